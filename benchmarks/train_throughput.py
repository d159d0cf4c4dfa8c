"""Training throughput side by side: single-process Keras vs Ray Train workers at two batch sizes.

    python benchmarks/train_throughput.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz

Prints a table of training images/s (validation excluded) of the last epoch of each setup,
and each setup's ratio to the tutorial's own setup (one process, batch 32). All setups run in
this one invocation, one after another, so the ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def single_process(data: str, cache_dir: str, batch_size: int, limit: int, epochs: int) -> float:
    """The tutorial's loop: plain Keras fit in this process, TensorFlow's default threads."""
    from toolkit.data import load_dataset, make_train_dataset
    from toolkit.models import make_model
    from toolkit.train import compile_model

    ds = load_dataset(data, cache_dir).limited(limit)
    model = make_model("seed_cnn")
    compile_model(model, 1e-3)
    steps = len(ds.x_train) // batch_size
    train = make_train_dataset(ds.x_train, ds.y_train, batch_size, num_classes=10, augment=False, seed=0)
    rate = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.fit(train, steps_per_epoch=steps, epochs=1, verbose=0)
        rate = steps * batch_size / (time.perf_counter() - t0)
    return rate


def ray_train(data: str, cache_dir: str, workers: int, cpus: int, batch_size: int, limit: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", data, "--cache-dir", cache_dir,
             "--num-workers", str(workers), "--cpus-per-worker", str(cpus), "--batch-size", str(batch_size),
             "--epochs", str(epochs), "--limit", str(limit), "--no-augment", "--no-export",
             "--output", f"{tmp}/out", "--storage-path", f"{tmp}/ray"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"jobs/train.py failed:\n{proc.stderr[-2000:]}")
        history = json.loads(Path(f"{tmp}/out/history.json").read_text())
        return history["images_per_s"][-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset source (as for jobs/train.py)")
    p.add_argument("--cache-dir", default=None, help="decoded-array cache (default: the toolkit's)")
    p.add_argument("--limit", type=int, default=12800, help="training images per epoch")
    p.add_argument("--epochs", type=int, default=2, help="the last epoch is measured (the first traces)")
    args = p.parse_args()
    from toolkit.config import default_cache_dir

    cache = args.cache_dir or default_cache_dir()
    rows = []
    setups = [
        ("1 process, batch 32 (tutorial)", lambda: single_process(args.data, cache, 32, args.limit, args.epochs)),
        ("Ray Train 2 workers x 1 CPU, batch 32", lambda: ray_train(args.data, cache, 2, 1, 32, args.limit, args.epochs)),
        ("Ray Train 2 workers x 1 CPU, batch 256 (default)",
         lambda: ray_train(args.data, cache, 2, 1, 256, args.limit, args.epochs)),
        ("Ray Train 1 worker x 2 CPUs, batch 256", lambda: ray_train(args.data, cache, 1, 2, 256, args.limit, args.epochs)),
    ]
    for name, run in setups:
        print(f"running: {name} ...", file=sys.stderr, flush=True)
        rows.append((name, run()))
    base = rows[0][1]
    print(f"\n{'setup':<50} {'images/s':>10} {'vs tutorial':>12}")
    for name, rate in rows:
        print(f"{name:<50} {rate:>10,.0f} {rate / base:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
