"""Measure a .tflite file in TensorFlow Lite for Microcontrollers: the real interpreter (the ``tflite-micro``
package, TFLM's reference kernels and its all-ops resolver), run on this machine.

For each file: the ops it uses, those TFLM has no kernel for (every one, not only the first), whether it
allocates and runs (and if not, TFLM's own reason, one line), the tensor arena it needs (TFLM's recording
allocator, then checked: the file allocates in exactly that many bytes and not in one byte less), and its top-1
on sample images, to compare with LiteRT's.

Each file is measured in a child process (``python -m export.tflite.micro``): TFLM prints its errors from C++ on the
process's stderr, and a crash or hang in its kernels costs that one measurement, never the export.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROBE_ARENA = 16 * 1024 * 1024  # large enough for any model a microcontroller could hold; the need is recorded
_STAND_IN = 0  # BuiltinOperator ADD: what a missing op is renamed to, to find the next missing one


def measure_micro(path, images: str | None = None, timeout: float = 600.0) -> dict:
    """What TFLM says of the .tflite at ``path`` (see probe); the raw uint8 images (N, H, W, C) in the .npy file
    ``images`` are run one by one for their output scores. A child that crashes or hangs gives
    ``{"runs": False, "reason": ...}``."""
    with tempfile.TemporaryDirectory(prefix="micro-") as tmp:
        cmd = [sys.executable, "-m", "export.tflite.micro", str(path), "--out", os.path.join(tmp, "result.json")]
        if images:
            cmd += ["--images", str(images)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"runs": False, "reason": f"TFLite Micro did not finish within {timeout:g} s"}
        result = Path(tmp, "result.json")
        if proc.returncode != 0 or not result.exists():
            tail = " ".join(proc.stderr.split())[-300:]
            return {"runs": False, "reason": f"TFLite Micro's process exited with status {proc.returncode}: {tail}"}
        return json.loads(result.read_text())


def measure_variants(results: list, x_test, y_test, preds: dict, samples: int, timeout: float,
                     output_kind: str, log=print) -> dict[str, dict]:
    """{variant: TFLM's figures} for each built .tflite (export.results.VariantResult); for the integer ones (what a microcontroller runs:
    integer input, or no op computing in float behind float input and output, as 16-bit activations), on the first
    ``samples`` test images, its accuracy in TFLM and its top-1 agreement with LiteRT's (``preds``:
    each variant's LiteRT top-1 on the test split): TFLM's integer kernels round differently from LiteRT's. The
    outputs become classes as the export's own (export.model.predictions.class_predictions: probabilities, logits, one
    sigmoid unit)."""
    from export.ops import tflite_ops
    from export.model.predictions import class_predictions

    n = min(int(samples), len(x_test))
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="micro-images-") as tmp:
        images = os.path.join(tmp, "images.npy")
        np.save(images, np.ascontiguousarray(x_test[:n]))  # once, for every variant
        for r in results:
            if not r.ok or r.format != "tflite":
                continue
            integer = np.dtype(r.measured.input["dtype"]).kind in "iu" or not tflite_ops(r.path)["float_ops"]
            m = measure_micro(r.path, images if n and integer else None, timeout)
            scores = m.pop("scores", None)
            if scores is not None and r.name in preds:
                top1 = class_predictions(np.asarray(scores, np.float32), output_kind)
                litert, y = preds[r.name][:n], np.asarray(y_test[:n])
                m.update(samples=n, accuracy=float(np.mean(top1 == y)), litert_accuracy=float(np.mean(litert == y)),
                         agreement_with_litert=float(np.mean(top1 == litert)))
            out[r.name] = m
            log(f"  {r.name:<14} TFLite Micro: " + (
                f"arena {m['arena_bytes']:,} B" + (f", agrees with LiteRT on {m['agreement_with_litert']:.1%} of {n}"
                                                   if "samples" in m else "")
                if m.get("runs") else f"does not run: {m.get('reason')}"))
    return out


def probe(model: bytes, images=None) -> dict:
    """{"ops", "missing_ops", "runs", "reason", "arena_bytes", "input", "scores"} of one model, in this process."""
    ops = op_names(model)
    missing = missing_ops(model)
    out = {"ops": ops, "missing_ops": missing, "runs": False, "reason": None, "arena_bytes": None}
    if missing:
        out["reason"] = f"TFLite Micro has no kernel for {', '.join(missing)}"
        return out
    interp, log = _allocate(model, PROBE_ARENA)
    if interp is None:
        out["reason"] = _reason(log)
        return out
    d = interp.get_input_details(0)
    try:
        _, log = _captured(lambda: (interp.set_input(np.zeros(d["shape"], d["dtype"]), 0), interp.invoke(),
                                    interp.print_allocations()))
    except RuntimeError:
        out["reason"] = _reason(log)
        return out
    total = re.search(r"Arena allocation total (\d+) bytes", log)
    arena = int(total.group(1)) if total else None
    if arena is not None:
        # The recorded figure is the one to allocate: it must allocate, and one byte less must not.
        exact, _ = _allocate(model, arena)
        short, _ = _allocate(model, arena - 1)
        out["arena_checked"] = exact is not None and short is None
    out.update(runs=True, arena_bytes=arena, input=_spec(d).to_dict())
    if images is not None:
        out["scores"] = run_images(interp, images).tolist()
    return out


def run_images(interp, x_uint8: np.ndarray) -> np.ndarray:
    """The float output of each image, one invocation each (a microcontroller runs batch 1), raw pixels quantised
    and outputs dequantised as the runtime wrappers do (export.runtime)."""
    from export.runtime import dequantize, quantize

    spec_in, spec_out = _spec(interp.get_input_details(0)), _spec(interp.get_output_details(0))
    out = []
    for img in x_uint8:
        interp.set_input(quantize(img[None], spec_in).reshape(spec_in.shape), 0)
        interp.invoke()
        out.append(dequantize(interp.get_output(0), spec_out).reshape(-1))
    return np.stack(out)


def op_names(model: bytes) -> list[str]:
    """The op of every operator in the model's subgraphs, in first-use order (custom ops by their name)."""
    m = _model_object(model)
    codes, names = m.operatorCodes or [], []
    for sg in m.subgraphs or []:
        for op in sg.operators or []:
            name = _code_name(codes[op.opcodeIndex])
            if name not in names:
                names.append(name)
    return names


def missing_ops(model: bytes, limit: int = 64) -> list[str]:
    """Every op TFLM's resolver has no kernel for. TFLM names only the first; that op is renamed to one it has
    and the model resolved again, until all resolve (kernels are looked up for every op before any is run)."""
    from tflite_micro.python.tflite_micro import runtime

    m, missing, blob = None, [], model
    for _ in range(limit):
        _, log = _captured(lambda: _try(runtime, blob))
        found = re.search(r"Didn't find op for (?:builtin|custom) opcode '([^']+)'", log)
        if not found:
            return missing
        missing.append(found.group(1))
        m = m or _model_object(model)
        for code in m.operatorCodes:
            if _code_name(code) == found.group(1):
                code.builtinCode, code.deprecatedBuiltinCode, code.customCode = _STAND_IN, _STAND_IN, None
        blob = _pack(m)
    return missing


def _try(runtime, blob: bytes):
    try:
        return runtime.Interpreter.from_bytes(blob, arena_size=PROBE_ARENA)
    except RuntimeError:
        return None


def _allocate(model: bytes, arena: int):
    from tflite_micro.python.tflite_micro import runtime

    def make():
        try:
            return runtime.Interpreter.from_bytes(model, arena_size=arena)
        except RuntimeError:
            return None

    return _captured(make)


def _captured(fn):
    """(fn(), what C++ printed on stderr meanwhile): TFLM reports through the process's file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            value = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return value, f.read().decode(errors="replace")


# TFLM's checks that fail on files made for phones, in words a user acts on (TFLM's own follow in brackets).
_KNOWN = ((re.compile(r"Hybrid models are not supported"),
           "a dynamic-range (hybrid) file: TFLite Micro has no kernels for float activations with int8 weights"),
          (re.compile(r"Node DEQUANTIZE .*failed to prepare"),
           "float16 weights: TFLite Micro's DEQUANTIZE takes only int8, int16 and uint8 tensors"))


def _reason(log: str) -> str:
    """Why TFLM refused the file, one line: a known cause in words, then TFLM's own (the node it stopped at)."""
    lines = [re.sub(r"^tensorflow/\S+\.cc(:\d+)?\s+", "", ln.strip()) for ln in log.splitlines()
             if ln.strip() and not ln.startswith("[RecordingMicroAllocator]")]
    own = "; ".join(lines[:3]) or "TFLite Micro failed to allocate the tensors"
    for pattern, words in _KNOWN:
        if pattern.search(log):
            node = next((ln for ln in lines if ln.startswith("Node ")), own)
            return f"{words} (TFLM: {node})"
    return own


def _spec(d: dict):
    """A TFLM tensor's details as export.runtime's TensorSpec."""
    from export.runtime import TensorSpec

    q = d.get("quantization_parameters") or {}
    scales = [float(v) for v in q.get("scales", [])]
    quantized = np.dtype(d["dtype"]).kind in "iu" and bool(scales) and scales[0] != 0
    return TensorSpec(d.get("name", ""), np.dtype(d["dtype"]).name, [int(v) for v in d["shape"]],
                      scales[0] if quantized else None, int(q["zero_points"][0]) if quantized else None)


def _model_object(model: bytes):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.convert_bytearray_to_object(bytearray(model))


def _code_name(code) -> str:
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    value = max(code.builtinCode, code.deprecatedBuiltinCode)
    if value == schema.BuiltinOperator.CUSTOM:
        return (code.customCode or b"CUSTOM").decode() if isinstance(code.customCode, bytes) else str(code.customCode)
    return _builtin_names().get(value, str(value))


@functools.lru_cache(maxsize=1)
def _builtin_names() -> dict:
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _pack(m) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m export.tflite.micro",
                                description="Measure a .tflite file in TensorFlow Lite for Microcontrollers.")
    p.add_argument("model", help=".tflite file")
    p.add_argument("--images", default=None, help=".npy of raw uint8 images (N, H, W, C) to run")
    p.add_argument("--out", default=None, help="write the result here as JSON (default: print it)")
    args = p.parse_args(argv)
    try:
        model = Path(args.model).read_bytes()
    except OSError as e:
        print(f"error: {args.model}: {e.strerror}", file=sys.stderr)
        return 2
    result = probe(model, np.load(args.images) if args.images else None)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
