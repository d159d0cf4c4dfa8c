"""A Keras 3 model rebuilt as a tf_keras one, layer by layer with its weights: what training trains (a --model
written with ``import keras``) and what the export's QAT fine-tunes; and the trained weights copied back.

tfmot and the toolkit's training work in Keras 2 (tf_keras), and Keras 3 is what ``pip install tensorflow`` gives.
Most Keras 3 layers have a tf_keras class of the same name taking the same configuration; :func:`to_tf_keras`
walks the Keras 3 graph (Keras 3's own ``_run_through_graph``, nested models inlined), makes each layer's
tf_keras twin from its configuration (keys tf_keras does not know dropped, Keras 3's serialised dtypes and
initialisers translated, Keras 3's activations that tf_keras lacks or defines differently given here), copies
its weights, and maps Keras 3's operations on tensors (``x + 3.0``...) to the TensorFlow op. What has no
counterpart is named in a :class:`NoTfKerasCounterpart`; the caller checks the outputs match (export.model.rewrite's
``outputs_close``) before fine-tuning from it.
"""

from __future__ import annotations

import inspect
from typing import Optional

from toolkit.activations import functions
from toolkit.tf import import_keras, import_tf


class NoTfKerasCounterpart(ValueError):
    """The Keras 3 model holds layers or operations tf_keras has no equivalent for."""


def activations() -> dict:
    """Keras 3 activation name -> the tf_keras activation computing the same, where the names differ."""
    fns = functions()
    return {"hard_sigmoid": fns["hard_sigmoid"], "hard_swish": fns["hard_swish"], "hard_silu": fns["hard_swish"],
            "silu": "swish", "relu6": fns["relu6"]}


# Keras 3 operations on tensors (keras.ops, written as x + y in a functional model) -> TensorFlow's op.
OPS = {"Add": "add", "Subtract": "subtract", "Multiply": "multiply", "Divide": "divide", "TrueDivide": "divide"}


def _config_value(key: str, value, dtype):
    if key == "dtype":
        return dtype
    if key == "activation" and isinstance(value, str):
        return activations().get(value, value)
    if isinstance(value, dict) and "class_name" in value and "config" in value:  # initialiser, regulariser...
        return {"class_name": value["class_name"], "config": value["config"]}
    return value


_ADAPTER: list = []


def keras3_layer_class():
    """tf_keras's ``Keras3Layer`` (registered as keras_edge_toolkit>Keras3Layer): a user's own Keras 3 layer (a
    subclass registered with ``keras.saving.register_keras_serializable``, its module named by --custom-objects),
    which has no tf_keras twin, run inside the tf_keras model as it is: its ``call`` on TensorFlow tensors (Keras 3 on
    the TensorFlow backend), its variables this layer's weights, its configuration saved with the model."""
    if _ADAPTER:
        return _ADAPTER[0]
    keras = import_keras()

    @keras.saving.register_keras_serializable(package="keras_edge_toolkit")
    class Keras3Layer(keras.layers.Layer):
        def __init__(self, layer: dict, **kwargs):
            import keras as keras3

            super().__init__(**kwargs)
            self.layer = layer  # Keras 3's serialisation of the layer
            object.__setattr__(self, "inner", keras3.saving.deserialize_keras_object(layer))  # (not tracked twice)

        def build(self, input_shape):
            if not self.inner.built:
                self.inner.build(tuple(input_shape))
            # Keras 3's variables hold tf.Variables: tracked here, they are what tf_keras trains, saves and restores
            self.inner_trainable = [v.value for v in self.inner.trainable_weights]
            self.inner_non_trainable = [v.value for v in self.inner.non_trainable_weights]
            super().build(input_shape)

        def call(self, inputs):
            return self.inner(inputs)

        def get_config(self):
            return {**super().get_config(), "layer": self.layer}

    _ADAPTER.append(Keras3Layer)
    return Keras3Layer


def keras3_weights_of(layer):
    """What holds ``layer``'s weights in Keras 3's order: the Keras 3 layer inside an adapter (tf_keras lists
    trainable weights first), else the layer."""
    return layer.inner if _ADAPTER and isinstance(layer, _ADAPTER[0]) else layer


def twin(layer, dtype: Optional[str] = "float32"):
    """The tf_keras layer computing what Keras 3's ``layer`` does (weights not yet copied), computing in ``dtype``
    (None: the global dtype policy, as training's bfloat16 sets it). A user's own layer runs as it is, inside
    keras3_layer_class's adapter."""
    import keras as keras3

    keras = import_keras()
    name = type(layer).__name__
    if type(layer).__module__.split(".")[0] != "keras":
        try:
            config = keras3.saving.serialize_keras_object(layer)
            return keras3_layer_class()(config, name=layer.name)
        except Exception as e:  # most often a class Keras cannot find again by its registered name
            from toolkit.errors import one_line

            why = ("a Keras 3 layer of its own that Keras cannot make again from its configuration: register it "
                   "with keras.saving.register_keras_serializable" if "Could not locate class" in str(e)
                   else one_line(e, limit=160))
            raise NoTfKerasCounterpart(f"{layer.name} ({name}: {why})") from e
    cls = getattr(keras.layers, name, None)
    if cls is None:
        raise NoTfKerasCounterpart(f"{layer.name} ({name})")
    accepted = set(inspect.signature(cls.__init__).parameters) | {"name", "trainable", "dtype"}
    # Initialisers are dropped (the weights are copied; Keras 3's take arguments tf_keras's do not).
    config = {k: _config_value(k, v, dtype) for k, v in layer.get_config().items()
              if k in accepted and not k.endswith("_initializer") and not (k == "dtype" and dtype is None)}
    try:  # (MultiHeadAttention's from_config wants shapes Keras 3 does not store; it is built when called)
        return cls(**config) if name == "MultiHeadAttention" else cls.from_config(config)
    except Exception as e:
        raise NoTfKerasCounterpart(f"{layer.name} ({name}: {type(e).__name__})") from e


def to_tf_keras(model, dtype: Optional[str] = "float32"):
    """``model`` (Keras 3, functional or Sequential) as a tf_keras functional model with the same weights and layer
    names, every layer computing in ``dtype`` (None: under the global policy). Raises NoTfKerasCounterpart naming
    every layer or operation that has none."""
    return rebuild(model, dtype)[0]


def rebuild(model, dtype: Optional[str] = "float32") -> tuple:
    """(to_tf_keras's model, {id of each tf_keras layer: the Keras 3 layer it was made from})."""
    import keras as keras3

    keras = import_keras()
    tf = import_tf()
    made: dict[int, tuple] = {}
    missing: list[str] = []

    def graph(m):
        return m._functional if isinstance(m, keras3.Sequential) else m

    def call(op, *args, **kwargs):
        if isinstance(op, keras3.Model):
            if not hasattr(graph(op), "_run_through_graph"):
                missing.append(f"{op.name} (subclassed model)")
                return args[0]
            return graph(op)._run_through_graph(args[0] if len(args) == 1 else args, call_fn=call)
        if not isinstance(op, keras3.layers.Layer):
            fn = OPS.get(type(op).__name__)
            if fn is None:
                missing.append(f"{op.name} (operation {type(op).__name__})")
                return args[0]
            return getattr(tf.math, fn)(*args, **kwargs)
        if id(op) not in made:
            try:
                made[id(op)] = (op, twin(op, dtype))
            except NoTfKerasCounterpart as e:
                missing.append(str(e))
                made[id(op)] = (op, None)
        new = made[id(op)][1]
        if new is None:
            return args[0]
        kwargs.pop("training", None)
        return new(*args, **kwargs)

    m = graph(model)
    inputs = [keras.Input(tuple(x.shape[1:]), dtype="float32") for x in m.inputs]
    outputs = m._run_through_graph(inputs[0] if len(inputs) == 1 else inputs, call_fn=call)
    if missing:
        raise NoTfKerasCounterpart("no tf_keras counterpart for " + ", ".join(dict.fromkeys(missing)))
    rebuilt = keras.Model(inputs, outputs, name=model.name)
    for old, new in made.values():
        if old.weights:
            keras3_weights_of(new).set_weights([w.numpy() for w in old.weights])
        if type(new).__name__ == "Normalization":  # computes from its weights once finalised
            new.finalize_state()
    return rebuilt, {id(new): old for old, new in made.values() if new is not None}


def is_keras3(model) -> bool:
    """Whether ``model`` is a Keras 3 model (``import keras``; TF 2.20's ``tf.keras`` without TF_USE_LEGACY_KERAS)."""
    return any(c.__module__.split(".")[0] == "keras" for c in type(model).__mro__)


def copy_weights_back(trained, keras3_model) -> int:
    """The weights of ``trained`` (to_tf_keras's rebuild of this architecture, trained) into ``keras3_model``: layer by
    layer in the rebuild's order (a factory called again names its layers anew: conv2d_3 where the trained one has
    conv2d). Returns how many layers took weights; ValueError when the two are not the same architecture."""
    fresh, source = rebuild(keras3_model, None)
    copied = 0
    for f, t in zip(fresh.layers, trained.layers):
        if type(f).__name__ != type(t).__name__ or [w.shape for w in f.weights] != [w.shape for w in t.weights]:
            raise ValueError(f"{f.name} ({type(f).__name__}) and the trained {t.name} ({type(t).__name__}) differ")
        if f.weights:
            source[id(f)].set_weights(keras3_weights_of(t).get_weights())
            copied += 1
    return copied
