"""Device targets: named RAM and flash budgets with the runtime that runs the model there (``targets.toml``, which
users extend with ``--targets-file``), and the checks that each TFLite variant fits and runs on each target.

A TFLite Micro target (a microcontroller) takes a variant that runs in TFLM (export.tflite.micro), whose measured tensor
arena fits its RAM and whose file fits its flash. A LiteRT target (a phone) takes every built .tflite whose file
fits its flash; ops outside the GPU delegate are named, not failed (LiteRT runs them on the CPU). ONNX files go to
neither.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from export.errors import ExportInputError

PROFILES = Path(__file__).with_name("targets.toml")
RUNTIMES = ("tflite_micro", "litert")
# The builtin ops LiteRT's GPU delegate takes: the cases of NewOperationParser in
# tensorflow/lite/delegates/gpu/common/model_builder.cc (quantize/dequantize with quantised models). The
# model analyzer's own GPU check is deprecated and passes every model (tensorflow/tensorflow#77042).
GPU_DELEGATE_OPS = frozenset(
    "ABS ADD AVERAGE_POOL_2D BATCH_MATMUL CONCATENATION CONV_2D COS DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EXP "
    "FULLY_CONNECTED HARD_SWISH LOGISTIC LOG LSTM MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG PACK PAD POW "
    "REDUCE_MAX REDUCE_MIN REDUCE_PROD QUANTIZE RELU RELU6 LEAKY_RELU PRELU RESHAPE RESIZE_BILINEAR "
    "RESIZE_NEAREST_NEIGHBOR RSQRT SIN SLICE SOFTMAX SPACE_TO_DEPTH SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE "
    "STRIDED_SLICE SUB SUM TANH TRANSPOSE TRANSPOSE_CONV".split())


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str
    ram_kb: Optional[float] = None
    flash_kb: Optional[float] = None
    description: str = ""
    basis: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def load_profiles(targets_file: Optional[str] = None) -> dict[str, Target]:
    """The built-in profiles, with ``targets_file``'s added (a table of the same name replaces one)."""
    profiles = _read(PROFILES)
    if targets_file:
        profiles.update(_read(Path(targets_file), "--targets-file"))
    return profiles


def resolve_targets(names, targets_file: Optional[str] = None, ram_kb: Optional[float] = None,
                    flash_kb: Optional[float] = None) -> list[Target]:
    """The targets asked for: each ``--target`` name, and "custom" when a budget is given on the command line."""
    profiles = load_profiles(targets_file) if (names or targets_file) else {}
    unknown = [n for n in names if n not in profiles]
    if unknown:
        raise ExportInputError(f"--target: unknown target(s) {', '.join(unknown)}; choose from "
                               f"{', '.join(profiles)} or give --ram-kb/--flash-kb (add boards with --targets-file)")
    out = [profiles[n] for n in dict.fromkeys(names)]
    if ram_kb is not None or flash_kb is not None:
        out.append(_target("custom", {"runtime": "tflite_micro", "ram_kb": ram_kb, "flash_kb": flash_kb,
                                      "description": "the budget given on the command line",
                                      "basis": "--ram-kb / --flash-kb"}, "--ram-kb/--flash-kb"))
    return out


def fit(target: Target, result, micro: Optional[dict]) -> Optional[dict]:
    """Whether the built variant ``result`` (export.results.VariantResult) fits and runs on ``target``, with the
    figures (``micro``: what TFLite Micro measured of it, export.tflite.micro); None when the target does not take
    its format."""
    if not result.ok or result.format != "tflite":
        return None
    micro = micro or {}
    flash = int(result.size_bytes)
    if target.runtime == "tflite_micro":
        runs, arena, reason = bool(micro.get("runs")), micro.get("arena_bytes"), micro.get("reason")
        missing = list(micro.get("missing_ops") or [])
    else:
        runs, arena, reason = True, None, None
        missing = [op for op in micro.get("ops") or [] if op not in GPU_DELEGATE_OPS]
    ram_left = _left(target.ram_kb, arena)
    flash_left = _left(target.flash_kb, flash)
    problems = [] if runs else [f"does not run in TFLite Micro: {reason}"]
    if ram_left is not None and ram_left < 0:
        problems.append(f"arena {_kb(arena)} > RAM {target.ram_kb:g} KB")
    if flash_left is not None and flash_left < 0:
        problems.append(f"file {_kb(flash)} > flash {target.flash_kb:g} KB")
    figures = ", ".join(x for x in (
        f"arena {_kb(arena)} of {target.ram_kb:g} KB RAM" if arena is not None and target.ram_kb else
        f"arena {_kb(arena)}" if arena is not None else "",
        f"file {_kb(flash)} of {target.flash_kb:g} KB flash" if target.flash_kb else f"file {_kb(flash)}") if x)
    return {"target": target.name, "variant": result.name, "runtime": target.runtime, "fits": not problems,
            "runs": runs, "arena_bytes": arena, "flash_bytes": flash, "ram_left_bytes": ram_left,
            "flash_left_bytes": flash_left, "missing_ops": missing,
            "why": "; ".join(problems) if problems else f"fits: {figures}"}


def target_checks(results: list, micro: dict[str, dict], targets: list[Target]) -> list[dict]:
    """One ``target`` check per (target, TFLite variant): export.gate.checks' form, so JUnit and the verdict
    (export.gate.verdict) count them."""
    out = []
    for t in targets:
        for r in results:
            f = fit(t, r, micro.get(r.name))
            if f is not None:
                out.append({"kind": "target", "name": f"{r.name} on {t.name}", "passed": f["fits"],
                            "why": f["why"], "variant": r.name, **f})
    return out


def render_targets(report: dict) -> list[str]:
    """report.md's device section: what TFLite Micro measured of each variant, then a table per target."""
    rows = [r for r in report["variants"] if r.get("micro")]
    if not rows:
        return []
    lines = ["", "## On the device", "", "Measured in TensorFlow Lite for Microcontrollers (its reference kernels, "
             "on this machine): the tensor arena each variant needs, and its top-1 on the first test images "
             "against LiteRT's.", "",
             "| variant | runs in TFLM | arena (KB) | flash (KB) | TFLM accuracy | agreement with LiteRT | ops |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        m = r["micro"]
        runs = "yes" if m.get("runs") else f"no: {_cell(m.get('reason'))}"
        sample = (f"{m['accuracy'] * 100:.2f}% (LiteRT {m['litert_accuracy'] * 100:.2f}%) | "
                  f"{m['agreement_with_litert'] * 100:.2f}% of {m['samples']}") if "accuracy" in m else " | "
        lines.append(f"| {r['name']} | {runs} | {_kbn(m.get('arena_bytes'))} | {_kbn(r['size_bytes'])} | {sample} | "
                     f"{', '.join(m.get('ops') or [])} |")
    for t in report.get("targets", []):
        fits = [c for c in report.get("checks", []) if c["kind"] == "target" and c["target"] == t["name"]]
        lines += ["", f"### {t['name']}: {t['description']}", "",
                  f"Budget: {_budget(t)}; runtime {t['runtime']}. Based on: {t['basis']}.", "",
                  "| variant | fits | arena (KB) | RAM left (KB) | flash (KB) | flash left (KB) | "
                  + ("ops outside the GPU delegate |" if t["runtime"] == "litert" else "missing ops |"),
                  "|---|---|---:|---:|---:|---:|---|"]
        for c in fits:
            lines.append(f"| {c['variant']} | {'yes' if c['passed'] else '**no**: ' + _cell(c['why'])} | "
                         f"{_kbn(c['arena_bytes'])} | {_kbn(c['ram_left_bytes'])} | {_kbn(c['flash_bytes'])} | "
                         f"{_kbn(c['flash_left_bytes'])} | {', '.join(c['missing_ops']) or 'none'} |")
    return lines


def _cell(text) -> str:
    return str(text).replace("|", "\\|")  # a table cell: TFLM's messages quote C++ (||)


def _read(path: Path, what: str = "targets") -> dict[str, Target]:
    try:
        with open(path, "rb") as f:
            tables = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ExportInputError(f"{what} {path}: {e}") from None
    return {name: _target(name, t, f"{what} {path}") for name, t in tables.items()}


def _target(name: str, t, where: str) -> Target:
    if not isinstance(t, dict):
        raise ExportInputError(f"{where}: [{name}] must be a table")
    unknown = set(t) - {"runtime", "ram_kb", "flash_kb", "description", "basis"}
    if unknown:
        raise ExportInputError(f"{where}: [{name}] has unknown key(s) {', '.join(sorted(unknown))}")
    if t.get("runtime") not in RUNTIMES:
        raise ExportInputError(f"{where}: [{name}] runtime must be one of {', '.join(RUNTIMES)}, got {t.get('runtime')!r}")
    for key in ("ram_kb", "flash_kb"):
        v = t.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ExportInputError(f"{where}: [{name}] {key} must be a positive number of KB, got {v!r}")
    return Target(name, t["runtime"], t.get("ram_kb"), t.get("flash_kb"), t.get("description", ""), t.get("basis", ""))


def _left(budget_kb: Optional[float], used: Optional[int]) -> Optional[int]:
    return None if budget_kb is None or used is None else int(budget_kb * 1024) - int(used)


def _kb(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1024:,.1f} KB ({n:,} B)"


def _kbn(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 1024:,.1f}"


def _budget(t: dict) -> str:
    parts = [f"RAM {t['ram_kb']:g} KB" if t.get("ram_kb") else "", f"flash {t['flash_kb']:g} KB" if t.get("flash_kb") else ""]
    return ", ".join(p for p in parts if p) or "none"
