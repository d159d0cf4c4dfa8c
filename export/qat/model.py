"""The model tfmot fine-tunes: each layer annotated by what tfmot's 8-bit scheme can do with it, after
export.qat.graph's rewrites, and the coverage the report states.

Schemes (export.qat.finetune tries them in order until one builds):

- ``default``: every layer tfmot's 8-bit registry has a rule for quantised; the others fine-tuned in float
  with their output quantised (custom layers, GroupNormalization, LayerNormalization, Multiply), or left
  unannotated (MultiHeadAttention, TensorFlow ops), each named in the report with why;
- ``conv_dense``: only Conv2D and Dense layers annotated, everything else left in float.
"""

from __future__ import annotations

from typing import Optional

from toolkit.activations import functions
from export.qat.graph import TFMOT_ACTIVATIONS, activation_name, for_qat
from toolkit.tf import import_keras

SCHEMES = ("default", "conv_dense")


def quantize_configs() -> tuple:
    """(OutputQuantizeConfig, FusedActivationQuantizeConfig), made on first use (tfmot is imported lazily).

    OutputQuantizeConfig quantises only a layer's output (Rescaling has no weights, but the converter needs
    the range of the first convolution's input). FusedActivationQuantizeConfig also quantises a convolution's
    or Dense's weights as tfmot does, its output taken after its fused activation (ReLU6, which tfmot's
    QuantizeAwareActivation does not know), as TFLite computes a fused activation."""
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit.default_8bit_quantizers import (
        Default8BitConvWeightsQuantizer,
    )

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

    class FusedActivationQuantizeConfig(OutputQuantizeConfig):
        def __init__(self, weight_attr: str = "kernel", per_axis: bool = True):
            self.weight_attr, self.per_axis = weight_attr, per_axis

        def get_weights_and_quantizers(self, layer):
            q = Default8BitConvWeightsQuantizer() if self.per_axis else \
                qk.quantizers.LastValueQuantizer(num_bits=8, per_axis=False, symmetric=True, narrow_range=True)
            return [(getattr(layer, self.weight_attr), q)]

        def set_quantize_weights(self, layer, quantize_weights):
            setattr(layer, self.weight_attr, quantize_weights[0])

        def get_config(self):
            return {"weight_attr": self.weight_attr, "per_axis": self.per_axis}

    return OutputQuantizeConfig, FusedActivationQuantizeConfig


# Preprocessing layers that scale pixel values (to [0, 1], or to about +-3 for an adapted Normalization):
# computed in float inside the device model, only their output quantised, so that the first convolution's
# input has a range. Layers that move pixels without scaling them (Resizing, CenterCrop) stay in float,
# unannotated: their 0-255 output would sit against the [-6, 6] range tfmot's output quantiser starts
# from (measured: the zoo's preprocessing model fell to chance within one epoch), and the converter
# calibrates them from the representative images instead.
SCALING = ("Rescaling", "Normalization")
SCALED = "preprocessing: computed in float, output quantised"
GEOMETRIC = ("Resizing", "CenterCrop")


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
        return "fused", ""  # export.qat.graph fused its ReLU6: weights quantised, output after the ReLU6
    if kind == "MultiHeadAttention":
        return "float", "attention: fine-tuned in float, unannotated (the converter calibrates its ops)"
    if kind == "Activation" and activation_name(layer) not in TFMOT_ACTIVATIONS:
        return "output", f"activation {activation_name(layer)}: tfmot has no rule for it; fine-tuned in float, output quantised"
    if kind == "BatchNormalization":  # export.qat.graph folded those after a convolution or Dense
        return "output", "batch norm not after a convolution or Dense (not folded): fine-tuned in float, output quantised"
    if registry.supports(layer):
        return "quantize", ""
    if kind == "StaticGroupNormalization":  # export.model.rewrite's form of GroupNormalization
        return "output", "GroupNormalization: tfmot has no 8-bit rule for it; fine-tuned in float, output quantised"
    own = getattr(layer, "inner", layer) if kind == "Keras3Layer" else layer  # a Keras 3 layer inside toolkit.keras3's
    module = type(own).__module__.split(".")[0]
    if module not in ("tf_keras", "keras"):
        keras3 = " (Keras 3)" if own is not layer else ""
        return "output", (f"custom layer {type(own).__name__}{keras3} (module {type(own).__module__}): tfmot has no "
                          "8-bit rule for it; fine-tuned in float, output quantised")
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


def quantize_aware_model(model, scheme: str = "default", custom_objects: Optional[dict] = None, prepared=None):
    """``model`` (tf_keras) wrapped for quantisation-aware training with ``scheme`` (see SCHEMES), after
    export.qat.graph.for_qat (nested models inlined, inference-identity layers dropped, batch norm folded,
    separable convolutions and unsupported activations split); ``prepared``: for_qat's model, when the
    caller has it already (it is only cloned here, so one serves every scheme and retry)."""
    keras = import_keras()
    import tensorflow_model_optimization as tfmot

    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown QAT scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    qk = tfmot.quantization.keras
    OutputQuantizeConfig, FusedActivationQuantizeConfig = quantize_configs()
    model = prepared if prepared is not None else for_qat(model)[0]
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


def count_quantized(qat_model) -> int:
    """Layers with a kernel whose weights tfmot quantises (the coverage the report states; a layer only
    output-quantised does not count)."""
    return sum(1 for layer in qat_model.layers
               if type(layer).__name__.startswith("QuantizeWrapper")
               and layer.quantize_config.get_weights_and_quantizers(layer.layer))
