"""MLPerf Tiny's ResNet-8 (toolkit.models.resnet8) to a microcontroller: its int8 file and its tensor arena, measured
in TensorFlow Lite for Microcontrollers, fit the budgets a Cortex-M class board gives it. (Its accuracy at full
training, 85.1% int8, is benchmarks/results/resnet8_b128.md's; here, briefly trained on the tiny colour tree.)"""

from __future__ import annotations

import json

from conftest import export_in_process

FLASH_KB, RAM_KB = 100, 96  # the budgets: 92 KB file and a 54.9 KB arena measured at full training


def test_resnet8_exports_within_a_microcontrollers_budget(tmp_path, tiny_tree_tgz, cache_dir):
    from toolkit.data import load_dataset
    from toolkit.models import compile_model, make_model
    from toolkit.tf import import_keras, save_model

    keras = import_keras()
    keras.utils.set_random_seed(0)
    ds = load_dataset(str(tiny_tree_tgz), cache_dir)
    model = make_model("resnet8", (32, 32, 3), 10)
    compile_model(model, 1e-3)
    model.fit(ds.x_train, keras.utils.to_categorical(ds.y_train, 10), epochs=3, batch_size=32, verbose=0)
    path = tmp_path / "resnet8.keras"
    save_model(model, str(path))
    out = tmp_path / "out"
    proc = export_in_process("export", [str(path), "--data", str(tiny_tree_tgz), "--out", str(out), "--cache-dir",
                                        cache_dir, "--variants", "int8", "--latency-runs", "5", "--micro-samples", "50",
                                        "--ram-kb", str(RAM_KB), "--flash-kb", str(FLASH_KB)])
    report = json.loads((out / "report.json").read_text())
    int8 = report["variants"][0]
    assert int8["status"] == "ok", (int8.get("reason"), proc.stdout[-2000:])
    micro = int8["micro"]
    # It runs in TFLite Micro, every op has a kernel there, and it computes what LiteRT does.
    assert micro["runs"] and micro["missing_ops"] == [], micro
    assert micro["samples"] == 50 and micro["agreement_with_litert"] >= 0.9, micro
    assert int8["size_bytes"] <= FLASH_KB * 1024 and micro["arena_bytes"] <= RAM_KB * 1024, (int8["size_bytes"], micro)
    # The export's own device check agrees (the custom target of --ram-kb and --flash-kb).
    (check,) = [c for c in report["checks"] if c["kind"] == "target"]
    assert check["name"] == "int8 on custom" and check["passed"], check
    assert check["ram_left_bytes"] == RAM_KB * 1024 - micro["arena_bytes"], check
