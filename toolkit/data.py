"""CIFAR-10 (or any image-classification set of one image size, RGB or grayscale) as uint8 arrays,
and tf.data pipelines.

Sources, recognised from what is at the path:

- ``None``: the Keras download (``tf_keras.datasets.cifar10.load_data``), as in the tutorial;
- the official "python version": a ``cifar-10-batches-py/`` folder (or a folder holding one),
  or the ``cifar-10-python.tar.gz`` archive;
- a class-folder tree ``train/<class>/*`` and ``test/<class>/*`` of JPEG/PNG files, as a
  folder or as a ``.tar``/``.tar.gz`` (optionally under one top-level folder).

Decoded arrays are cached (``.npz``, written atomically) under a key derived from the source's
identity (path, sizes, modification times), so the second load only reads the cache.
Every problem with a source raises :class:`DataError` with one line naming the path.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Bump when the decoded layout changes, so stale caches are not read.
_CACHE_VERSION = 2


class DataError(ValueError):
    """A data source is missing, malformed or corrupt. The message names the path."""


@dataclass(frozen=True)
class Dataset:
    """Train and test splits as uint8 images (N, H, W, C), C = 3 (RGB) or 1 (grayscale), and int64
    labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    # A validation split the data came with (a tree's val/ folder); None = split from train.
    x_val: Optional[np.ndarray] = None
    y_val: Optional[np.ndarray] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    def limited(self, n: Optional[int], seed: int = 0) -> "Dataset":
        """A seeded random ``n`` images of each split (for smoke tests); ``None`` keeps all.
        Random, not the first ``n``: class-folder sources are stored class by class."""
        if n is None:
            return self
        rng = np.random.default_rng(seed)

        def pick(x, y):
            if x is None:
                return None, None
            i = np.sort(rng.permutation(len(x))[:n])
            return x[i], y[i]

        return Dataset(*pick(self.x_train, self.y_train), *pick(self.x_test, self.y_test), self.class_names,
                       self.source, *pick(self.x_val, self.y_val))

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, by class name."""
        out = {}
        for split, y in (("train", self.y_train), ("val", self.y_val), ("test", self.y_test)):
            if y is not None:
                counts = np.bincount(y, minlength=self.num_classes)
                out[split] = {c: int(n) for c, n in zip(self.class_names, counts)}
        return out


RESIZE_MODES = ("crop", "stretch")


@dataclass(frozen=True)
class ImageSpec:
    """How images are brought to one shape as they are decoded."""

    # (height, width) to resize to; None = as stored (then every image must share one size).
    size: Optional[tuple[int, int]] = None
    # "crop": scale the shorter side to the size, then cut out the centre (keeps the aspect ratio, loses
    # the borders); "stretch": a plain resize to the size (keeps everything, distorts the aspect ratio).
    resize: str = "crop"
    # 1 (grayscale) or 3 (RGB): grayscale, RGBA, palette and other modes are converted; None = as
    # stored, RGB stays RGB and grayscale stays one channel.
    channels: Optional[int] = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.size is not None and not all(1 <= int(d) <= 4096 for d in self.size):
            raise ValueError(f"image size must be between 1x1 and 4096x4096, got {self.size[0]}x{self.size[1]}")

    @property
    def is_identity(self) -> bool:
        return self.size is None and self.channels is None

    def key(self) -> str:
        return "" if self.is_identity else f"{self.size}:{self.resize}:{self.channels}"

    def apply(self, im, where: str) -> np.ndarray:
        """A PIL image -> uint8 (H, W, C) array, converted and resized as this spec says."""
        from PIL import Image

        mode, (w, h) = im.mode, im.size
        if self.channels == 1:
            im = im.convert("L")
        elif self.channels == 3 or (self.channels is None and mode not in ("RGB", "L")):
            if self.channels is None:
                raise DataError(f"{where}: image is {w}x{h} {mode}; expected RGB or grayscale (L) images "
                                "(--channels 3 or 1 converts it)")
            im = im.convert("RGB")
        if self.size is not None:
            th, tw = self.size
            if self.resize == "stretch":
                im = im.resize((tw, th), Image.Resampling.BILINEAR)
            else:
                scale = max(th / h, tw / w)
                nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - tw) // 2, (nh - th) // 2
                im = im.crop((left, top, left + tw, top + th))
        arr = np.asarray(im, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr


def parse_image_size(text: str) -> tuple[int, int]:
    """'96' -> (96, 96); '64x48' -> (64, 48) (height x width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text or "")
    if not m:
        raise ValueError(f"image size must be H or HxW (say 96 or 64x48), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


# --------------------------------------------------------------------------------------------
# Loading


def load_dataset(source: Optional[str] = None, cache_dir: Optional[str] = None,
                 spec: ImageSpec = ImageSpec()) -> Dataset:
    """Load a dataset from ``source`` (see module docstring), through the on-disk cache, with images
    converted and resized as ``spec`` says."""
    if source is None or source in ("", "keras", "download"):
        return _apply_spec(_load_keras_download(), spec)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    path = path.resolve()
    key = _source_key(path, spec)
    cache_file = Path(cache_dir) / f"{key}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        try:
            return _read_cache(cache_file, str(path))
        except (OSError, ValueError, KeyError):
            pass  # A corrupt cache is rebuilt below, never trusted.
    ds = _load_uncached(path, spec)
    _validate(ds)
    if cache_file is not None:
        _write_cache(cache_file, ds)
    return ds


def _apply_spec(ds: Dataset, spec: ImageSpec) -> Dataset:
    """``spec`` applied to a source decoded as arrays (the CIFAR-10 batches and download)."""
    if spec.is_identity:
        return ds
    from PIL import Image

    def convert(x):
        if x is None:
            return None
        return np.stack([spec.apply(Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img), ds.source)
                         for img in x])

    return Dataset(convert(ds.x_train), ds.y_train, convert(ds.x_test), ds.y_test, ds.class_names, ds.source,
                   convert(ds.x_val), ds.y_val)


def _load_keras_download() -> Dataset:
    from toolkit.tf import import_keras

    keras = import_keras()
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as e:  # network errors come in many types; re-raise as one clear line
        raise DataError(f"Keras CIFAR-10 download failed ({type(e).__name__}: {e}); "
                        "pass --data with a local copy instead") from e
    ds = Dataset(x_train, y_train.reshape(-1).astype(np.int64), x_test,
                 y_test.reshape(-1).astype(np.int64), CIFAR10_CLASSES, "keras")
    _validate(ds)
    return ds


def _load_uncached(path: Path, spec: ImageSpec) -> Dataset:
    if path.is_dir():
        batches = _find_python_batches_dir(path)
        if batches is not None:
            return _apply_spec(_load_python_batches_dir(batches), spec)
        return _load_image_tree_dir(path, spec)
    if not tarfile.is_tarfile(path):
        raise DataError(f"{path}: not a folder or a .tar/.tar.gz archive (cannot read it as one)")
    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            if any(re.search(r"(^|/)data_batch_1$", n) for n in names):
                return _apply_spec(_load_python_batches_tar(tar, path), spec)
            return _load_image_tree_tar(tar, path, spec)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # zlib.error: a truncated .gz
        raise DataError(f"{path}: truncated or corrupt archive ({type(e).__name__}: {e})") from e


# -- the official python version ------------------------------------------------------------

_PY_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_PY_TEST = "test_batch"


def _find_python_batches_dir(path: Path) -> Optional[Path]:
    for cand in (path, path / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() or (cand / "batches.meta").is_file():
            return cand
    return None


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


def _assemble_python(read: "callable", where: str) -> Dataset:
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
    ds = Dataset(x_train, y_train, parts[5][0], parts[5][1], class_names, where)
    return ds


def _load_python_batches_dir(folder: Path) -> Dataset:
    def read(name: str) -> Optional[bytes]:
        p = folder / name
        return p.read_bytes() if p.is_file() else None

    return _assemble_python(read, str(folder))


def _load_python_batches_tar(tar: tarfile.TarFile, path: Path) -> Dataset:
    members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}

    def read(name: str) -> Optional[bytes]:
        m = members.get(name)
        if m is None:
            return None
        f = tar.extractfile(m)
        return f.read() if f is not None else None

    return _assemble_python(read, str(path))


# -- class-folder image trees ---------------------------------------------------------------


def _decode_image(raw: bytes, where: str, spec: ImageSpec = ImageSpec()) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return spec.apply(im, where)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def _order_classes(names: Iterable[str]) -> tuple[str, ...]:
    names = set(names)
    if names == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES  # CIFAR-10's own label order, so labels match the Keras download
    return tuple(sorted(names))


def tree_classes(files: dict[str, dict[str, list]], where: str) -> tuple[str, ...]:
    """The class names of a listed tree (``files[split][class]``), after checking it has train/ and test/
    and that test/ and val/ hold the same classes as train/ (DataError otherwise)."""
    for split in ("train", "test"):
        if split not in files or not files[split]:
            raise DataError(f"{where}: missing split '{split}/' (expected {split}/<class>/*.jpg|png)")
    for split in ("test", "val"):
        if split in files and set(files[split]) != set(files["train"]):
            only = sorted(set(files["train"]) ^ set(files[split]))
            raise DataError(f"{where}: train/ and {split}/ have different classes ({', '.join(only)})")
    return _order_classes(files["train"])


def _assemble_tree(
    files: dict[str, dict[str, list[str]]], read: "callable", where: str, spec: ImageSpec = ImageSpec()
) -> Dataset:
    """``files[split][class]`` lists file keys (splits train, test and optionally val); ``read(key)``
    returns bytes."""
    class_names = tree_classes(files, where)
    out = {}
    first: dict = {}  # the first image's shape and name: every image must share it
    for split in [s for s in ("train", "val", "test") if s in files]:
        xs, ys = [], []
        for label, cls in enumerate(class_names):
            keys = sorted(files[split][cls])
            if not keys:
                raise DataError(f"{where}: class folder {split}/{cls}/ has no images")
            for key in keys:
                img = _decode_image(read(key), f"{where}/{key}", spec)
                if not first:
                    first.update(shape=img.shape, key=key)
                elif img.shape != first["shape"]:
                    raise DataError(f"{where}/{key}: image is {_describe(img.shape)} but {first['key']} is "
                                    f"{_describe(first['shape'])}; all images must share one size and channel "
                                    "count (--image-size HxW resizes them on load, --channels 1|3 converts)")
                xs.append(img)
                ys.append(label)
        out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    val = out.get("val", (None, None))
    return Dataset(out["train"][0], out["train"][1], out["test"][0], out["test"][1], class_names, where, *val)


def _describe(shape: tuple) -> str:
    return f"{shape[1]}x{shape[0]} {'RGB' if shape[2] == 3 else 'grayscale'}"


_TREE_RE = re.compile(r"^(?:(?P<top>[^/]+)/)?(?P<split>train|val|test)/(?P<cls>[^/]+)(?:/(?P<file>[^/]+))?$")


def _load_image_tree_dir(root: Path, spec: ImageSpec = ImageSpec()) -> Dataset:
    base = root
    if not (root / "train").is_dir() and not (root / "test").is_dir():
        subdirs = [p for p in root.iterdir() if p.is_dir()]
        if len(subdirs) == 1:
            base = subdirs[0]  # a tree unpacked under one top-level folder
    files: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "val", "test"):
        d = base / split
        if not d.is_dir():
            continue
        files[split] = {}
        for cls_dir in sorted(p for p in d.iterdir() if p.is_dir()):
            files[split][cls_dir.name] = [
                f"{split}/{cls_dir.name}/{p.name}"
                for p in cls_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
    if not files:
        raise DataError(
            f"{root}: not a recognised dataset (no cifar-10-batches-py files, no train/ and test/ class folders)"
        )
    return _assemble_tree(files, lambda key: (base / key).read_bytes(), str(base), spec)


def _load_image_tree_tar(tar: tarfile.TarFile, path: Path, spec: ImageSpec = ImageSpec()) -> Dataset:
    files: dict[str, dict[str, list[str]]] = {}
    data: dict[str, bytes] = {}
    tops = set()
    # Stream the archive once (a .tar.gz cannot seek cheaply), keeping the raw bytes.
    for m in tar:
        name = m.name.lstrip("./")
        mt = _TREE_RE.match(name)
        if not mt:
            continue
        tops.add(mt["top"])
        split, cls, fname = mt["split"], mt["cls"], mt["file"]
        files.setdefault(split, {}).setdefault(cls, [])
        if m.isfile() and fname and fname.lower().endswith(IMAGE_SUFFIXES):
            f = tar.extractfile(m)
            data[name] = f.read() if f is not None else b""
            files[split][cls].append(name)
    if not files:
        raise DataError(
            f"{path}: not a recognised dataset archive (no cifar-10-batches-py files, "
            "no train/ and test/ class folders)"
        )
    if len(tops) > 1:
        raise DataError(f"{path}: train/ and test/ found under several top-level folders")
    return _assemble_tree(files, data.__getitem__, str(path), spec)


# -- validation and cache ---------------------------------------------------------------------


def _validate(ds: Dataset) -> None:
    splits = [("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)]
    if ds.x_val is not None:
        splits.append(("val", ds.x_val, ds.y_val))
    for split, x, y in splits:
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] not in (1, 3):
            raise DataError(f"{ds.source}: {split} images have shape {x.shape} {x.dtype}, expected "
                            "(N, height, width, 1 or 3) uint8")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{ds.source}: train images are {_describe(ds.x_train.shape[1:])} but test images are "
                        f"{_describe(ds.x_test.shape[1:])}")
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


def _source_key(path: Path, spec: ImageSpec = ImageSpec()) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}:{path}:{spec.key()}".encode())
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


def _write_cache(cache_file: Path, ds: Dataset) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            val = {} if ds.x_val is None else {"x_val": ds.x_val, "y_val": ds.y_val}
            np.savez(f, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
                     class_names=np.asarray(ds.class_names), **val)
        os.replace(tmp, cache_file)  # atomic: readers never see a half-written cache
    except OSError:
        # An unwritable cache folder costs speed, not correctness.
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)


def _read_cache(cache_file: Path, source: str) -> Dataset:
    with np.load(cache_file, allow_pickle=False) as z:
        val = (z["x_val"], z["y_val"]) if "x_val" in z.files else (None, None)
        return Dataset(z["x_train"], z["y_train"], z["x_test"], z["y_test"],
                       tuple(str(c) for c in z["class_names"]), source, *val)


# --------------------------------------------------------------------------------------------
# Splits and tf.data pipelines


def split_validation(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split of the training data into (x_train, y_train, x_val, y_val)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * fraction)))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def crop_flip(images, offset_y, offset_x, flip):
    """Shift each image by (offset_y, offset_x) pixels with reflected borders, then mirror the
    ones where ``flip`` is true: the same as padding by reflection, cropping back to size and
    flipping, done as one gather per batch (no padded copy, no separate reverse).

    ``images`` (n, h, w, c) of any dtype; offsets (n,) int32 in [-h+1, h-1]; flip (n,) bool."""
    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]

    def reflect(i, size):  # index reflection without repeating the edge, like tf.pad's REFLECT
        return (size - 1) - tf.abs((size - 1) - tf.abs(i))

    cols = tf.range(w)[None, :]
    cols = tf.where(flip[:, None], (w - 1) - cols, cols)
    rows = reflect(offset_y[:, None] + tf.range(h)[None, :], h)  # (n, h)
    cols = reflect(offset_x[:, None] + cols, w)  # (n, w)
    index = rows[:, :, None] * w + cols[:, None, :]  # (n, h, w) into each image's flattened pixels
    flat = tf.reshape(images, [n, h * w, -1])
    return tf.reshape(tf.gather(flat, tf.reshape(index, [n, h * w]), batch_dims=1), shape)


def augment_batch(images, seed: Optional[int] = None, pad: int = 4):
    """Random crop after ``pad``-pixel reflection padding, and a random horizontal flip, on a batch.

    Vectorised over the batch (one gather), so it stays off a training step's critical path
    (benchmarks/scaling.py measures the default run with and without it)."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    offset_y = tf.random.uniform([n], -pad, pad + 1, dtype=tf.int32, seed=seed)
    offset_x = tf.random.uniform([n], -pad, pad + 1, dtype=tf.int32, seed=seed)
    flip = tf.random.uniform([n], 0, 1, seed=seed) < 0.5
    return crop_flip(images, offset_y, offset_x, flip)


def make_train_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    num_classes: int,
    augment: bool,
    seed: int,
    num_shards: int = 1,
    shard_index: int = 0,
    class_weights: Optional[list[float]] = None,
):
    """An endless, shuffled, batched training pipeline for one worker.

    Each worker takes a distinct shard of the (seeded) per-epoch order, so together the workers
    see every image once per epoch; ``batch_size`` is the per-worker batch. Labels are one-hot
    (categorical cross-entropy and the tutorial's precision/recall metrics want them).
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shard(num_shards, shard_index)
    ds = ds.shuffle(len(x) // num_shards + 1, seed=seed + shard_index, reshuffle_each_iteration=True)
    ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)

    return prepare_batches(ds, num_classes=num_classes, augment=augment, class_weights=class_weights)


def prepare_batches(ds, *, num_classes: int, augment: bool, class_weights: Optional[list[float]] = None):
    """(uint8 images, int labels) batches -> augmented images, one-hot labels (and per-image weights
    from ``class_weights``), prefetched: the one map shared by the in-memory and streaming pipelines."""
    import tensorflow as tf

    weights = tf.constant(class_weights, tf.float32) if class_weights is not None else None

    def prepare(a, b):  # one map per batch: augmentation, one-hot labels (and sample weights) together
        out = (augment_batch(a) if augment else a), tf.one_hot(b, num_classes)
        return out if weights is None else (*out, tf.gather(weights, b))

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, num_classes: int):
    """A finite, ordered, batched pipeline for evaluation (validation or test)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    ds = ds.map(lambda a, b: (a, tf.one_hot(b, num_classes)))
    return ds.prefetch(tf.data.AUTOTUNE)
