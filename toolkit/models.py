"""Models: the registry's pure factories ``make_model(name, ...)`` returning uncompiled tf_keras models,
and the user's own (``--model``), in three forms:

- a registry name (``seed_cnn``, ``edge_resnet``);
- a saved model, ``path/to/model.keras`` (or ``.h5``), from tf_keras or Keras 3: fine-tuned, or an architecture
  built elsewhere; its own layers come from the modules named by ``--custom-objects`` (:mod:`toolkit.custom`);
- a factory, ``package.module:function``, called as ``function(input_shape, num_classes)``, written with tf_keras or
  Keras 3 (``import keras``); it must be importable where the workers run (installed, on ``PYTHONPATH``, or in the
  job's working dir).

A Keras 3 model is trained as its tf_keras rebuild (:mod:`toolkit.keras3`: the same layers, names and weights),
made in each worker from the same seeded factory call or the same file; the run writes ``model.keras`` back in
Keras 3 (:func:`keras3_source`, toolkit.train.outputs).

Every registry model takes raw 0-255 pixels: scaling is a layer inside the model, so a saved or exported
model cannot be fed wrongly preprocessed images on a device. A user's model gets the same images.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from typing import Callable, Optional

from toolkit.custom import current_folder_importable, import_custom_objects, unknown_layers, unknown_layers_message
from toolkit.errors import one_line
from toolkit.keras3 import is_keras3
from toolkit.tfmot import given_wrappers, unreadable_wrappers, unwrap
from toolkit.tf import import_keras, saved_keras_major

INPUT_SHAPE = (32, 32, 3)


def seed_cnn(input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
    """The tutorial's CNN, exactly (315,722 parameters for 32x32x3 and 10 classes)."""
    keras = import_keras()
    L = keras.layers
    return keras.Sequential(
        [
            L.InputLayer(input_shape=input_shape, name="image"),
            L.Rescaling(1.0 / 255, name="rescale"),
            L.Conv2D(32, (3, 3), activation="relu", name="conv1"),
            L.MaxPooling2D((2, 2), name="pool1"),
            L.Conv2D(64, (3, 3), activation="relu", name="conv2"),
            L.MaxPooling2D((2, 2), name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(128, activation="relu", name="fc1"),
            L.Dense(num_classes, activation="softmax", name="probs"),
        ],
        name="seed_cnn",
    )


def edge_resnet(input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
    """A small functional network with the layers edge models use: BatchNormalization,
    residual Add, depthwise-separable convolution, Dropout and global average pooling."""
    keras = import_keras()
    L = keras.layers
    inp = keras.Input(shape=input_shape, name="image")
    x = L.Rescaling(1.0 / 255, name="rescale")(inp)
    x = L.Conv2D(32, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for i, filters in enumerate((32, 64)):
        stride = 1 if i == 0 else 2
        shortcut = x
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"b{i}_dw")(x)
        y = L.BatchNormalization(name=f"b{i}_dw_bn")(y)
        y = L.ReLU(name=f"b{i}_dw_relu")(y)
        y = L.Conv2D(filters, 1, use_bias=False, name=f"b{i}_pw")(y)
        y = L.BatchNormalization(name=f"b{i}_pw_bn")(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"b{i}_proj")(shortcut)
            shortcut = L.BatchNormalization(name=f"b{i}_proj_bn")(shortcut)
        x = L.Add(name=f"b{i}_add")([y, shortcut])
        x = L.ReLU(name=f"b{i}_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="edge_resnet")


def resnet8(input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
    """MLPerf Tiny's image-classification model (its reference ``resnet_v1_eembc``): a 16-filter 3x3 stem, then
    three residual stages of 16, 32 and 64 filters (two 3x3 convolutions each with batch norm; the last two stages
    stride 2 with a 1x1 projection shortcut), global average pooling and a softmax Dense; He-normal
    initialisation, L2 1e-4 on every convolution. 78,666 parameters and 12.5 million multiply-accumulates for
    32x32x3 and 10 classes (tests/test_models.py counts both from the model)."""
    keras = import_keras()
    L, l2 = keras.layers, keras.regularizers.l2(1e-4)

    def conv(filters, size, strides, name):
        return L.Conv2D(filters, size, strides=strides, padding="same", kernel_initializer="he_normal",
                        kernel_regularizer=l2, name=name)

    inp = keras.Input(shape=input_shape, name="image")
    x = L.Rescaling(1.0 / 255, name="rescale")(inp)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(conv(16, 3, 1, "stem_conv")(x)))
    for i, (filters, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
        y = conv(filters, 3, stride, f"s{i}_conv1")(x)
        y = L.ReLU(name=f"s{i}_relu1")(L.BatchNormalization(name=f"s{i}_bn1")(y))
        y = L.BatchNormalization(name=f"s{i}_bn2")(conv(filters, 3, 1, f"s{i}_conv2")(y))
        if stride != 1:
            x = conv(filters, 1, stride, f"s{i}_proj")(x)
        x = L.ReLU(name=f"s{i}_out")(L.Add(name=f"s{i}_add")([x, y]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(num_classes, activation="softmax", kernel_initializer="he_normal", name="probs")(x)
    return keras.Model(inp, out, name="resnet8")


MODELS: dict[str, Callable] = {"seed_cnn": seed_cnn, "edge_resnet": edge_resnet, "resnet8": resnet8}


def make_model(name: str, input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
    """Build registered model ``name`` (uncompiled)."""
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes)


class ModelError(ValueError):
    """A --model that cannot be trained on this data, in one line naming it."""


def model_kind(spec: str) -> str:
    """"registry", "file" or "factory" for a --model value."""
    if spec in MODELS:
        return "registry"
    if spec.endswith((".keras", ".h5", ".hdf5")) or os.sep in spec:
        return "file"
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        return "factory"
    raise ModelError(f"--model {spec}: not a registered model ({', '.join(sorted(MODELS))}), a saved model "
                     "(path ending .keras or .h5) or a factory (package.module:function)")


def keras3_model(model, spec: str):
    """A Keras 3 model as the tf_keras model training trains (toolkit.keras3.to_tf_keras, each layer under the
    global dtype policy, so --compute-dtype applies); one line naming what has no tf_keras counterpart."""
    from toolkit.keras3 import NoTfKerasCounterpart, to_tf_keras

    try:
        return to_tf_keras(model, dtype=None)
    except NoTfKerasCounterpart as e:
        raise ModelError(f"--model {spec}: a Keras 3 model, trained here as its tf_keras rebuild: {e}") from None


def _load_file(spec: str, content: Optional[bytes] = None, custom_objects: tuple[str, ...] = ()):
    keras = import_keras()
    try:
        objects = import_custom_objects(custom_objects)
    except ValueError as e:
        raise ModelError(f"--model {spec}: {e}") from None
    suffix = os.path.splitext(spec)[1] or ".keras"
    with tempfile.TemporaryDirectory() as d:
        path = spec
        if content is not None:  # on a worker: the driver's copy of the file, through Ray's object store
            path = os.path.join(d, f"model{suffix}")
            with open(path, "wb") as f:
                f.write(content)
        if saved_keras_major(path) == 3:
            return keras3_model(_load_keras3(spec, path, objects), spec)
        try:
            with keras.utils.custom_object_scope({**given_wrappers(path), **objects}):  # tfmot's, when it has any
                model = keras.models.load_model(path, compile=False)
        except Exception as e:
            unknown = unknown_layers(path, objects, keras)
            why = unreadable_wrappers(path, e) or (unknown_layers_message(unknown) if unknown
                                                   else one_line(e, limit=200))
            raise ModelError(f"--model {spec}: cannot be loaded ({why})") from None
    try:  # tfmot's wrappers stripped: the plain model trains (tfmot_note says so)
        return unwrap(model)[0]
    except ValueError as e:
        raise ModelError(f"--model {spec}: {e}") from None


def tfmot_note(spec: str) -> str:
    """What training does with a saved model tfmot wrapped, in one line ("" for any other --model). Training takes
    the plain model out of tfmot's wrappers: a run does not keep pruning, clustering or fake quantisation going, and
    the export quantises the result again."""
    from toolkit.tfmot import WORDS, saved_kinds

    kinds = saved_kinds(spec) if model_kind(spec) == "file" else set()
    if len(kinds) != 1:  # none; or several, which unwrap refuses
        return ""
    return (f"model: {spec} was {WORDS[kinds.pop()]} by tfmot; its wrappers are taken out and the plain model "
            "trains (prune, cluster or prepare it again after training to keep that)")


def _load_keras3(spec: str, path: str, objects: dict):
    from toolkit.custom import Keras3LoadError, load_keras3_file

    try:
        return load_keras3_file(path, objects)
    except Keras3LoadError as e:
        raise ModelError(f"--model {spec}: cannot be loaded by Keras 3 ({e})") from None


def keras3_source(spec: str, input_shape, num_classes: int, custom_objects: tuple[str, ...] = (), seed: int = 0):
    """The Keras 3 model ``spec`` names, as built or loaded before training (None for a tf_keras one): what the
    trained weights are copied back into (toolkit.keras3.copy_weights_back)."""
    kind = model_kind(spec)
    if kind == "file" and saved_keras_major(spec) == 3:
        return _load_keras3(spec, spec, import_custom_objects(custom_objects))
    if kind == "factory":
        with current_folder_importable():
            fn = _factory(spec)
            model = fn(tuple(input_shape), int(num_classes))
        return _seeded_keras3(fn, input_shape, num_classes, seed) if is_keras3(model) else None
    return None


def _seeded_keras3(fn: Callable, input_shape, num_classes: int, seed: int):
    """A Keras 3 factory's model made again with Keras 3's random seed set: the same weights on every worker (a
    MultiWorkerMirroredStrategy syncs the weights of the variables it creates, not weights copied into them)."""
    import keras as keras3

    keras3.utils.set_random_seed(seed)
    with current_folder_importable():
        return fn(tuple(input_shape), int(num_classes))


def _factory(spec: str) -> Callable:
    from toolkit.tf import set_tf_env

    set_tf_env()  # a factory written with `import keras` imports TensorFlow: tf_keras must be chosen first
    module_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"--model {spec}: cannot import {module_name} ({e}); it must be installed, on "
                         "PYTHONPATH, or in the current folder") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"--model {spec}: {module_name} has no function {fn_name}")
    return fn


def build_model(spec: str, input_shape: tuple[int, int, int], num_classes: int, content: Optional[bytes] = None,
                custom_objects: tuple[str, ...] = (), seed: int = 0):
    """The tf_keras model ``spec`` names, checked against the data's shape and class count and ending in class
    probabilities (a model ending in logits gets a softmax layer). A Keras 3 factory is called again after seeding
    Keras 3 with ``seed``, so that every worker starts from the same weights. Raises ModelError in one line."""
    keras = import_keras()
    kind = model_kind(spec)
    try:
        if kind == "registry":
            model = make_model(spec, input_shape=input_shape, num_classes=num_classes)
        elif kind == "file":
            if content is None and not os.path.isfile(spec):
                raise ModelError(f"--model {spec}: no such file")
            model = _load_file(spec, content, custom_objects)
        else:
            with current_folder_importable():
                fn = _factory(spec)
                model = fn(tuple(input_shape), int(num_classes))
            if is_keras3(model):
                model = keras3_model(_seeded_keras3(fn, input_shape, num_classes, seed), spec)
    except ModelError:
        raise
    except Exception as e:  # a model that cannot be built for this shape: say which, in one line
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if "dimension" in line.lower()), lines[0] if lines else "")[:240]
        hint = ("; a larger --image-size may fit" if isinstance(e, ValueError)
                else "; it is called as function(input_shape, num_classes)" if kind == "factory" else "")
        raise ModelError(f"--model {spec}: cannot be built for {_shape(input_shape)} images with {num_classes} "
                         f"classes ({type(e).__name__}: {detail}){hint}") from None
    if not isinstance(model, keras.Model):
        what = type(model).__module__.split(".")[0] + "." + type(model).__name__
        raise ModelError(f"--model {spec}: returned {what}, not a Keras model")
    return check_model(model, spec, input_shape, num_classes)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def check_model(model, spec: str, input_shape, num_classes: int):
    keras = import_keras()
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelError(f"--model {spec}: has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "an image classifier has one of each")
    want = tuple(model.inputs[0].shape[1:])
    if len(want) != 3 or any(w is not None and w != d for w, d in zip(want, input_shape)):
        raise ModelError(f"--model {spec}: takes {_shape(['?' if w is None else w for w in want])} input but the "
                         f"data is {_shape(input_shape)} (--image-size HxW and --channels 1|3 reshape the data)")
    units = model.outputs[0].shape[-1]
    if units != num_classes or len(model.outputs[0].shape) != 2:
        raise ModelError(f"--model {spec}: outputs {_shape(model.outputs[0].shape[1:])} values but the data has "
                         f"{num_classes} classes")
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", None)
    if isinstance(last, keras.layers.Softmax) or activation == "softmax":
        return model
    if activation in (None, "linear"):  # logits: the loss and the metrics want probabilities
        outputs = keras.layers.Softmax(name="probs_softmax")(model.outputs[0])
        return keras.Model(model.inputs, outputs, name=model.name)
    raise ModelError(f"--model {spec}: ends in {activation}; training uses categorical cross-entropy on class "
                     "probabilities: end the model with softmax, or with no activation (logits get a softmax)")


def compile_model(model, optimizer, steps_per_execution: int = 1, label_smoothing: float = 0.0) -> None:
    """Categorical cross-entropy and the tutorial's metrics (accuracy, precision, recall); ``optimizer`` a
    Keras optimizer (toolkit.train.recipes.make_optimizer) or a learning rate for the tutorial's Adam."""
    keras = import_keras()
    if isinstance(optimizer, (int, float)):
        optimizer = keras.optimizers.Adam(learning_rate=optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")],
        steps_per_execution=steps_per_execution,
    )
