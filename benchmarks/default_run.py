"""The README's default run, measured: runs ``python jobs/train.py --data DATA`` exactly as the README's first
command does (every default: seed_cnn, 30 epochs, the default layout, the full edge export), then writes what
docs/results.md quotes into ``default_run.json`` and ``default_run.md``, with the git revision, the date and
the machine.

    python benchmarks/default_run.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # as benchmarks/scaling.py: runnable from a checkout

from toolkit.files import git_revision, machine  # noqa: E402
TRAIN = str(ROOT / "jobs" / "train.py")
# The tutorial's own figures (its notebook's output), quoted beside ours, never measured here.
TUTORIAL = {"test_accuracy": 0.6709, "test_precision": 0.7655}


def run(data: str, extra: list[str]) -> dict:
    """The job, timed; its metrics.json and export report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, TRAIN, "--data", data, "--output", str(out), "--storage-path", f"{tmp}/ray", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        job_s = time.perf_counter() - t0
        if not (out / "metrics.json").exists():
            raise SystemExit(f"the run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
        history = json.loads((out / "history.json").read_text())
        report_path = out / "export" / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else None
    return {"exit_status": proc.returncode, "job_s": job_s, "metrics": metrics, "history": history, "export": report}


def summary(result: dict) -> dict:
    m, r = result["metrics"], result["export"]
    hit = m.get("time_to_70pct_val_accuracy")
    out = {
        "test_accuracy": m["test_accuracy"], "test_precision": m["test_precision"], "test_recall": m["test_recall"],
        "best_epoch": m["best_epoch"], "epochs": m["epochs"], "wall_time_s": m["wall_time_s"],
        "train_images_per_s": m["train_images_per_s"], "job_s": result["job_s"], "exit_status": result["exit_status"],
        "layout": f"{m['num_workers']} worker(s) x {m['cpus_per_worker']} CPU",
        "time_to_70pct_val_accuracy": hit, "variants": [],
    }
    if r:
        f32 = next((v["size_bytes"] for v in r["variants"] if v["name"] == "float32" and v["status"] == "ok"), None)
        for v in r["variants"]:
            row = {"name": v["name"], "status": v["status"], "format": v["format"]}
            if v["status"] == "ok":
                row.update({k: v[k] for k in ("accuracy", "drop_pp", "agreement", "size_bytes", "latency_ms_p50",
                                              "latency_ms_p90", "throughput_images_per_s", "throughput_batch",
                                              "passed")})
                row["route"] = v.get("route")
                row["size_vs_float32"] = v["size_bytes"] / f32 if f32 else None
            else:
                row["reason"] = v.get("reason")
            out["variants"].append(row)
        out["export_passed"] = r["passed"]
        out["export_wall_time_s"] = r.get("wall_time_s")
    return out


def markdown(s: dict, meta: dict) -> str:
    hit = s["time_to_70pct_val_accuracy"]
    lines = [f"# The default run ({meta['date']})", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}` (which runs `{meta['job']}`). "
             f"Git {meta['git_revision']}.", "",
             "| | this toolkit | tutorial (its own figures) |", "|---|---:|---:|",
             f"| test accuracy | {s['test_accuracy']:.2%} | {TUTORIAL['test_accuracy']:.2%} |",
             f"| test precision | {s['test_precision']:.2%} | {TUTORIAL['test_precision']:.2%} |",
             f"| test recall | {s['test_recall']:.2%} | – |",
             f"| layout | {s['layout']} | – |",
             f"| training wall time ({s['epochs']} epochs) | {s['wall_time_s']:.0f} s | – |",
             f"| whole job (data, training, outputs, export) | {s['job_s']:.0f} s | – |",
             f"| training images/s | {s['train_images_per_s']:,.0f} | – |",
             f"| best epoch | {s['best_epoch']} | – |",
             "| time to 70% validation accuracy | " + (f"epoch {hit['epoch']}, {hit['epoch_time_s']:.0f} s of epoch time"
                                                     if hit else "not reached") + " | – |", ""]
    if s["variants"]:
        lines += ["| variant | format | size (KB) | vs float32 | accuracy | drop (pp) | agreement | p50 (ms) | "
                  "img/s @batch | gate |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for v in s["variants"]:
            if v["status"] != "ok":
                lines.append(f"| {v['name']} | {v['format']} | {v['status']}: {v.get('reason', '')} |||||||| |")
                continue
            name = v["name"] + (f" ({v['route']})" if v.get("route") else "")
            lines.append(f"| {name} | {v['format']} | {v['size_bytes'] / 1024:,.0f} | {v['size_vs_float32']:.2f}x | "
                         f"{v['accuracy']:.2%} | {v['drop_pp']:+.2f} | {v['agreement']:.2%} | "
                         f"{v['latency_ms_p50']:.3f} | {v['throughput_images_per_s']:,.0f} @{v['throughput_batch']} | "
                         f"{'pass' if v['passed'] else 'FAIL'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the dataset, as for jobs/train.py's --data")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for default_run.json/.md")
    p.add_argument("extra", nargs="*", help="options passed on to jobs/train.py after --, e.g. -- --epochs 2 "
                                           "(the results are then not the default run's)")
    args = p.parse_args(argv)
    result = run(args.data, args.extra)
    s = summary(result)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "python": platform.python_version(),
            "git_revision": git_revision(),
            "command": "python benchmarks/default_run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "job": " ".join(["python jobs/train.py --data", args.data, *args.extra])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_run.json").write_text(json.dumps({"meta": meta, "summary": s, "metrics": result["metrics"],
                                                      "history": result["history"]}, indent=1, default=str) + "\n")
    (out / "default_run.md").write_text(markdown(s, meta))
    print(markdown(s, meta))
    print(f"wrote {out / 'default_run.json'} and {out / 'default_run.md'}")
    return 0 if result["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
