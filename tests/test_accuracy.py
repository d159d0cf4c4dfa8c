"""Accuracy regression on real data: the tutorial recipe through Ray Train reaches >= 60% in 3 epochs."""

from __future__ import annotations

import json


def test_two_worker_training_reaches_60_percent(regression_run):
    m = json.loads((regression_run / "metrics.json").read_text())
    assert m["num_workers"] == 2 and len(m["workers"]) == 2
    assert m["num_train_images"] == 50_000 and m["num_test_images"] == 10_000
    assert m["epochs"] == 3 and m["config"]["batch_size"] == 32 and m["config"]["augment"] is False
    # Reference (single process, same recipe): 65% after 3 epochs.
    assert m["test_accuracy"] >= 0.60, f"test accuracy {m['test_accuracy']:.4f} < 0.60"
