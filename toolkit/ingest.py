"""Datasets beyond memory: class-folder trees listed (not decoded) on the driver, then read, decoded
and resized by Ray Data in parallel tasks and streamed to each Ray Train worker's shard.

    memory  (toolkit.data) the driver decodes every image into arrays, once (cached), and ships them
            through the object store: fastest while the arrays fit;
    stream  (this module) the driver lists the files; Ray Data reads them (``read_binary_files``, any
            pyarrow filesystem: local, s3://, ...), decodes with the same ImageSpec as the memory path,
            and hands each worker its shard (``ray.train.get_dataset_shard``) batch by batch;
    auto    streams when the decoded arrays would exceed --memory-budget.

A tree on object storage (``--data s3://bucket/prefix/``) is listed through pyarrow; in memory mode it
is downloaded once into the cache folder (keyed by the listing) and loaded like a local tree.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from toolkit.data import IMAGE_SUFFIXES, DataError, ImageSpec, tree_classes
from toolkit.storage import filesystem, gist, is_uri

if TYPE_CHECKING:
    from toolkit.data import Dataset

SPLITS = ("train", "val", "test")
_REL_RE = re.compile(r"^(?:(?P<top>[^/]+)/)?(?P<split>train|val|test)/(?P<cls>[^/]+)/(?P<file>[^/]+)$")


@dataclass
class FileTree:
    """A class-folder tree's files, by split, with integer labels; nothing decoded."""

    source: str
    fs: Any  # pyarrow.fs.FileSystem
    files: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    sizes: dict[str, int]  # bytes per split, for the memory estimate

    def count(self, split: str) -> int:
        return len(self.files.get(split, []))

    def digest(self) -> str:
        h = hashlib.sha256(self.source.encode())
        for split in SPLITS:
            for p in self.files.get(split, []):
                h.update(p.encode())
        h.update(str(sorted(self.sizes.items())).encode())
        return h.hexdigest()[:24]

    def class_counts(self) -> dict[str, dict[str, int]]:
        return {s: {c: int(n) for c, n in zip(self.class_names, np.bincount(self.labels[s], minlength=len(
            self.class_names)))} for s in SPLITS if s in self.labels}


def list_tree(source: str, endpoint: Optional[str] = None) -> FileTree:
    """List ``source`` (a local folder or a URI) as a train/[val/]test class-folder tree."""
    import pyarrow.fs as pafs

    try:
        if is_uri(source):
            fs, root = filesystem(source, endpoint)
        else:
            fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{source}: no such folder or prefix") from None
    except Exception as e:  # pyarrow/AWS errors: one line
        raise DataError(f"{source}: cannot list it ({gist(e)})") from None
    by_split: dict[str, dict[str, list[str]]] = {}
    sizes: dict[str, int] = {}
    tops = set()
    base = root.rstrip("/") + "/"
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.lower().endswith(IMAGE_SUFFIXES):
            continue
        m = _REL_RE.match(info.path[len(base):])
        if not m:
            continue
        tops.add(m["top"])
        by_split.setdefault(m["split"], {}).setdefault(m["cls"], []).append(info.path)
        sizes[m["split"]] = sizes.get(m["split"], 0) + (info.size or 0)
    if len(tops) > 1:
        raise DataError(f"{source}: train/ and test/ found under several top-level folders")
    class_names = tree_classes(by_split, source)
    files, labels = {}, {}
    for split, classes in by_split.items():
        paths, ys = [], []
        for label, cls in enumerate(class_names):
            for p in sorted(classes[cls]):
                paths.append(p)
                ys.append(label)
        files[split], labels[split] = paths, np.asarray(ys, dtype=np.int64)
    return FileTree(source, fs, files, labels, class_names, sizes)


def first_image_shape(tree: FileTree, spec: ImageSpec) -> tuple[int, int, int]:
    """The shape every image will have: the spec's, or the first training image's as decoded."""
    from toolkit.data import _decode_image

    path = tree.files["train"][0]
    with tree.fs.open_input_file(path) as f:
        return tuple(_decode_image(f.read(), path, spec).shape)


def decoded_bytes(tree: FileTree, shape: tuple[int, int, int]) -> int:
    """What the memory path's arrays would take (all splits)."""
    return sum(tree.count(s) for s in SPLITS) * int(np.prod(shape))


def memory_budget_bytes(fraction: float) -> int:
    """``fraction`` of this machine's physical memory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)


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
                with tree.fs.open_input_file(p) as src, open(local, "wb") as dst:
                    dst.write(src.read())
    except Exception as e:
        raise DataError(f"{tree.source}: download failed ({gist(e)})") from None
    open(done, "w").close()
    return target


# -- Ray Data ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """A tree to stream: what fit_distributed takes instead of a decoded Dataset."""

    tree: FileTree
    spec: ImageSpec
    image_shape: tuple[int, int, int]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.tree.class_names

    @property
    def num_classes(self) -> int:
        return len(self.tree.class_names)

    @property
    def source(self) -> str:
        return self.tree.source

    def labels_of(self, paths: list[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.asarray([index[p.rsplit("/", 2)[-2]] for p in paths], dtype=np.int64)

    def class_counts(self) -> dict[str, dict[str, int]]:
        return self.tree.class_counts()

    def iter_split(self, split: str, batch_size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) batches of a whole split, read and decoded by Ray Data."""
        yield from iter_numpy(ray_dataset(self.tree, self.tree.files[split], self.spec), batch_size)

    def sample(self, n_train: int, n_test: int, seed: int = 0):
        """A decoded in-memory Dataset of a seeded sample of each split (``n_test`` 0 = all of test): what
        the plots and the edge export (calibration, QAT, accuracy) work from."""
        from toolkit.data import Dataset, _decode_image

        rng = np.random.default_rng(seed)

        def decode(split, n):
            paths = self.tree.files[split]
            idx = np.sort(rng.permutation(len(paths))[:n]) if n else np.arange(len(paths))
            images = []
            for i in idx:
                with self.tree.fs.open_input_file(paths[i]) as f:
                    images.append(_decode_image(f.read(), paths[i], self.spec))
            return np.stack(images), self.tree.labels[split][idx]

        return Dataset(*decode("train", n_train), *decode("test", n_test), self.class_names, self.source)


def _read_decode_batch(batch: dict, fs, spec: ImageSpec) -> dict:
    """Ray Data map: a batch of (path, label) rows -> uint8 images (read through ``fs``) and labels."""
    from toolkit.data import _decode_image

    images = []
    for path in batch["path"]:
        with fs.open_input_file(path) as f:
            images.append(_decode_image(f.read(), path, spec))
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def quiet_ray_data() -> None:
    """No progress bars or per-execution INFO lines from Ray Data (our epoch lines say the progress);
    warnings and errors still show. Call in every process that executes a dataset."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"


def ray_dataset(tree: FileTree, paths: list[str], spec: ImageSpec):
    """A lazy Ray Dataset of {"image", "label"} rows for ``paths``, read and decoded in Ray Data's
    parallel tasks, 1,024 files per task, labels from the class folders.

    Reading in our own map, rather than ``read_binary_files`` (one Arrow row per file, then a map):
    10,000 against 3,100 images/s for CIFAR-10's 32x32 JPEGs on the 2-core machine, measured with
    nothing else running. The tasks reserve no CPU (``num_cpus=0``), and at most one task runs per
    cluster CPU. The training workers reserve every CPU of their nodes, so tasks waiting for a free
    CPU never ran (measured: a run hung with 0 rows read). Decoding shares the cores with training
    instead; that is what streaming costs (benchmarks/ingest.py)."""
    import ray
    import ray.data

    quiet_ray_data()
    index = {c: i for i, c in enumerate(tree.class_names)}
    items = [{"path": p, "label": index[p.rsplit("/", 2)[-2]]} for p in paths]
    tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // READ_BATCH))
    return ds.map_batches(_read_decode_batch, fn_kwargs={"fs": tree.fs, "spec": spec}, batch_size=READ_BATCH,
                          batch_format="numpy", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=tasks))


# Files per read-and-decode task: 256 gave 4,500 images/s, 1,024 gave 10,000 (CIFAR-10 JPEGs, 2 cores,
# nothing else running); 2,048 trained 3,521 against 3,333 images/s for 1,024 with 2 workers (noise-level).
READ_BATCH = 2048


def split_files(tree: FileTree, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) paths: the tree's val/ when present, else the seeded fraction of train/ (the same
    permutation as toolkit.data.split_validation applies to the decoded arrays)."""
    train = tree.files["train"]
    if "val" in tree.files:
        return train, tree.files["val"]
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(len(train) * fraction)))
    return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]


def iter_numpy(dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield batch["image"], batch["label"]


def _archive_or_batches(source: str) -> bool:
    """Sources only the memory path reads: .tar/.tar.gz archives and CIFAR-10's python batches."""
    import tarfile

    p = os.path.expanduser(source)
    if os.path.isfile(p):
        return tarfile.is_tarfile(p)
    return any(os.path.isfile(os.path.join(p, d, "data_batch_1")) for d in ("", "cifar-10-batches-py"))


def open_data(cfg) -> "Dataset | Stream":
    """The run's data as ``cfg.ingest`` asks: a decoded Dataset (memory) or a Stream of a listed tree.
    Raises DataError in one line."""
    from toolkit.data import load_dataset

    spec = cfg.image_spec
    source = cfg.data
    listable = source is not None and (is_uri(source) or not _archive_or_batches(source))
    if cfg.ingest == "stream" and not listable:
        raise DataError(f"{source or 'the Keras download'}: --ingest stream reads class-folder trees (a folder or "
                        "an s3:// prefix); unpack the archive, or use --ingest memory")
    if not listable:  # archives and CIFAR batches: decoded in memory (cached)
        return load_dataset(source, cfg.cache_dir, spec).limited(cfg.limit, cfg.seed)
    if not is_uri(source) and not os.path.exists(os.path.expanduser(source)):
        raise DataError(f"{source}: no such file or directory")
    tree = list_tree(source, cfg.s3_endpoint)
    if cfg.limit:
        tree = _limited(tree, cfg.limit, cfg.seed)
    shape = first_image_shape(tree, spec)
    need, budget = decoded_bytes(tree, shape), memory_budget_bytes(cfg.memory_budget)
    stream = cfg.ingest == "stream" or (cfg.ingest == "auto" and need > budget)
    print(f"ingest: {'stream' if stream else 'memory'} (decoded arrays {need / 2**30:.2f} GiB, budget "
          f"{budget / 2**30:.1f} GiB = {cfg.memory_budget:g} of memory; --ingest {cfg.ingest})", flush=True)
    if stream:
        return Stream(tree, spec, shape)
    local = download_tree(tree, os.path.join(cfg.cache_dir, "trees")) if is_uri(source) else source
    ds = load_dataset(local, cfg.cache_dir, spec).limited(cfg.limit, cfg.seed)
    return ds if not is_uri(source) else _renamed(ds, source)


def _renamed(ds, source: str):
    import dataclasses

    return dataclasses.replace(ds, source=source)


def _limited(tree: FileTree, n: int, seed: int) -> FileTree:
    """A seeded random ``n`` files of each split, in class order (as Dataset.limited)."""
    rng = np.random.default_rng(seed)
    files, labels = {}, {}
    for split, paths in tree.files.items():
        i = np.sort(rng.permutation(len(paths))[:n])
        files[split], labels[split] = [paths[k] for k in i], tree.labels[split][i]
    return FileTree(tree.source, tree.fs, files, labels, tree.class_names, tree.sizes)
