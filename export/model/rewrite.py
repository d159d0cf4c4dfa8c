"""Rewrite a tf_keras model's graph, layer by layer, before it is converted or fine-tuned.

Models as users save them hold layers that the converters and tfmot cannot take as they are; each has an
equivalent that they can, computing the same function on the same weights:

- a ``mixed_float16`` / ``mixed_bfloat16`` compute policy: the converter meets float16 ``Mul`` ops it has no
  kernel for (``'tf.Mul' op is neither a custom op nor a flex op``) and tfmot's quantisers get float16
  tensors. :func:`as_float32` rebuilds every layer under the float32 policy, weights copied;
- ``GroupNormalization``: tf_keras reshapes with the dynamic batch size, which the converter lowers to a
  ``BROADCAST_TO`` that LiteRT refuses at run time. :class:`StaticGroupNormalization` computes the same
  with static group shapes and plain broadcasting;
- grouped convolutions (``Conv2D(groups > 1)``, RegNet's): tf_keras runs them through an XLA-compiled
  function, which tf2onnx leaves as a ``PartitionedCall`` node ONNX has no op for. :func:`split_groups`
  writes each as one convolution per group and a concatenation (ONNX only; TFLite converts them whole);

:func:`rebuild` is the one graph walk under all of them, and under export.qat.graph's rewrites for
quantisation-aware training (nested models are inlined on the way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from export.errors import ExportInputError
from toolkit.errors import one_line
from toolkit.tf import all_layers, float16_policy, import_keras, import_tf

IDENTITY = "identity"  # what a replace function returns for a layer to drop (its input passes through)


@dataclass
class Chain:
    """What a replace function returns for one layer computed by several: ``layers`` applied in order to
    the replaced layer's inputs; ``weights`` each one's weights (None: the first gets the replaced layer's)."""
    layers: list
    weights: Optional[list] = None

# Layers that compute the identity at inference: dropped before QAT, where fine-tuning would run them
# in their training mode (export.qat.graph). RandomCrop is not one (it crops or
# resizes at inference).
TRAINING_ONLY = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
                 "GaussianDropout", "AlphaDropout", "ActivityRegularization", "RandomFlip", "RandomRotation",
                 "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness", "RandomHeight",
                 "RandomWidth", "StochasticDepth")

# TFOpLambda symbols of two tensors that have a Keras merge layer (what tfmot can clone and annotate).
BINARY_OPS = {"__operators__.add": "Add", "math.add": "Add", "math.multiply": "Multiply",
              "math.subtract": "Subtract"}


def rebuild(model, replace: Optional[Callable] = None):
    """``model`` rebuilt as one functional graph of plain layers, nested functional models inlined.

    ``replace(layer)`` returns the layer to use in its place: the same layer (weights shared), a new
    one (built in the graph, then given the old one's weights), a :class:`Chain`, or ``IDENTITY`` to
    drop it. Each layer
    is replaced once, so a layer shared by several nodes stays shared."""
    keras = import_keras()
    tf = import_tf()
    made: dict[int, tuple] = {}

    def call(layer, args, kwargs):
        if id(layer) not in made:
            made[id(layer)] = (layer, replace(layer) if replace is not None else layer)
        new = made[id(layer)][1]
        if new is IDENTITY:
            return args[0] if args else next(iter(kwargs.values()))
        first, rest = (new.layers[0], new.layers[1:]) if isinstance(new, Chain) else (new, [])
        if type(layer).__name__ == "TFOpLambda" and type(first).__name__ in set(BINARY_OPS.values()):  # op -> merge layer
            y = first(list(args) + [kwargs[k] for k in ("x", "y") if k in kwargs])
        else:
            y = first(*args, **kwargs)
        for later in rest:
            y = later(y)
        return y

    def inline(m, inputs):  # tf_keras's own graph walk (Functional._run_internal_graph), recursing
        usage = m._tensor_usage_count
        tensors = {}
        for x, y in zip(m.inputs, tf.nest.flatten(inputs)):
            tensors[str(id(x))] = [y] * usage[str(id(x))]
        for depth in sorted(m._nodes_by_depth, reverse=True):
            for node in m._nodes_by_depth[depth]:
                if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                    continue
                args, kwargs = node.map_arguments(tensors)
                layer = node.layer
                if isinstance(layer, keras.Model) and getattr(layer, "_is_graph_network", False):
                    outputs = inline(layer, args[0] if len(args) == 1 else args)
                else:
                    outputs = call(layer, args, kwargs)
                for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    tensors[x_id] = [y] * usage[x_id]
        outs = [tensors[str(id(x))].pop() for x in m.outputs]
        return outs[0] if len(outs) == 1 else outs

    inputs = [keras.Input(x.shape[1:], dtype="float32" if x.dtype.is_floating else x.dtype) for x in model.inputs]
    rebuilt = keras.Model(inputs, inline(model, inputs[0] if len(inputs) == 1 else inputs), name=model.name)
    for old, new in made.values():
        if isinstance(new, Chain):
            weights = new.weights if new.weights is not None else [old.get_weights()]
            for layer, w in zip(new.layers, weights):
                if w:
                    layer.set_weights(w)
        elif new is not old and new is not IDENTITY and old.weights:
            new.set_weights(old.get_weights())
    return rebuilt


def has_nested(model) -> bool:
    keras = import_keras()
    return any(isinstance(layer, keras.Model) for layer in model.layers)


# -- the rewrites ------------------------------------------------------------------------------


def as_float32(model):
    """Every layer rebuilt under the float32 policy from its config, with its weights."""
    def replace(layer):
        if type(layer).__name__ in ("InputLayer", "TFOpLambda"):  # no weights, no policy of its own to change
            return layer
        return type(layer).from_config({**layer.get_config(), "dtype": "float32"})
    return rebuild(model, replace)


def keras3_as_float32(model):
    """A Keras 3 model's every layer rebuilt under float32 from its config, with its weights (Keras 3's
    own clone; its SavedModel export then traces float32 ops only)."""
    import keras as keras3

    def clone(layer):
        return type(layer).from_config({**layer.get_config(), "dtype": "float32"})

    rebuilt = keras3.models.clone_model(model, clone_function=clone)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def static_group_norm_class():
    """:class:`StaticGroupNormalization`, made on first use (tf_keras is imported lazily)."""
    global _STATIC_GN
    if _STATIC_GN is not None:
        return _STATIC_GN
    keras = import_keras()
    tf = import_tf()

    # Registered: tfmot rebuilds the model from its config, where only registered classes resolve.
    @keras.saving.register_keras_serializable(package="keras_edge_toolkit")
    class StaticGroupNormalization(keras.layers.Layer):
        """GroupNormalization (channels last) with static group shapes: reshape to (H, W, groups, C/groups),
        moments over all but the batch and group axes, then gamma and beta by plain broadcasting. The same
        function as tf_keras's, without the batch-sized BROADCAST_TO that LiteRT refuses."""

        def __init__(self, groups: int, epsilon: float, center: bool, scale: bool, **kw):
            super().__init__(**kw)
            self.groups, self.epsilon, self.center, self.scale = groups, epsilon, center, scale

        def build(self, input_shape):
            c = int(input_shape[-1])
            if self.scale:
                self.gamma = self.add_weight(name="gamma", shape=(c,), initializer="ones")
            if self.center:
                self.beta = self.add_weight(name="beta", shape=(c,), initializer="zeros")
            super().build(input_shape)

        def call(self, x):
            dims = [int(d) for d in x.shape[1:]]
            c = dims[-1]
            grouped = tf.reshape(x, [-1, *dims[:-1], self.groups, c // self.groups])
            axes = list(range(1, len(dims))) + [len(dims) + 1]
            mean, var = tf.nn.moments(grouped, axes=axes, keepdims=True)
            y = tf.reshape((grouped - mean) * tf.math.rsqrt(var + self.epsilon), [-1, *dims])
            if self.scale:
                y = y * self.gamma
            if self.center:
                y = y + self.beta
            return y

        def get_config(self):
            return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon,
                    "center": self.center, "scale": self.scale}

    _STATIC_GN = StaticGroupNormalization
    return _STATIC_GN


_STATIC_GN = None


def group_norms(model) -> list[str]:
    """Names of the channels-last GroupNormalization layers (what LiteRT cannot run as converted)."""
    return [layer.name for layer in all_layers(model) if type(layer).__name__ == "GroupNormalization"
            and layer.axis in (-1, len(layer.input_shape) - 1)]


def static_group_norms(model):
    """Every channels-last GroupNormalization replaced by :class:`StaticGroupNormalization`."""
    names = set(group_norms(model))
    cls = static_group_norm_class()

    def replace(layer):
        if layer.name not in names:
            return layer
        return cls(layer.groups, layer.epsilon, layer.center, layer.scale, name=layer.name)
    return rebuild(model, replace)


def grouped_convs(model) -> list[str]:
    return [layer.name for layer in all_layers(model)
            if type(layer).__name__ == "Conv2D" and getattr(layer, "groups", 1) > 1]


def split_groups(model):
    """Every grouped Conv2D as a functional block: split the channels, one convolution per group,
    concatenate; the same weights sliced per group. For tf2onnx, which cannot convert the XLA call
    tf_keras makes for a grouped convolution."""
    keras = import_keras()
    tf = import_tf()

    class SplitGroupConv2D(keras.layers.Layer):
        def __init__(self, conv, **kw):
            super().__init__(name=conv.name, **kw)
            self.conv_config = conv.get_config()
            self.groups = conv.groups
            self.activation = conv.activation

        def build(self, input_shape):
            cfg = self.conv_config
            k = (*cfg["kernel_size"], int(input_shape[-1]) // self.groups, cfg["filters"])
            self.kernel = self.add_weight(name="kernel", shape=k)
            self.bias = self.add_weight(name="bias", shape=(cfg["filters"],)) if cfg["use_bias"] else None
            super().build(input_shape)

        def call(self, x):
            cfg = self.conv_config
            parts = tf.split(x, self.groups, axis=-1)
            kernels = tf.split(self.kernel, self.groups, axis=-1)
            y = tf.concat([tf.nn.conv2d(p, k, strides=cfg["strides"], padding=cfg["padding"].upper(),
                                        dilations=cfg["dilation_rate"]) for p, k in zip(parts, kernels)], -1)
            if self.bias is not None:
                y = tf.nn.bias_add(y, self.bias)
            return self.activation(y)

    names = set(grouped_convs(model))
    return rebuild(model, lambda layer: SplitGroupConv2D(layer) if layer.name in names else layer)


def rewrite_for_conversion(model, path: str) -> tuple:
    """(the model the converters and tfmot get, what was rewritten): a float16 compute policy rebuilt as
    float32, GroupNormalization with static shapes (export.model.rewrite); the model itself when neither."""
    rewrites = []
    try:
        policy = float16_policy(model)
        if policy:
            model = as_float32(model)
            rewrites.append(f"built under the {policy} policy: rebuilt as float32 with the same weights")
        norms = group_norms(model)
        if norms:
            model = static_group_norms(model)
            rewrites.append(f"{len(norms)} GroupNormalization layer(s) with static group shapes (LiteRT cannot "
                            "run tf_keras's batch-sized BROADCAST_TO)")
    except Exception as e:  # a layer that cannot be rebuilt from its config
        raise ExportInputError(f"{path}: model could not be rewritten for conversion ({one_line(e)})") from e
    return model, rewrites


# How far a saved model's outputs may be from its float32 rebuild, as a fraction of their range: the largest
# difference, and the mean over every output. float16 rounds to 11 bits (about 0.1% an op): 1% covers both. bfloat16
# rounds to 8 (about 0.4% an op), and its largest difference is set by the one image nearest a decision, where the
# softmax turns a logit's rounding into a large step: six seeds of tests/test_own_data.py's 64x64 defect model,
# 6 epochs under mixed_bfloat16, gave largest differences of 0.0007-0.032 over 745 images and CI's machine 0.044 on
# 165, while their means stayed at 0.0004-0.0014 (/tmp script over load_source_model, 2026-11-29). So bfloat16
# allows 0.15 at most (a confident top-1 cannot move that far by rounding) and 0.01 on average; a rewrite that
# computes something else moves every output (the mean) and the top-1s, which are checked on every image the
# saved model decides by more than the largest tolerance.
OUTPUT_TOLERANCE = {"float32": 0.01, "float16": 0.01, "bfloat16": 0.15}
MEAN_TOLERANCE = 0.01  # whatever the dtype: under float16's and float32's largest difference, it binds bfloat16 only


def outputs_close(reference: np.ndarray, rewritten: np.ndarray, compute_dtype: str = "float32") -> tuple[bool, str]:
    """Whether a rewritten model computes what the saved one (computing in ``compute_dtype``) does on a batch:
    every output within OUTPUT_TOLERANCE of the outputs' range and their mean within MEAN_TOLERANCE, and the same
    top-1 on at least 99% of the images whose top-1 the saved model decides by more than OUTPUT_TOLERANCE (a
    near-uniform output, as an untrained EfficientNet's, has a top-1 that float16 rounding alone reorders).
    Returns (close, what was measured)."""
    if not reference.size:
        return True, "no images to compare on"
    scale = max(1.0, float(np.max(np.abs(reference))))
    difference = np.abs(reference - rewritten)
    diff, mean = float(np.max(difference)), float(np.mean(difference))
    tolerance = OUTPUT_TOLERANCE[compute_dtype] * scale
    if reference.shape[-1] > 1:
        top2 = np.sort(reference, axis=-1)[:, -2:]
        margin, same = top2[:, 1] - top2[:, 0], reference.argmax(-1) == rewritten.argmax(-1)
    else:
        flat, new = reference.reshape(len(reference)), rewritten.reshape(len(rewritten))
        margin, same = np.abs(flat - 0.5), (flat > 0.5) == (new > 0.5)
    decided = margin > tolerance
    agree = float(np.mean(same[decided])) if decided.any() else 1.0
    close = agree >= 0.99 and diff <= tolerance and mean <= MEAN_TOLERANCE * scale
    return close, (f"max output difference {diff:.2g} (mean {mean:.2g}), top-1 the same on {agree:.1%} of "
                   f"{len(reference)} images ({int((~decided).sum())} with a top-1 lead under the tolerance "
                   "not counted)")
