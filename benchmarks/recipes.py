"""Time to accuracy: each (model, recipe) trained by jobs/train.py on this machine, validation accuracy against
training seconds, the test accuracy, and the int8 file's accuracy, size and TFLite Micro arena after export.

    python benchmarks/recipes.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz \\
        --runs seed_cnn:tutorial,seed_cnn:adam,seed_cnn:fast,resnet8:fast --epochs 15

A run is MODEL:RECIPE[:OPTION=VALUE...] (options as jobs/train.py's, without the dashes: ``seed_cnn:fast:
learning-rate=0.05``). ``--epochs`` overrides every recipe's epochs (0: the recipe's own). Each run is exported
with ``--variants int8`` (the file that ships). Writes NAME.json, NAME.md and NAME.png (accuracy against seconds)
into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def run_one(spec: str, data: str, epochs: int, cache_dir: str, work: Path) -> dict:
    """Train and export one MODEL:RECIPE[:opt=value...]; its figures (or its error)."""
    model, recipe, *options = spec.split(":")
    out = work / spec.replace(":", "_").replace("=", "-")
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", data, "--model", model, "--recipe", recipe,
           "--output", str(out), "--storage-path", str(work / "ray"), "--name", out.name, "--cache-dir", cache_dir,
           "--no-export", *(["--epochs", str(epochs)] if epochs else [])]
    for opt in options:
        key, _, value = opt.partition("=")
        cmd += [f"--{key}", value]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"run": spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    exp = subprocess.run([sys.executable, "-m", "export", str(out / "model.keras"), "--data", data, "--out",
                          str(out / "export"), "--variants", "int8", "--cache-dir", cache_dir, "--latency-runs", "20"],
                         capture_output=True, text=True)
    report = json.loads((out / "export" / "report.json").read_text()) if (out / "export" / "report.json").exists() else {}
    int8 = next((v for v in report.get("variants", []) if v["name"] == "int8" and v["status"] == "ok"), None)
    elapsed, seconds = 0.0, []
    for t in history["epoch_time_s"]:
        elapsed += t
        seconds.append(elapsed)
    return {"run": spec, "model": model, "recipe": recipe, "options": options, "epochs": metrics["epochs"],
            "wall_s": wall, "train_s": seconds[-1], "val_accuracy": history["val_accuracy"], "seconds": seconds,
            # the last epoch's accuracy on the (augmented) training images: near validation's, the model underfits
            "train_accuracy": (history.get("accuracy") or [None])[-1],
            "test_accuracy": metrics["test_accuracy"], "export_exit": exp.returncode,
            "export_error": None if int8 else (exp.stderr.strip().splitlines() or [f"exit {exp.returncode}"])[-1],
            "int8_accuracy": int8["accuracy"] if int8 else None, "int8_kb": int8["size_bytes"] / 1024 if int8 else None,
            "int8_arena_kb": (int8.get("micro") or {}).get("arena_bytes", 0) / 1024 if int8 else None,
            "config": metrics["config"]}


def first_reaching(row: dict, target: float) -> Optional[tuple[int, float]]:
    """(epoch, training seconds) at which validation accuracy first reached ``target``."""
    for i, acc in enumerate(row.get("val_accuracy", [])):
        if acc >= target:
            return i + 1, row["seconds"][i]
    return None


def markdown(rows: list[dict], target: float) -> str:
    lines = [f"| run | epochs | training s | val. accuracy >= {target:.0%} at | train accuracy (augmented) | test accuracy | "
             "int8 accuracy | int8 KB | TFLM arena KB |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} |" + " |" * 7)
            continue
        hit = first_reaching(r, target)
        lines.append(f"| {r['run']} | {r['epochs']} | {r['train_s']:.0f} | "
                     f"{f'epoch {hit[0]}, {hit[1]:.0f} s' if hit else 'not reached'} | "
                     f"{f'{train * 100:.2f}%' if (train := r.get('train_accuracy')) is not None else '-'} | "
                     f"{r['test_accuracy'] * 100:.2f}% | "
                     + (f"{r['int8_accuracy'] * 100:.2f}% | {r['int8_kb']:.0f} | {r['int8_arena_kb']:.1f} |"
                        if r["int8_accuracy"] is not None else f"export failed: {r.get('export_error')} | | |"))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from toolkit.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "error" not in r:
            ax.plot(r["seconds"], [a * 100 for a in r["val_accuracy"]], marker=".", label=r["run"])
    ax.set_xlabel("training seconds (this machine)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--runs", default="seed_cnn:tutorial,seed_cnn:adam,seed_cnn:fast,resnet8:fast")
    p.add_argument("--epochs", type=int, default=15, help="every run's epochs (0: each recipe's own)")
    p.add_argument("--target", type=float, default=0.70, help="the validation accuracy whose time is reported")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="recipes")
    p.add_argument("--keep", default=None, help="a folder where each run's model and export stay (default: deleted; "
                   "keep them to export other variants, e.g. qat_int8, afterwards)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from toolkit.config import default_cache_dir
    from toolkit.files import git_revision, machine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for spec in args.runs.split(","):
            rows.append(run_one(spec, args.data, args.epochs, args.cache_dir or default_cache_dir(), work))
            print(markdown(rows[-1:], args.target).splitlines()[-1], flush=True)
    table = markdown(rows, args.target)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "git_revision": git_revision(),
            "command": f"python benchmarks/recipes.py {' '.join(argv if argv is not None else sys.argv[1:])}"}
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{args.name}.md").write_text(f"`{meta['command']}` ({meta['date']}, git {meta['git_revision']}, "
                                         f"{meta['machine']})\n\n{table}\n\n![accuracy against time]({args.name}.png)\n")
    plot(rows, out / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
