"""Paired statistics for comparing two classifiers on the same test images: McNemar's exact test on the
images where exactly one of them is right, and a seeded paired bootstrap of the accuracy difference.

Paired, because both models see the same images: what matters is where they disagree, not the two
accuracies' own sampling noise (which is several times larger, and would hide real drops).

Training noise: two trainings of one recipe that differ only in their seed disagree on these images by more than
test-image sampling explains (the default recipe, 30 epochs: about 0.5-0.6 points of accuracy beyond it, and
1.4 points of a class's recall, far more in short runs; benchmarks/gate_noise.py). McNemar's test asks whether *this* file is worse than *that* one, and
finds a retrain of the same recipe "significantly" worse one time in eight. With ``noise_pp`` > 0 the test asks
whether the candidate is worse by more than retraining explains: the paired difference's variance is the
test-image part (from the disagreements) plus ``noise_pp`` squared, and the bootstrap draws add a normal draw of
that spread. ``noise_pp`` = 0 is McNemar's exact test and the plain bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def points(difference: float) -> float:
    """An accuracy difference (a fraction) in points, rounded to 1e-9. Accuracies are counts over the same n images,
    so every true difference is a multiple of 100/n points; unrounded, 0.332 - 0.322 is 1.0000000000000009 points,
    which a 1-point budget fails (as_saved's qat_int8 in the zoo test: 5 of 500 images, "over" the gate)."""
    return round(difference * 100, 9) + 0.0  # (+ 0.0: no -0.0)


@dataclass(frozen=True)
class Paired:
    n: int  # images compared
    accuracy_a: float  # the reference (baseline, or the float model)
    accuracy_b: float  # the candidate
    only_a: int  # images only the reference gets right (the candidate broke them)
    only_b: int  # images only the candidate gets right (it fixed them)
    p_value: float  # two-sided, that both are equally accurate (beyond training noise when noise_pp > 0)
    ci_low_pp: float  # paired bootstrap interval of accuracy_b - accuracy_a, in points (training noise added)
    ci_high_pp: float
    confidence: float
    mcnemar_p: float  # McNemar's exact test alone (p_value when noise_pp is 0)
    noise_pp: float = 0.0  # the training noise allowed for, in points

    @property
    def delta_pp(self) -> float:
        return points(self.accuracy_b - self.accuracy_a)

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


def images_var_pp(only_a: int, only_b: int, n: int) -> float:
    """Variance, in points squared, of the paired accuracy difference from sampling the ``n`` test images (of
    which ``only_a`` only the reference gets right, ``only_b`` only the candidate)."""
    if n == 0:
        return 0.0
    return ((only_a + only_b) / n - ((only_b - only_a) / n) ** 2) / n * 100 ** 2


def noisy_p(only_a: int, only_b: int, n: int, noise_pp: float) -> float:
    """Two-sided p that the candidate is as accurate as the reference, when a retrain alone moves the paired
    difference by ``noise_pp`` points (standard deviation): a normal test on the difference, its variance the
    test images' (from the discordant counts) plus ``noise_pp`` squared."""
    if n == 0:
        return 1.0
    delta = (only_b - only_a) / n * 100
    sd = math.sqrt(images_var_pp(only_a, only_b, n) + noise_pp ** 2)
    return 1.0 if sd == 0 else math.erfc(abs(delta) / sd / math.sqrt(2))


def paired_bootstrap(right_a: np.ndarray, right_b: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0, noise_pp: float = 0.0) -> tuple[float, float]:
    """Percentile interval of mean(right_b) - mean(right_a) in points, resampling images, each draw moved by a
    normal draw of ``noise_pp`` (training noise; seeded: the same inputs give the same interval)."""
    diff = right_b.astype(np.int8) - right_a.astype(np.int8)
    n = len(diff)
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    # Only the discordant images move the mean: resample counts of +1 and -1 among n draws.
    plus, minus = int(np.sum(diff == 1)), int(np.sum(diff == -1))
    draws = rng.multinomial(n, [plus / n, minus / n, 1 - (plus + minus) / n], size=resamples)
    means = (draws[:, 0] - draws[:, 1]) / n * 100
    if noise_pp > 0:
        means = means + rng.normal(0.0, noise_pp, resamples)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def compare(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, confidence: float = 0.95,
            seed: int = 0, noise_pp: float = 0.0) -> Paired:
    """Reference ``pred_a`` against candidate ``pred_b`` (top-1 class ids) on labels ``y``, allowing for
    ``noise_pp`` points of training noise."""
    if noise_pp < 0:
        raise ValueError(f"noise_pp: must be >= 0, got {noise_pp}")
    right_a, right_b = pred_a == y, pred_b == y
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    low, high = paired_bootstrap(right_a, right_b, confidence, seed=seed, noise_pp=noise_pp)
    exact = mcnemar_exact(only_a, only_b)
    p = exact if noise_pp == 0 else noisy_p(only_a, only_b, len(y), noise_pp)
    return Paired(len(y), float(right_a.mean()) if len(y) else 0.0, float(right_b.mean()) if len(y) else 0.0,
                  only_a, only_b, p, low, high, confidence, exact, noise_pp)


def _difference_and_images_var(right_a: np.ndarray, right_b: np.ndarray) -> tuple[float, float]:
    """Accuracy difference b - a in points, and its variance from sampling these images (points squared)."""
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    return (right_b.mean() - right_a.mean()) * 100, images_var_pp(only_a, only_b, len(right_a))


def training_noise(y: np.ndarray, runs: list) -> dict:
    """How far retrains of one recipe (``runs``: each one's top-1 class ids on labels ``y``, at least 2) move
    accuracy, and each class's recall, beyond what the test images explain: over every pair of runs, the
    square root of mean(difference squared) - mean(the test images' variance of it), in points (0 when the test
    images explain it all). The mean over all pairs of squared differences is twice the runs' unbiased variance,
    the spread a difference between two runs has."""
    if len(runs) < 2:
        raise ValueError(f"runs: need at least 2 retrains of the same recipe, got {len(runs)}")
    diffs, images, class_diffs, class_images = [], [], [], []
    classes = np.unique(y)
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            a, b = runs[i] == y, runs[j] == y
            d, v = _difference_and_images_var(a, b)
            diffs.append(d)
            images.append(v)
            for c in classes:
                d, v = _difference_and_images_var(a[y == c], b[y == c])
                class_diffs.append(d)
                class_images.append(v)

    def extra(d, v):
        return float(np.sqrt(max(0.0, np.mean(np.square(d)) - np.mean(v))))

    return {"runs": len(runs), "pairs": len(diffs), "accuracy_sd_pp": float(np.std([np.mean(r == y) * 100 for r in runs], ddof=1)),
            "difference_rms_pp": float(np.sqrt(np.mean(np.square(diffs)))), "images_sd_pp": float(np.sqrt(np.mean(images))),
            "training_noise": extra(diffs, images), "class_difference_rms_pp": float(np.sqrt(np.mean(np.square(class_diffs)))),
            "class_training_noise": extra(class_diffs, class_images)}
