"""TFLite variants: float32, dynamic-range, float16, full-integer int8, and QAT int8.

    python -m export.tflite MODEL.keras --data ...    (see --help)

Each ``convert_*`` takes a Keras 2 model and returns the .tflite flatbuffer bytes.
"""

from __future__ import annotations

import sys
from typing import Iterator, Optional

import numpy as np

from toolkit.tf import import_keras, import_tf

VARIANTS = ("float32", "dynamic", "float16", "int8", "qat_int8")


def _representative(calibration: np.ndarray):
    """The converter's representative dataset: raw 0-255 pixels, one image at a time, exactly
    what the model is fed on a device."""
    def gen() -> Iterator[list]:
        for i in range(len(calibration)):
            yield [calibration[i:i + 1].astype(np.float32)]
    return gen


def _converter(model):
    tf = import_tf()
    return tf.lite.TFLiteConverter.from_keras_model(model)


def convert_float32(model) -> bytes:
    return _converter(model).convert()


def convert_dynamic(model) -> bytes:
    """Dynamic-range quantisation: int8 weights, float activations; no calibration needed."""
    tf = import_tf()
    c = _converter(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    return c.convert()


def convert_float16(model) -> bytes:
    tf = import_tf()
    c = _converter(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.target_spec.supported_types = [tf.float16]
    return c.convert()


def convert_int8(model, calibration: np.ndarray, io_type: str = "uint8") -> bytes:
    """Full-integer quantisation calibrated on ``calibration`` (uint8 images); integer-only ops.

    Input and output are ``io_type`` (uint8 or int8): a device feeds camera bytes as they are,
    since the model scales pixels itself (its input scale comes out as 1.0, zero point 0)."""
    tf = import_tf()
    if io_type not in ("uint8", "int8"):
        raise ValueError(f"io_type: expected 'uint8' or 'int8', got {io_type!r}")
    if len(calibration) == 0:
        raise ValueError("calibration: no calibration images")
    c = _converter(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = _representative(calibration)
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = getattr(tf, io_type)
    c.inference_output_type = getattr(tf, io_type)
    return c.convert()


def quantize_aware_model(model):
    """``model`` wrapped for quantisation-aware training with tfmot's default 8-bit scheme.

    Pixel scaling (Rescaling) is not in tfmot's registry: it gets a config that quantises its
    output only, which the converter needs as the first convolution's input range."""
    keras = import_keras()
    import tensorflow_model_optimization as tfmot

    qk = tfmot.quantization.keras

    class OutputQuantizeConfig(qk.QuantizeConfig):
        """Quantise only the layer's output (it has no weights). Without an output range the
        converter has nothing to quantise the next layer's input with."""

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

    def annotate(layer):
        if isinstance(layer, keras.layers.Rescaling):
            return qk.quantize_annotate_layer(layer, quantize_config=OutputQuantizeConfig())
        return qk.quantize_annotate_layer(layer)

    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    with qk.quantize_scope({"OutputQuantizeConfig": OutputQuantizeConfig}):
        return qk.quantize_apply(annotated)


def train_qat(model, x_train: np.ndarray, y_train: np.ndarray, *, epochs: int, batch_size: int = 128,
              learning_rate: float = 1e-4, seed: int = 0, log=print):
    """Fine-tune a QAT copy of ``model`` from its float weights; returns the QAT model."""
    keras = import_keras()
    from toolkit.data import make_train_dataset

    if epochs < 1:
        raise ValueError(f"qat_epochs: must be >= 1, got {epochs}")
    keras.utils.set_random_seed(seed)
    qat = quantize_aware_model(model)
    # A small step: the float weights are already good; QAT only adapts them to 8-bit rounding.
    qat.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="categorical_crossentropy",
                metrics=["accuracy"])
    steps = max(1, len(x_train) // batch_size)
    ds = make_train_dataset(x_train, y_train, batch_size, num_classes=model.output_shape[-1], augment=False,
                            seed=seed)
    tf = import_tf()
    ds = ds.map(lambda a, b: (tf.cast(a, tf.float32), b))

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            log(f"  qat epoch {epoch + 1}/{epochs}  loss {logs['loss']:.4f}  acc {logs['accuracy']:.4f}")

    qat.fit(ds, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[Progress()])
    return qat


def convert_variant(variant: str, model, *, calibration: Optional[np.ndarray] = None,
                    qat_model=None) -> bytes:
    """Convert ``model`` to TFLite ``variant`` (one of ``VARIANTS``)."""
    if variant == "float32":
        return convert_float32(model)
    if variant == "dynamic":
        return convert_dynamic(model)
    if variant == "float16":
        return convert_float16(model)
    if variant == "int8":
        return convert_int8(model, calibration)
    if variant == "qat_int8":
        if qat_model is None:
            raise ValueError("qat_model: required for the qat_int8 variant")
        return convert_int8(qat_model, calibration)
    raise ValueError(f"variant: unknown TFLite variant {variant!r}; choose from {', '.join(VARIANTS)}")


def main(argv: Optional[list[str]] = None) -> int:
    from export.cli import main as cli_main

    return cli_main(argv, formats=("tflite",), prog="python -m export.tflite")


if __name__ == "__main__":
    sys.exit(main())
