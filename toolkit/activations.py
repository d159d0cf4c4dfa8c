"""Activation functions tf_keras lacks (or defines otherwise than Keras 3), registered so that tfmot's
clones and saved tf_keras models find them: Keras 3's ``hard_sigmoid`` (relu6(x + 3) / 6; tf_keras's is
0.2 x + 0.5 clipped) and ``hard_swish``, and ``relu6`` (a ReLU(max_value=6) fused into its convolution by
export.qat.graph). The TFLite converter turns each into its own op (HARD_SWISH, RELU6, fused activations)."""

from __future__ import annotations

from toolkit.tf import import_keras, import_tf

_FUNCTIONS: dict = {}


def functions() -> dict:
    """name -> registered tf_keras activation function (made on first use: tf_keras is imported lazily)."""
    if _FUNCTIONS:
        return _FUNCTIONS
    keras = import_keras()
    tf = import_tf()
    register = keras.saving.register_keras_serializable(package="keras_edge_toolkit")

    @register
    def hard_sigmoid(x):
        return tf.nn.relu6(x + 3.0) * (1.0 / 6.0)

    @register
    def hard_swish(x):
        return x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)

    @register
    def relu6(x):
        return tf.nn.relu6(x)

    _FUNCTIONS.update(hard_sigmoid=hard_sigmoid, hard_swish=hard_swish, relu6=relu6)
    return _FUNCTIONS
