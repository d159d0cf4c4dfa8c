"""Device budgets (issue 20): every TFLite variant measured in the real TensorFlow Lite for Microcontrollers
interpreter (the tflite-micro package), and --target checks that fail exactly the variants that do not fit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from junitparser import JUnitXml

from conftest import export_in_process, require_shared_cifar


def test_every_tflite_variant_is_measured_in_tflite_micro(full_export):
    out, proc = full_export
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    int8 = rows["int8"]["micro"]
    assert int8["runs"] and int8["missing_ops"] == [] and "CONV_2D" in int8["ops"], int8
    # The arena the report gives is the one to allocate: TFLM allocates in exactly that many bytes, not one less.
    from tflite_micro import runtime

    model = (out / "int8.tflite").read_bytes()
    interp = runtime.Interpreter.from_bytes(model, arena_size=int8["arena_bytes"])
    interp.set_input(np.zeros((1, 32, 32, 3), np.uint8), 0)
    interp.invoke()
    with pytest.raises(RuntimeError):
        runtime.Interpreter.from_bytes(model, arena_size=int8["arena_bytes"] - 1)
    assert int8["arena_checked"] is True
    # float32 runs too, with a larger arena (float activations: four bytes each).
    assert rows["float32"]["micro"]["runs"] and rows["float32"]["micro"]["arena_bytes"] > 3 * int8["arena_bytes"]
    # Phone files do not run in TFLM, with the reason.
    assert not rows["dynamic"]["micro"]["runs"]
    assert rows["dynamic"]["micro"]["reason"].startswith("a dynamic-range (hybrid) file"), rows["dynamic"]["micro"]
    assert not rows["float16"]["micro"]["runs"]
    assert rows["float16"]["micro"]["reason"].startswith("float16 weights"), rows["float16"]["micro"]
    # The microcontroller build computes what was measured: TFLM's int8 kernels against LiteRT's on 300 images.
    for name in ("int8", "qat_int8"):
        m = rows[name]["micro"]
        assert m["samples"] == 300 and m["agreement_with_litert"] >= 0.97, m
        assert abs(m["accuracy"] - m["litert_accuracy"]) <= 0.03, m
    assert all("micro" not in r for r in report["variants"] if r["format"] == "onnx")
    # The app learns the arena to allocate from the variant's sidecar; the report shows the table.
    assert json.loads((out / "int8.tflite.json").read_text())["tflite_micro"]["arena_bytes"] == int8["arena_bytes"]
    assert "## On the device" in (out / "report.md").read_text()


def test_targets_fail_exactly_the_variants_that_do_not_fit(full_export, regression_run, tmp_path, cache_dir):
    """--target cortex-m4 --target phone, a board of the user's own (--targets-file) and a custom RAM budget 8 bytes
    under int8's measured arena, in one export."""
    arena = next(r for r in json.loads((full_export[0] / "report.json").read_text())["variants"]
                 if r["name"] == "int8")["micro"]["arena_bytes"]
    board = tmp_path / "boards.toml"
    board.write_text('[my-board]\ndescription = "our sensor board"\nruntime = "tflite_micro"\nram_kb = 64\n'
                     'flash_kb = 512\nbasis = "the board\'s datasheet"\n')
    out = tmp_path / "out"
    proc = export_in_process("export", [
        str(regression_run / "model.keras"), "--data", str(require_shared_cifar()), "--out", str(out),
        "--cache-dir", cache_dir, "--variants", "float32,dynamic,float16,int8", "--latency-runs", "20",
        "--target", "cortex-m4", "--target", "phone", "--target", "my-board", "--targets-file", str(board),
        "--ram-kb", str((arena - 8) / 1024), "--micro-samples", "50", "--junit", str(tmp_path / "gate.xml")])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    failed = {c["name"] for c in report["checks"] if c["kind"] == "target" and not c["passed"]}
    assert failed == {"float32 on cortex-m4", "dynamic on cortex-m4", "float16 on cortex-m4",
                      "float32 on my-board", "dynamic on my-board", "float16 on my-board",
                      "float32 on custom", "dynamic on custom", "float16 on custom", "int8 on custom"}, failed
    fails = [ln for ln in proc.stderr.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == len(failed), proc.stderr
    assert any(ln.startswith("FAIL float32 on cortex-m4: file ") and ln.endswith("> flash 1024 KB") for ln in fails), fails
    checks = {c["name"]: c for c in report["checks"] if c["kind"] == "target"}
    custom = checks["int8 on custom"]
    assert custom["ram_left_bytes"] == -8 and f"arena {arena / 1024:,.1f} KB ({arena:,} B) > RAM" in custom["why"], custom
    assert checks["int8 on cortex-m4"]["ram_left_bytes"] == 256 * 1024 - arena
    assert all(checks[f"{v} on phone"]["passed"] for v in ("float32", "dynamic", "float16", "int8"))
    # Every variant's build passed: only the device checks fail, and they reach CI's formats.
    assert report["failed"] == [] and set(report["failed_checks"]) == failed
    cases = {(c.classname, c.name): c for suite in JUnitXml.fromfile(str(tmp_path / "gate.xml")) for c in suite}
    assert not cases[("export.target", "int8 on cortex-m4")].result
    assert cases[("export.target", "int8 on custom")].result[0].message == custom["why"]
    sidecar = json.loads((out / "int8.tflite.json").read_text())
    assert sidecar["targets"]["cortex-m4"]["fits"] and not sidecar["targets"]["custom"]["fits"]
    md = (out / "report.md").read_text()
    assert "### cortex-m4: Arm Cortex-M4F" in md and "### my-board: our sensor board" in md


def test_every_missing_op_is_named(tmp_path):
    """TFLM's resolver names only the first op it lacks; export.tflite.micro names them all, in a real process."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
    def f(x):
        return tf.reduce_prod(tf.nn.gelu(x, approximate=False), axis=1)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    (tmp_path / "m.tflite").write_bytes(conv.convert())
    proc = subprocess.run([sys.executable, "-m", "export.tflite.micro", str(tmp_path / "m.tflite")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert sorted(result["missing_ops"]) == ["GELU", "REDUCE_PROD"] and not result["runs"], result
    assert result["reason"] == f"TFLite Micro has no kernel for {', '.join(result['missing_ops'])}"


@pytest.mark.parametrize("args, message", [
    (["--target", "mars"], "error: --target: unknown target(s) mars; choose from cortex-m4, cortex-m7, esp32-s3, phone"),
    (["--ram-kb", "0"], "error: ram_kb: must be > 0 KB, got 0.0"),
    (["--micro-samples", "-1"], "error: micro_samples: must be >= 0, got -1"),
])
def test_bad_target_options_are_one_line(args, message, tmp_path):
    proc = export_in_process("export", [str(tmp_path / "model.keras"), *args])
    assert proc.returncode == 2 and proc.stderr.startswith(message) and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_bad_targets_file_is_named(tmp_path):
    f = tmp_path / "boards.toml"
    f.write_text('[b]\nruntime = "tflite_micro"\nram_kb = "lots"\n')
    proc = export_in_process("export", [str(tmp_path / "model.keras"), "--targets-file", str(f), "--target", "b"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: --targets-file {f}: [b] ram_kb must be a positive number of KB, got 'lots'"
