"""Does the CI gate cry wolf, and what does it catch? Same-recipe retrains gated against each other, and a power
curve simulated on their real predictions.

    python benchmarks/gate_noise.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz --pairs 4   # prints tables

1. Trains ``2 x --pairs`` models with the default recipe (jobs/train.py, seeds 1, 2, ...), each exported
   (``--variants int8``: the file that ships), keeping every export's per-image predictions.
2. No false alarms: each pair gated both ways (the second as candidate, the first as baseline, and back) under
   every policy, by export.gate.checks' own checks on the stored predictions: a same-recipe retrain must pass. The
   default policy allows for the gate's default training noise; "McNemar alone" is the same policy without it
   (is this file worse than that one). The class checks (``--max-class-drop 5``) allow for the class noise.
   Then the runs' own training noise (export.gate.stats.training_noise, as ``python -m export.noise`` prints it).
   Planted regressions (``--planted``, on by default): the recipe trained for a third of its epochs, and trained
   on a copy of the data with cat's training images cut to a tenth, each gated against seed 1.
3. Power: the first pair's real predictions (two seeds disagree on many images in both directions: the
   noise a gate lives with), the second seed's made exactly as accurate as the first (random flips of its
   surplus or deficit), then k points' worth of its correct predictions flipped to wrong: a candidate whose true
   drop on this test split is exactly k points. Each of ``--reps`` repetitions draws a fresh test set of the same
   size from those paired predictions (images resampled with replacement) and gates it; the table is how often
   each policy fails it. At k = 0 that is the false-alarm rate, which must stay within alpha.

Each run's predictions are kept in ``--cache-dir``/gate_noise/ and reused by a later invocation.

Tables in benchmarks/results/gate_noise.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.gate.checks import GateConfig, judge  # noqa: E402
from export.gate.stats import compare, training_noise  # noqa: E402
from toolkit.config import TrainConfig, default_cache_dir  # noqa: E402
from toolkit.data.types import CIFAR10_CLASSES  # noqa: E402

POLICIES = ("regression", "non_inferiority", "fixed")
ALONE = "regression, McNemar alone"  # the default policy without the training-noise allowance
VARIANT = "int8"
CLASS_DROP = 5.0  # the class checks' margin in the same-recipe table (--max-class-drop 5)
EXPORT_ONLY = ("export_variants",)  # TrainConfig fields that leave the trained model as it is
CUT_CLASS = "cat"  # the planted class regression: its training images cut to a tenth


def train_and_export(data: str, seed: int, out: Path, cache_dir: str, epochs: Optional[int], tag: str = "") -> dict:
    # The kept predictions belong to the defaults they were trained with: any change of a default is a new key
    # (but for options that only choose what the job's export builds: this benchmark exports on its own).
    trained = {k: v for k, v in TrainConfig().to_dict().items() if k not in EXPORT_ONLY}
    defaults = hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:12]
    kept = Path(cache_dir) / "gate_noise" / f"defaults-{defaults}-epochs{epochs or 'default'}-seed{seed}{tag}.npz"
    if kept.exists():
        with np.load(kept) as z:
            return {k: z[k].astype(np.int64) for k in z.files}
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", data, "--seed", str(seed), "--output", str(out),
           "--storage-path", str(out / "ray"), "--name", f"noise-{seed}", "--cache-dir", cache_dir, "--no-export"]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, "-m", "export", str(out / "model.keras"), "--data", data, "--out",
                    str(out / "export"), "--cache-dir", cache_dir, "--variants", VARIANT], cwd=ROOT, capture_output=True,
                   text=True)  # exit 1 (over the drift budget) still writes the predictions
    with np.load(out / "export" / "predictions.npz") as z:
        run = {"labels": z["labels"].astype(np.int64), "float": z["float"].astype(np.int64),
               VARIANT: z[VARIANT].astype(np.int64)}
    kept.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(kept, **run)
    return run


def cut_class(data: str, cls: str, keep: float, folder: Path) -> str:
    """A copy of the .tar.gz ``data`` with class ``cls``'s training images cut to ``keep`` of them (the first;
    its test images all kept): a planted regression of one class, as a lost share of a class's data makes."""
    import tarfile

    target = folder / f"{Path(data).name.split('.')[0]}-{cls}-{keep:g}.tar.gz"
    if target.exists():
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(data) as src:
        members = [m for m in src.getmembers() if m.isfile()]
        ours = sorted(m.name for m in members if m.name.lstrip("./").startswith(f"train/{cls}/"))
        dropped = set(ours[int(len(ours) * keep):])
        with tarfile.open(str(target) + ".part", "w:gz") as dst:
            for m in members:
                if m.name not in dropped:
                    dst.addfile(m, src.extractfile(m))
    Path(str(target) + ".part").rename(target)
    return str(target)


def verdicts(y, base, cand, gate: GateConfig, seed: int = 0) -> dict:
    s = compare(y, base, cand, 1 - gate.alpha, seed, gate.training_noise)
    alone = dataclasses.replace(s, p_value=s.mcnemar_p, noise_pp=0.0)  # regression reads the p-value alone
    return ({p: judge(p, gate.max_regression, s, gate.alpha)[0] for p in POLICIES}
            | {ALONE: judge("regression", gate.max_regression, alone, gate.alpha)[0], "delta_pp": s.delta_pp,
               "p": s.p_value, "mcnemar_p": s.mcnemar_p})


def class_failures(y, base, cand, gate: GateConfig, names) -> list:
    """Classes whose recall check against the baseline fails (margin CLASS_DROP, the gate's class noise)."""
    out = []
    for c in np.unique(y):
        m = y == c
        s = compare(y[m], base[m], cand[m], 1 - gate.alpha, gate.seed, gate.class_training_noise)
        if not judge("regression", CLASS_DROP, s, gate.alpha)[0]:
            out.append(f"{names[int(c)]} ({s.delta_pp:+.1f})")
    return out


def planted(y, base, cand, k_pp: float, rng) -> np.ndarray:
    """``cand`` made exactly as accurate as ``base`` (its surplus of correct predictions made wrong, or its
    deficit of wrong ones made right, at random), then k points' worth of its correct predictions made wrong."""
    out = cand.copy()
    surplus = int(np.sum(out == y)) - int(np.sum(base == y))
    pool = np.flatnonzero(out == y) if surplus > 0 else np.flatnonzero(out != y)
    idx = rng.choice(pool, size=abs(surplus), replace=False)
    out[idx] = (y[idx] + 1) % (y.max() + 1) if surplus > 0 else y[idx]
    right = np.flatnonzero(out == y)
    idx = rng.choice(right, size=int(round(k_pp / 100 * len(y))), replace=False)
    out[idx] = (y[idx] + 1) % (y.max() + 1)
    return out


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's own")
    p.add_argument("--reps", type=int, default=500, help="simulated candidates per drop size")
    p.add_argument("--planted", action=argparse.BooleanOptionalAction, default=True,
                   help="also train two planted regressions (a third of the epochs; cat's training images cut to a "
                        "tenth) and gate them against seed 1")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    gate = GateConfig()
    with tempfile.TemporaryDirectory() as tmp:
        # The toolkit's cache by default: the kept predictions must outlive this run (a temporary folder lost
        # 8 x 30-epoch trainings once, when only the gate's margin was to change).
        cache = args.cache_dir or default_cache_dir()
        runs = []
        for seed in range(1, 2 * args.pairs + 1):
            t0 = time.perf_counter()
            runs.append(train_and_export(args.data, seed, Path(tmp) / f"seed{seed}", cache, args.epochs))
            acc = float(np.mean(runs[-1][VARIANT] == runs[-1]["labels"]))
            print(f"seed {seed}: {VARIANT} accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        # Planted regressions, each gated against seed 1 (the baseline): the recipe's training cut short, and one
        # class's training images cut to a tenth.
        planted_runs = []
        if args.planted:
            short = max(1, (args.epochs or TrainConfig().epochs) // 3)
            t0 = time.perf_counter()
            planted_runs.append((f"shorter training ({short} epochs, seed 1)", train_and_export(
                args.data, 1, Path(tmp) / "short", cache, short)))
            cut = cut_class(args.data, CUT_CLASS, 0.1, Path(cache) / "gate_noise")
            planted_runs.append((f"{CUT_CLASS} training images cut to a tenth (seed 1)", train_and_export(
                cut, 1, Path(tmp) / "cut", cache, args.epochs, tag=f"-{CUT_CLASS}-tenth")))
            print(f"planted regressions trained ({time.perf_counter() - t0:.0f} s)", flush=True)
    same = []
    for i in range(args.pairs):
        a, b = runs[2 * i], runs[2 * i + 1]
        for name, base, cand in ((f"{2 * i + 2} vs {2 * i + 1}", a, b), (f"{2 * i + 1} vs {2 * i + 2}", b, a)):
            v = verdicts(a["labels"], base[VARIANT], cand[VARIANT], gate)
            classes = class_failures(a["labels"], base[VARIANT], cand[VARIANT], gate, CIFAR10_CLASSES)
            same.append({"candidate vs baseline (seeds)": name, "delta (pp)": f"{v['delta_pp']:+.2f}",
                         "McNemar p": f"{v['mcnemar_p']:.3g}", "p with noise": f"{v['p']:.3g}",
                         **{pol: "pass" if v[pol] else "**FAIL**" for pol in (*POLICIES, ALONE)},
                         f"class checks ({CLASS_DROP:g} pp)": "pass" if not classes else "**FAIL** " + ", ".join(classes)})
    rng = np.random.default_rng(0)
    y, base, cand = runs[0]["labels"], runs[0][VARIANT], runs[1][VARIANT]
    power = []
    for k in (0.0, 0.5, 1.0, 2.0):
        fails = {pol: 0 for pol in (*POLICIES, ALONE)}
        sim = planted(y, base, cand, k, rng)
        for r in range(args.reps):
            draw = rng.integers(0, len(y), len(y))  # a fresh test set of the same size
            v = verdicts(y[draw], base[draw], sim[draw], gate, seed=r)
            for pol in fails:
                fails[pol] += not v[pol]
        power.append({"true drop (points)": k, **{pol: f"{n / args.reps:.1%}" for pol, n in fails.items()}})
    caught = []
    for name, run in planted_runs:
        y, base = runs[0]["labels"], runs[0][VARIANT]
        assert np.array_equal(run["labels"], y), f"{name}: other test images than seed 1's"
        v = verdicts(y, base, run[VARIANT], gate)
        classes = class_failures(y, base, run[VARIANT], gate, CIFAR10_CLASSES)
        caught.append({"planted regression (candidate vs seed 1)": name, "delta (pp)": f"{v['delta_pp']:+.2f}",
                       "p with noise": f"{v['p']:.3g}", "regression": "pass" if v["regression"] else "**FAIL**",
                       f"class checks ({CLASS_DROP:g} pp)": "pass" if not classes else "**FAIL** " + ", ".join(classes)})
    noise = training_noise(runs[0]["labels"], [r[VARIANT] for r in runs])
    noise_row = {"runs": noise["runs"], "pairs": noise["pairs"], "accuracy sd": f"{noise['accuracy_sd_pp']:.2f}",
                 "difference rms": f"{noise['difference_rms_pp']:.2f}", "test images' part": f"{noise['images_sd_pp']:.2f}",
                 "training noise": f"{noise['training_noise']:.2f}",
                 "class difference rms": f"{noise['class_difference_rms_pp']:.2f}",
                 "class training noise": f"{noise['class_training_noise']:.2f}"}
    tables = (f"Same-recipe retrains, gated both ways (margin {gate.max_regression} pp, alpha {gate.alpha}, training "
              f"noise {gate.training_noise} pp, class noise {gate.class_training_noise} pp):\n\n"
              + markdown(same) + ("\n\nPlanted regressions, gated against seed 1:\n\n" + markdown(caught) if caught else "")
              + f"\n\nThese runs' own training noise ({VARIANT}, points; export.gate.stats.training_noise):"
              f"\n\n" + markdown([noise_row]) + f"\n\nShare of simulated candidates failed ({args.reps} resampled test sets per row; the "
              f"second seed's predictions made as accurate as the first's, then k points of its correct ones "
              f"flipped):\n\n" + markdown(power))
    print(tables)
    from toolkit.files import git_revision, machine

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "git_revision": git_revision(),
            "command": "python benchmarks/gate_noise.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate_noise.json").write_text(json.dumps({"meta": meta, "same_recipe": same, "planted": caught, "noise": noise, "power": power}, indent=2))
    (out / "gate_noise.md").write_text(f"`{meta['command']}` ({meta['date']}, git {meta['git_revision']}, "
                                       f"{meta['machine']})\n\n{tables}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
