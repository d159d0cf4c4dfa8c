"""Quantisation-aware fine-tuning with tfmot, of the model export.qat.model annotates (after export.qat.graph's
rewrites), scheme by scheme (export.qat.model.SCHEMES, tried in order until one builds).

A scheme that raises is followed by the next one in the same process. A scheme that hangs (tfmot's
graph rebuild can loop forever) is killed by the export's supervisor, which resumes with the next scheme.

Fine-tuning uses the loss that matches the model's output (probabilities, logits, one sigmoid unit),
and is checked for divergence (a non-finite loss, or held-out accuracy that fell back towards chance);
a diverged run is retried once with a ten times smaller learning rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from export.model.predictions import class_predictions
from export.qat.graph import for_qat
from export.qat.model import count_quantized, float_layers, quantize_aware_model
from toolkit.tfmot import has_kernel
from export.model.rewrite import outputs_close
from toolkit.tf import import_keras, import_tf

# QAT needs a number of optimiser steps to settle the fake-quantisation ranges, not a number of epochs:
# on scikit-learn's digits (1,293 images, 10 steps of 128 per epoch) 1 epoch lost 5.0 points, 2 lost
# 2.5 and 4 recovered to 0.3 (tests/test_own_data.py's model); on CIFAR-10 one epoch is 350 steps.
# Small sets get as many epochs as this many steps take (never fewer than asked).
QAT_MIN_STEPS = 100
QAT_BATCH = 128


def qat_epochs_for(num_images: int, epochs: int) -> int:
    steps_per_epoch = max(1, math.ceil(num_images / QAT_BATCH))
    return max(epochs, math.ceil(QAT_MIN_STEPS / steps_per_epoch))

class QATDiverged(RuntimeError):
    """Fine-tuning diverged at both learning rates."""


@dataclass
class QATResult:
    model: object
    scheme: str
    quantized_layers: int  # layers with kernels whose weights tfmot quantises
    weighted_layers: int  # layers with kernels (convolution, Dense, attention), nested models inlined
    learning_rate: float
    retried: bool
    val_accuracy: float
    final_loss: float
    float_layers: dict  # layer name -> why it stayed in float
    dropped_layers: list  # identity at inference, dropped before fine-tuning (dropout, noise, augmentation)

    def summary(self) -> dict:
        return {"scheme": self.scheme, "quantized_layers": self.quantized_layers,
                "float_layers": self.float_layers, "dropped_layers": self.dropped_layers,
                "weighted_layers": self.weighted_layers, "learning_rate": self.learning_rate,
                "retried_after_divergence": self.retried, "val_accuracy": self.val_accuracy,
                "final_loss": self.final_loss}


def loss_for(output_kind: str):
    """The cross-entropy that matches what the model outputs (labels are integer class ids)."""
    keras = import_keras()
    if output_kind == "probabilities":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    if output_kind == "logits":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if output_kind == "sigmoid":
        return keras.losses.BinaryCrossentropy(from_logits=False)
    if output_kind == "sigmoid_logit":
        return keras.losses.BinaryCrossentropy(from_logits=True)
    raise ValueError(f"output_kind: unknown {output_kind!r}")


def _train_dataset(x, y, batch_size: int, output_kind: str, seed: int):
    tf = import_tf()
    labels = y.astype(np.float32).reshape(-1, 1) if output_kind.startswith("sigmoid") else y.astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((x, labels)).shuffle(min(len(x), 20_000), seed=seed)
    return ds.batch(batch_size).map(lambda a, b: (tf.cast(a, tf.float32), b)).prefetch(tf.data.AUTOTUNE)


def fine_tune(qat, x, y, x_val, y_val, *, output_kind: str, epochs: int, learning_rate: float,
              batch_size: int = QAT_BATCH, seed: int = 0, log: Callable[[str], None] = print,
              heartbeat: Optional[Callable[[], None]] = None) -> tuple[float, float, Optional[str]]:
    """Fit ``qat`` in place, keeping the weights of the epoch with the best held-out accuracy; returns
    (that accuracy, last loss, divergence reason or None).

    Best-epoch, because more QAT steps are not always better: on the zoo's outlier_range model (a weak
    42% model, 2,700 images) five epochs lost 5 points where one epoch had been within the gate, while
    the digits needed ten epochs to recover (QAT_MIN_STEPS)."""
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    qat.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss_for(output_kind))
    losses: list[float] = []
    best = {"accuracy": -1.0, "epoch": 0, "weights": None}

    def held_out() -> float:
        pred = class_predictions(qat.predict(x_val.astype(np.float32), batch_size=500, verbose=0), output_kind)
        return float(np.mean(pred == y_val))

    class Watch(keras.callbacks.Callback):
        last = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                self.model.stop_training = True  # nothing good comes after a NaN
                losses.append(float(loss))
            if heartbeat is not None and time.monotonic() - Watch.last > 5:
                Watch.last = time.monotonic()
                heartbeat()

        def on_epoch_end(self, epoch, logs=None):
            losses.append(float(logs["loss"]))
            acc = held_out() if math.isfinite(logs["loss"]) else float("nan")
            if acc > best["accuracy"]:
                best.update(accuracy=acc, epoch=epoch + 1, weights=qat.get_weights())
            log(f"  qat epoch {epoch + 1}/{epochs}  loss {logs['loss']:.4f}  held-out {acc:.4f}  (lr {learning_rate:g})")

    qat.fit(_train_dataset(x, y, batch_size, output_kind, seed), epochs=epochs, verbose=0, callbacks=[Watch()])
    last = losses[-1] if losses else float("nan")
    if not all(math.isfinite(v) for v in losses):
        return float("nan"), last, f"loss became {last} at lr {learning_rate:g}"
    if best["weights"] is not None and best["epoch"] < len(losses):
        qat.set_weights(best["weights"])
        log(f"  qat: kept epoch {best['epoch']} (best held-out accuracy {best['accuracy']:.4f})")
    return best["accuracy"], last, None


class QATRewriteMismatch(ValueError):
    """export.qat.graph's rewrite of the model does not compute what the model does."""


def check_equivalent(model, prepared, images) -> None:
    """Raise QATRewriteMismatch unless ``prepared`` (for_qat's) gives ``model``'s outputs on ``images``
    (export.model.rewrite.outputs_close's tolerance): QAT would otherwise start from another function."""
    if prepared is model or not len(images):
        return
    x = images.astype(np.float32)
    close, measured = outputs_close(np.asarray(model.predict(x, verbose=0)), np.asarray(prepared.predict(x, verbose=0)))
    if not close:
        raise QATRewriteMismatch(f"the graph rewritten for QAT does not compute the model's outputs ({measured})")


def train_qat(model, x, y, x_val, y_val, *, output_kind: str, num_classes: int, float_val_accuracy: float,
              epochs: int, scheme: str, learning_rate: float = 1e-4, seed: int = 0, qat_model=None,
              prepared: Optional[tuple] = None, custom_objects: Optional[dict] = None,
              log: Callable[[str], None] = print, heartbeat: Optional[Callable[[], None]] = None) -> QATResult:
    """Fine-tune the QAT model of ``scheme`` (``qat_model`` if already built, else built here) from the
    float weights; a diverged run is retried once, on a fresh build, at a tenth of the learning rate,
    then QATDiverged is raised. ``prepared``: for_qat(model)'s result when the caller has it already."""
    if epochs < 1:
        raise ValueError(f"qat_epochs: must be >= 1, got {epochs}")
    chance = 1.0 / num_classes
    prepared, dropped = prepared if prepared is not None else for_qat(model)
    check_equivalent(model, prepared, x_val[:256])
    weighted = sum(1 for layer in prepared.layers if has_kernel(layer))
    left_float = float_layers(prepared, scheme)
    reasons = []
    for attempt, lr in enumerate((learning_rate, learning_rate / 10)):
        qat = qat_model if attempt == 0 and qat_model is not None else \
            quantize_aware_model(model, scheme, custom_objects, prepared=prepared)
        quantized = count_quantized(qat)
        val_acc, loss, reason = fine_tune(qat, x, y, x_val, y_val, output_kind=output_kind, epochs=epochs,
                                          learning_rate=lr, seed=seed, log=log, heartbeat=heartbeat)
        # Accuracy that fell more than half-way back to chance is a fine-tune that broke the model.
        if reason is None and float_val_accuracy > chance + 0.05 and \
                val_acc < chance + 0.5 * (float_val_accuracy - chance):
            reason = (f"held-out accuracy fell to {val_acc:.3f} (float model {float_val_accuracy:.3f}, "
                      f"chance {chance:.3f}) at lr {lr:g}")
        if reason is None:
            return QATResult(qat, scheme, quantized, weighted, lr, attempt > 0, val_acc, loss, left_float, dropped)
        reasons.append(reason)
        log(f"  qat diverged: {reason}" + ("; retrying at lr /10" if attempt == 0 else ""))
    raise QATDiverged("fine-tuning diverged: " + "; then ".join(reasons))
