"""What a model outputs, and whether it fits the data, before any conversion starts.

:func:`inspect_model` refuses what the exporter cannot handle (NaN weights, output units that do not match the
classes, an input that does not fit the images) with one line, and finds out what the output means:
probabilities, logits, or one sigmoid unit of a binary classifier. Every variant is measured, trained and
documented (sidecar ``output_kind``) with that meaning.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from export.errors import ExportInputError
from export.model.load import ModelInfo, SourceModel
from export.gate.stats import points


def detect_output_kind(outputs: np.ndarray, compute_dtype: str = "float32") -> str:
    """What the outputs on a batch are: rows of non-negative values summing to 1 (within the rounding of
    ``compute_dtype``: a bfloat16 softmax's rows sum to 1 within about 0.4%) are probabilities; a single unit in
    [0, 1] is a sigmoid probability; anything else is logits."""
    if outputs.shape[-1] == 1:
        return "sigmoid" if (outputs.min() >= 0 and outputs.max() <= 1) else "sigmoid_logit"
    atol = 1e-2 if compute_dtype == "bfloat16" else 1e-3
    if outputs.min() >= -1e-6 and np.allclose(outputs.sum(-1), 1.0, atol=atol):
        return "probabilities"
    return "logits"


def class_predictions(outputs: np.ndarray, kind: str) -> np.ndarray:
    """Top-1 class per row, for any output kind (a sigmoid unit is class 1 above 0.5 / logit 0)."""
    outputs = np.asarray(outputs)
    if kind == "sigmoid":
        return (outputs.reshape(len(outputs), -1)[:, 0] > 0.5).astype(np.int64)
    if kind == "sigmoid_logit":
        return (outputs.reshape(len(outputs), -1)[:, 0] > 0).astype(np.int64)
    return outputs.argmax(-1)


def drop_and_agreement(pred: np.ndarray, y: np.ndarray, float_pred: Optional[np.ndarray],
                       float_accuracy: float) -> tuple[float, float, Optional[float]]:
    """(accuracy, drop from ``float_accuracy`` in points, top-1 agreement with ``float_pred``, None without it) of
    a variant's classes ``pred`` on images labelled ``y``."""
    acc = float(np.mean(pred == y))
    return acc, points(float_accuracy - acc), None if float_pred is None else float(np.mean(pred == float_pred))


def tflite_accuracy(blob: bytes, x: np.ndarray, y: np.ndarray, kind: str) -> float:
    """Top-1 accuracy of a TFLite flatbuffer (its bytes) on images ``x`` with labels ``y``, in LiteRT."""
    from export.runtime import TFLiteModel

    return float(np.mean(class_predictions(TFLiteModel(content=blob).predict(x), kind) == y))


def check_finite_weights(model: SourceModel) -> None:
    """Refuse NaN or infinite weights up front, naming the first layer that has them."""
    for name, w in model.weights():
        if w.dtype.kind == "f" and not np.all(np.isfinite(w)):
            bad = "NaN" if np.isnan(w).any() else "infinite"
            raise ExportInputError(f"{model.info.path}: layer {name} has {bad} weights; the model is broken "
                                  "(diverged training?), nothing to export")


def inspect_model(model: SourceModel, sample: np.ndarray, num_classes: int, data_desc: str) -> ModelInfo:
    """Check the model against the data and find its output kind; returns the completed ModelInfo."""
    info = model.info
    want, got = tuple(info.input_shape), tuple(sample.shape[1:])
    if want != got:
        raise ExportInputError(f"{info.path}: model input shape {want} does not fit the images of {data_desc} {got}")
    if info.units == 1 and num_classes != 2:
        raise ExportInputError(f"{info.path}: model has 1 output unit (a binary classifier) but {data_desc} has "
                              f"{num_classes} classes")
    if info.units != 1 and info.units != num_classes:
        raise ExportInputError(f"{info.path}: model has {info.units} outputs but {data_desc} has {num_classes} "
                              "classes")
    check_finite_weights(model)
    out = model.predict(sample)
    if not np.all(np.isfinite(out)):
        raise ExportInputError(f"{info.path}: model outputs NaN or infinite values on {data_desc}")
    rewrites = model.check_rewrites(sample, out)
    kind = detect_output_kind(out, model.compute_dtype)
    return ModelInfo(**{**info.to_dict(), "output_kind": kind, "rewrites": rewrites})
