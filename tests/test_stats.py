"""The gate's statistics checked against what they claim (export.gate.stats, export.gate.checks.judge): a 95% interval covers
the true difference in about 95% of many simulated test sets, as wide as the normal approximation says; the
p-value with training noise rejects about 5% of same-recipe retrains; non_inferiority passes a candidate only
when its interval proves the margin. Simulations with a known truth, no TensorFlow."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.gate.checks import GateConfig, judge
from export.gate.stats import compare, images_var_pp, noisy_p, paired_bootstrap

N_IMAGES = 2000
ONLY_A, ONLY_B = 0.10, 0.07  # the true share of images only the reference / only the candidate gets right
TRUE_DELTA_PP = (ONLY_B - ONLY_A) * 100  # -3 points
SIMULATIONS = 1000  # the coverage of 1,000 intervals has a standard error of 0.7 points at 95%


def paired_images(rng, n: int, only_a: float, only_b: float, both: float = 0.6):
    """Which of ``n`` images each model gets right, drawn with these true shares."""
    kind = rng.choice(4, size=n, p=[only_a, only_b, both, 1 - only_a - only_b - both])
    return (kind == 0) | (kind == 2), (kind == 1) | (kind == 2)


def normal_width_pp(noise_pp: float = 0.0, confidence: float = 0.95) -> float:
    """The normal approximation's interval width for the true shares, in points."""
    var = (ONLY_A + ONLY_B - (ONLY_B - ONLY_A) ** 2) / N_IMAGES * 100 ** 2 + noise_pp ** 2
    return 2 * 1.959964 * math.sqrt(var) if confidence == 0.95 else float("nan")


@pytest.mark.parametrize("noise_pp", [0.0, 1.0])
def test_the_bootstrap_interval_covers_the_true_difference_95_times_in_100(noise_pp):
    """Each simulated test set is a fresh draw of 2,000 images (and, with training noise, a retrain whose true
    difference moves by a normal draw of ``noise_pp``): its 95% interval must hold the recipe's true difference
    (-3 points) in 93-97% of 1,000 sets, and be as wide as the normal approximation within 10%. An interval scaled
    wrongly (half as wide covers about 68%; at 90% confidence about 90%) or off centre fails here."""
    rng = np.random.default_rng(11)
    covered, widths = 0, []
    for i in range(SIMULATIONS):
        shift = rng.normal(0, noise_pp) / 100 if noise_pp else 0.0  # this retrain's luck, split over both shares
        a, b = paired_images(rng, N_IMAGES, ONLY_A - shift / 2, ONLY_B + shift / 2)
        low, high = paired_bootstrap(a, b, 0.95, resamples=1000, seed=i, noise_pp=noise_pp)
        covered += low <= TRUE_DELTA_PP <= high
        widths.append(high - low)
    coverage = covered / SIMULATIONS
    assert 0.93 <= coverage <= 0.97, coverage
    assert np.mean(widths) == pytest.approx(normal_width_pp(noise_pp), rel=0.10), (np.mean(widths), normal_width_pp(noise_pp))


def test_the_bootstrap_is_seeded_and_centred_on_the_difference():
    rng = np.random.default_rng(3)
    a, b = paired_images(rng, 5000, ONLY_A, ONLY_B)
    y = np.zeros(5000, np.int64)
    s1 = compare(y, np.where(a, 0, 1), np.where(b, 0, 1), seed=7)
    assert s1 == compare(y, np.where(a, 0, 1), np.where(b, 0, 1), seed=7)  # the same inputs give the same decision
    assert (s1.ci_low_pp + s1.ci_high_pp) / 2 == pytest.approx(s1.delta_pp, abs=0.1)
    sd = math.sqrt(images_var_pp(s1.only_a, s1.only_b, 5000))
    assert s1.ci_high_pp - s1.ci_low_pp == pytest.approx(2 * 1.96 * sd, rel=0.1)


def test_training_noise_keeps_same_recipe_retrains_at_the_stated_false_alarm_rate():
    """Retrains of one recipe, no real difference, their true difference spread by 1 point of training noise:
    the p-value that allows for it rejects 3-7% of them at alpha 0.05 (McNemar alone, which does not, rejects
    far more: the reason the baseline check's default allows for it)."""
    rng = np.random.default_rng(5)
    noise, alarms, mcnemar_alarms = 1.0, 0, 0
    for _ in range(SIMULATIONS):
        shift = rng.normal(0, noise) / 100
        a, b = paired_images(rng, N_IMAGES, 0.08 - shift / 2, 0.08 + shift / 2)
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        alarms += noisy_p(only_a, only_b, N_IMAGES, noise) < 0.05
        mcnemar_alarms += compare(np.zeros(N_IMAGES), np.where(a, 0, 1), np.where(b, 0, 1)).p_value < 0.05
    assert 0.03 <= alarms / SIMULATIONS <= 0.07, alarms
    assert mcnemar_alarms / SIMULATIONS > 0.15, mcnemar_alarms


def planted_pair(n: int, only_a: int, only_b: int):
    """Labels and two models' classes on ``n`` images: ``only_a`` right only for the reference, ``only_b`` only for
    the candidate, the rest right for both."""
    y = np.zeros(n, np.int64)
    ref = np.where(np.arange(n) < only_a, 0, 1)
    ref[only_a + only_b:] = 0
    cand = np.where((np.arange(n) >= only_a) & (np.arange(n) < only_a + only_b), 0, 1)
    cand[only_a + only_b:] = 0
    return y, ref, cand


def test_non_inferiority_passes_only_a_drop_its_interval_proves_within_the_margin():
    """Two candidates, both under the 1-point margin: 0.2 points down on few disagreements (interval [-0.4, 0.0]:
    proven within), and 0.6 points down on many (its interval reaches -1.5: not proven). The regression policy,
    which fails only a significant drop over the margin, passes both; non_inferiority fails the second, and says
    why with the interval."""
    gate = GateConfig(policy="non_inferiority", max_regression=1.0)
    close = compare(*planted_pair(10_000, 60, 40), confidence=1 - gate.alpha, seed=gate.seed)
    vague = compare(*planted_pair(10_000, 1000, 940), confidence=1 - gate.alpha, seed=gate.seed)
    assert close.delta_pp == pytest.approx(-0.2) and vague.delta_pp == pytest.approx(-0.6)
    passed, why = judge("non_inferiority", gate.max_regression, close, gate.alpha)
    assert passed and "within 1 pp" in why, why
    passed, why = judge("non_inferiority", gate.max_regression, vague, gate.alpha)
    assert not passed and why.startswith("drop +0.60 pp, 95% interval of the drop [") and "not within 1 pp" in why
    worst = float(why.split(", ")[-1].split("]")[0])
    assert worst == pytest.approx(0.6 + 1.96 * math.sqrt(images_var_pp(1000, 940, 10_000)), abs=0.1), why
    for stats in (close, vague):
        assert judge("regression", gate.max_regression, stats, gate.alpha)[0]
        assert judge("fixed", gate.max_regression, stats, gate.alpha)[0]


def test_a_drop_of_exactly_the_budget_passes():
    """5 of 500 images is 1 point: 0.332 - 0.322 in floating point is 1.0000000000000009, which failed a 1-point
    budget (the zoo's as_saved qat_int8, one run). Differences are taken in whole points of n images."""
    from export.model.predictions import drop_and_agreement
    from export.gate.stats import points

    assert (0.332 - 0.322) * 100 > 1.0 and points(0.332 - 0.322) == 1.0 and points(0.1 - 0.1) == 0.0
    y = np.zeros(500, np.int64)
    ref = np.where(np.arange(500) < 166, 0, 1)  # 33.2%
    cand = np.where(np.arange(500) < 161, 0, 1)  # 32.2%
    acc, drop, _ = drop_and_agreement(cand, y, None, float(np.mean(ref == y)))
    assert drop == 1.0 and compare(y, ref, cand).delta_pp == -1.0
    assert judge("fixed", 1.0, compare(y, ref, cand), 0.05)[0]
