"""The run's data as ``--ingest`` asks, and nothing else: a decoded :class:`Dataset` (memory) or a
:class:`Stream` of a listed tree (Ray Data). Both answer the same questions (see :mod:`toolkit.data.arrays`).

    memory  the driver decodes every image into arrays, once (cached), and ships them through the object
            store: fastest while the arrays fit;
    stream  the driver lists the files; Ray Data reads and decodes them in parallel tasks and hands each
            worker its shard;
    auto    streams when the decoded arrays would exceed --memory-budget.

A tree on object storage (``--data s3://bucket/prefix/``) is listed through pyarrow; in memory mode it is
downloaded once into the cache folder (keyed by the listing) and loaded like a local tree.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from toolkit.data.arrays import Dataset
from toolkit.data.decode import decode_image
from toolkit.data.memory import load_dataset
from toolkit.data.sources import TREE, source_kind
from toolkit.data.streaming import Stream
from toolkit.data.tree import FileTree, download_tree, list_tree
from toolkit.data.types import SPLITS, DataError, ImageSpec
from toolkit.storage import is_uri


def first_image_shape(tree: FileTree, spec: ImageSpec) -> tuple[int, int, int]:
    """The shape every image will have: the spec's, or the first training image's as decoded."""
    key = tree.files["train"][0]
    return tuple(decode_image(tree.read(key), tree.where(key), spec).shape)


def decoded_bytes(tree: FileTree, shape: tuple[int, int, int]) -> int:
    """What the memory path's arrays would take (all splits)."""
    return sum(tree.count(s) for s in SPLITS) * int(np.prod(shape))


def memory_budget_bytes(fraction: float) -> int:
    """``fraction`` of this machine's physical memory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)


def open_data(cfg) -> "Dataset | Stream":
    """The run's data as ``cfg.ingest`` asks (a TrainConfig). Raises DataError in one line."""
    spec, source = cfg.image_spec, cfg.data
    kind = source_kind(source)
    if kind != TREE:  # the Keras download, archives and CIFAR batches: decoded in memory (cached)
        if cfg.ingest == "stream":
            raise DataError(f"{source or 'the Keras download'}: --ingest stream reads class-folder trees (a folder "
                            "or an s3:// prefix); unpack the archive, or use --ingest memory")
        return load_dataset(source, cfg.cache_dir, spec).limited(cfg.limit, cfg.seed)
    tree = list_tree(source, cfg.s3_endpoint).limited(cfg.limit, cfg.seed)
    shape = first_image_shape(tree, spec)
    need, budget = decoded_bytes(tree, shape), memory_budget_bytes(cfg.memory_budget)
    stream = cfg.ingest == "stream" or (cfg.ingest == "auto" and need > budget)
    print(f"ingest: {'stream' if stream else 'memory'} (decoded arrays {need / 2**30:.2f} GiB, budget "
          f"{budget / 2**30:.1f} GiB = {cfg.memory_budget:g} of memory; --ingest {cfg.ingest})", flush=True)
    if stream:
        return Stream(tree, spec, shape)
    if not is_uri(source):
        return load_dataset(source, cfg.cache_dir, spec).limited(cfg.limit, cfg.seed)
    local = download_tree(tree, os.path.join(cfg.cache_dir, "trees"))
    return dataclasses.replace(load_dataset(local, cfg.cache_dir, spec).limited(cfg.limit, cfg.seed), source=source)
