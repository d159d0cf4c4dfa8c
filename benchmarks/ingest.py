"""Ingest benchmark: --ingest memory against --ingest stream (Ray Data), side by side, in one run.

    python benchmarks/ingest.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz     # the table in docs/data.md

The archive is unpacked once into a class-folder tree (streaming reads files); "4x" is the same tree
with every training image present four times (symbolic links: four times the files to list, read
and decode, the same bytes on disk). Each row is a real `jobs/train.py` run with 2 workers (--no-export):
training images/s (mean over the epochs after the first), the driver's and the workers' peak resident
memory (ru_maxrss), and wall time from start to metrics.json. The targets (issue 10): streaming at
least 0.8x the in-memory images/s; streaming's peak memory flat from 1x to 4x.
Writes ingest.json and ingest.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "jobs" / "train.py")


def unpack(archive: str, target: Path, copies: int) -> Path:
    """``archive`` as train/ test/ folders under ``target``; train/ images repeated ``copies`` times."""
    done = target / ".complete"
    if done.exists():
        return target
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = m.name.lstrip("./").split("/")
            if not m.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
                continue
            dst = target / parts[-3] / parts[-2] / parts[-1]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(m).read())
            if parts[-3] == "train":
                for k in range(1, copies):
                    (dst.parent / f"x{k}-{parts[-1]}").symlink_to(dst.name)
    done.touch()
    return target


def run(data: Path, ingest: str, epochs: int, workdir: Path, cache_dir: str) -> dict:
    out = workdir / f"out-{ingest}-{data.name}"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, TRAIN, "--data", str(data), "--ingest", ingest, "--num-workers", "2", "--epochs", str(epochs),
         "--output", str(out), "--storage-path", str(workdir / "ray"), "--cache-dir", cache_dir, "--no-export"],
        capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{ingest} on {data} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    hist = json.loads((out / "history.json").read_text())
    later = hist["images_per_s"][1:] or hist["images_per_s"]
    return {"ingest": ingest, "data": data.name, "train_images": m["num_train_images"],
            "images_per_s": sum(later) / len(later), "test_accuracy": m["test_accuracy"],
            "driver_peak_rss_mb": m["driver_peak_rss_mb"],
            "worker_peak_rss_mb": max(w["peak_rss_mb"] for w in m["workers"]), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the CIFAR-10 class-folder archive (cifar10-jpeg.tar.gz)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--sizes", default="1,4", help="dataset multiples to run (training images repeated)")
    p.add_argument("--workdir", default=None, help="where trees and runs go (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ingest-bench-"))
    cache = str(work / "cache")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        tree = unpack(args.data, work / f"cifar-{size}x", size)
        for ingest in ("memory", "stream"):
            row = run(tree, ingest, args.epochs, work, cache)
            row["size"] = f"{size}x"
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"] and r["ingest"] == "memory")
        row["ratio_to_memory"] = row["images_per_s"] / base["images_per_s"]
    from toolkit.files import git_revision, machine

    command = "python benchmarks/ingest.py " + " ".join(sys.argv[1:])
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "description": machine()},
              "git_revision": git_revision(), "command": command, "epochs": args.epochs, "rows": rows,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`{command}` ({result['finished_at'][:10]}, git {result['git_revision']}, {machine()})", "",
             "| data | ingest | train images | images/s | vs memory | driver peak MB | worker peak MB | "
             "test acc | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['ingest']} | {r['train_images']:,} | {r['images_per_s']:,.0f} | "
                     f"{r['ratio_to_memory']:.2f}x | {r['driver_peak_rss_mb']:,.0f} | {r['worker_peak_rss_mb']:,.0f} | "
                     f"{r['test_accuracy']:.3f} | {r['wall_s']:.0f} |")
    (out / "ingest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
