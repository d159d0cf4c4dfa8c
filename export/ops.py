"""What a .tflite file runs, and where: its ops, those computed in float, and those LiteRT's default
CPU delegate (XNNPACK) does not take, read from the interpreter after it applied the delegate.

Why an int8 file can be slower than float32 at batch 1: LiteRT hands the ops XNNPACK supports to it, in
partitions, and runs the rest with its built-in kernels, some of them reference kernels for int8; an op
left in float inside a quantised model costs a DEQUANTIZE and a QUANTIZE around it. :func:`speed_note`
says which, for a variant measured slower than float32.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

# Ops that move between float and int8: counted apart, not as ops "computed in float".
CASTS = ("QUANTIZE", "DEQUANTIZE")


def _delegated(ops: list[dict]) -> set[int]:
    """Indices of the ops inside a DELEGATE node's partition: every op reached backwards from the
    delegate's outputs without crossing its inputs."""
    producer = {t: i for i, op in enumerate(ops) if op["op_name"] != "DELEGATE" for t in op["outputs"]}
    inside: set[int] = set()
    for op in ops:
        if op["op_name"] != "DELEGATE":
            continue
        boundary = set(op["inputs"])
        stack = list(op["outputs"])
        while stack:
            t = stack.pop()
            i = producer.get(t)
            if t in boundary or i is None or i in inside:
                continue
            inside.add(i)
            stack.extend(ops[i]["inputs"])
    return inside


def tflite_ops(path: Optional[str] = None, content: Optional[bytes] = None) -> dict:
    """{"ops": {op: count}, "float_ops": {op: count} (ops reading a float32 tensor, casts aside), "int8_ops": {op:
    count} (ops writing an integer activation: what a denylist can keep in float), "casts": number of QUANTIZE/DEQUANTIZE ops, "not_delegated": {op: count}} of the file at ``path`` (or its
    bytes, ``content``) in LiteRT with its default delegates, one thread."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=None if path is None else str(path), model_content=content, num_threads=1)
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    dtype = {t["index"]: t["dtype"].__name__ for t in interp.get_tensor_details()}
    inside = _delegated(ops)
    plain = [(i, op) for i, op in enumerate(ops) if op["op_name"] != "DELEGATE"]

    def first_input(op) -> Optional[str]:
        return next((dtype.get(t) for t in op["inputs"] if t >= 0), None)

    def first_output(op) -> Optional[str]:
        return next((dtype.get(t) for t in op["outputs"] if t >= 0), None)

    return {
        "ops": dict(Counter(op["op_name"] for _, op in plain)),
        "float_ops": dict(Counter(op["op_name"] for _, op in plain
                                  if op["op_name"] not in CASTS and first_input(op) == "float32")),
        "int8_ops": dict(Counter(op["op_name"] for _, op in plain
                                 if op["op_name"] not in CASTS and first_output(op) in ("int8", "uint8", "int16"))),
        "casts": sum(1 for _, op in plain if op["op_name"] in CASTS),
        "not_delegated": dict(Counter(op["op_name"] for i, op in plain if i not in inside)),
    }


# ONNX ops that only move or reshape values (int8 or float alike): counted apart from the ops computed in float.
ONNX_LAYOUT = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Gather", "Shape", "Slice",
               "Cast", "Identity")
ONNX_CASTS = ("QuantizeLinear", "DequantizeLinear")


def onnx_ops(path: str) -> dict:
    """{"ops": {op: count}, "float_ops": {op: count} (ops reading a DequantizeLinear's float output: computed in
    float between a DequantizeLinear and a QuantizeLinear), "casts": number of those, "transposes": number of
    Transpose ops} of the graph ONNX Runtime runs for ``path`` (CPU, after its optimisations: the QDQ pairs it could
    fuse into int8 kernels are gone), read from the optimised model it writes."""
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 1, 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        nodes = list(onnx.load(opts.optimized_model_filepath).graph.node)
    dequantized = {t for n in nodes if n.op_type == "DequantizeLinear" for t in n.output}
    return {"ops": dict(Counter(n.op_type for n in nodes)),
            "float_ops": dict(Counter(n.op_type for n in nodes if n.op_type not in ONNX_CASTS + ONNX_LAYOUT
                                      and any(t in dequantized for t in n.input))),
            "casts": sum(1 for n in nodes if n.op_type in ONNX_CASTS),
            "transposes": sum(1 for n in nodes if n.op_type == "Transpose")}


# Slower means by more than a tenth: batch-1 medians of the same file differ by a few percent between runs.
SLOWER = 1.1
QUANTISED = ("dynamic", "float16", "int8", "int8_selective", "qat_int8")


def _counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))


def speed_notes(results: list) -> dict:
    """{variant: note} for each quantised TFLite variant slower than float32.tflite at batch 1 (p50), and onnx_int8
    slower than onnx_float32, with the ops responsible; {} when none is, or the float file was not built.
    ``results``: export.results.VariantResult."""
    ok = {r.name: r for r in results if r.ok}
    p50 = {name: r.measured.latency_ms_p50 for name, r in ok.items()}
    notes = {}
    if "float32" in ok:
        base_ops = tflite_ops(ok["float32"].path)
        speed = ok["int8_selective"].details.get("speed") if "int8_selective" in ok else None
        for name in QUANTISED:
            if name in ok and p50[name] > SLOWER * p50["float32"]:
                notes[name] = _note(name, "float32", p50, tflite_why(name, tflite_ops(ok[name].path), base_ops, speed))
    if "onnx_int8" in ok and "onnx_float32" in ok and p50["onnx_int8"] > SLOWER * p50["onnx_float32"]:
        notes["onnx_int8"] = _note("onnx_int8", "onnx_float32", p50, onnx_why(
            onnx_ops(ok["onnx_int8"].path), onnx_ops(ok["onnx_float32"].path)))
    return notes


def _note(name: str, base: str, p50: dict, why: list[str]) -> dict:
    ms, base_ms = p50[name], p50[base]
    return {"latency_ms_p50": ms, f"{base}_latency_ms_p50": base_ms, "ratio": ms / base_ms, "why": why,
            "text": (f"`{name}` is slower than {base} at batch 1 ({ms:.3f} vs {base_ms:.3f} ms, "
                     f"{ms / base_ms:.2f}x): " + "; ".join(why) + ".")}


def tflite_why(name: str, ops: dict, base_ops: dict, selective_speed: Optional[dict]) -> list[str]:
    """Why a TFLite variant is slower than float32: what it leaves to LiteRT's built-in kernels beyond what float32
    already does, what it computes in float between casts, and the faster int8_selective when there is one."""
    extra = Counter(ops["not_delegated"])
    extra.subtract(Counter(base_ops["not_delegated"]))
    extra = {k: v for k, v in extra.items() if v > 0}
    why = []
    if extra:
        why.append(f"ops run outside LiteRT's XNNPACK delegate (built-in kernels): {_counts(extra)}")
    if ops["float_ops"] and name not in ("dynamic", "float16"):
        why.append(f"ops computed in float between {ops['casts']} QUANTIZE/DEQUANTIZE ops: {_counts(ops['float_ops'])}")
    if not why:
        why.append("every op runs in the XNNPACK delegate, as float32's do: its quantised kernels themselves are "
                   "slower on this CPU at batch 1")
    fast = selective_speed or {}  # int8_selective's speed step (export.tflite.fast_int8)
    if fast.get("kept") and name != "int8_selective":
        why.append(f"`int8_selective` keeps {', '.join(fast['float_op_types'])} in float: "
                   f"{fast['ratio_vs_float32']:.2f}x float32, timed side by side")
    return why


def onnx_why(ops: dict, base_ops: dict) -> list[str]:
    """Why onnx_int8 is slower than onnx_float32 in ONNX Runtime: ops left in float between QDQ pairs it could not
    fuse, and layout transposes its int8 kernels need that the float graph does not."""
    why = []
    if ops["float_ops"]:
        why.append(f"ops computed in float between {ops['casts']} QuantizeLinear/DequantizeLinear ops: "
                   f"{_counts(ops['float_ops'])}")
    if ops["transposes"] > base_ops["transposes"]:
        why.append(f"{ops['transposes']} Transpose ops around ONNX Runtime's int8 kernels (onnx_float32: "
                   f"{base_ops['transposes']})")
    if not why:
        why.append("every op runs in ONNX Runtime's int8 kernels: they themselves are slower on this CPU at batch 1")
    return why


def fastest_within_gate(results: list, verdict) -> Optional[str]:
    """The TFLite variant the verdict (export.gate.verdict) passed with the lowest p50 latency at batch 1 (None if
    none passed)."""
    ok = [r for r in results if r.ok and r.format == "tflite" and verdict.of(r.name).passed]
    return min(ok, key=lambda r: r.measured.latency_ms_p50).name if ok else None
