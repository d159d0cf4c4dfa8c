"""The export report: report.json's content (the one place results become rows), the verdict printed (decided in
export.gate.verdict), a Markdown table for pull requests, and an accuracy-vs-size plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from export.ops import fastest_within_gate, speed_notes
from export.gate.targets import render_targets
from toolkit.files import git_revision, write_json, write_text
from toolkit.plots import pyplot, save_figure
from toolkit.tfmot import WORDS


# What each variant's sidecar says of each target: enough for the app to size its arena.
_SIDECAR_FIT = ("fits", "runs", "arena_bytes", "flash_bytes", "ram_left_bytes", "flash_left_bytes", "missing_ops", "why")


def render_markdown(report: dict) -> str:
    verdict = "PASSED" if report["passed"] else f"FAILED ({', '.join(report['failed'])})"
    lines = [
        f"# Edge export report: {verdict}",
        "",
        f"Float Keras model: top-1 accuracy **{report['float_accuracy'] * 100:.2f}%** on "
        f"{report['num_test_images']:,} test images; allowed drop {report['max_drop_pp']:.2f} points.",
        "",
        "| variant | format | size (KB) | vs float32 .tflite | accuracy | drop (pp) | agreement | "
        "p50 (ms) | p90 (ms) | img/s @batch | gate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["variants"]:
        if r["status"] != "ok":
            word = "**FAILED**" if r["status"] == "failed" else "skipped"
            lines.append(f"| {r['name']} | {r['format']} | {word}: {r['reason']} |" + " |" * 7
                         + f" {'pass' if r['passed'] else '**FAIL**'} |")
            continue
        ratio = r.get("size_ratio_vs_float32_tflite")
        lines.append(
            f"| {r['name']}{' (' + r['route'] + ')' if r.get('route') else ''} | {r['format']} | "
            f"{r['size_bytes'] / 1024:,.0f} | {f'{ratio:.2f}x' if ratio else 'n/a'} | {r['accuracy'] * 100:.2f}% | "
            f"{r['drop_pp']:+.2f} | {r['agreement'] * 100:.2f}% | {r['latency_ms_p50']:.3f} | "
            f"{r['latency_ms_p90']:.3f} | {r['throughput_images_per_s']:,.0f} @{r['throughput_batch']} | "
            f"{'pass' if r['passed'] else '**FAIL**'} |"
        )
    info = report.get("model_info", {})
    if info:
        lines[2:2] = [f"Model: {info['format']}" + (f" saved by Keras {info['keras']}" if info.get("keras") else "")
                      + f", input {'x'.join(map(str, info['input_shape']))}, output: {info['output_kind']}"
                      + (" (apply softmax on the device for probabilities)" if info["output_kind"] == "logits" else "")
                      + ".", ""]
    lines += variant_notes(report)
    notes = [r["speed_note"]["text"] for r in report["variants"] if r.get("speed_note")]
    if notes:
        lines += ["", "**Slower than the float file at batch 1:** " + " ".join(notes)]
    if report.get("fastest_within_gate"):
        lines += ["", f"Fastest TFLite variant within the gate at batch 1: `{report['fastest_within_gate']}`."]
    lines += ["", "Latency: batch 1, one thread, median and 90th percentile of "
              f"{report['config']['latency_runs']} runs after warm-up; TFLite in LiteRT, ONNX in ONNX Runtime (CPU).",
              "Drop: float accuracy minus variant accuracy, in percentage points. Agreement: share of test images "
              "where the variant's top-1 class equals the float model's.", ""]
    lines += render_targets(report)
    return "\n".join(lines)


def variant_notes(report: dict) -> list[str]:
    """The report's paragraphs on how variants were built: onnx_int8's routes, QAT's scheme, int8_selective's float
    tensors and op types."""
    lines: list[str] = []
    cands = [r for r in report["variants"] if r.get("candidates")]
    for r in cands:
        lines += ["", f"`{r['name']}` was built two ways and the more accurate kept (`{r['route']}`): "
                  + "; ".join(f"{k}: {v['accuracy'] * 100:.2f}%, p50 {v['latency_ms_p50']:.3f} ms" if "error" not in v
                              else f"{k}: failed ({v['error']})" for k, v in r["candidates"].items()) + "."]
    given = report.get("model_info", {}).get("tfmot")
    if given:
        figures = "; ".join(f"{name} {', '.join(f'{k} {v}' for k, v in fig.items())}".strip() for name, fig in
                            given["layers"].items())
        gzipped = ", ".join(f"`{r['name']}` {r['gzip_bytes'] / 1024:,.1f} KB" for r in report["variants"]
                            if "gzip_bytes" in r)
        lines += ["", f"The model as given was {WORDS[given['kind']]} by tfmot ({figures}); its wrappers were "
                  f"taken out before conversion. Sizes after gzip -9: {gzipped}."]
    for r in report["variants"]:
        if r.get("qat", {}).get("as_given"):
            lines += ["", f"`{r['name']}`: the quantisation-aware model as given, converted from the ranges it "
                      "learned (no fine-tuning here)."]
        elif r.get("qat"):
            q = r["qat"]
            lines += ["", f"`{r['name']}`: tfmot scheme `{q['scheme']}`, weights of {q['quantized_layers']} of {q['weighted_layers']} layers with kernels (convolution, Dense, attention) "
                      f"quantised, learning rate {q['learning_rate']:g}"
                      + (" after a diverged first try" if q["retried_after_divergence"] else "")
                      + ("; schemes that failed first: " + "; ".join(q["schemes_failed"]) if q["schemes_failed"]
                         else "") + "."]
        if r.get("float_tensors") and r["status"] == "ok":
            lines += ["", f"`{r['name']}` keeps {len(r['float_tensors'])} tensor(s) in float, chosen by "
                      f"quantisation error and re-measured on held-out training images: "
                      + ", ".join(f"`{t}`" for t in r.get("float_layers", r["float_tensors"])) + ". Input and output are float32."]
        if r.get("activations") == "int16" and r["status"] == "ok":
            lines += ["", f"`{r['name']}` has 16-bit activations and int8 weights (TFLite's 16x8 mode, integer "
                      f"throughout): no int8 file came within budget on the held-out images. LiteRT runs it on "
                      f"reference kernels, not XNNPACK. Input and output are float32."]
        fast = r.get("speed") or {}
        if fast.get("kept") and r["status"] == "ok":
            lines += ["", f"`{r['name']}` keeps {', '.join(f'`{o}`' for o in fast['float_op_types'])} in float for "
                      f"speed (XNNPACK does not run them all in int8): {fast['ratio_vs_float32']:.2f}x float32 at "
                      f"batch 1, where it was {fast['before_ratio_vs_float32']:.2f}x without (timed side by side)."]
    return lines


def plot_accuracy_vs_size(report: dict, path: str | os.PathLike) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["variants"]:
        if r["status"] != "ok":
            continue
        marker = "o" if r["format"] == "tflite" else "s"
        color = "tab:green" if r["passed"] else "tab:red"
        ax.scatter(r["size_bytes"] / 1024, r["accuracy"] * 100, marker=marker, color=color, s=50)
        # TFLite labels above their point, ONNX labels below: paired variants often coincide.
        ax.annotate(r["name"], (r["size_bytes"] / 1024, r["accuracy"] * 100), textcoords="offset points",
                    xytext=(5, 4) if r["format"] == "tflite" else (5, -11), fontsize=8)
    fa = report["float_accuracy"] * 100
    ax.axhline(fa, color="gray", ls="--", lw=1, label=f"float model {fa:.2f}%")
    ax.axhline(fa - report["max_drop_pp"], color="tab:red", ls=":", lw=1, label=f"gate (-{report['max_drop_pp']} pp)")
    ax.set_xlabel("file size (KB)")
    ax.set_ylabel("top-1 accuracy on the test split (%)")
    ax.set_title("Accuracy vs size (circle: TFLite, square: ONNX)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def print_gate(report: dict) -> int:
    """Print the verdict (export.gate.verdict, in ``report["verdict"]``): on stdout the skipped variants that do not
    count against it and, when it passed, one line saying so; on stderr each failure. Returns its exit status (0
    passed, 1 not). What ``python -m export`` and ``jobs/train.py`` both end with."""
    import sys

    verdict = report["verdict"]
    out = [f"skipped {r['name']}: {r['reason']}" for r in report["variants"]
           if r["status"] == "skipped" and r["passed"]]
    if verdict["passed"]:
        base = [c for c in report.get("checks", []) if c["kind"] != "drift"]
        out.append(f"export: {len(report['built'])} variants within {report['max_drop_pp']} pp of the float model "
                   f"({report['float_accuracy']:.4f})"
                   + (f"; {len(base)} baseline, class and device checks passed" if base else ""))
    for line in out:
        print(line, flush=True)
    for line in verdict["failures"]:
        print(line, file=sys.stderr, flush=True)
    return verdict["exit_status"]


def speed_notes_of(results: list) -> tuple[dict, Optional[str]]:
    """({variant: speed note}, None) for each quantised variant slower than float32 (export.ops), read from the files
    before intermediate ones are dropped; ({}, the error) when that failed (it never loses the export)."""
    try:
        return speed_notes(results), None
    except Exception as e:
        return {}, f"{type(e).__name__}: {e}"


def report_rows(results: list, micro: dict, notes: dict, verdict, out_dir: Path) -> list[dict]:
    """report.json's variants, composed here and nowhere else: each result (export.results) with TFLite Micro's
    figures, the verdict's pass or fail, its speed note, its size against float32.tflite, and where its file lands."""
    sizes = {r.name: r.size_bytes for r in results if r.ok}
    rows = []
    for r in results:
        row = r.to_dict()
        row.pop("predictions_file", None)  # all of them are in predictions.npz
        if r.ok:
            row["path"] = str(out_dir.resolve() / Path(r.path).name)
        if r.name in micro:
            row["micro"] = micro[r.name]
        row["passed"] = verdict.of(r.name).passed
        if r.name in notes:
            row["speed_note"] = notes[r.name]
        if r.ok:
            row["size_ratio_vs_float32_tflite"] = r.size_bytes / sizes["float32"] if "float32" in sizes else None
        rows.append(row)
    return rows


def write_sidecars(stage: Path, rows: list[dict], info, checks) -> None:
    """Each built file's ``.json``: what an app needs to feed and read the model, its TFLite Micro figures
    (the arena to allocate) and, when targets were checked (``checks``), whether it fits each."""
    for r in rows:
        if r["status"] != "ok":
            continue
        write_json(stage / f"{Path(r['path']).name}.json",
                   {"variant": r["name"], "file": Path(r["path"]).name, "input": r["input"],
                    "output": r["output"], "output_kind": info.output_kind,
                    "apply_softmax": info.output_kind == "logits",
                    "apply_sigmoid": info.output_kind == "sigmoid_logit", "labels": "labels.txt",
                    **({"tflite_micro": r["micro"]} if r.get("micro") else {}),
                    **({"targets": {c["target"]: {k: c[k] for k in _SIDECAR_FIT} for c in checks
                                    if c["kind"] == "target" and c["variant"] == r["name"]}} if checks is not None else {})})


def build_report(stage: Path, cfg, info, ds, results: list, float_acc: float, float_val_acc: float, *,
                 micro: dict, checks: list, verdict, targets: list = ()) -> dict:
    """report.json's content (the verdict as export.gate.verdict decided it); writes the sidecars, report.md and the
    plot into ``stage`` and drops intermediate files that were not asked for."""
    requested = set(cfg.requested)
    notes, speed_error = speed_notes_of(results)
    # Intermediate files (int8 built for onnx_int8 or int8_selective, float ONNX for onnx_int8) only
    # ship when they were asked for.
    for f in list(stage.iterdir()):
        if f.is_file() and f.suffix in (".tflite", ".onnx") and (f.stem not in requested or ".part" in f.name):
            f.unlink()
    rows = report_rows(results, micro, notes, verdict, cfg.out_dir)
    write_sidecars(stage, rows, info, checks if targets else None)
    report = {
        "model": str(Path(cfg.model).resolve()),
        "model_info": info.to_dict(),
        "output_kind": info.output_kind,
        "data_source": ds.source,
        "class_names": list(ds.class_names),
        "num_test_images": int(len(ds.x_test)),
        "float_accuracy": float_acc,
        "float_holdout_accuracy": float_val_acc,
        "max_drop_pp": cfg.max_drop,
        "passed": verdict.passed,
        "failed": verdict.failed,
        "failed_checks": [c["name"] for c in verdict.failed_checks],  # against the baseline, per class, devices
        "verdict": verdict.to_dict(),
        "gate": {**cfg.gate.to_dict(), "max_drop_pp": cfg.max_drop},
        "checks": list(checks),
        "targets": [t.to_dict() for t in targets],  # device profiles checked (export.gate.targets)
        "built": [r.name for r in results if r.ok],
        "skipped": {r.name: r.reason for r in results if r.status == "skipped"},
        "variants": rows,
        # The TFLite variant to ship for speed: the fastest at batch 1 among those within the gate.
        "fastest_within_gate": fastest_within_gate(results, verdict),
        **({"speed_note_error": speed_error} if speed_error else {}),
        "git_revision": git_revision(),
        "config": cfg.to_dict(),
    }
    write_text(stage / "report.md", render_markdown(report))
    plot_accuracy_vs_size(report, stage / "accuracy_vs_size.png")
    return report
