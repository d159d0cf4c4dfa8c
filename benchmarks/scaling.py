"""Scaling benchmark: plain single-process Keras against Ray Train layouts, side by side, in one run.

    python benchmarks/scaling.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz            # the tables in docs/results.md
    python benchmarks/scaling.py --data ... --nodes 1,2,4,8 --cores-per-node 2                # on a 16-core machine

Sections (each row: training images/s, ratio to plain Keras on the same cores and global batch,
scaling efficiency, and where a step's time goes, from each worker's own timers):
  one machine  local Ray on every core: the default layout (auto: one worker with all CPUs), with and
               without augmentation, against 1-CPU workers (with Keras's per-step metric all-reduces, as
               before, and without) and plain Keras;
  nodes        a real Ray cluster of N nodes on this machine (benchmarks.localcluster: `ray start` per
               node, each pinned to its own cores): weak scaling (fixed per-worker batch) and strong
               scaling (fixed global batch) over --nodes, then the gradient-synchronisation options
               (float16/bfloat16 on the wire, gradient accumulation, small packs) at the largest N.
Every Ray row is a real `jobs/train.py` run (--no-export, --profile-steps); images/s is the mean of
the epochs after the first (the first traces). Writes scaling.json and scaling.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = str(ROOT / "jobs" / "train.py")


# -- the baseline: plain Keras in one process ----------------------------------------------------


def plain_keras(data: str, cache_dir: str, batch_size: int, limit: int, epochs: int, augment: bool) -> dict[str, Any]:
    """The tutorial's loop, nothing distributed: one tf_keras ``fit(epochs=N)`` on in-memory arrays in
    this process, with the toolkit's model, pipeline and compile, and TensorFlow's default thread pools
    (sized from the cores this process may run on). Run in a child process (``--_plain``) so it can
    be pinned to the same cores as the Ray rows it is compared with.

    One fit call, timed per epoch by a callback: a fit call per epoch would rebuild the input
    iterator and refill the shuffle buffer every epoch (measured: half the speed on one core)."""
    from toolkit.data import load_dataset, make_train_dataset, split_validation
    from toolkit.tf import import_keras

    keras = import_keras()
    from toolkit.models import make_model
    from toolkit.models import compile_model

    ds = load_dataset(data, cache_dir).limited(limit)
    x, y, _, _ = split_validation(ds.x_train, ds.y_train, 0.1, 0)
    model = make_model("seed_cnn", input_shape=x.shape[1:], num_classes=ds.num_classes)
    compile_model(model, 2e-3)
    steps = len(x) // batch_size
    train = make_train_dataset(x, y, batch_size, num_classes=ds.num_classes, augment=augment, seed=0)
    rates: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            rates.append(steps * batch_size / (time.perf_counter() - self.t0))

    model.fit(train, steps_per_epoch=steps, epochs=epochs, verbose=0, callbacks=[Timer()])
    return {"images_per_s": _steady(rates), "epoch_images_per_s": rates, "step_ms": 1000 * batch_size / _steady(rates)}


def _steady(rates: list[float]) -> float:
    later = rates[1:] or rates
    return sum(later) / len(later)


def run_plain(args, batch_size: int, augment: bool, cores: list[int]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_plain", "--data", args.data, "--cache-dir", args.cache_dir,
           "--limit", str(args.limit), "--epochs", str(args.epochs), "--_batch", str(batch_size),
           "--_augment" if augment else "--_no-augment"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"plain Keras baseline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- Ray Train rows ------------------------------------------------------------------------------


def run_ray(args, train_args: list[str], env: Optional[dict] = None) -> dict[str, Any]:
    """One real jobs/train.py run; returns images/s, layout and the slowest worker's step breakdown."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, TRAIN, "--data", args.data, "--cache-dir", args.cache_dir, "--limit", str(args.limit),
               "--epochs", str(args.epochs), "--no-export", "--profile-steps", str(args.profile_steps),
               "--output", f"{tmp}/out", "--storage-path", f"{tmp}/ray", *train_args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"jobs/train.py {' '.join(train_args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        m = json.loads(Path(f"{tmp}/out/metrics.json").read_text())
        h = json.loads(Path(f"{tmp}/out/history.json").read_text())
    nodes = {w.get("node_id") for w in m["workers"]}
    return {"images_per_s": _steady(h["images_per_s"]), "epoch_images_per_s": h["images_per_s"],
            "num_workers": m["num_workers"], "cpus_per_worker": m["cpus_per_worker"], "worker_nodes": len(nodes),
            "batch_size": m["config"]["batch_size"], "breakdown": m.get("step_breakdown_ms")}


# -- the table -----------------------------------------------------------------------------------


def row(section: str, name: str, result: dict, *, baseline: Optional[float], reference: Optional[float] = None,
        scale: float = 1, batch: int, **extra) -> dict[str, Any]:
    """A table row. ``reference`` is the same recipe on 1 node (efficiency = rate / (scale x reference))."""
    rate = result["images_per_s"]
    b = result.get("breakdown") or {}
    step = b.get("step_ms", result.get("step_ms"))
    out = {"section": section, "setup": name, "global_batch": batch, "images_per_s": rate,
           # the plain-Keras run this row is compared with, so every ratio can be recomputed from this file
           "plain_keras_images_per_s": baseline, "reference_images_per_s": reference,
           "vs_plain_keras": rate / baseline if baseline else None,
           "efficiency": rate / (scale * reference) if reference else None,
           "step_ms": step, "compute_ms": b.get("compute_ms"), "all_reduce_ms": b.get("all_reduce_ms"),
           "input_ms": b.get("input_ms"),
           "other_ms": (step - b["compute_ms"] - b["all_reduce_ms"]) if b and step else None,
           "workers": result.get("num_workers"), "cpus_per_worker": result.get("cpus_per_worker"),
           "worker_nodes": result.get("worker_nodes"), "epoch_images_per_s": result.get("epoch_images_per_s"), **extra}
    _print_row(out)
    return out


COLUMNS = [("setup", "setup", "{}"), ("global_batch", "batch", "{:,}"), ("images_per_s", "images/s", "{:,.0f}"),
           ("vs_plain_keras", "vs plain Keras", "{:.2f}x"), ("efficiency", "efficiency", "{:.0%}"),
           ("step_ms", "step ms", "{:.1f}"), ("compute_ms", "compute", "{:.1f}"), ("all_reduce_ms", "all-reduce", "{:.1f}"),
           ("input_ms", "input", "{:.1f}"), ("other_ms", "other", "{:.1f}")]


def _cell(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    return "–" if v is None else fmt.format(v)


def _print_row(r: dict) -> None:
    print("  ".join(f"{_cell(r, k, f):>{8 if k != 'setup' else 48}}" for k, _, f in COLUMNS), flush=True)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Scaling benchmark ({meta['date']})", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}`. Git {meta['git_revision']}.", "",
             "images/s: mean of the epochs after the first; step: measured training step; compute, all-reduce, "
             "input: each timed alone on the slowest worker (ms per step); other = step - compute - all-reduce "
             "(contention, waiting for the slowest worker).", ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"## {section}", "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
                  "|" + "|".join("---" if k == "setup" else "---:" for k, _, _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows if r["section"] == section]
        lines.append("")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset source (as for jobs/train.py)")
    p.add_argument("--cache-dir", default=None, help="decoded-array cache (default: the toolkit's)")
    p.add_argument("--limit", type=int, default=20000, help="images used (the training split is 90%% of it)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per row; the first is not counted")
    p.add_argument("--global-batch", type=int, default=256, help="global batch of the one-machine rows and of strong scaling")
    p.add_argument("--per-worker-batch", type=int, default=128, help="per-worker batch of weak scaling")
    p.add_argument("--nodes", default="1,2", help="node counts for the simulated cluster (comma-separated; '' = skip)")
    p.add_argument("--cores-per-node", type=int, default=1, help="cores (and Ray CPUs) per simulated node")
    p.add_argument("--profile-steps", type=int, default=20, help="steps timed per part for the step breakdown")
    p.add_argument("--sections", default="machine,nodes,sync", help="which sections to run")
    p.add_argument("--kinds", default="weak,strong", help="the nodes section's scaling kinds (weak: --per-worker-batch "
                   "per worker; strong: --global-batch in all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for scaling.json and scaling.md")
    # internal: the plain-Keras child process
    p.add_argument("--_plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_augment", dest="_augment", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_no-augment", dest="_augment", action="store_false", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from toolkit.config import default_cache_dir

    args.cache_dir = args.cache_dir or default_cache_dir()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from toolkit.files import git_revision, machine

    if args._plain:
        print(json.dumps(plain_keras(args.data, args.cache_dir, args._batch, args.limit, args.epochs, args._augment)))
        return 0
    if args.epochs < 2:
        print("error: --epochs must be >= 2 (the first epoch traces and is not counted)", file=sys.stderr)
        return 2
    sections = set(args.sections.split(","))
    nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
    all_cores = list(range(os.cpu_count() or 1))
    G, P, c = args.global_batch, args.per_worker_batch, args.cores_per_node
    rows: list[dict] = []
    print("  ".join(f"{h:>{8 if k != 'setup' else 48}}" for k, h, _ in COLUMNS), flush=True)

    if "machine" in sections:
        sec = f"One machine: {len(all_cores)} cores, local Ray, global batch {G}"
        plain = run_plain(args, G, False, all_cores)
        rows.append(row(sec, f"plain Keras, 1 process on {len(all_cores)} cores", plain, baseline=plain["images_per_s"], batch=G))
        default = run_ray(args, ["--batch-size", str(G), "--no-augment"])
        rows.append(row(sec, f"Ray Train default (auto: {default['num_workers']} x {default['cpus_per_worker']} CPU)",
                        default, baseline=plain["images_per_s"], batch=G))
        n = len(all_cores)
        if n > 1 and G % n == 0:
            old = run_ray(args, ["--batch-size", str(G), "--no-augment", "--num-workers", str(n), "--cpus-per-worker", "1"])
            rows.append(row(sec, f"Ray Train {n} workers x 1 CPU", old, baseline=plain["images_per_s"], batch=G))
            old_keras = run_ray(args, ["--batch-size", str(G), "--no-augment", "--num-workers", str(n),
                                       "--cpus-per-worker", "1", "--step-metrics"])
            rows.append(row(sec, f"Ray Train {n} workers x 1 CPU, Keras per-step metrics (before)", old_keras,
                            baseline=plain["images_per_s"], batch=G))
        spe = run_ray(args, ["--batch-size", str(G), "--no-augment", "--steps-per-execution", "1"])
        rows.append(row(sec, "Ray Train default, steps_per_execution 1", spe, baseline=plain["images_per_s"], batch=G))
        plain_aug = run_plain(args, G, True, all_cores)
        rows.append(row(sec, "plain Keras, augmentation", plain_aug, baseline=plain["images_per_s"], batch=G,
                        vs_own_no_augment=plain_aug["images_per_s"] / plain["images_per_s"]))
        aug = run_ray(args, ["--batch-size", str(G), "--augment"])
        rows.append(row(sec, "Ray Train default, augmentation", aug, baseline=plain["images_per_s"], batch=G,
                        vs_own_no_augment=aug["images_per_s"] / default["images_per_s"]))
        print(f"  default with augmentation: {aug['images_per_s'] / default['images_per_s']:.2f}x of without", flush=True)

    if nodes and ({"nodes", "sync"} & sections):
        from benchmarks.localcluster import LocalCluster

        n_max = max(nodes)
        plain_cache: dict[tuple, dict] = {}

        def plain_on(cores: int, batch: int) -> float:
            key = (cores, batch)
            if key not in plain_cache:
                plain_cache[key] = run_plain(args, batch, False, all_cores[:cores] if cores <= len(all_cores) else all_cores)
            return plain_cache[key]["images_per_s"]

        refs: dict[str, float] = {}
        for n in sorted(nodes):
            sec = f"Ray cluster on this machine: nodes x {c} core(s), each node pinned to its own cores"
            with LocalCluster(nodes=n, cpus_per_node=c, advertise=False) as cluster:  # its runs join by RAY_ADDRESS
                env = cluster.env
                if "nodes" in sections:
                    runs: dict[int, dict] = {}  # weak and strong share a run when their global batches are equal
                    for kind, batch in (("weak", n * P), ("strong", G)):
                        if batch % n or kind not in args.kinds.split(","):
                            continue
                        if batch not in runs:
                            runs[batch] = run_ray(args, ["--batch-size", str(batch), "--no-augment"], env=env)
                        r = runs[batch]
                        refs.setdefault(kind, r["images_per_s"])  # the smallest node count is the reference
                        rows.append(row(sec, f"{n} node(s), {kind}: {batch // n} per worker", r,
                                        baseline=plain_on(n * c, batch), reference=refs[kind],
                                        scale=n / min(nodes), batch=batch, nodes=n, kind=kind))
                if "sync" in sections and n == n_max and n > 1:
                    sec2 = f"Gradient synchronisation at {n} nodes x {c} core(s), {P} images per worker per all-reduce"
                    base = run_ray(args, ["--batch-size", str(n * P), "--no-augment"], env=env)
                    rows.append(row(sec2, "float32, one pack (default)", base, baseline=plain_on(n * c, n * P), batch=n * P))
                    for name, extra, batch in (
                        ("Keras per-step metric all-reduces (before)", ["--step-metrics"], n * P),
                        ("float16 on the wire", ["--grad-dtype", "float16"], n * P),
                        ("bfloat16 on the wire", ["--grad-dtype", "bfloat16"], n * P),
                        ("packs of 64 KiB", ["--bytes-per-pack", str(64 * 1024)], n * P),
                        ("accumulate 4 micro-batches", ["--accumulate-steps", "4"], 4 * n * P),
                    ):
                        r = run_ray(args, ["--batch-size", str(batch), "--no-augment", *extra], env=env)
                        rows.append(row(sec2, name, r, baseline=plain_on(n * c, batch), batch=batch))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "python": platform.python_version(),
            "command": "python benchmarks/scaling.py " + " ".join(a for a in (argv or sys.argv[1:])),
            "git_revision": git_revision(), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "scaling.md").write_text(markdown(rows, meta))
    print(f"\nwrote {out / 'scaling.json'} and {out / 'scaling.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
