"""Classification metrics from predicted probabilities (numpy only: usable for any runtime)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of images of true class i predicted as class j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, the tutorial's precision/recall, macro precision/recall, per-class accuracy and
    the confusion matrix.

    ``precision``/``recall`` are computed as ``tf.keras.metrics.Precision/Recall`` do on one-hot
    labels (threshold 0.5 on each class probability, counted over all image-class pairs), so they
    compare directly with the tutorial's 76.55% precision.
    """
    y_true = np.asarray(y_true).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if probs.shape != (len(y_true), k):
        raise ValueError(f"probs: shape {probs.shape}, expected ({len(y_true)}, {k})")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    onehot = np.eye(k, dtype=bool)[y_true]
    above = probs > 0.5
    tp = np.sum(above & onehot)
    precision = float(tp / max(1, above.sum()))
    recall = float(tp / max(1, onehot.sum()))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_class_recall = np.where(cm.sum(1) > 0, np.diag(cm) / cm.sum(1), 0.0)
        per_class_precision = np.where(cm.sum(0) > 0, np.diag(cm) / cm.sum(0), 0.0)
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "precision": precision,
        "recall": recall,
        "macro_precision": float(per_class_precision.mean()),
        "macro_recall": float(per_class_recall.mean()),
        "per_class_accuracy": {c: float(a) for c, a in zip(class_names, per_class_recall)},
        "confusion_matrix": cm.tolist(),
    }
