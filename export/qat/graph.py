"""The graph tfmot is given for quantisation-aware training: the model's function, in layers tfmot's
default 8-bit scheme can annotate.

tfmot's registry has rules for Conv2D, DepthwiseConv2D and Dense with a handful of activations, and its
own transforms fold batch normalisation only in the patterns they know. Mobile graphs step outside both:
a SeparableConv2D followed by batch norm (keras-io's examples), batch norm after a depthwise
convolution shared with a shortcut, ``hard_sigmoid`` on the excitation's Dense, ``x + 3`` inside
hard-swish. :func:`for_qat` rewrites them into the same function the default scheme can take:

1. nested models inlined; layers that are the identity at inference (dropout, noise, augmentation)
   dropped, so that fine-tuning does not train through them; ``x + y`` ``TFOpLambda`` ops between two
   tensors made ``Add`` / ``Multiply`` / ``Subtract`` layers (tfmot's clone cannot call them);
2. every SeparableConv2D split into its DepthwiseConv2D and 1x1 Conv2D (what the converter emits);
3. batch normalisation folded into the convolution or Dense before it (scale into the kernel, shift
   into the bias) when that layer feeds nothing else: quantisation then sees the weights the device runs;
   and a ReLU / ReLU6 after it fused as its activation, as TFLite fuses it. (Left as a layer, tfmot's
   own ``LayerReLUQuantize`` transform gives the convolution a no-op config: its weights would never be
   fake-quantised. Measured on keras-io's model: 4 of 14 kernels.)
4. an activation tfmot has no rule for (``hard_sigmoid``, ``elu``...) split out of its convolution or
   Dense into an Activation layer, so the convolution is quantised and the activation's output is.

Every rewrite computes the same function on the same weights; export.qat.finetune checks that on held-out images.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from toolkit.activations import functions
from export.model.rewrite import BINARY_OPS, IDENTITY, TRAINING_ONLY, Chain, has_nested, rebuild
from toolkit.tf import import_keras

# The activations tfmot's QuantizeAwareActivation takes on a convolution or Dense (tfmot 0.8.1's
# quantize_aware_activation.py), and those its Activation-layer config takes (default_8bit_quantize_registry.py).
LAYER_ACTIVATIONS = ("linear", "relu", "swish", "gelu", "softmax", "sigmoid", "tanh")
TFMOT_ACTIVATIONS = LAYER_ACTIVATIONS + ("relu6",)
FOLDS_INTO = ("Conv2D", "DepthwiseConv2D", "Dense")


def activation_name(layer) -> str:
    fn = getattr(layer, "activation", None)
    return getattr(fn, "__name__", type(fn).__name__) if fn is not None else "linear"


def _inline(model):
    """Step 1: (model, dropped layer names)."""
    keras = import_keras()
    dropped = []

    def two_tensors(layer) -> bool:  # x + y, not x + 3.0 (a constant stays a TFOpLambda, unannotated)
        node = layer._inbound_nodes[-1] if layer._inbound_nodes else None
        return node is not None and len(node.keras_inputs) == 2

    def replace(layer):
        kind = type(layer).__name__
        if kind in TRAINING_ONLY:
            dropped.append(layer.name)
            return IDENTITY
        if kind == "TFOpLambda" and getattr(layer, "symbol", None) in BINARY_OPS and two_tensors(layer):
            return getattr(keras.layers, BINARY_OPS[layer.symbol])(name=layer.name.replace(".", "_"))
        return layer

    needs = has_nested(model) or any(type(layer).__name__ in TRAINING_ONLY or type(layer).__name__ == "TFOpLambda"
                                     for layer in model.layers)
    return (rebuild(model, replace), dropped) if needs else (model, dropped)


def _nodes(model) -> list:
    """The model's own call nodes (a layer shared with another model has nodes there too)."""
    return [n for depth in model._nodes_by_depth.values() for n in depth if not n.is_input]


def fused_relu(layer):
    """The activation a ReLU layer is fused as (``"relu"`` or the registered relu6), or None when it is a
    leaky, thresholded or otherwise capped ReLU that TFLite does not fuse."""
    kind = type(layer).__name__
    if kind == "Activation":
        return "relu" if activation_name(layer) == "relu" else None
    if kind != "ReLU" or float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        return None
    if layer.max_value is None:
        return "relu"
    return functions()["relu6"] if float(layer.max_value) == 6.0 else None


def fusion_plan(model) -> dict:
    """{id(convolution or Dense): (batch norm or None, ReLU layer or None)} for each convolution or Dense
    with no activation that is read only by a batch norm over the last axis, and/or (after it) only by a
    ReLU TFLite fuses: the batch norm folds into its weights, the ReLU becomes its activation."""
    nodes = _nodes(model)
    readers: dict = {}
    for n in nodes:
        for p in n.parent_nodes:
            readers.setdefault(id(p), []).append(n)
    calls = Counter(id(n.layer) for n in nodes)

    def sole_reader(node):
        r = readers.get(id(node), [])
        return r[0] if len(r) == 1 and len(r[0].parent_nodes) == 1 and calls[id(r[0].layer)] == 1 else None

    plan = {}
    for n in nodes:
        conv = n.layer
        if type(conv).__name__ not in FOLDS_INTO + ("SeparableConv2D",) or calls[id(conv)] != 1 \
                or activation_name(conv) != "linear":
            continue
        bn, relu, nxt = None, None, sole_reader(n)
        if nxt is not None and type(nxt.layer).__name__ == "BatchNormalization" and \
                list(nxt.layer.axis) == [len(nxt.layer.input_shape) - 1]:
            bn, nxt = nxt.layer, sole_reader(nxt)
        if nxt is not None and fused_relu(nxt.layer) is not None:
            relu = nxt.layer
        if bn is not None or relu is not None:
            plan[id(conv)] = (bn, relu)
    return plan


def folded(kernel: np.ndarray, bias, bn, depthwise: bool) -> list:
    """[kernel, bias] with ``bn`` applied: per output channel, scale gamma / sqrt(var + eps) into the
    kernel, and (bias - mean) * scale + beta as the bias. A depthwise kernel (h, w, in, multiplier) has
    output channel in * multiplier + m."""
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    gamma = bn.gamma.numpy() if bn.gamma is not None else np.ones_like(mean)
    beta = bn.beta.numpy() if bn.beta is not None else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + bn.epsilon)
    k = kernel * (scale.reshape(kernel.shape[-2:]) if depthwise else scale)
    b = (bias if bias is not None else np.zeros_like(mean)) - mean
    return [k.astype(np.float32), (b * scale + beta).astype(np.float32)]


def _split_separable(keras, layer) -> tuple[list, list]:
    """A SeparableConv2D as its DepthwiseConv2D (no bias) and 1x1 Conv2D: (layers, their weights)."""
    c = layer.get_config()
    dw = keras.layers.DepthwiseConv2D(c["kernel_size"], strides=c["strides"], padding=c["padding"],
                                      depth_multiplier=c["depth_multiplier"], dilation_rate=c["dilation_rate"],
                                      use_bias=False, name=f"{layer.name}_depthwise")
    pw = keras.layers.Conv2D(c["filters"], 1, use_bias=c["use_bias"], activation=c["activation"],
                             name=f"{layer.name}_pointwise")
    w = layer.get_weights()
    return [dw, pw], [[w[0]], w[1:]]


def _for_default_scheme(model):
    """Steps 2-4 on an inlined model."""
    keras = import_keras()
    plan = fusion_plan(model)
    merged = {id(layer) for bn, relu in plan.values() for layer in (bn, relu) if layer is not None}

    def fuse(kind, config, weights, layer):
        """(config, weights) of ``layer``'s convolution with its batch norm folded and its ReLU fused."""
        bn, relu = plan.get(id(layer), (None, None))
        if bn is not None:
            config = {**config, "use_bias": True}
            weights = folded(weights[0], weights[1] if len(weights) > 1 else None, bn,
                             depthwise=kind == "DepthwiseConv2D")
        if relu is not None:
            config = {**config, "activation": fused_relu(relu)}
        return config, weights

    def replace(layer):
        kind = type(layer).__name__
        if id(layer) in merged:
            return IDENTITY
        if kind == "SeparableConv2D":
            layers, weights = _split_separable(keras, layer)
            config, weights[1] = fuse("Conv2D", layers[1].get_config(), weights[1], layer)
            layers[1] = keras.layers.Conv2D.from_config(config)
            return Chain(layers, weights)
        if kind not in FOLDS_INTO:
            return layer
        act = activation_name(layer)
        if id(layer) not in plan and act in LAYER_ACTIVATIONS:
            return layer
        config, weights = fuse(kind, {**layer.get_config(), "activation": "linear"}, layer.get_weights(), layer)
        layers = [type(layer).from_config(config)]
        if act not in LAYER_ACTIVATIONS:  # split out (a layer in the plan has none: it is linear)
            layers.append(keras.layers.Activation(layer.activation, name=f"{layer.name}_{act}"))
        return Chain(layers, [weights, []])

    changes = plan or any(type(layer).__name__ == "SeparableConv2D" or (type(layer).__name__ in FOLDS_INTO and
                                                                       activation_name(layer) not in LAYER_ACTIVATIONS)
                          for layer in model.layers)
    return rebuild(model, replace) if changes else model


def for_qat(model):
    """The model tfmot is given (see the module's docstring). Returns (model, dropped layer names)."""
    inlined, dropped = _inline(model)
    return _for_default_scheme(inlined), dropped
