"""Load the model a user hands the exporter, and understand it before any conversion starts.

Accepted: ``.keras`` (saved by Keras 2 / tf_keras or by Keras 3), ``.h5``, and a SavedModel folder.
Whatever the source, :class:`SourceModel` offers the same four things: ``predict``, a TFLite converter,
a function for tf2onnx, and (only when it is Keras 2) the tf_keras model that tfmot's quantisation-aware
training needs.

:func:`export.model.predictions.inspect_model` then checks it against the data and finds out what its output means.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from export.errors import ExportInputError
from toolkit.custom import import_custom_objects, unknown_layers, unknown_layers_message
from toolkit.errors import one_line
from toolkit.tf import import_keras, import_tf, saved_keras_major
from toolkit.tfmot import given_wrappers, unreadable_wrappers



@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str  # "keras", "h5" or "savedmodel"
    keras: Optional[int]  # 2 (tf_keras), 3 (Keras 3) or None (a plain SavedModel)
    input_shape: tuple  # (H, W, C)
    units: int  # size of the output vector
    output_kind: str = "probabilities"
    output_activation: Optional[str] = None  # the last layer's activation, when it has one
    num_layers: int = 0
    # How the saved model was rewritten before conversion (export.model.rewrite), each with what was checked.
    rewrites: tuple = ()
    # What tfmot had done to the model as given (toolkit.tfmot): {"kind", "layers"}, None for a plain model.
    tfmot: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)


class SourceModel:
    """The model to export, whatever saved it. ``keras2`` is the tf_keras model or None."""

    def __init__(self, info: ModelInfo, keras2=None, keras3=None, saved_model_dir: Optional[str] = None,
                 loaded=None, original=None, custom_objects: Optional[dict] = None, given_qat=None):
        self.info = info
        # A quantisation-aware model as the user gave it (toolkit.tfmot): qat_int8 converts it as it is.
        self.given_qat = given_qat
        # What is converted and what tfmot's QAT gets: the tf_keras model, rewritten where the converters
        # need it (export.model.rewrite); ``original`` is the model as saved, what the float figures measure.
        self.keras2 = keras2
        self._keras = original if original is not None else keras2 if keras2 is not None else keras3
        self._converted = keras2 if keras2 is not None else keras3  # what the rewrites are checked on
        self.custom_objects = custom_objects or {}
        # Everything that is not Keras 2 converts from a SavedModel: a Keras 3 model is exported to one
        # first (converting its objects through a concrete function gives NaN outputs in TFLite 2.20).
        self.saved_model_dir = saved_model_dir
        self._trackable = loaded
        self._signature = loaded.signatures["serving_default"] if loaded is not None else None

    # -- running it ------------------------------------------------------------------------

    def concrete_function(self):
        """``float32 (None, H, W, C) -> (None, units)``: what TFLite and tf2onnx convert."""
        tf = import_tf()
        spec = tf.TensorSpec((None, *self.info.input_shape), tf.float32, name="image")
        if self._signature is not None:
            sig, name = self._signature, _sig_input(self._signature)
            fn = tf.function(lambda x: next(iter(sig(**{name: x}).values())))
        else:
            m = self._keras
            fn = tf.function(lambda x: m(x, training=False))
        return fn.get_concrete_function(spec)

    @property
    def compute_dtype(self) -> str:
        """What the saved model computes in (toolkit.tf.compute_dtype): its outputs carry that rounding."""
        from toolkit.tf import compute_dtype

        return compute_dtype(self._keras) if self._keras is not None else "float32"

    def predict(self, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
        if self._keras is not None:
            return np.asarray(self._keras.predict(x, batch_size=batch_size, verbose=0), np.float32)
        fn = self.concrete_function()
        outs = [fn(x[i:i + batch_size].astype(np.float32)).numpy() for i in range(0, len(x), batch_size)]
        return np.concatenate(outs).astype(np.float32)

    # -- converting it ---------------------------------------------------------------------

    def check_rewrites(self, sample: np.ndarray, ref: np.ndarray) -> tuple:
        """The rewrites, each with how closely the rewritten model follows the saved one on ``sample`` (whose
        outputs from the saved model are ``ref``); ExportInputError when it does not (a rewrite that changed
        what the model computes)."""
        if not self.info.rewrites:
            return ()
        from export.model.rewrite import outputs_close

        new = np.asarray(self._converted.predict(sample.astype(np.float32), batch_size=500, verbose=0), np.float32)
        close, measured = outputs_close(ref, new, self.compute_dtype)
        if not close:
            raise ExportInputError(f"{self.info.path}: the model rewritten for conversion "
                                   f"({'; '.join(self.info.rewrites)}) does not compute what the saved one does: "
                                   f"{measured}")
        return tuple(f"{r} (checked: {measured})" for r in self.info.rewrites)

    def onnx_keras(self):
        """The tf_keras model tf2onnx converts: grouped convolutions split per group (export.model.rewrite)."""
        from export.model.rewrite import grouped_convs, split_groups

        if self.keras2 is None or not grouped_convs(self.keras2):
            return self.keras2
        return split_groups(self.keras2)

    def tflite_converter(self):
        tf = import_tf()
        if self.keras2 is not None:
            return tf.lite.TFLiteConverter.from_keras_model(self.keras2)
        return tf.lite.TFLiteConverter.from_saved_model(self.saved_model_dir)

    def weights(self) -> list[tuple[str, np.ndarray]]:
        """(layer or variable name, values) for every weight, to refuse NaN/inf up front."""
        if self._keras is not None:
            return [(layer.name, np.asarray(w)) for layer in self._keras.layers for w in layer.get_weights()]
        return [(v.name.split(":")[0], v.numpy()) for v in getattr(self._trackable, "variables", [])]


def _sig_input(sig) -> str:
    kwargs = sig.structured_input_signature[1]
    if len(kwargs) != 1:
        raise ExportInputError(f"the SavedModel's serving signature has {len(kwargs)} inputs; "
                              "export supports one image input")
    return next(iter(kwargs))


# --------------------------------------------------------------------------------------------
# Loading


def load_source_model(path: str, custom_objects: str = "") -> SourceModel:
    """Load ``path`` (.keras, .h5 or a SavedModel folder), the model's own layers imported from the
    ``custom_objects`` modules (comma list); ExportInputError names the file."""
    p = Path(path)
    try:
        objects = import_custom_objects(custom_objects)
    except ValueError as e:
        raise ExportInputError(str(e)) from None
    if not p.exists():
        raise ExportInputError(f"{path}: model file does not exist")
    keras = import_keras()
    if p.is_dir():
        if not (p / "saved_model.pb").exists():
            raise ExportInputError(f"{path}: is a folder without saved_model.pb, expected a .keras or .h5 "
                                  "model file or a SavedModel folder")
        try:  # a SavedModel written by tf_keras loads back as a Keras 2 model (QAT possible)
            with keras.utils.custom_object_scope(objects):
                return _from_keras2(keras.models.load_model(str(p), compile=False), path, "savedmodel", objects)
        except Exception:  # not a Keras SavedModel: serve it through its signature below
            pass
        tf = import_tf()
        try:
            loaded = tf.saved_model.load(str(p))
        except Exception as e:  # TensorFlow raises many types for a bad folder
            raise ExportInputError(f"{path}: not a loadable SavedModel ({one_line(e)})") from e
        return _from_saved_model(loaded, str(p), path, "savedmodel", None)
    suffix = p.suffix.lower()
    if suffix not in (".keras", ".h5", ".hdf5"):
        raise ExportInputError(f"{path}: unknown model format {suffix or '(no suffix)'}; expected .keras, .h5 "
                              "or a SavedModel folder")
    fmt = "keras" if suffix == ".keras" else "h5"
    version = saved_keras_major(p) if fmt == "keras" else None
    if version == 3:
        return _load_keras3(p, path, objects)
    known = {**given_wrappers(p), **objects}  # tfmot's own layers, when the file holds any
    try:
        with keras.utils.custom_object_scope(known):
            model = keras.models.load_model(str(p), compile=False)
    except Exception as e2:  # Keras raises many types for a bad file
        unknown = unknown_layers(str(p), known, keras)
        if unreadable_wrappers(str(p), e2):
            raise ExportInputError(f"{path}: {unreadable_wrappers(str(p), e2)}") from None
        if unknown:
            raise ExportInputError(f"{path}: {unknown_layers_message(unknown)}") from None
        if fmt == "h5":  # maybe written by Keras 3
            try:
                return _load_keras3(p, path, objects)
            except ExportInputError:
                pass
        raise ExportInputError(f"{path}: not a loadable Keras model ({one_line(e2)})") from e2
    return _from_keras2(model, path, fmt, objects)


def _from_saved_model(loaded, saved_model_dir: str, path: str, fmt: str, keras3, original=None,
                      rewrites=()) -> SourceModel:
    """A SavedModel served through its ``serving_default`` signature (one image in, one tensor out)."""
    sigs = getattr(loaded, "signatures", {})
    if "serving_default" not in sigs:
        raise ExportInputError(f"{path}: SavedModel has no serving_default signature")
    sig = sigs["serving_default"]
    name = _sig_input(sig)
    spec = sig.structured_input_signature[1][name]
    if len(sig.structured_outputs) != 1:
        raise ExportInputError(f"{path}: SavedModel has {len(sig.structured_outputs)} outputs; export supports "
                              "single-output classifiers")
    if spec.shape.rank != 4 or any(d is None for d in spec.shape[1:]):
        raise ExportInputError(f"{path}: SavedModel input {name} has shape {spec.shape}; expected images "
                              "(batch, height, width, channels) of a fixed size")
    out = next(iter(sig.structured_outputs.values()))
    info = ModelInfo(str(Path(path)), fmt, 3 if keras3 is not None else None,
                     tuple(int(d) for d in spec.shape[1:]), int(out.shape[-1]),
                     output_activation=_last_activation(keras3) if keras3 is not None else None,
                     num_layers=len(keras3.layers) if keras3 is not None else 0, rewrites=tuple(rewrites))
    return SourceModel(info, keras3=keras3, saved_model_dir=saved_model_dir, loaded=loaded, original=original)


def _load_keras3(p: Path, path: str, objects: dict) -> SourceModel:
    model, original, rewrites = _keras3_model(p, path, objects)
    export_dir = tempfile.mkdtemp(prefix="keras3-savedmodel-")
    atexit.register(shutil.rmtree, export_dir, True)
    try:
        export_inference(model, export_dir)
        loaded = import_tf().saved_model.load(export_dir)
    except Exception as e:  # Keras/TensorFlow raise many types for models they cannot trace
        raise ExportInputError(f"{path}: Keras 3 model could not be exported to a SavedModel "
                              f"({one_line(e)})") from e
    return _from_saved_model(loaded, export_dir, path, "keras" if p.suffix.lower() == ".keras" else "h5", model,
                             original, rewrites)


def load_keras3_model(path: str, custom_objects: str = ""):
    """A Keras 3 model file as the converters get it (float32 if saved under a mixed policy): what the
    export worker rebuilds in tf_keras for QAT (it converts the other variants from the SavedModel)."""
    return _keras3_model(Path(path), path, import_custom_objects(custom_objects))[0]


def _keras3_model(p: Path, path: str, objects: dict) -> tuple:
    """(the model the converters get, the model as saved, the rewrites between them)."""
    import_tf()
    if importlib.util.find_spec("keras") is None:  # (TensorFlow 2.20 installs it)
        raise ExportInputError(f"{path}: saved by Keras 3, which is not installed (pip install keras)")
    from toolkit.custom import Keras3LoadError, load_keras3_file

    try:
        model = load_keras3_file(str(p), objects)
    except Keras3LoadError as e:
        raise ExportInputError(f"{path}: {e}" if e.unknown else f"{path}: not a loadable Keras 3 model ({e})") from None
    _check_single_io(model, path)
    from export.model.rewrite import keras3_as_float32
    from toolkit.tf import float16_policy

    original, rewrites = model, []
    policy = float16_policy(model)
    if policy:
        try:
            model = keras3_as_float32(model)
        except Exception as e:  # a layer that cannot be rebuilt from its config
            raise ExportInputError(f"{path}: model could not be rewritten for conversion ({one_line(e)})") from e
        rewrites.append(f"built under the {policy} policy: rebuilt as float32 with the same weights")
    return model, original, rewrites


def export_inference(model, export_dir: str) -> None:
    """A Keras 3 model's SavedModel, its serving function called with ``training=False``. Not
    ``model.export()``: that calls the model without ``training``, and a layer whose call defaults to
    training=True (RandomFlip and Keras 3's other augmentation layers) then runs every later layer in
    training mode: batch norm on the batch's statistics, the augmentation's random ops traced (measured: a
    RandomFlip/BatchNormalization model's SavedModel 0.75 off the model's outputs, its TFLite conversion
    failing on StatelessRandomGetKeyCounter)."""
    import keras as keras3

    tf = import_tf()
    archive = keras3.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
    archive.add_endpoint(name="serve", fn=lambda x: model(x, training=False), input_signature=[spec])
    archive.write_out(export_dir, verbose=False)


def _check_single_io(model, path: str) -> None:
    n_in, n_out = len(model.inputs), len(model.outputs)
    if n_in != 1 or n_out != 1:
        raise ExportInputError(f"{path}: model has {n_in} input(s) and {n_out} output(s); export supports "
                              "classifiers with one image input and one class-score output")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ExportInputError(f"{path}: model input has shape {shape}; expected images (batch, height, width, "
                              "channels)")
    if any(d is None for d in shape[1:]):
        raise ExportInputError(f"{path}: model input shape {shape} has an unknown size; export needs a fixed "
                              "height, width and channels")


def _from_keras2(model, path: str, fmt: str, objects: dict) -> SourceModel:
    from toolkit.tfmot import unwrap

    try:
        model, given_qat, tfmot_done = unwrap(model)  # tfmot's wrappers stripped: the plain model converts
    except ValueError as e:
        raise ExportInputError(f"{path}: {e}") from None
    _check_single_io(model, path)
    from export.model.rewrite import rewrite_for_conversion

    converted, rewrites = rewrite_for_conversion(model, path)
    info = ModelInfo(str(Path(path)), fmt, 2, tuple(int(d) for d in model.input_shape[1:]),
                     int(model.output_shape[-1]), output_activation=_last_activation(model),
                     num_layers=len(model.layers), rewrites=tuple(rewrites), tfmot=tfmot_done)
    return SourceModel(info, keras2=converted, original=model, custom_objects=objects, given_qat=given_qat)


def _last_activation(model) -> Optional[str]:
    """The activation applied last: the output layer's ``activation``, or a Softmax/Activation layer."""
    layer = model.layers[-1]
    name = type(layer).__name__
    if name == "Softmax":
        return "softmax"
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    return getattr(act, "__name__", str(act))
