"""Paired statistics for comparing two classifiers on the same test images: McNemar's exact test on the
images where exactly one of them is right, and a seeded paired bootstrap of the accuracy difference.

Paired, because both models see the same images: what matters is where they disagree, not the two
accuracies' own sampling noise (which is several times larger, and would hide real drops).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    n: int  # images compared
    accuracy_a: float  # the reference (baseline, or the float model)
    accuracy_b: float  # the candidate
    only_a: int  # images only the reference gets right (the candidate broke them)
    only_b: int  # images only the candidate gets right (it fixed them)
    p_value: float  # McNemar's exact two-sided test that both are equally accurate
    ci_low_pp: float  # paired bootstrap interval of accuracy_b - accuracy_a, in points
    ci_high_pp: float
    confidence: float

    @property
    def delta_pp(self) -> float:
        return (self.accuracy_b - self.accuracy_a) * 100

    def to_dict(self) -> dict:
        return {**asdict(self), "delta_pp": self.delta_pp}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under "equally accurate", each discordant image is a fair coin."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    # P(X <= k) for X ~ Binomial(n, 1/2), in logs (n can be thousands).
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)


def paired_bootstrap(right_a: np.ndarray, right_b: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mean(right_b) - mean(right_a) in points, resampling images (seeded: the same
    inputs give the same interval)."""
    diff = right_b.astype(np.int8) - right_a.astype(np.int8)
    n = len(diff)
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    # Only the discordant images move the mean: resample counts of +1 and -1 among n draws.
    plus, minus = int(np.sum(diff == 1)), int(np.sum(diff == -1))
    draws = rng.multinomial(n, [plus / n, minus / n, 1 - (plus + minus) / n], size=resamples)
    means = (draws[:, 0] - draws[:, 1]) / n * 100
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def compare(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, confidence: float = 0.95,
            seed: int = 0) -> Paired:
    """Reference ``pred_a`` against candidate ``pred_b`` (top-1 class ids) on labels ``y``."""
    right_a, right_b = pred_a == y, pred_b == y
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    low, high = paired_bootstrap(right_a, right_b, confidence, seed=seed)
    return Paired(len(y), float(right_a.mean()) if len(y) else 0.0, float(right_b.mean()) if len(y) else 0.0,
                  only_a, only_b, mcnemar_exact(only_a, only_b), low, high, confidence)
