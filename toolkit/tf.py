"""One place that imports TensorFlow, so Keras 2 (tf_keras) is always the Keras in use.

tensorflow-model-optimization only works with Keras 2, and Keras 3 breaks
MultiWorkerMirroredStrategy fit loops: ``TF_USE_LEGACY_KERAS=1`` must be set before
TensorFlow is first imported, in every process (driver and each Ray worker).
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from types import ModuleType
from typing import Optional

LEGACY_KERAS_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def set_tf_env() -> None:
    """Set the environment TensorFlow must see at first import (no-op after it is set)."""
    if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise RuntimeError("TensorFlow was imported before TF_USE_LEGACY_KERAS=1 was set; "
                           "import it through toolkit.tf.import_tf()")
    for k, v in LEGACY_KERAS_ENV.items():
        os.environ.setdefault(k, v)


# Lines TensorFlow and Ray print on every run that read like failures and are not: CUDA probing on a
# CPU-only machine, absl's note that logging is not initialised, TensorFlow's gRPC server start (absl
# INFO, which TF_CPP_MIN_LOG_LEVEL does not cover), and Ray Train's warning about its own
# PreemptionWatcher actor. A line is noise when it contains every part of one pattern; each is narrow,
# and every other line (real errors included) passes. Used here for device initialisation and by
# toolkit.train on the worker logs Ray forwards.
KNOWN_NOISE = (
    ("failed call to cuInit",),
    ("Could not find cuda drivers",),
    ("All log messages before absl::InitializeLog() is called",),
    ("grpc_server_lib.cc", "Started server with target"),
    ("PreemptionWatcher", "max_restarts > 0"),
    # Ray Data (--ingest stream): an internal deprecation in Ray Train's own dataset manager, the
    # progress-bar notice, and a line per epoch from the split coordinator; our epoch lines say it.
    ("exclude_resources", "deprecated"),
    ("self.exclude_resources = exclude_resources",),
    ("Progress bars disabled. To enable",),
    ("Dataset train_", "execution finished in"),
)
_devices_ready = False


def is_noise(line: str) -> bool:
    return any(all(part in line for part in pattern) for pattern in KNOWN_NOISE)


def _init_devices_quietly(tf) -> None:
    """Let TensorFlow find its devices (where it tries CUDA) with stderr captured at the file
    descriptor, then pass on every line that is not known device-probing noise."""
    global _devices_ready
    if _devices_ready:
        return
    _devices_ready = True
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to quiet
        tf.config.list_physical_devices()
        return
    with tempfile.TemporaryFile() as cap:
        os.dup2(cap.fileno(), 2)
        try:
            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        cap.seek(0)
        kept = [line for line in cap.read().decode(errors="replace").splitlines(keepends=True)
                if not is_noise(line)]
    if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def import_tf() -> ModuleType:
    """``tensorflow``, imported with legacy Keras selected, its devices found without the CUDA
    build's driver-probing noise."""
    set_tf_env()
    import tensorflow as tf

    _init_devices_quietly(tf)
    return tf


def import_keras() -> ModuleType:
    """``tf_keras`` (Keras 2), the Keras this toolkit uses everywhere."""
    import_tf()
    import tf_keras
    from tf_keras.src.mixed_precision import device_compatibility_check

    # Loading a model saved under mixed_float16 on a machine without a GPU logs a three-line warning that
    # it "may run slowly": the export rebuilds such a model as float32 and never runs it that way, and a
    # refused model must get one line (device_compatibility_check logs once per process, then sets this).
    device_compatibility_check._logged_compatibility_check = True
    return tf_keras


def set_threads(num_threads: int) -> None:
    """Pin TensorFlow's thread pools; Ray sets OMP_NUM_THREADS=1 in workers, TF's pools are ours to set."""
    tf = import_tf()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(num_threads)
    except RuntimeError:
        pass  # already initialised in this process: the earlier setting stands


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU computes bfloat16 natively (bf16_in_cpuinfo of Linux's /proc/cpuinfo); False where
    that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_in_cpuinfo(f.read())
    except OSError:
        return False


def bf16_in_cpuinfo(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text names a native bfloat16 unit on its first "flags" line: avx512_bf16 (AMD Zen 4
    and later, Intel Cooper Lake and later) or amx_bf16 (Intel Sapphire Rapids and later)."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(compute_dtype: str, use_gpu: bool) -> tuple[str, str]:
    """(the Keras dtype policy to train under, why) for TrainConfig.compute_dtype on this machine."""
    if compute_dtype == "bfloat16":
        return "mixed_bfloat16", "asked"
    if compute_dtype == "float32":
        return "float32", "asked"
    if use_gpu:
        return "float32", "auto: bfloat16 not measured on GPUs yet"
    if cpu_has_bf16():
        return "mixed_bfloat16", "auto: this CPU computes bfloat16 natively"
    return "float32", "auto: this CPU has no native bfloat16"


# Depthwise convolutions other than 3x3 at stride 1 (MobileNets' strided and 5x5 ones, the depthwise half of a
# SeparableConv2D) train slower in bfloat16 than in float32 on a CPU with native bfloat16 (stride 2: 0.58x,
# separable stride 2: 0.25x, 5x5: 0.53x, 7x7: 1.06x; 3x3 stride 1: 1.25x; benchmarks/results/bf16_layers.md, by
# benchmarks/step_speed.py): with them MobileNetV3Small trains at 0.38x. ``auto`` keeps such models in float32.
FAST_BF16_DEPTHWISE = {"kernel_size": (3, 3), "strides": (1, 1)}


def all_layers(model) -> list:
    """Every layer, nested models' layers included (the nested models themselves not); tf_keras or Keras 3."""
    out = []
    for layer in model.layers:
        out.extend(all_layers(layer) if isinstance(getattr(layer, "layers", None), list) else [layer])
    return out


def float16_policy(model) -> Optional[str]:
    """The reduced-precision compute policy the model was built under (``mixed_float16``...), or None."""
    for layer in all_layers(model):
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and policy.compute_dtype in ("float16", "bfloat16"):
            return policy.name
    return None


def compute_dtype(model) -> str:
    """The dtype ``model``'s layers compute in: float32, or a mixed policy's float16 or bfloat16."""
    policy = float16_policy(model)
    return "bfloat16" if policy and "bfloat16" in policy else "float16" if policy else "float32"


def slow_in_bfloat16(model) -> list[str]:
    """The names of ``model``'s layers that train slower in bfloat16 than in float32 on a CPU
    (FAST_BF16_DEPTHWISE's measurement)."""
    return [layer.name for layer in all_layers(model) if hasattr(layer, "depthwise_kernel") or
            type(layer).__name__ in ("DepthwiseConv2D", "SeparableConv2D")
            if any(tuple(getattr(layer, key, value)) != value for key, value in FAST_BF16_DEPTHWISE.items())]


def save_model(model, path: str) -> None:
    """Save in the native ``.keras`` format. Explicit, because tf_keras decides the format from
    a thread-local flag that its own first save in a non-main thread (Ray Train runs the loop in
    one) resets to False, silently writing HDF5 under a ``.keras`` name from then on."""
    model.save(path, save_format="keras_v3")


def quiet_tf_logs() -> None:
    """Keep TensorFlow's Python INFO logs (one per collective op) out of job output."""
    import logging

    import_tf().get_logger().setLevel(logging.ERROR)


def saved_keras_major(path) -> Optional[int]:
    """2 or 3 for a ``.keras`` zip (the ``keras_version`` of its metadata.json) or an ``.h5`` file (its
    ``keras_version`` attribute); None when it does not say (a folder, a damaged file). The one check of which Keras
    saved a model."""
    try:
        if str(path).lower().endswith((".h5", ".hdf5")):
            import h5py

            with h5py.File(path, "r") as f:
                version = f.attrs.get("keras_version", "")
                version = version.decode() if isinstance(version, bytes) else str(version)
        else:
            with zipfile.ZipFile(path) as z:
                version = str(json.loads(z.read("metadata.json")).get("keras_version", ""))
        return int(version.split(".")[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
