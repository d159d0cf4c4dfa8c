"""tf.data for training and evaluation: augmentation, one-hot labels and sample weights, one map per batch
for the in-memory and the streamed paths alike."""

from __future__ import annotations

from typing import Optional

import numpy as np

from toolkit.tf import import_tf


def crop_flip(images, offset_y, offset_x, flip):
    """Shift each image by (offset_y, offset_x) pixels with reflected borders, then mirror the
    ones where ``flip`` is true: the same as padding by reflection, cropping back to size and
    flipping, done as one gather per batch (no padded copy, no separate reverse).

    ``images`` (n, h, w, c) of any dtype; offsets (n,) int32 in [-h+1, h-1]; flip (n,) bool."""
    tf = import_tf()
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


def augment_batch(images, seed, pad: int = 4):
    """Random crop after ``pad``-pixel reflection padding, and a random horizontal flip, on a batch.

    ``seed``: a stateless random seed (two integers; :func:`prepare_batches` gives each batch its own), so
    that a batch's crops and flips follow from the run's seed alone. (Stateful random ops drew in whatever
    order tf.data's parallel calls reached them: on a busy machine the same seeded regression run ended at
    55.96%, 57.78% and 61.14%, 2026-11-30.)

    Vectorised over the batch (one gather), so it stays off a training step's critical path
    (benchmarks/scaling.py measures the default run with and without it)."""
    tf = import_tf()
    n = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    offset_y = tf.random.stateless_uniform([n], seeds[0], -pad, pad + 1, dtype=tf.int32)
    offset_x = tf.random.stateless_uniform([n], seeds[1], -pad, pad + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform([n], seeds[2]) < 0.5
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
    tf = import_tf()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shard(num_shards, shard_index)
    ds = ds.shuffle(len(x) // num_shards + 1, seed=seed + shard_index, reshuffle_each_iteration=True)
    ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    return prepare_batches(ds, num_classes=num_classes, augment=augment, class_weights=class_weights,
                           seed=(seed, shard_index))


def prepare_batches(ds, *, num_classes: int, augment: bool, class_weights: Optional[list[float]] = None,
                    seed: tuple[int, int] = (0, 0)):
    """(uint8 images, int labels) batches -> augmented images, one-hot labels (and per-image weights
    from ``class_weights``), prefetched: the one map shared by the in-memory and streaming pipelines.
    Batch i is augmented with the stateless seed ``seed`` with i folded in (TensorFlow's stateless_fold_in)."""
    tf = import_tf()
    weights = tf.constant(class_weights, tf.float32) if class_weights is not None else None
    base = tf.constant(seed, tf.int64)

    def prepare(i, batch):  # one map per batch: augmentation, one-hot labels (and sample weights) together
        a, b = batch
        seed_i = tf.random.experimental.stateless_fold_in(base, i)
        out = (augment_batch(a, seed_i) if augment else a), tf.one_hot(b, num_classes)
        return out if weights is None else (*out, tf.gather(weights, b))

    ds = ds.enumerate().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, num_classes: int):
    """A finite, ordered, batched pipeline for evaluation (validation or test)."""
    tf = import_tf()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    ds = ds.map(lambda a, b: (a, tf.one_hot(b, num_classes)))
    return ds.prefetch(tf.data.AUTOTUNE)


def generator_dataset(batches, batch_size: int, image_shape, *, num_classes: int, augment: bool, class_weights,
                      seed: tuple[int, int] = (0, 0)):
    """A tf.data pipeline over a Python generator of (uint8 images, int labels) batches of ``batch_size``
    (the streamed path's shard), prepared like the in-memory pipeline."""
    tf = import_tf()
    ds = tf.data.Dataset.from_generator(batches, output_signature=(
        tf.TensorSpec((batch_size, *image_shape), tf.uint8), tf.TensorSpec((batch_size,), tf.int64)))
    return prepare_batches(ds, num_classes=num_classes, augment=augment, class_weights=class_weights, seed=seed)
