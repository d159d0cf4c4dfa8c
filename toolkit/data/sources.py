"""What ``--data`` is, and the readers of sources that come as arrays: the Keras download (as in the
tutorial) and CIFAR-10's official "python version" (a ``cifar-10-batches-py/`` folder, or a folder holding
one, or the ``cifar-10-python.tar.gz`` archive). Class-folder trees are listed by :mod:`toolkit.data.tree`.
"""

from __future__ import annotations

import pickle
import re
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from toolkit.data.arrays import Dataset
from toolkit.data.types import CIFAR10_CLASSES, DataError
from toolkit.errors import one_line
from toolkit.storage import is_uri

# What a source is, decided once, here:
KERAS = "keras"  # the Keras download
BATCHES = "batches"  # CIFAR-10 python batches, a folder
ARCHIVE = "archive"  # a .tar/.tar.gz: CIFAR-10 python batches or a class-folder tree (told apart on reading)
TREE = "tree"  # a class-folder tree: a folder, or a URI prefix (s3://...); the only kind Ray Data streams

_PY_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_PY_TEST = "test_batch"


def source_kind(source: Optional[str]) -> str:
    """KERAS, BATCHES, ARCHIVE or TREE for ``--data``; DataError for a path that is none. Cheap: nothing is
    decompressed (an archive's content is told apart when it is read, and not at all on a cache hit)."""
    if source is None or source in ("", "keras", "download"):
        return KERAS
    if is_uri(source):
        return TREE
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir():
        return BATCHES if batches_dir(path) is not None else TREE
    if not tarfile.is_tarfile(path):
        raise DataError(f"{path.resolve()}: not a folder or a .tar/.tar.gz archive (cannot read it as one)")
    return ARCHIVE


def is_batches_archive(names: list[str]) -> bool:
    """Whether an archive's member names hold CIFAR-10's python batches (else it is read as a tree)."""
    return any(re.search(r"(^|/)data_batch_1$", n) for n in names)


def load_keras_download() -> Dataset:
    from toolkit.tf import import_keras

    keras = import_keras()
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as e:  # network errors come in many types; re-raise as one clear line
        raise DataError(f"Keras CIFAR-10 download failed ({one_line(e)}); "
                        "pass --data with a local copy instead") from e
    return Dataset(x_train, y_train.reshape(-1).astype(np.int64), x_test,
                   y_test.reshape(-1).astype(np.int64), CIFAR10_CLASSES, KERAS)


def batches_dir(path: Path) -> Optional[Path]:
    """The folder holding CIFAR-10's python batches: ``path`` or its ``cifar-10-batches-py/``; None if neither."""
    for cand in (path, path / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() or (cand / "batches.meta").is_file():
            return cand
    return None


def load_batches_dir(folder: Path) -> Dataset:
    def read(name: str) -> Optional[bytes]:
        p = folder / name
        return p.read_bytes() if p.is_file() else None

    return _assemble_batches(read, str(folder))


def load_batches_tar(tar: tarfile.TarFile, path: Path) -> Dataset:
    members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}

    def read(name: str) -> Optional[bytes]:
        m = members.get(name)
        if m is None:
            return None
        f = tar.extractfile(m)
        return f.read() if f is not None else None

    return _assemble_batches(read, str(path))


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        d = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # pickle raises many types on garbage; all mean "corrupt"
        raise DataError(f"{where}: corrupt batch file ({type(e).__name__})") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise DataError(f"{where}: not a CIFAR-10 batch (no data/labels)")
    return d


def _batch_arrays(d: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(d[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 32 * 32 * 3:
        raise DataError(f"{where}: data has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{where}: {labels.shape[0]} labels for {data.shape[0]} images")
    # Stored channel-first (N, 3, 32, 32); Keras wants channel-last.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _class_names_from_meta(raw: Optional[bytes], where: str) -> tuple[str, ...]:
    if raw is None:
        return CIFAR10_CLASSES
    try:
        meta = pickle.loads(raw, encoding="bytes")
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"])
    except Exception as e:  # same as _unpickle: any failure is a corrupt file
        raise DataError(f"{where}: corrupt batches.meta ({type(e).__name__})") from e


def _assemble_batches(read: Callable[[str], Optional[bytes]], where: str) -> Dataset:
    parts = []
    for name in _PY_TRAIN + [_PY_TEST]:
        raw = read(name)
        if raw is None:
            split = "test" if name == _PY_TEST else "train"
            raise DataError(f"{where}: missing {name} ({split} split)")
        parts.append(_batch_arrays(_unpickle(raw, f"{where}/{name}"), f"{where}/{name}"))
    class_names = _class_names_from_meta(read("batches.meta"), f"{where}/batches.meta")
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return Dataset(x_train, y_train, parts[5][0], parts[5][1], class_names, where)
