"""Data: from ``--data`` to what the trainer, the report and the export read.

Modules, each importing only those above it:

    types      errors, ImageSpec, the one seeded split and subset, class counts, --image-size
    decode     image bytes -> uint8 arrays (the one decoder)
    pipeline   tf.data: augmentation, training and evaluation pipelines
    arrays     the in-memory Dataset, and its inputs on a Ray Train worker
    sources    what --data is; the Keras download and CIFAR-10's python batches
    tree       class-folder trees listed (folders, archives, buckets): one lister
    memory     decoding a source into arrays, the cache (load_dataset)
    streaming  the streamed Stream: Ray Data reads and decodes, each worker gets its shard
    open       the memory-or-stream choice (open_data)

A ``Dataset`` and a ``Stream`` answer the same questions, so nothing outside this package asks which
one it holds.
"""

from toolkit.data.arrays import Dataset, TrainerInputs
from toolkit.data.memory import load_dataset
from toolkit.data.open import open_data
from toolkit.data.pipeline import crop_flip, make_eval_dataset, make_train_dataset
from toolkit.data.streaming import Stream
from toolkit.data.types import (CIFAR10_CLASSES, DataError, ImageSpec, balanced_class_weights, image_size_arg,
                                parse_image_size, seeded_subset, split_validation)

__all__ = ["CIFAR10_CLASSES", "DataError", "Dataset", "ImageSpec", "Stream", "TrainerInputs", "balanced_class_weights",
           "crop_flip", "image_size_arg", "load_dataset", "make_eval_dataset", "make_train_dataset", "open_data",
           "parse_image_size", "seeded_subset", "split_validation"]
