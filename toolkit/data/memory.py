"""Decoding a source into arrays, once: ``load_dataset`` reads any source (see :mod:`toolkit.data.sources`
and :mod:`toolkit.data.tree`), checks it, and caches the arrays (``.npz``, written atomically) under a key
derived from the source's identity (path, sizes, modification times), so the second load only reads the
cache. Every problem with a source raises :class:`DataError` with one line naming the path.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from toolkit.data.arrays import Dataset
from toolkit.data.decode import convert_arrays, decode_image
from toolkit.data.sources import (ARCHIVE, BATCHES, KERAS, batches_dir, is_batches_archive, load_batches_dir,
                                  load_batches_tar, load_keras_download, source_kind)
from toolkit.data.tree import FileTree, list_archive, list_tree
from toolkit.data.types import DataError, ImageSpec, describe_shape
from toolkit.errors import one_line
from toolkit.files import atomic_path

# Bump when the decoded layout changes, so stale caches are not read.
CACHE_VERSION = 2


def load_dataset(source: Optional[str] = None, cache_dir: Optional[str] = None,
                 spec: ImageSpec = ImageSpec()) -> Dataset:
    """Load a dataset from ``source`` through the on-disk cache, with images converted and resized as
    ``spec`` says."""
    kind = source_kind(source)
    if kind == KERAS:
        ds = load_keras_download()
        validate(ds)
        return convert(ds, spec)
    path = Path(source).expanduser().resolve()
    cache_file = Path(cache_dir) / f"{source_key(path, spec)}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        try:
            return read_cache(cache_file, str(path))
        except (OSError, ValueError, KeyError):
            pass  # A corrupt cache is rebuilt below, never trusted.
    if kind == BATCHES:
        ds = convert(load_batches_dir(batches_dir(path)), spec)
    elif kind == ARCHIVE:
        ds = _load_archive(path, spec)
    else:
        ds = decode_tree(list_tree(str(path)), spec)
    validate(ds)
    if cache_file is not None:
        write_cache(cache_file, ds)
    return ds


def _load_archive(path: Path, spec: ImageSpec) -> Dataset:
    try:
        with tarfile.open(path) as tar:
            if is_batches_archive(tar.getnames()):
                return convert(load_batches_tar(tar, path), spec)
    except DataError:
        raise
    except Exception as e:  # tarfile, EOF, OSError, zlib.error (a truncated .gz)
        raise DataError(f"{path}: truncated or corrupt archive ({one_line(e)})") from e
    return decode_tree(list_archive(str(path)), spec)


def convert(ds: Dataset, spec: ImageSpec) -> Dataset:
    """``spec`` applied to a source decoded as arrays (the CIFAR-10 batches and download)."""
    if spec.is_identity:
        return ds
    return Dataset(convert_arrays(ds.x_train, spec, ds.source), ds.y_train, convert_arrays(ds.x_test, spec, ds.source),
                   ds.y_test, ds.class_names, ds.source, convert_arrays(ds.x_val, spec, ds.source), ds.y_val)


def decode_tree(tree: FileTree, spec: ImageSpec = ImageSpec()) -> Dataset:
    """Every file of a listed tree decoded; every image must come out with one shape."""
    out = {}
    first: dict = {}  # the first image's shape and name: every image must share it
    for split in [s for s in ("train", "val", "test") if s in tree.files]:
        xs = []
        for key in tree.files[split]:
            img = decode_image(tree.read(key), tree.where(key), spec)
            if not first:
                first.update(shape=img.shape, key=key)
            elif img.shape != first["shape"]:
                raise DataError(f"{tree.where(key)}: image is {describe_shape(img.shape)} but {tree.name(first['key'])} is "
                                f"{describe_shape(first['shape'])}; all images must share one size and channel "
                                "count (--image-size HxW resizes them on load, --channels 1|3 converts)")
            xs.append(img)
        out[split] = (np.stack(xs), tree.labels[split])
    val = out.get("val", (None, None))
    return Dataset(out["train"][0], out["train"][1], out["test"][0], out["test"][1], tree.class_names, tree.source,
                   *val)


def validate(ds: Dataset) -> None:
    splits = [("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)]
    if ds.x_val is not None:
        splits.append(("val", ds.x_val, ds.y_val))
    for split, x, y in splits:
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
            raise DataError(f"{ds.source}: {split} images have shape {x.shape} {x.dtype}, expected "
                            "(N, height, width, 1 or 3) uint8")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{ds.source}: train images are {describe_shape(ds.x_train.shape[1:])} but test images are "
                        f"{describe_shape(ds.x_test.shape[1:])}")
    for split, x, y in splits:
        if len(x) != len(y):
            raise DataError(f"{ds.source}: {split} has {len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{ds.source}: {split} split is empty")
        bad = (y < 0) | (y >= ds.num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{ds.source}: {split} label {int(y[i])} at index {i} is out of range 0..{ds.num_classes - 1}"
            )


def source_key(path: Path, spec: ImageSpec = ImageSpec()) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:{path}:{spec.key()}".encode())
    if path.is_dir():
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in sorted(names):
                st = os.stat(os.path.join(root, n))
                h.update(f"{os.path.relpath(os.path.join(root, n), path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    else:
        st = path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def write_cache(cache_file: Path, ds: Dataset) -> None:
    """Atomically (readers never see a half-written cache); an unwritable cache folder costs speed, not
    correctness."""
    try:
        with atomic_path(cache_file, suffix=".tmp") as tmp:
            with open(tmp, "wb") as f:
                val = {} if ds.x_val is None else {"x_val": ds.x_val, "y_val": ds.y_val}
                np.savez(f, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                         class_names=np.asarray(ds.class_names), **val)
    except OSError:
        pass


def read_cache(cache_file: Path, source: str) -> Dataset:
    with np.load(cache_file, allow_pickle=False) as z:
        val = (z["x_val"], z["y_val"]) if "x_val" in z.files else (None, None)
        return Dataset(z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                       tuple(str(c) for c in z["class_names"]), source, *val)
