"""Datasets beyond memory: a class-folder tree listed (not decoded) on the driver, then read, decoded and
resized by Ray Data in parallel tasks and streamed to each Ray Train worker's shard
(``ray.train.get_dataset_shard``), batch by batch, with the same ImageSpec code as the in-memory path.

Reading is our own map over ``from_items`` of (path, label) rows, ``READ_BATCH`` files per task, through
any pyarrow filesystem (local, s3://, ...): see :func:`ray_dataset` for why not ``read_binary_files``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from toolkit.data.arrays import Dataset, TrainerInputs
from toolkit.data.decode import decode_image
from toolkit.data.pipeline import generator_dataset, make_eval_dataset
from toolkit.data.tree import FileTree
from toolkit.data.types import ImageSpec, seeded_split, seeded_subset

# Files per read-and-decode task: 256 gave 4,500 images/s, 1,024 gave 10,000 (CIFAR-10 JPEGs, 2 cores,
# nothing else running); 2,048 trained 3,521 against 3,333 images/s for 1,024 with 2 workers (noise-level).
READ_BATCH = 2048
# Files a task reads at once: a real object store answers each GET after a round trip of tens of
# milliseconds, which reading in threads overlaps and reading one file after another adds up. Against the
# tests' local S3 endpoint (moto: one Python process, itself the limit) 16 threads read 1.12-1.21x as many
# files/s as one (python benchmarks/object_store_reads.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz,
# 2 cores shared with a training); decoding stays one file after another.
READ_THREADS = 16


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


def read_decode_batch(batch: dict, tree: FileTree, spec: ImageSpec) -> dict:
    """Ray Data map: a batch of (path, label) rows -> uint8 images (read through the tree's filesystem,
    READ_THREADS files at a time) and labels."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list(batch["path"])
    with ThreadPoolExecutor(min(READ_THREADS, max(1, len(paths)))) as pool:
        blobs = pool.map(tree.read, paths)  # in order
        images = [decode_image(blob, tree.where(path), spec) for blob, path in zip(blobs, paths)]
    return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def ray_dataset(tree: FileTree, paths: list[str], labels: np.ndarray, spec: ImageSpec):
    """A lazy Ray Dataset of {"image", "label"} rows for ``paths``, read and decoded in Ray Data's
    parallel tasks, ``READ_BATCH`` files per task.

    Reading in our own map, rather than ``read_binary_files`` (one Arrow row per file, then a map):
    10,000 against 3,100 images/s for CIFAR-10's 32x32 JPEGs on the 2-core machine, measured with
    nothing else running. The tasks reserve no CPU (``num_cpus=0``), and at most one task runs per
    cluster CPU. The training workers reserve every CPU of their nodes, so tasks waiting for a free
    CPU never ran (measured: a run hung with 0 rows read). Decoding shares the cores with training
    instead; that is what streaming costs (benchmarks/ingest.py)."""
    import ray
    import ray.data

    quiet_ray_data()
    items = [{"path": p, "label": int(y)} for p, y in zip(paths, labels)]
    tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // READ_BATCH))
    slim = FileTree(tree.source, tree.fs, {}, {}, tree.class_names, {}, prefix=tree.prefix, root=tree.root)  # no listing to ship
    return ds.map_batches(read_decode_batch, fn_kwargs={"tree": slim, "spec": spec}, batch_size=READ_BATCH,
                          batch_format="numpy", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=tasks))


def iter_numpy(dataset, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield batch["image"], batch["label"]


class StreamInputs:
    """A worker's view of streamed data: its Ray Data shard of the training files, one pass per epoch
    (Ray Data re-reads and re-decodes the files), and all of the validation set, which is small (a tenth,
    or the tree's val/)."""

    def __init__(self, num_train: int, image_shape: tuple) -> None:
        self.num_train, self.image_shape = num_train, tuple(image_shape)
        self.validation: Optional[tuple[np.ndarray, np.ndarray]] = None

    def load(self) -> None:
        import ray.train

        quiet_ray_data()
        xs, ys = [], []
        for x, y in iter_numpy(ray.train.get_dataset_shard("val"), 1024):
            xs.append(x)
            ys.append(y)
        self.validation = np.concatenate(xs), np.concatenate(ys)

    def steps_per_epoch(self, batch_size: int, world: int) -> int:
        # Ray Data splits the rows equally (dropping at most world-1), each worker drops its last partial
        # batch: every worker runs the same number of steps.
        return (self.num_train // world) // (batch_size // world)

    def train_dataset(self, input_ctx, cfg, *, per_worker_batch: int, num_classes: int, class_weights,
                      total_batches: Callable[[], int]):
        """Exactly the batches this fit will take (``total_batches()``, read when fit starts iterating: after a
        checkpoint's epoch is known). A generator that read on would start another Ray Data epoch, which
        blocks until every worker starts it, and a worker that has finished never does.

        No row-level shuffle buffer: the file order is shuffled once on the driver, so every block mixes the
        classes, and the block order every epoch. One run with a buffer and one without (1,627 and 1,401
        images/s, on an earlier read path) differed within this machine's noise."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        batch_size = per_worker_batch

        def batches():
            left = total_batches()
            while left > 0:
                for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                            prefetch_batches=4):
                    yield b["image"], b["label"]
                    left -= 1
                    if left == 0:
                        return

        return generator_dataset(batches, batch_size, self.image_shape, num_classes=num_classes,
                                 augment=cfg.augment, class_weights=class_weights,
                                 seed=(cfg.seed, input_ctx.input_pipeline_id))

    def profile_dataset_fn(self, cfg, per_worker_batch: int, **_):
        return None  # the step profile times in-memory input only

    def validation_dataset(self, batch_size: int, num_classes: int):
        return make_eval_dataset(*self.validation, batch_size, num_classes=num_classes)


@dataclass
class Stream:
    """A tree to stream. Answers the same questions as the in-memory :class:`Dataset`."""

    tree: FileTree
    spec: ImageSpec
    image_shape: tuple[int, int, int]

    ingest = "stream"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.tree.class_names

    @property
    def num_classes(self) -> int:
        return len(self.tree.class_names)

    @property
    def source(self) -> str:
        return self.tree.source

    def class_counts(self) -> dict[str, dict[str, int]]:
        return self.tree.class_counts()

    def train_val(self, fraction: float, seed: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
        """(train paths, labels, val paths, labels): the tree's val/ when present, else the seeded
        ``fraction`` of train/ (the same split as the in-memory path's)."""
        files, labels = self.tree.files, self.tree.labels
        if "val" in files:
            return files["train"], labels["train"], files["val"], labels["val"]
        train, val = seeded_split(len(files["train"]), fraction, seed)
        return ([files["train"][i] for i in train], labels["train"][train],
                [files["train"][i] for i in val], labels["train"][val])

    def trainer_inputs(self, fraction: float, seed: int) -> TrainerInputs:
        """Ray Data datasets of the train and validation files; the trainer splits train over the workers."""
        x_tr, y_tr, x_val, y_val = self.train_val(fraction, seed)
        # One seeded shuffle of the file order (trees list class by class); Ray Data then shuffles the
        # block order every epoch.
        order = np.random.default_rng(seed).permutation(len(x_tr))
        x_tr, y_tr = [x_tr[i] for i in order], y_tr[order]
        datasets = {"train": ray_dataset(self.tree, x_tr, y_tr, self.spec).randomize_block_order(),
                    "val": ray_dataset(self.tree, x_val, y_val, self.spec)}
        note = (f"ingest: stream ({len(x_tr):,} train, {len(x_val):,} val files read and decoded by Ray Data, "
                "sharded over the workers)")
        return TrainerInputs(StreamInputs(len(x_tr), self.image_shape), datasets, y_tr, note)

    def iter_test(self, batch_size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, labels) batches of the test split, read and decoded by Ray Data."""
        yield from iter_numpy(ray_dataset(self.tree, self.tree.files["test"], self.tree.labels["test"], self.spec),
                              batch_size)

    def plot_sample(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        d = self.decoded(64, seed, n_test=1)
        return d.x_train, d.y_train

    def decoded(self, n: int, seed: int = 0, n_test: Optional[int] = None) -> Dataset:
        """A decoded in-memory Dataset of a seeded sample of ``n`` train and ``n_test`` (default ``n``) test
        images: what the edge export (calibration, QAT, accuracy) works from."""
        rng = np.random.default_rng(seed)

        def decode(split, count):
            paths = self.tree.files[split]
            idx = seeded_subset(len(paths), count, rng)
            images = [decode_image(self.tree.read(paths[i]), self.tree.where(paths[i]), self.spec) for i in idx]
            return np.stack(images), self.tree.labels[split][idx]

        return Dataset(*decode("train", n), *decode("test", n if n_test is None else n_test), self.class_names,
                       self.source)
