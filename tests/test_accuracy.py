"""Accuracy regression on real data: the default recipe and layout through Ray Train reach >= 58% in 4 epochs."""

from __future__ import annotations

import json


def test_default_training_reaches_58_percent(regression_run):
    m = json.loads((regression_run / "metrics.json").read_text())
    assert m["num_workers"] == len(m["workers"]) == 1  # the default layout: one worker per node
    assert m["num_train_images"] == 50_000 and m["num_test_images"] == 10_000
    assert m["epochs"] == 4 and m["config"]["batch_size"] == 256 and m["config"]["optimizer"] == "sgd"
    # Measured with two workers (2026-11-29): 60.9-61.5% test accuracy in four runs; one worker, the same global
    # batch and steps: 61.14% in two runs. Those crops and flips came from stateful random ops, drawn in the order
    # tf.data's threads reached them: on a machine busy with other tests the same run ended at 55.96% and 57.78%.
    # Seeded per batch since (toolkit.data.pipeline.augment_batch): 60.48%, and 60.48% again with two busy loops
    # on the two cores; with the batch index folded in by stateless_fold_in (the seed pair had been written by
    # hand, and two shards' seeds met after a million batches): 60.18% (2026-11-30).
    assert m["test_accuracy"] >= 0.58, f"test accuracy {m['test_accuracy']:.4f} < 0.58"
