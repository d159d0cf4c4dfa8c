"""Quantisation-aware fine-tuning with tfmot, for models tfmot's default scheme cannot rebuild too.

Schemes, tried in order until one builds:

- ``default``: every layer tfmot's 8-bit registry has a rule for annotated (batch norm folded by its
  transforms); the others (custom layers, GroupNormalization) left in float, named in the report;
- ``conv_dense``: only Conv2D and Dense layers annotated, everything else left in float. tfmot's
  whole-graph layout transforms (separable-convolution splitting, batch-norm folding across shared
  inputs) are what fail on mobile-style graphs; plain convolutions and dense layers always rebuild.

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

from export.model_io import class_predictions
from export.activations import functions
from export.qat_graph import TFMOT_ACTIVATIONS, activation_name, for_qat
from export.rewrite import outputs_close
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

SCHEMES = ("default", "conv_dense")


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


def _output_quantize_config():
    """Quantise only a layer's output (Rescaling has no weights, but the converter needs the range
    of the first convolution's input)."""
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras

    class OutputQuantizeConfig(qk.QuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [qk.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                         narrow_range=False)]

        def get_config(self):
            return {}

    return OutputQuantizeConfig


# Preprocessing layers that scale pixel values (to [0, 1], or to about +-3 for an adapted Normalization):
# computed in float inside the device model, only their output quantised, so that the first convolution's
# input has a range. Layers that move pixels without scaling them (Resizing, CenterCrop) stay in float,
# unannotated: their 0-255 output would sit against the [-6, 6] range tfmot's output quantiser starts
# from (measured: the zoo's preprocessing model fell to chance within one epoch), and the converter
# calibrates them from the representative images instead.
SCALING = ("Rescaling", "Normalization")
SCALED = "preprocessing: computed in float, output quantised"
GEOMETRIC = ("Resizing", "CenterCrop")


def _fused_quantize_config():
    """Quantise a convolution's or Dense's weights as tfmot does, and its output after its fused activation
    (ReLU6, which tfmot's QuantizeAwareActivation does not know), as TFLite computes a fused activation."""
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantizers import (
        Default8BitConvWeightsQuantizer,
    )

    qk = tfmot.quantization.keras

    class FusedActivationQuantizeConfig(qk.QuantizeConfig):
        def __init__(self, weight_attr: str = "kernel", per_axis: bool = True):
            self.weight_attr, self.per_axis = weight_attr, per_axis

        def get_weights_and_quantizers(self, layer):
            q = Default8BitConvWeightsQuantizer() if self.per_axis else \
                qk.quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=True, narrow_range=True)
            return [(getattr(layer, self.weight_attr), q)]

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            setattr(layer, self.weight_attr, quantize_weights[0])

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return [qk.quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False,
                                                         narrow_range=False)]

        def get_config(self):
            return {"weight_attr": self.weight_attr, "per_axis": self.per_axis}

    return FusedActivationQuantizeConfig


def annotation(layer, scheme: str, registry) -> tuple[str, str]:
    """How ``scheme`` treats ``layer``: ("quantize", ""), ("fused", ""), ("output", why) or ("float", why).

    ``default`` quantises every layer tfmot's 8-bit registry has a rule for; the others (a custom layer,
    GroupNormalization) are fine-tuned in float with their output quantised, as the full-integer model
    will quantise it, instead of refusing the whole model. A ``TFOpLambda`` op stays unannotated (tfmot
    cannot clone one with a config). ``conv_dense`` quantises convolutions and dense layers only."""
    kind = type(layer).__name__
    if kind in SCALING:
        return "output", SCALED
    if kind in GEOMETRIC:
        return "float", "preprocessing: moves pixels, computed in float (the converter calibrates it)"
    if kind == "InputLayer":
        return "float", "input"
    if kind == "TFOpLambda":
        return "float", f"TensorFlow op {getattr(layer, 'symbol', layer.name)}: fine-tuned in float (the converter calibrates it)"
    if scheme == "conv_dense":
        if kind in ("Conv2D", "Dense"):
            return "quantize", ""
        return "float", "conv_dense scheme: only Conv2D and Dense are quantised"
    if kind in ("Conv2D", "DepthwiseConv2D", "Dense") and activation_name(layer) == "relu6":
        return "fused", ""  # export.qat_graph fused its ReLU6: weights quantised, output after the ReLU6
    if kind == "MultiHeadAttention":
        return "float", "attention: fine-tuned in float, unannotated (the converter calibrates its ops)"
    if kind == "Activation" and activation_name(layer) not in TFMOT_ACTIVATIONS:
        return "output", f"activation {activation_name(layer)}: tfmot has no rule for it; fine-tuned in float, output quantised"
    if kind == "BatchNormalization":  # export.qat_graph folded those after a convolution or Dense
        return "output", "batch norm not after a convolution or Dense (not folded): fine-tuned in float, output quantised"
    if registry.supports(layer):
        return "quantize", ""
    if kind == "StaticGroupNormalization":  # export.rewrite's form of GroupNormalization
        return "output", "GroupNormalization: tfmot has no 8-bit rule for it; fine-tuned in float, output quantised"
    module = type(layer).__module__.split(".")[0]
    if module not in ("tf_keras", "keras"):
        return "output", (f"custom layer {kind} (module {type(layer).__module__}): tfmot has no 8-bit rule for it; "
                          "fine-tuned in float, output quantised")
    return "output", f"tfmot's 8-bit registry has no rule for {kind}; fine-tuned in float, output quantised"


def _registry():
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry,
    )

    return default_8bit_quantize_registry.Default8BitQuantizeRegistry()


def float_layers(model, scheme: str) -> dict[str, str]:
    """The layers ``scheme`` does not quantise as tfmot would (inputs and scaling preprocessing aside):
    fine-tuned in float, with why. In the full-integer model the converter gives them int8 kernels and
    calibrated ranges like any other op."""
    registry = _registry()
    out = {}
    for layer in model.layers:
        what, why = annotation(layer, scheme, registry)
        if what not in ("quantize", "fused") and why not in ("input", SCALED):
            out[layer.name] = why
    return out


def quantize_aware_model(model, scheme: str = "default", custom_objects: Optional[dict] = None):
    """``model`` (tf_keras) wrapped for quantisation-aware training with ``scheme`` (see SCHEMES), after
    export.qat_graph.for_qat (nested models inlined, inference-identity layers dropped, batch norm folded,
    separable convolutions and unsupported activations split)."""
    keras = import_keras()
    import tensorflow_model_optimization as tfmot

    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown QAT scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    qk = tfmot.quantization.keras
    OutputQuantizeConfig = _output_quantize_config()
    FusedActivationQuantizeConfig = _fused_quantize_config()
    model, _ = for_qat(model)
    registry = _registry()

    def annotate(layer):
        what, _ = annotation(layer, scheme, registry)
        if what == "output":
            return qk.quantize_annotate_layer(layer, quantize_config=OutputQuantizeConfig())
        if what == "fused":
            depthwise = type(layer).__name__ == "DepthwiseConv2D"
            config = FusedActivationQuantizeConfig("depthwise_kernel" if depthwise else "kernel",
                                                   per_axis=type(layer).__name__ != "Dense")
            return qk.quantize_annotate_layer(layer, quantize_config=config)
        return qk.quantize_annotate_layer(layer) if what == "quantize" else layer

    scope = {"OutputQuantizeConfig": OutputQuantizeConfig, "FusedActivationQuantizeConfig": FusedActivationQuantizeConfig,
             **functions(), **(custom_objects or {})}
    with qk.quantize_scope(scope):
        annotated = keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        qat_model = qk.quantize_apply(annotated)
    # An adapted Normalization computes from tensors derived from its weights when it is adapted or
    # loaded, not when weights are set: without this it normalises with mean 0 and variance 1 (measured:
    # the zoo's preprocessing model at chance before any fine-tuning).
    for layer in qat_model.layers:
        inner = getattr(layer, "layer", layer)
        if type(inner).__name__ == "Normalization":
            inner.finalize_state()
    return qat_model


def has_kernel(layer) -> bool:
    """A layer with a weight matrix or kernel (convolution, Dense, attention): what quantisation coverage
    counts (batch norm is folded, scales and shifts are vectors)."""
    return any("kernel" in w.name for w in layer.weights)


def count_quantized(qat_model) -> int:
    """Layers with a kernel whose weights tfmot quantises (the coverage the report states; a layer only
    output-quantised does not count)."""
    return sum(1 for layer in qat_model.layers
               if type(layer).__name__.startswith("QuantizeWrapper")
               and layer.quantize_config.get_weights_and_quantizers(layer.layer))


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
    """export.qat_graph's rewrite of the model does not compute what the model does."""


def check_equivalent(model, prepared, images) -> None:
    """Raise QATRewriteMismatch unless ``prepared`` (for_qat's) gives ``model``'s outputs on ``images``
    (export.rewrite.outputs_close's tolerance): QAT would otherwise start from another function."""
    if prepared is model or not len(images):
        return
    x = images.astype(np.float32)
    close, measured = outputs_close(np.asarray(model.predict(x, verbose=0)), np.asarray(prepared.predict(x, verbose=0)))
    if not close:
        raise QATRewriteMismatch(f"the graph rewritten for QAT does not compute the model's outputs ({measured})")


def train_qat(model, x, y, x_val, y_val, *, output_kind: str, num_classes: int, float_val_accuracy: float,
              epochs: int, scheme: str, learning_rate: float = 1e-4, seed: int = 0, qat_model=None,
              custom_objects: Optional[dict] = None, log: Callable[[str], None] = print, heartbeat: Optional[Callable[[], None]] = None) -> QATResult:
    """Fine-tune the QAT model of ``scheme`` (``qat_model`` if already built, else built here) from the
    float weights; a diverged run is retried once, on a fresh build, at a tenth of the learning rate,
    then QATDiverged is raised."""
    if epochs < 1:
        raise ValueError(f"qat_epochs: must be >= 1, got {epochs}")
    chance = 1.0 / num_classes
    prepared, dropped = for_qat(model)
    check_equivalent(model, prepared, x_val[:256])
    weighted = sum(1 for layer in prepared.layers if has_kernel(layer))
    left_float = float_layers(prepared, scheme)
    reasons = []
    for attempt, lr in enumerate((learning_rate, learning_rate / 10)):
        qat = qat_model if attempt == 0 and qat_model is not None else \
            quantize_aware_model(model, scheme, custom_objects)
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
