"""Where a model's own layers live: ``--custom-objects package.module`` in training and in the export.

A team's layer registered with ``register_keras_serializable`` is found by Keras only once the module
that defines it has been imported; a saved model names that module (``"module": "team_layers"``) but
Keras does not import it, and fails with ``'str' object is not callable``. :func:`import_custom_objects`
imports the named modules (from the current folder too, as ``python -m`` would) and returns every Keras
object they define, registered or not, for ``custom_object_scope``; :func:`unknown_layers` reads a saved
model's config to name the layers nothing imported, so the error can say which module to name.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import sys
import zipfile
from typing import Iterator, Sequence

# Modules whose classes Keras resolves by itself.
KERAS_MODULES = ("keras", "tf_keras", "tensorflow")


@contextlib.contextmanager
def current_folder_importable() -> Iterator[None]:
    """The current folder on ``sys.path`` while a user's module is imported, as ``python -m`` would have
    it (a module next to where the command runs); taken off again after."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        yield
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def parse_modules(value) -> tuple[str, ...]:
    """``"a.b,c"`` or a sequence of such strings -> ("a.b", "c")."""
    items = [value] if isinstance(value, str) else list(value or ())
    return tuple(m.strip() for item in items for m in item.split(",") if m.strip())


def import_custom_objects(modules: Sequence[str]) -> dict[str, type]:
    """Import ``modules`` and return their Keras-serialisable classes by class name and registered name.
    Raises ValueError naming ``custom_objects`` and the module that cannot be imported."""
    from toolkit.tf import set_tf_env

    set_tf_env()  # a module written with `import keras` imports TensorFlow: tf_keras must be chosen first
    objects: dict[str, type] = {}
    for name in parse_modules(modules):
        try:
            with current_folder_importable():
                module = importlib.import_module(name)
        except Exception as e:  # ImportError, or any error the user's module raises on import
            raise ValueError(f"custom_objects: cannot import {name} ({type(e).__name__}: {e}); it must be "
                             "installed, on PYTHONPATH, or in the current folder") from None
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__.split(".")[0] in KERAS_MODULES or not hasattr(cls, "from_config"):
                continue
            objects[cls_name] = cls
    return objects


def saved_config(path: str) -> dict:
    """The model config stored in a ``.keras`` (zip) or ``.h5`` file; {} when there is none to read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        if str(path).lower().endswith((".h5", ".hdf5")):
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
                return json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else {}
    except (OSError, KeyError, ValueError):
        return {}
    return {}


def _layer_entries(node) -> Iterator[dict]:
    """Every serialised layer in a config: dicts with a ``class_name`` inside ``layers`` lists, nested
    models included."""
    if isinstance(node, dict):
        for layer in node.get("layers", []) if isinstance(node.get("layers"), list) else []:
            if isinstance(layer, dict) and "class_name" in layer:
                yield layer
        for value in node.values():
            yield from _layer_entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _layer_entries(value)


def layer_classes(path: str) -> list[str]:
    """The class name of every layer the saved ``path`` holds (nested models' and wrapped layers' too)."""
    return [entry["class_name"] for entry in _layer_entries(saved_config(path))]


def unknown_layers(path: str, known: dict[str, type], keras) -> list[tuple[str, str]]:
    """(class name, module or registered package) of each layer in the saved ``path`` that neither
    ``keras`` (tf_keras or Keras 3) nor ``known`` nor Keras's registry resolves."""
    found = []
    for entry in _layer_entries(saved_config(path)):
        cls, module = entry["class_name"], entry.get("module") or ""
        registered = entry.get("registered_name") or cls
        if cls in known or registered in known or hasattr(keras.layers, cls) or cls in ("Functional", "Sequential",
                                                                                           "Model"):
            continue
        if keras.saving.get_registered_object(registered) is not None:
            continue
        if module.split(".")[0] in KERAS_MODULES and "Custom>" not in registered:
            continue
        where = module or (registered.split(">")[0] if ">" in registered else "")
        if (cls, where) not in found:
            found.append((cls, where))
    return found


def unknown_layers_message(unknown: list[tuple[str, str]]) -> str:
    """One line: the unknown layers, and the option that imports them."""
    names = ", ".join(f"{cls} (module {where})" if where else cls for cls, where in unknown)
    modules = ",".join(dict.fromkeys(where for _, where in unknown if where)) or "package.module"
    return (f"custom layer(s) {names} not known to Keras: name the module that defines them with "
            f"--custom-objects {modules}")


@contextlib.contextmanager
def custom_scope(modules, keras) -> Iterator[dict]:
    """``modules`` imported and their objects in ``keras``'s custom object scope (nothing when empty)."""
    from toolkit.activations import functions
    from toolkit.keras3 import keras3_layer_class

    functions()  # registered, for the rebuild of a Keras 3 model (toolkit.keras3) that uses them,
    keras3_layer_class()  # and the adapter its own Keras 3 layers run in (in a worker restarted from a checkpoint)
    objects = import_custom_objects(modules) if parse_modules(modules) else {}
    with keras.utils.custom_object_scope(objects):
        yield objects


class Keras3LoadError(ValueError):
    """A file Keras 3 saved that Keras 3 cannot load; the message says why in words. ``unknown``: a layer nothing
    imported (the message names it and the module to pass)."""

    def __init__(self, why: str, unknown: bool = False):
        super().__init__(why)
        self.unknown = unknown


def load_keras3_file(path: str, objects: dict):
    """A model file saved by Keras 3, loaded by Keras 3 (its own layers from ``objects``, the --custom-objects
    modules' classes, or registered with keras.saving.register_keras_serializable). Keras3LoadError names an unknown
    layer and the module to pass, or gives the error's gist. Training and the export both load such files here."""
    import keras as keras3

    from toolkit.errors import one_line

    try:
        return keras3.saving.load_model(str(path), compile=False, custom_objects=objects)
    except Exception as e:  # Keras raises many types for a bad file
        unknown = unknown_layers(str(path), objects, keras3)
        raise Keras3LoadError(unknown_layers_message(unknown) if unknown else one_line(e, limit=200),
                              unknown=bool(unknown)) from e
