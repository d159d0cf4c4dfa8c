"""A model card per export (``model_card.md`` with PNGs): for the variant to ship, the per-class table, the
confusion matrix, and, against the baseline, the images it fixed and broke, as a grid with their classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.files import write_text
from toolkit.plots import pyplot, save_figure


def shipped_variant(report: dict) -> str:
    """The variant the card describes: int8 when it passed, else the fastest within the gate, else float32."""
    ok = {r["name"]: r for r in report["variants"] if r["status"] == "ok"}
    if ok.get("int8", {}).get("passed"):
        return "int8"
    return report.get("fastest_within_gate") or ("float32" if "float32" in ok else next(iter(ok), "float"))


def plot_confusion(y, pred, names: list, path: Path, title: str) -> None:
    k = len(names)
    m = np.zeros((k, k), int)
    np.add.at(m, (y, pred), 1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * k, 1 + 0.45 * k))
    ax.imshow(m / np.maximum(m.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] > 0.5 * max(m[i].sum(), 1) else "black")
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_flips(x, y, before, after, idx, names: list, path: Path, title: str, limit: int = 24) -> None:
    idx = list(idx)[:limit]
    cols = 8
    rows = max(1, -(-len(idx) // cols))
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        img = x[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(f"{names[y[i]]}\n{names[before[i]]}->{names[after[i]]}", fontsize=6)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def write_model_card(stage: Path, report: dict, x, y, preds: dict, baseline) -> None:
    names = report["class_names"]
    variant = shipped_variant(report)
    pred = preds.get(variant, preds.get("float"))
    lines = [f"# Model card: `{Path(report['model']).name}` as `{variant}`", "",
             f"Gate: **{'PASSED' if report['passed'] else 'FAILED'}**. Float model {report['float_accuracy'] * 100:.2f}%"
             f" on {len(y):,} test images ({report['data_source']}).", ""]
    ref = None
    if baseline is not None:
        bp = baseline["predictions"]
        ref = bp.get(variant, bp.get("float"))
        lines += [f"Baseline: {baseline['source']}.", ""]
    lines += ["| class | images | recall | precision |" + (" recall vs baseline |" if ref is not None else ""),
              "|---|---:|---:|---:|" + ("---:|" if ref is not None else "")]
    for c, name in enumerate(names):
        mask, said = y == c, pred == c
        recall = float(np.mean(pred[mask] == c)) * 100 if mask.any() else 0.0
        precision = float(np.mean(y[said] == c)) * 100 if said.any() else 0.0
        row = f"| {name} | {int(mask.sum())} | {recall:.1f}% | {precision:.1f}% |"
        if ref is not None:
            row += f" {recall - float(np.mean(ref[mask] == c)) * 100 if mask.any() else 0.0:+.1f} pp |"
        lines.append(row)
    plot_confusion(y, pred, names, stage / "confusion_matrix.png", f"{variant}: confusion matrix")
    lines += ["", "![confusion matrix](confusion_matrix.png)"]
    if ref is not None:
        for what, mask in (("broken", (ref == y) & (pred != y)), ("fixed", (ref != y) & (pred == y))):
            idx = np.flatnonzero(mask)
            lines += ["", f"{what.capitalize()} against the baseline: {len(idx)} image(s)"
                      + (f" (first {min(len(idx), 24)}: true class, baseline -> this model)" if len(idx) else ".")]
            if len(idx):
                plot_flips(x, y, ref, pred, idx, names, stage / f"flips_{what}.png", f"{what}: baseline -> {variant}")
                lines += ["", f"![{what}](flips_{what}.png)"]
    write_text(stage / "model_card.md", "\n".join(lines) + "\n")
