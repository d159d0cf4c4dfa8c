"""Models that tfmot has wrapped already, as users hand them over: prepared for quantisation-aware training
(``quantize_model`` / ``quantize_apply``, trained and saved), pruned and saved before ``strip_pruning``, clustered and
saved before ``strip_clustering``. Such a file loads only with tfmot's own layers (its three scopes' objects,
:func:`tfmot_objects`); tfmot is one of the toolkit's dependencies, so no ``--custom-objects`` is asked for.

:func:`unwrap` gives the plain model every variant converts and says what tfmot had done:

- pruned or clustered: tfmot's own strip, which computes exactly what the wrapped model does; the report gives
  each wrapped layer's sparsity (the share of its kernel's values that are zero) or its number of distinct values
  (the clusters), and each file's gzip size (what pruning and clustering buy on flash: a zero or a repeated value
  compresses, a float32 file does not shrink otherwise);
- quantisation-aware: the float model with the fake-quant taken out (each wrapped layer rebuilt with its weights
  and its own activation), for the float variants and post-training int8; ``qat_int8`` is the given model itself
  converted to int8 from the ranges it learned, with no second fine-tuning.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from toolkit.tf import import_keras

WRAPPERS = {"QuantizeWrapper": "qat", "QuantizeWrapperV2": "qat", "QuantizeLayer": "qat",
            "PruneLowMagnitude": "pruned", "ClusterWeights": "clustered", "ClusterWeightsMHA": "clustered"}


def tfmot_objects() -> dict[str, type]:
    """Every object tfmot's quantize, prune and cluster scopes resolve (wrappers, quantizers, configs)."""
    import tensorflow_model_optimization as tfmot

    objects: dict[str, type] = {}
    for scope in (tfmot.quantization.keras.quantize_scope(), tfmot.sparsity.keras.prune_scope(),
                  tfmot.clustering.keras.cluster_scope()):
        for table in scope.custom_objects:
            objects.update(table)
    return objects


def wrapped_kind(model) -> Optional[str]:
    """"qat", "pruned" or "clustered" when tfmot's wrappers are in ``model`` (tf_keras), else None."""
    kinds = {WRAPPERS[type(layer).__name__] for layer in model.layers if type(layer).__name__ in WRAPPERS}
    if len(kinds) > 1:
        raise ValueError(f"model: tfmot wrappers of more than one kind ({', '.join(sorted(kinds))}); strip all but "
                         "one with tfmot before exporting")
    return next(iter(kinds), None)


def has_kernel(layer) -> bool:
    """A layer with a weight matrix or kernel (convolution, Dense, attention): what quantisation coverage
    counts (batch norm is folded, scales and shifts are vectors)."""
    return any("kernel" in w.name for w in layer.weights)


# What tfmot had done, in the words the report and training's note use.
WORDS = {"pruned": "pruned", "clustered": "clustered", "qat": "prepared for quantisation-aware training"}


def saved_kinds(path: str) -> set[str]:
    """The kinds of tfmot wrapper ("qat", "pruned", "clustered") the saved model at ``path`` names, read from its
    configuration without loading it."""
    from toolkit.custom import layer_classes

    return {WRAPPERS[c] for c in layer_classes(str(path)) if c in WRAPPERS}


def given_wrappers(path: str) -> dict:
    """tfmot's objects when the saved model at ``path`` names one of its wrappers, else none (tfmot is imported
    only for such a file)."""
    return tfmot_objects() if saved_kinds(path) else {}


def unreadable_wrappers(path: str, error: Exception) -> str:
    """Why a saved model holding tfmot's wrappers did not load, in words ("" when it holds none): most often a file
    saved by another tfmot, whose wrappers take arguments the installed one does not know."""
    from toolkit.custom import layer_classes

    from toolkit.errors import one_line

    wrappers = sorted(set(layer_classes(str(path))) & set(WRAPPERS))
    if not wrappers:
        return ""
    import tensorflow_model_optimization as tfmot

    return (f"tfmot's {', '.join(wrappers)} as saved cannot be read by the installed tfmot {tfmot.__version__} "
            f"({one_line(error, limit=160)}): saved by another tfmot version? Save it with tfmot "
            f"{tfmot.__version__}, or strip the wrappers before saving")


def unwrap(model) -> tuple:
    """(the plain model, the given QAT model or None, what tfmot had done: {"kind", "layers": {layer: figures}})
    for a tfmot-wrapped ``model``; (model, None, None) for any other."""
    kind = wrapped_kind(model)
    if kind is None:
        return model, None, None
    wrapped = [layer.layer.name for layer in model.layers if WRAPPERS.get(type(layer).__name__) == kind
               and hasattr(layer, "layer")]  # (QuantizeLayer, the input's fake-quant, wraps none)
    if kind == "qat":
        plain, given = without_fake_quant(model), model
    else:
        plain, given = strip(kind)(model), None
    layers = {name: FIGURES[kind](plain.get_layer(name)) for name in wrapped if has_kernel(plain.get_layer(name))}
    return plain, given, {"kind": kind, "layers": layers}


def strip(kind: str):
    """tfmot's own strip for a pruned or clustered model (exact: the wrapped model computes the same)."""
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning if kind == "pruned" else tfmot.clustering.keras.strip_clustering


def kernel(layer) -> np.ndarray:
    """A layer's kernel (its first weight with "kernel" in its name)."""
    return np.asarray(next(w for w in layer.weights if "kernel" in w.name))


# What each kind reports for a wrapped layer with a kernel, read from the plain model.
FIGURES = {"pruned": lambda layer: {"sparsity": round(float(np.mean(kernel(layer) == 0)), 4)},
           "clustered": lambda layer: {"clusters": int(len(np.unique(kernel(layer))))},
           "qat": lambda layer: {}}


def without_fake_quant(qat_model):
    """The float model inside a quantisation-aware one: each QuantizeWrapper's layer rebuilt with its own
    activation (the wrapper had replaced it with a QuantizeAwareActivation) and its weights (the wrapper holds the
    kernel), each QuantizeLayer (the input's fake-quant) an identity."""
    keras = import_keras()

    def rebuild(layer):
        kind = type(layer).__name__
        if kind == "QuantizeLayer":
            return keras.layers.Activation("linear", name=layer.name)
        if not kind.startswith("QuantizeWrapper"):
            return layer.__class__.from_config(layer.get_config())
        config = layer.layer.get_config()
        act = config.get("activation")
        if isinstance(act, dict) and act.get("class_name") in ("QuantizeAwareActivation", "NoOpActivation"):
            config["activation"] = act.get("config", {}).get("activation", "linear")
        return layer.layer.__class__.from_config(config)

    plain = keras.models.clone_model(qat_model, clone_function=rebuild)
    for new, old in zip(plain.layers, qat_model.layers):
        if not type(old).__name__.startswith("QuantizeWrapper"):
            if type(old).__name__ != "QuantizeLayer":
                new.set_weights(old.get_weights())
            continue
        by_name = {w.name.split("/")[-1]: w for w in [*old.layer.weights, *old.weights]}
        new.set_weights([np.asarray(by_name[w.name.split("/")[-1]]) for w in new.weights])
    return plain
