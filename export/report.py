"""The export report a person reads: a Markdown table for pull requests, and an accuracy-vs-size plot."""

from __future__ import annotations

import os

from toolkit.plots import pyplot, save_figure


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
    cands = [r for r in report["variants"] if r.get("candidates")]
    for r in cands:
        lines += ["", f"`{r['name']}` was built two ways and the more accurate kept (`{r['route']}`): "
                  + "; ".join(f"{k}: {v['accuracy'] * 100:.2f}%, p50 {v['latency_ms_p50']:.3f} ms" if "error" not in v
                              else f"{k}: failed ({v['error']})" for k, v in r["candidates"].items()) + "."]
    for r in report["variants"]:
        if r.get("qat"):
            q = r["qat"]
            lines += ["", f"`{r['name']}`: tfmot scheme `{q['scheme']}`, {q['quantized_layers']} of {q['weighted_layers']} convolution/dense "
                      f"layers quantised, learning rate {q['learning_rate']:g}"
                      + (" after a diverged first try" if q["retried_after_divergence"] else "")
                      + ("; schemes that failed first: " + "; ".join(q["schemes_failed"]) if q["schemes_failed"]
                         else "") + "."]
        if r.get("float_tensors") and r["status"] == "ok":
            lines += ["", f"`{r['name']}` keeps {len(r['float_tensors'])} tensor(s) in float, chosen by "
                      f"quantisation error and re-measured on held-out training images: "
                      + ", ".join(f"`{t}`" for t in r.get("float_layers", r["float_tensors"])) + ". Input and output are float32."]
    lines += ["", "Latency: batch 1, one thread, median and 90th percentile of "
              f"{report['config']['latency_runs']} runs after warm-up; TFLite in LiteRT, ONNX in ONNX Runtime (CPU).",
              "Drop: float accuracy minus variant accuracy, in percentage points. Agreement: share of test images "
              "where the variant's top-1 class equals the float model's.", ""]
    return "\n".join(lines)


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
