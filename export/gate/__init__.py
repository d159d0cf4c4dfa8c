"""The gate: every check an export is judged by, and the one verdict.

    stats     paired statistics: McNemar's exact test, the paired bootstrap, training noise, points()
    checks    GateConfig and the checks: drift against the float model, against --baseline, per class
    baseline  reads the baseline (an export's stored predictions, or a model evaluated here)
    targets   device profiles (targets.toml) and the checks that each TFLite variant fits and runs there
    verdict   decide(results, checks, config) -> Verdict: each variant's pass or fail and why, the exit status
    ci        the verdict as CI reads it: JUnit XML and GitHub's step summary
    card      the model card of the variant to ship
"""
