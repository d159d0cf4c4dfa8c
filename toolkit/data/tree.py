"""Class-folder trees, listed and not decoded: ``train/<class>/*``, ``test/<class>/*`` and optionally
``val/<class>/*`` JPEG/PNG files, optionally under one top-level folder, in a folder, a ``.tar``/``.tar.gz``
archive, or an object-store prefix (``s3://bucket/prefix/``, any filesystem pyarrow opens).

One lister for all three: each yields relative paths, one pattern sorts them into splits and classes, and
one check (:func:`tree_classes`) decides the class names.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass, replace
from typing import Any, Iterable, Optional

import numpy as np

from toolkit.data.types import CIFAR10_CLASSES, IMAGE_SUFFIXES, SPLITS, DataError, count_classes, seeded_subset
from toolkit.errors import one_line
from toolkit.storage import open_location

# split/class[/file], optionally under one top-level folder: the one path pattern of every tree.
TREE_RE = re.compile(r"^(?:(?P<top>[^/]+)/)?(?P<split>train|val|test)/(?P<cls>[^/]+)(?:/(?P<file>[^/]+))?$")
NOT_A_TREE = "no cifar-10-batches-py files, no train/ and test/ class folders"


@dataclass
class FileTree:
    """A class-folder tree's files, by split, with integer labels; nothing decoded. ``fs`` reads the keys
    (a pyarrow filesystem: what Ray Data's tasks open them with); an archive's bytes are in ``blobs``."""

    source: str
    fs: Any
    files: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    sizes: dict[str, int]  # bytes per split, for the memory estimate
    blobs: Optional[dict[str, bytes]] = None  # an archive's files, read in one pass
    prefix: str = ""  # what error messages put before a key (an archive's path)
    root: str = ""  # the folder keys are under (a listed folder or prefix): keys are named relative to it

    def name(self, key: str) -> str:
        """``key`` as the tree names it: relative to the tree's root (an archive's member name as it is)."""
        return key[len(self.root) + 1:] if self.root and key.startswith(self.root + "/") else key

    def count(self, split: str) -> int:
        return len(self.files.get(split, []))

    def read(self, key: str) -> bytes:
        if self.blobs is not None:
            return self.blobs[key]
        with self.fs.open_input_file(key) as f:
            return f.read()

    def where(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def digest(self) -> str:
        h = hashlib.sha256(self.source.encode())
        for split in SPLITS:
            for p in self.files.get(split, []):
                h.update(p.encode())
        h.update(str(sorted(self.sizes.items())).encode())
        return h.hexdigest()[:24]

    def class_counts(self) -> dict[str, dict[str, int]]:
        return count_classes(self.labels, self.class_names)

    def limited(self, n: Optional[int], seed: int) -> "FileTree":
        """A seeded random ``n`` files of each split, in class order (the same picks as Dataset.limited)."""
        if not n:
            return self
        rng = np.random.default_rng(seed)
        files, labels = {}, {}
        for split in ("train", "test", "val"):
            if split in self.files:
                i = seeded_subset(len(self.files[split]), n, rng)
                files[split] = [self.files[split][k] for k in i]
                labels[split] = self.labels[split][i]
        return replace(self, files=files, labels=labels)


def order_classes(names: Iterable[str]) -> tuple[str, ...]:
    names = set(names)
    if names == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES  # CIFAR-10's own label order, so labels match the Keras download
    return tuple(sorted(names))


def tree_classes(files: dict[str, dict[str, list]], where: str) -> tuple[str, ...]:
    """The class names of a grouped tree (``files[split][class]``), after checking it has train/ and test/
    and that test/ and val/ hold the same classes as train/ (DataError otherwise)."""
    for split in ("train", "test"):
        if split not in files or not files[split]:
            raise DataError(f"{where}: missing split '{split}/' (expected {split}/<class>/*.jpg|png)")
    for split in ("test", "val"):
        if split in files and set(files[split]) != set(files["train"]):
            only = sorted(set(files["train"]) ^ set(files[split]))
            raise DataError(f"{where}: train/ and {split}/ have different classes ({', '.join(only)})")
    return order_classes(files["train"])


def group(entries: Iterable[tuple[str, str, bool, int]], where: str, empty: str) -> tuple[dict, dict, Optional[str]]:
    """Sort ``(relative path, key, is_file, size)`` entries into ``files[split][class] = [keys]``; returns that,
    the bytes per split and the top-level folder (None when the splits are at the root)."""
    by_split: dict[str, dict[str, list[str]]] = {}
    sizes: dict[str, int] = {}
    tops = set()
    for rel, key, is_file, size in entries:
        m = TREE_RE.match(rel)
        if not m or (is_file and (not m["file"] or not rel.lower().endswith(IMAGE_SUFFIXES))):
            continue
        if not is_file and m["file"]:
            continue  # a folder below a class folder
        tops.add(m["top"])
        classes = by_split.setdefault(m["split"], {})
        keys = classes.setdefault(m["cls"], [])
        if is_file:
            keys.append(key)
            sizes[m["split"]] = sizes.get(m["split"], 0) + (size or 0)
    if not by_split:
        raise DataError(empty)
    if len(tops) > 1:
        raise DataError(f"{where}: train/ and test/ found under several top-level folders")
    return by_split, sizes, next(iter(tops))


def labelled(by_split: dict, class_names: tuple[str, ...], where: str) -> tuple[dict, dict]:
    """Each split's keys in class order (sorted within a class) and their labels."""
    files, labels = {}, {}
    for split, classes in by_split.items():
        keys, ys = [], []
        for label, cls in enumerate(class_names):
            if not classes[cls]:
                raise DataError(f"{where}: class folder {split}/{cls}/ has no images")
            for k in sorted(classes[cls]):
                keys.append(k)
                ys.append(label)
        files[split], labels[split] = keys, np.asarray(ys, dtype=np.int64)
    return files, labels


def list_tree(source: str, endpoint: Optional[str] = None) -> FileTree:
    """List ``source`` (a local folder or a URI prefix) as a class-folder tree."""
    import pyarrow.fs as pafs

    try:
        fs, root = open_location(source, endpoint)
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{source}: no such folder or prefix") from None
    except Exception as e:  # pyarrow/AWS errors: one line
        raise DataError(f"{source}: cannot list it ({one_line(e, typed=False)})") from None
    base = root.rstrip("/") + "/"
    entries = ((i.path[len(base):], i.path, i.type == pafs.FileType.File, i.size) for i in infos
               if i.type in (pafs.FileType.File, pafs.FileType.Directory))
    local = source if "://" in source else root
    by_split, sizes, top = group(entries, source, f"{local}: not a recognised dataset ({NOT_A_TREE})")
    base = root.rstrip("/") if top is None else f"{root.rstrip('/')}/{top}"
    where = source if "://" in source else base
    class_names = tree_classes(by_split, where)
    files, labels = labelled(by_split, class_names, where)
    return FileTree(where, fs, files, labels, class_names, sizes, root=base)


def list_archive(path: str) -> FileTree:
    """A class-folder tree in a ``.tar``/``.tar.gz``, read in one pass (a .tar.gz cannot seek cheaply): the
    files' bytes are kept in the returned tree."""
    blobs: dict[str, bytes] = {}

    def entries(tar: tarfile.TarFile):
        for m in tar:
            name = m.name.lstrip("./")
            if m.isfile() and name.lower().endswith(IMAGE_SUFFIXES) and TREE_RE.match(name):
                f = tar.extractfile(m)
                blobs[name] = f.read() if f is not None else b""
            yield name, name, m.isfile(), m.size

    try:
        with tarfile.open(path) as tar:
            by_split, sizes, _ = group(entries(tar), path, f"{path}: not a recognised dataset archive ({NOT_A_TREE})")
    except DataError:
        raise
    except Exception as e:  # tarfile, EOF, OSError, zlib.error (a truncated .gz)
        raise DataError(f"{path}: truncated or corrupt archive ({one_line(e)})") from e
    class_names = tree_classes(by_split, path)
    files, labels = labelled(by_split, class_names, path)
    return FileTree(path, None, files, labels, class_names, sizes, blobs=blobs, prefix=f"{path}/")


def download_tree(tree: FileTree, cache_dir: str) -> str:
    """Copy a remote tree into ``cache_dir`` once (keyed by its listing); returns the local folder."""
    target = os.path.join(cache_dir, f"tree-{tree.digest()}")
    done = os.path.join(target, ".complete")
    if os.path.exists(done):
        return target
    base = os.path.commonpath([p for s in SPLITS for p in tree.files.get(s, [])])
    base = base.rsplit("/", 1)[0] if base.endswith(SPLITS) else base
    try:
        for split in SPLITS:
            for p in tree.files.get(split, []):
                local = os.path.join(target, os.path.relpath(p, base))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                with open(local, "wb") as dst:
                    dst.write(tree.read(p))
    except Exception as e:
        raise DataError(f"{tree.source}: download failed ({one_line(e, typed=False)})") from None
    open(done, "w").close()
    return target
