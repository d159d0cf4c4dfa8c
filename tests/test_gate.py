"""The CI gate against the model already shipped (export.gate.checks, export.gate.baseline, export.gate.ci, export.gate.card): real
exports of the regression model on the real CIFAR-10 test split, the full export as the baseline, a planted
regression, the JUnit file read back by a JUnit parser, the step summary and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from conftest import export_in_process, require_shared_cifar

FAST = ["--variants", "int8", "--latency-runs", "5"]  # (the baseline's calibration: the same int8 file)


def gate_export(model, out, cache_dir, *extra, data=None):
    return export_in_process("export", [str(model), "--data", str(data or require_shared_cifar()), "--out", str(out),
                                        "--cache-dir", cache_dir, *FAST, *extra])


@pytest.fixture(scope="module")
def planted(regression_run, tmp_path_factory):
    """The regression model with class cat all but switched off (its output bias lowered by 5): the rest of the
    model untouched, as a retrain with most cat images lost would be."""
    from toolkit.tf import import_keras

    keras = import_keras()
    model = keras.models.load_model(str(regression_run / "model.keras"), compile=False)
    last = model.layers[-1]
    k, b = last.get_weights()
    b[3] -= 5.0
    last.set_weights([k, b])
    path = tmp_path_factory.mktemp("planted") / "cat_cut.keras"
    model.save(path)
    return path


def test_the_same_model_passes_against_its_own_export(full_export, regression_run, tmp_path, cache_dir, monkeypatch,
                                                      capsys):
    """Every export stores its per-image predictions; a later export reads them as its baseline without running
    the baseline again, and the same model passes, with the JUnit file and the step summary saying so."""
    baseline, _ = full_export
    stored = json.loads((baseline / "report.json").read_text())["predictions"]
    with np.load(baseline / stored["file"]) as z:
        assert len(z["labels"]) == 10_000 and z["int8"].shape == (10_000,) and z["int8_scores"].shape == (10_000, 10)
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    proc = gate_export(regression_run / "model.keras", tmp_path / "out", cache_dir, "--baseline", str(baseline),
                       "--junit", str(tmp_path / "junit.xml"), "--max-class-drop", "5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    base = next(c for c in report["checks"] if c["name"] == "int8 vs baseline int8")
    assert base["passed"] and base["stats"]["only_a"] == base["stats"]["only_b"] == 0, base
    assert summary.read_text().startswith("## Edge export gate: PASSED")
    from junitparser import JUnitXml

    suite = next(iter(JUnitXml.fromfile(str(tmp_path / "junit.xml"))))
    names = [case.name for case in suite]
    assert "int8 vs float model" in names and "int8 vs baseline int8" in names and "int8 class cat recall vs baseline" in names
    assert suite.failures == 0 and suite.tests == len(names) == len(report["checks"])
    # Two exports of the same weights: python -m export.noise finds no training noise in them, and says so as
    # gate-file lines; one export is not enough (exit 2, one line).
    from export.noise import main as noise_main

    assert noise_main([str(baseline), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| int8 | 2 | 1 | 0.00 | 0.00 | 0.00 | **0.00** |" in out and "training_noise = 0.00" in out, out
    assert "note: 2 runs (1 pair(s)) give a rough figure" in out
    assert noise_main([str(baseline)]) == 2
    assert capsys.readouterr().err.strip() == "error: exports: need at least 2 exports of retrains of one recipe, got 1"


@pytest.fixture(scope="module")
def planted_export(full_export, planted, tmp_path_factory, cache_dir):
    """The planted model gated against the full export, with JUnit and GitHub's step summary: (its folder, the
    completed export)."""
    import os

    baseline, _ = full_export
    tmp = tmp_path_factory.mktemp("planted-export")
    saved = os.environ.get("GITHUB_STEP_SUMMARY")
    os.environ["GITHUB_STEP_SUMMARY"] = str(tmp / "summary.md")
    try:
        proc = gate_export(planted, tmp / "out", cache_dir, "--baseline", str(baseline), "--junit",
                           str(tmp / "junit.xml"), "--max-class-drop", "5", "--class-floor", "cat=20")
    finally:
        if saved is None:
            os.environ.pop("GITHUB_STEP_SUMMARY")
        else:
            os.environ["GITHUB_STEP_SUMMARY"] = saved
    return tmp, proc


def test_a_planted_regression_fails_and_names_the_class(planted_export):
    tmp_path, proc = planted_export
    summary, out = tmp_path / "summary.md", tmp_path / "out"
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    fails = [line for line in proc.stderr.splitlines() if line.startswith("FAIL ")]
    assert "FAIL int8 class cat recall vs baseline: drop" in proc.stderr
    assert any(line.startswith("FAIL int8 class cat recall floor: recall") for line in fails), fails
    assert not any("class dog" in line or "class truck" in line for line in fails), fails  # only the damaged class
    report = json.loads((out / "report.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "int8 vs baseline int8")
    assert check["stats"]["mcnemar_p"] < 1e-6 and check["stats"]["p_value"] < 0.01, check  # beyond training noise
    assert check["flips"]["broken"]["by_class"]["cat"] > 200, check
    from junitparser import Failure, JUnitXml

    suite = next(iter(JUnitXml.fromfile(str(tmp_path / "junit.xml"))))
    failed = {case.name for case in suite if any(isinstance(r, Failure) for r in case.result)}
    assert {"int8 class cat recall vs baseline", "int8 class cat recall floor", "int8 vs baseline int8"} <= failed
    assert "**Failed:**" in summary.read_text() and "class cat" in summary.read_text()
    card = (out / "model_card.md").read_text()
    assert "Broken against the baseline" in card and (out / "flips_broken.png").stat().st_size > 1000


def test_the_noise_lines_go_back_through_the_gate_file(full_export, planted_export, regression_run, tmp_path,
                                                      cache_dir, capsys):
    """What ``python -m export.noise`` prints as gate-file lines, committed in a gate.toml beside a policy, a budget
    and class floors, is what ``--gate`` then judges by: each value in the report's gate, and the checks computed
    with that training noise. (The planted model stands in for a second retrain: its cat class moves far more than
    a seed's would, so the figures are large.)"""
    import tomllib

    baseline, _ = full_export
    from export.noise import main as noise_main

    assert noise_main([str(baseline), str(planted_export[0] / "out")]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.split("# gate.toml", 1)[1].splitlines()[1:] if line.strip()]
    assert [line.split(" = ")[0] for line in lines] == ["training_noise", "class_training_noise"], printed
    noise = tomllib.loads("\n".join(lines))
    assert 0 < noise["training_noise"] < noise["class_training_noise"], noise  # one class was cut
    gate_file = tmp_path / "gate.toml"
    gate_file.write_text('policy = "regression"\nmax_regression = 0.75\nalpha = 0.1\nmax_drop = 1.5\n'
                         'max_class_drop = 5.0\n' + "\n".join(lines) + '\n[class_floors]\nautomobile = 30.0\n')
    proc = gate_export(regression_run / "model.keras", tmp_path / "out", cache_dir, "--baseline", str(baseline),
                       "--gate", str(gate_file))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    gate = report["gate"]
    assert (gate["policy"], gate["max_regression"], gate["alpha"], gate["max_drop_pp"], gate["max_class_drop"],
            gate["class_floors"]) == ("regression", 0.75, 0.1, 1.5, 5.0, {"automobile": 30.0}), gate
    assert (gate["training_noise"], gate["class_training_noise"]) == (noise["training_noise"],
                                                                      noise["class_training_noise"])
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["int8 vs baseline int8"]["stats"]["noise_pp"] == noise["training_noise"]
    assert f"with {noise['training_noise']:g} pp training noise" in checks["int8 vs baseline int8"]["why"]
    assert checks["int8 class cat recall vs baseline"]["stats"]["noise_pp"] == noise["class_training_noise"]
    assert checks["int8 class automobile recall floor"]["passed"]


def test_a_baseline_of_other_images_or_a_bad_gate_is_refused(full_export, regression_run, tiny_tree_tgz, tmp_path,
                                                             cache_dir):
    baseline, _ = full_export
    proc = gate_export(regression_run / "model.keras", tmp_path / "a", cache_dir, "--baseline", str(baseline),
                       data=tiny_tree_tgz)
    assert proc.returncode == 2 and not (tmp_path / "a").exists()
    assert proc.stderr.startswith(f"error: --baseline {baseline}: made on other test images")
    bad = tmp_path / "gate.toml"
    bad.write_text('policy = "lenient"\n')
    proc = gate_export(regression_run / "model.keras", tmp_path / "b", cache_dir, "--gate", str(bad))
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: gate: policy: unknown policy 'lenient'; choose "
                                                            "from fixed, regression, non_inferiority")


@pytest.mark.parametrize("policy", ["non_inferiority", "regression"])
def test_the_log_the_report_and_the_exit_status_say_one_verdict(regression_run, tmp_path, cache_dir, policy):
    """--max-drop 0 under a drift policy other than the fixed rule, where the two disagree: at a margin of 0,
    non_inferiority fails every variant not significantly better than its float model (its interval's worst case is
    never under 0), so one within --max-drop (a drop of 0 or less: float16's is, on the machines measured) fails;
    regression passes every drop that is not significant, so one over --max-drop passes. Whatever the numbers on
    this CPU, the log's gate lines, the FAIL lines, report.json, report.md, JUnit and the exit status say the same
    (export.gate.verdict decides; before it, the log printed the fixed rule's OVER THRESHOLD)."""
    from junitparser import Failure, JUnitXml

    out = tmp_path / "out"
    proc = gate_export(regression_run / "model.keras", out, cache_dir, "--max-drop", "0", "--float-policy", policy,
                       "--variants", "float16,int8", "--junit", str(tmp_path / "gate.xml"))
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    drift = {c["variant"]: c for c in report["checks"] if c["kind"] == "drift"}
    junit_failed = {case.name for case in next(iter(JUnitXml.fromfile(str(tmp_path / "gate.xml"))))
                    if any(isinstance(r, Failure) for r in case.result)}
    md = (out / "report.md").read_text()
    assert set(rows) == {"float16", "int8"} and all(r["status"] == "ok" for r in rows.values()), report["variants"]
    for name, r in rows.items():
        word = "pass" if r["passed"] else "FAIL"
        assert f"  gate  {name:<14} {word}: {drift[name]['why']}" in proc.stdout, proc.stdout[-3000:]
        assert r["passed"] == drift[name]["passed"] == report["verdict"]["variants"][name]["passed"]
        assert (f"FAIL {name}: " in proc.stderr) == (not r["passed"]) == (f"{name} vs float model" in junit_failed)
        assert f"| {'pass' if r['passed'] else '**FAIL**'} |" in next(line for line in md.splitlines()
                                                                       if line.startswith(f"| {name} |"))
        if policy == "non_inferiority" and r["drop_pp"] >= 0:  # within --max-drop or not: never proven under 0
            assert not r["passed"], drift[name]
        if policy == "regression" and drift[name]["stats"]["p_value"] >= 0.05:  # a drop over 0, not significant
            assert r["passed"], drift[name]
    assert "OVER THRESHOLD" not in proc.stdout
    assert proc.returncode == report["verdict"]["exit_status"] == (0 if all(r["passed"] for r in rows.values()) else 1)
    assert report["passed"] == (proc.returncode == 0) and md.startswith("# Edge export report: PASSED" if
                                                                         report["passed"] else "# Edge export report: FAILED")


def test_one_verdict_where_the_fixed_rule_and_the_policy_disagree():
    """export.gate.verdict.decide on real drift checks of planted predictions (1,000 images): a variant 0.4 points
    under its float model, within --max-drop 0.5, fails non_inferiority (4 images cannot prove the drop is under
    0.5); one 0.6 points under, over --max-drop, passes regression (16 broken and 10 fixed images are not a
    significant drop). The log's lines, the FAIL lines, report.json's rows and the exit status follow the decision."""
    from export.config import ExportConfig
    from export.gate.checks import GateConfig, drift_checks
    from export.gate.verdict import decide, verdict_lines
    from export.report import report_rows
    from export.results import Measurement, VariantResult

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1000)
    float_pred = y.copy()
    a = y.copy()
    a[:4] = (y[:4] + 1) % 10  # 4 images broken: drop 0.4
    b = y.copy()
    b[:16] = (y[:16] + 1) % 10  # 16 broken ...
    float_pred[100:110] = (y[100:110] + 1) % 10  # ... and 10 the float model gets wrong that b gets right: drop 0.6
    a[100:110] = float_pred[100:110]

    def result(name, pred):
        m = Measurement(accuracy=float(np.mean(pred == y)), agreement=float(np.mean(pred == float_pred)),
                        latency_ms_p50=1.0, latency_ms_p90=1.0, throughput_images_per_s=1.0, throughput_batch=1,
                        predictions_file="", input={}, output={})
        return VariantResult(name, "tflite", "ok", path=f"{name}.tflite", size_bytes=1, measured=m,
                             drop_pp=round((np.mean(float_pred == y) - m.accuracy) * 100, 9))

    results = [result("dynamic", a), result("int8", b),
               VariantResult("int8_selective", "tflite", "skipped", "int8 is within --max-drop")]
    assert [r.drop_pp for r in results[:2]] == [pytest.approx(0.4), pytest.approx(0.6)]
    for policy, passed in (("non_inferiority", {"dynamic": False}), ("regression", {"int8": True})):
        cfg = ExportConfig(model="m.keras", max_drop=0.5, gate=GateConfig(float_policy=policy))
        checks = drift_checks(y, float_pred, {"dynamic": a, "int8": b}, cfg.max_drop, cfg.gate)
        verdict = decide(results, checks, cfg)
        for name, expected in passed.items():
            assert verdict.of(name).passed is expected, (policy, verdict.of(name))
        assert verdict.of("int8_selective").passed  # skipped, not named
        lines = verdict_lines(verdict)
        assert len(lines) == 2 and all((" pass: " in line) == verdict.of(line.split()[1]).passed for line in lines)
        rows = report_rows(results, {}, {}, verdict, Path("out"))
        assert [r["passed"] for r in rows] == [d.passed for d in verdict.variants]
        assert verdict.exit_status == (0 if all(d.passed for d in verdict.variants) else 1)
        assert [f.split(":")[0] for f in verdict.failures] == [f"FAIL {d.variant}" for d in verdict.variants
                                                               if not d.passed]
    # The variant the user named must be built: skipped, it fails, and the command says why.
    named = decide(results, [], ExportConfig(model="m.keras", variants=("int8_selective",)))
    assert not named.of("int8_selective").passed and named.failures == ["FAIL int8_selective: int8 is within --max-drop"]


def test_a_junit_path_that_cannot_be_written_is_refused_before_any_work(regression_run, tmp_path, cache_dir):
    """--junit under an existing file: one line, exit 2, nothing built or written (it used to build and measure
    everything, then end with a FileExistsError traceback)."""
    blocker = tmp_path / "some_file"
    blocker.write_text("")
    proc = gate_export(regression_run / "model.keras", tmp_path / "out", cache_dir, "--junit", str(blocker / "gate.xml"))
    assert proc.returncode == 2 and not (tmp_path / "out").exists(), proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: --junit {blocker / 'gate.xml'}: {blocker} is a file, not a folder"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (3, 9), (40, 61), (700, 612), (5, 0)])
def test_mcnemar_is_the_exact_binomial_test(only_a, only_b):
    from export.gate.stats import mcnemar_exact

    expect = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expect, rel=1e-9)


def test_a_retrain_within_the_training_noise_passes_where_mcnemar_alone_fails():
    """A candidate 1 point under its baseline on 10,000 images, 7.5% vs 6.5% of them right only in one: McNemar
    calls it real (p < 0.01), as it is for these two files; a same-recipe retrain moves accuracy that much (the
    default recipe's 0.5 points of training noise), so the default gate passes it and still fails 2 points."""
    from export.gate.checks import GateConfig, judge
    from export.gate.stats import compare

    n = 10_000
    y = np.zeros(n, np.int64)
    base = np.where(np.arange(n) < 750, 0, 1)  # the first 750 right only in the baseline
    for drop_pp, default_passes in ((1.0, True), (2.0, False)):
        extra = 750 - int(drop_pp * 100)
        cand = np.where((np.arange(n) >= 750) & (np.arange(n) < 750 + extra), 0, 1)
        gate = GateConfig()
        s = compare(y, base, cand, 1 - gate.alpha, gate.seed, gate.training_noise)
        alone = compare(y, base, cand, 1 - gate.alpha, gate.seed)
        assert s.delta_pp == pytest.approx(-drop_pp) and s.mcnemar_p == alone.p_value < 0.01
        assert judge("regression", gate.max_regression, s, gate.alpha)[0] is default_passes, s
        assert judge("regression", gate.max_regression, alone, gate.alpha)[0] is False
        assert s.ci_high_pp - s.ci_low_pp > alone.ci_high_pp - alone.ci_low_pp  # the interval allows for it too


@pytest.mark.parametrize("noise_pp", [0.0, 0.5, 1.5])
def test_training_noise_recovers_the_spread_of_simulated_retrains(noise_pp):
    """30 simulated retrains on 10,000 images of mixed difficulty, each shifted by its own seed's luck (a
    difference between two of them has a spread of noise_pp points): the estimate finds it, beyond the test
    images' own noise, and finds about none when there is none."""
    from export.gate.stats import training_noise

    rng = np.random.default_rng(1)
    n, classes = 10_000, 10
    y = rng.integers(0, classes, n)
    difficulty = rng.beta(4, 2, n)
    runs = []
    for _ in range(30):
        luck = rng.normal(0, noise_pp / np.sqrt(2)) / 100
        right = rng.random(n) < np.clip(difficulty + luck, 0, 1)
        runs.append(np.where(right, y, (y + 1) % classes))
    est = training_noise(y, runs)
    assert est["pairs"] == 435 and est["images_sd_pp"] > 0.5
    assert est["training_noise"] == pytest.approx(noise_pp, abs=0.25), est
