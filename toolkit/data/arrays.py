"""The in-memory dataset: decoded uint8 arrays, and what a Ray Train worker makes of them.

``Dataset`` and the streamed :class:`toolkit.data.streaming.Stream` answer the same questions, so training
and reporting never ask which one they hold:

    trainer_inputs(fraction, seed)  what the Ray Train workers get (object-store arrays, or Ray Data shards)
    iter_test(batch_size)           the test split, batch by batch
    plot_sample(seed)               training images to draw a sample grid from
    decoded(n, seed)                arrays for the edge export
    class_counts(), image_shape, num_classes, class_names, source, ingest
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from toolkit.data.pipeline import make_eval_dataset, make_train_dataset
from toolkit.data.types import count_classes, seeded_subset, split_validation


@dataclass
class TrainerInputs:
    """What the driver hands Ray Train for a dataset: ``worker`` travels in the loop config and gives each
    worker its pipelines; ``datasets`` are Ray Data datasets for the trainer (None: arrays only)."""

    worker: Any
    datasets: Optional[dict]
    y_train: np.ndarray  # training labels, for class weights
    note: Optional[str] = None  # a line for the driver's log


class ArrayInputs:
    """A worker's view of in-memory data: one copy of the split arrays in the object store, read zero-copy
    by workers on the same node and shipped to others, so no worker needs the data path."""

    def __init__(self, ref) -> None:
        self.ref = ref
        self.arrays: Optional[dict] = None

    def load(self) -> None:
        """In the worker: fetch the arrays."""
        import ray

        self.arrays = ray.get(self.ref) if isinstance(self.ref, ray.ObjectRef) else self.ref

    @property
    def num_train(self) -> int:
        return len(self.arrays["x_train"])

    @property
    def image_shape(self) -> tuple:
        return tuple(self.arrays["x_train"].shape[1:])

    @property
    def validation(self) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays["x_val"], self.arrays["y_val"]

    def steps_per_epoch(self, batch_size: int, world: int) -> int:
        return self.num_train // batch_size

    def train_dataset(self, input_ctx, cfg, *, per_worker_batch: int, num_classes: int, class_weights,
                      total_batches: Callable[[], int]):
        """This worker's endless pipeline: its shard of every epoch's seeded order."""
        a = self.arrays
        return make_train_dataset(
            a["x_train"], a["y_train"], input_ctx.get_per_replica_batch_size(cfg.batch_size),
            num_classes=num_classes, augment=cfg.augment, seed=cfg.seed,
            num_shards=input_ctx.num_input_pipelines, shard_index=input_ctx.input_pipeline_id,
            class_weights=class_weights)

    def profile_dataset_fn(self, cfg, per_worker_batch: int, *, num_classes: int, world: int, rank: int):
        """A maker of this worker's pipeline for the step profile (toolkit.train.profile)."""
        a = self.arrays
        return lambda: make_train_dataset(a["x_train"], a["y_train"], per_worker_batch, num_classes=num_classes,
                                          augment=cfg.augment, seed=cfg.seed, num_shards=world, shard_index=rank)

    def validation_dataset(self, batch_size: int, num_classes: int):
        return make_eval_dataset(*self.validation, batch_size, num_classes=num_classes)


@dataclass(frozen=True)
class Dataset:
    """Train and test splits as uint8 images (N, H, W, C), C = 3 (RGB) or 1 (grayscale), and int64
    labels (N,): the in-memory dataset. It answers the same questions as a streamed one
    (:class:`toolkit.data.streaming.Stream`): its inputs for the trainer, its test split batch by batch,
    a sample to plot, arrays to export."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    # A validation split the data came with (a tree's val/ folder); None = split from train.
    x_val: Optional[np.ndarray] = None
    y_val: Optional[np.ndarray] = None

    ingest = "memory"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    def limited(self, n: Optional[int], seed: int = 0) -> "Dataset":
        """A seeded random ``n`` images of each split (for smoke tests); ``None`` keeps all."""
        if n is None:
            return self
        rng = np.random.default_rng(seed)

        def pick(x, y):
            if x is None:
                return None, None
            i = seeded_subset(len(x), n, rng)
            return x[i], y[i]

        return Dataset(*pick(self.x_train, self.y_train), *pick(self.x_test, self.y_test), self.class_names,
                       self.source, *pick(self.x_val, self.y_val))

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split, by class name."""
        return count_classes({"train": self.y_train, "val": self.y_val, "test": self.y_test}, self.class_names)

    def train_val(self, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_train, y_train, x_val, y_val): the data's own val/ split, else the seeded ``fraction`` of train."""
        if self.x_val is not None:
            return self.x_train, self.y_train, self.x_val, self.y_val
        return split_validation(self.x_train, self.y_train, fraction, seed)

    def iter_test(self, batch_size: int = 1024):
        """(images, labels) batches of the test split."""
        for i in range(0, len(self.x_test), batch_size):
            yield self.x_test[i:i + batch_size], self.y_test[i:i + batch_size]

    def plot_sample(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Training images and labels to draw a sample grid from."""
        return self.x_train, self.y_train

    def decoded(self, n: int, seed: int = 0) -> "Dataset":
        """Arrays for the edge export: this dataset itself (it is decoded already)."""
        return self

    def trainer_inputs(self, fraction: float, seed: int) -> TrainerInputs:
        """The split arrays, put once into the object store."""
        import ray

        x_tr, y_tr, x_val, y_val = self.train_val(fraction, seed)
        ref = ray.put({"x_train": x_tr, "y_train": y_tr, "x_val": x_val, "y_val": y_val})
        return TrainerInputs(ArrayInputs(ref), None, y_tr)
