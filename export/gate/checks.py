"""The CI gate: every check an export is judged by, each with its numbers and its verdict.

Checks (each a JUnit test case, export.junit):

- ``drift``: each variant against its own float model (the quantisation drift), by ``float_policy``;
- ``baseline``: each variant against the same variant of ``--baseline`` (the model on the device today), on
  the same test images, by ``policy``;
- ``class``: each class's recall of each variant, against a floor, and against the baseline's.

Policies (what a check needs to fail or pass):

- ``fixed``: fail when the drop exceeds the margin (the drift check's default: today's behaviour);
- ``regression``: fail when the drop exceeds the margin *and* is significant at ``alpha`` beyond the noise of
  the test images and of retraining (the baseline check's default: a same-recipe retrain differs from the
  baseline on many images in both directions, and that noise must never fail a build);
- ``non_inferiority``: pass only when the paired bootstrap interval's lower end shows the drop is under the
  margin (for teams that must prove it).

Training noise (``training_noise``, ``class_training_noise``; export.gate.stats): the baseline and class-vs-baseline
checks allow for the spread two trainings of one recipe show on the same images, measured for the default
recipe by benchmarks/gate_noise.py and for a team's own by ``python -m export.noise`` over a few retrains' exports.
0 asks whether this file is worse than that one, which a same-recipe retrain "is" one time in eight. The drift
check compares a variant with the very weights it was made from: no training noise there.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from export.gate.stats import compare

POLICIES = ("fixed", "regression", "non_inferiority")


@dataclass
class GateConfig:
    # The baseline check: fail a variant that is worse than the baseline's by more than max_regression
    # points, significantly at alpha (see POLICIES).
    policy: str = "regression"
    max_regression: float = 0.5
    # How far, in points, a retrain of the same recipe moves accuracy on these images beyond what the test
    # images explain (the standard deviation of the paired difference's extra spread). The default recipe, 30
    # epochs, eight seeds: 0.63 (28 pairs, benchmarks/results/gate_noise_30.md) and 0.49 (4 pairs, an earlier
    # eight, gate_noise_30_first.md); without it one same-recipe comparison in eight failed. 0.5 passes every
    # same-recipe comparison measured and catches a 2-point drop 98.2% of the time (0.63: about 94%).
    # Measure your recipe's with python -m export.noise.
    training_noise: float = 0.5
    # The same for one class's recall: seeds trade classes against each other (cat against dog). The default
    # recipe at 30 epochs: 1.42 (gate_noise_30.md); far more in short runs (8.9 after 5 epochs of the previous
    # default recipe), so measure yours before gating a class on a short run.
    class_training_noise: float = 1.5
    # The drift check (each variant against its float model): today's fixed 1-point budget (max_drop).
    float_policy: str = "fixed"
    # Significance of McNemar's test; coverage of the paired bootstrap interval (1 - alpha, two-sided).
    alpha: float = 0.05
    # Class checks: {class name: least recall, %}; and the most a class's recall may drop against the
    # baseline, in points, significantly (None: no per-class drop check).
    class_floors: dict = field(default_factory=dict)
    max_class_drop: Optional[float] = None
    seed: int = 0  # of the bootstrap: the same inputs give the same decision

    def __post_init__(self) -> None:
        for name in ("policy", "float_policy"):
            if getattr(self, name) not in POLICIES:
                raise ValueError(f"{name}: unknown policy {getattr(self, name)!r}; choose from {', '.join(POLICIES)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: must be between 0 and 1, got {self.alpha}")
        for name in ("max_regression", "training_noise", "class_training_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def images_digest(x: np.ndarray, y: np.ndarray) -> str:
    """What identifies a test split: its pixels, shape and labels (a baseline made on other images is refused)."""
    h = hashlib.sha256()
    h.update(str(x.shape).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.asarray(y, np.int64).tobytes())
    return h.hexdigest()


def judge(policy: str, margin_pp: float, stats, alpha: float) -> tuple[bool, str]:
    """(passed, why) of a paired comparison under ``policy``: the candidate may lose at most ``margin_pp``."""
    drop = -stats.delta_pp + 0.0  # (+ 0.0: no "-0.00")
    if policy == "fixed":
        return drop <= margin_pp, f"drop {drop:+.2f} pp {'<=' if drop <= margin_pp else '>'} {margin_pp:g} pp"
    if policy == "regression":
        real = stats.p_value < alpha and drop > 0
        passed = not (drop > margin_pp and real)
        verdict = "a significant drop" if real else "a significant gain" if stats.p_value < alpha else "not significant"
        test = (f"McNemar p = {stats.p_value:.3g}" if not stats.noise_pp else
                f"p = {stats.p_value:.3g} with {stats.noise_pp:g} pp training noise (McNemar alone {stats.mcnemar_p:.3g})")
        return passed, f"drop {drop:+.2f} pp (margin {margin_pp:g}), {test}: {verdict} at {alpha:g}"
    worst = -stats.ci_low_pp  # non-inferiority: the interval's worst case must stay within the margin
    return worst < margin_pp, (f"drop {drop:+.2f} pp, {stats.confidence:.0%} interval of the drop "
                               f"[{-stats.ci_high_pp:+.2f}, {worst:+.2f}] pp {'within' if worst < margin_pp else 'not within'} "
                               f"{margin_pp:g} pp")


def check(kind: str, name: str, stats, passed: bool, why: str, **extra) -> dict:
    return {"kind": kind, "name": name, "passed": bool(passed), "why": why,
            **({"stats": stats.to_dict()} if stats is not None else {}), **extra}


def drift_checks(y, float_pred, preds: dict, max_drop: float, gate: GateConfig) -> list[dict]:
    """Each variant against the float model it was made from."""
    out = []
    for variant, pred in preds.items():
        s = compare(y, float_pred, pred, 1 - gate.alpha, gate.seed)
        passed, why = judge(gate.float_policy, max_drop, s, gate.alpha)
        out.append(check("drift", f"{variant} vs float model", s, passed, why, variant=variant,
                         policy=gate.float_policy, margin_pp=max_drop))
    return out


def baseline_checks(y, preds: dict, baseline: dict, gate: GateConfig, class_names: list) -> list[dict]:
    """Each variant against the baseline's same variant (or the baseline's float model when the baseline is a
    model file), and per class when asked."""
    out = []
    for variant, pred in preds.items():
        ref_name = variant if variant in baseline else "float"
        if ref_name not in baseline:
            continue
        ref = baseline[ref_name]
        s = compare(y, ref, pred, 1 - gate.alpha, gate.seed, gate.training_noise)
        passed, why = judge(gate.policy, gate.max_regression, s, gate.alpha)
        right_ref, right_new = ref == y, pred == y
        flips = {"fixed": _flip_list(~right_ref & right_new, y, class_names),
                 "broken": _flip_list(right_ref & ~right_new, y, class_names)}
        out.append(check("baseline", f"{variant} vs baseline {ref_name}", s, passed, why, variant=variant,
                         baseline_variant=ref_name, policy=gate.policy, margin_pp=gate.max_regression, flips=flips,
                         class_recall_delta_pp=_class_deltas(y, ref, pred, class_names)))
        if gate.max_class_drop is not None:
            for c, cname in enumerate(class_names):
                mask = y == c
                sc = compare(y[mask], ref[mask], pred[mask], 1 - gate.alpha, gate.seed, gate.class_training_noise)
                ok, why_c = judge("regression", gate.max_class_drop, sc, gate.alpha)
                out.append(check("class", f"{variant} class {cname} recall vs baseline", sc, ok, why_c,
                                 variant=variant, class_name=cname, margin_pp=gate.max_class_drop))
    return out


def floor_checks(y, preds: dict, gate: GateConfig, class_names: list) -> list[dict]:
    out = []
    for cname, floor in gate.class_floors.items():
        if cname not in class_names:
            raise ValueError(f"class_floors: unknown class {cname!r}; the data's classes are {', '.join(class_names)}")
        c = class_names.index(cname)
        mask = y == c
        for variant, pred in preds.items():
            recall = float(np.mean(pred[mask] == c)) * 100 if mask.any() else 0.0
            out.append(check("class", f"{variant} class {cname} recall floor", None, recall >= floor,
                             f"recall {recall:.2f}% {'>=' if recall >= floor else '<'} floor {floor:g}%",
                             variant=variant, class_name=cname, recall_pct=recall, floor_pct=floor))
    return out


def _class_deltas(y, ref, pred, class_names) -> dict:
    return {cname: float(np.mean(pred[y == c] == c) - np.mean(ref[y == c] == c)) * 100
            for c, cname in enumerate(class_names) if np.any(y == c)}


def _flip_list(mask, y, class_names, limit: int = 50) -> dict:
    idx = np.flatnonzero(mask)
    return {"count": int(len(idx)), "images": [int(i) for i in idx[:limit]],
            "by_class": {class_names[c]: int(np.sum(y[idx] == c)) for c in np.unique(y[idx])}}
