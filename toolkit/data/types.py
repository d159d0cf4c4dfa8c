"""What every part of the data package shares: errors, the image spec, and the one seeded split, subset
and class count that the in-memory and streamed paths both use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")
RESIZE_MODES = ("crop", "stretch")


class DataError(ValueError):
    """A data source is missing, malformed or corrupt. The message names the path."""


def seeded_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of ``n`` items: the one seeded split of a training set, for
    decoded arrays and for streamed file lists alike."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split of the training data into (x_train, y_train, x_val, y_val)."""
    train, val = seeded_split(len(x), fraction, seed)
    return x[train], y[train], x[val], y[val]


def seeded_subset(n: int, count: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random ``count`` of ``n`` items (all when ``count`` is None or 0). Random, not the
    first ``count``: class-folder sources are stored class by class."""
    if not count:
        return np.arange(n)
    return np.sort(rng.permutation(n)[:count])


def count_classes(labels: dict[str, Optional[np.ndarray]], class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """Images per class in each split (``labels[split]``; None = no such split), by class name."""
    out = {}
    for split in ("train", "val", "test"):
        y = labels.get(split)
        if y is not None:
            counts = np.bincount(y, minlength=len(class_names))
            out[split] = {c: int(n) for c, n in zip(class_names, counts)}
    return out


def balanced_class_weights(y: np.ndarray, num_classes: int) -> list[float]:
    """total / (classes x count) per class, as scikit-learn's compute_class_weight("balanced"); a class
    with no training images gets weight 0 (there is nothing to weigh)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    return [float(len(y) / (num_classes * c)) if c else 0.0 for c in counts]


def describe_shape(shape: tuple) -> str:
    return f"{shape[1]}x{shape[0]} {'RGB' if shape[2] == 3 else 'grayscale'}"


def parse_image_size(text: str) -> tuple[int, int]:
    """'96' -> (96, 96); '64x48' -> (64, 48) (height x width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text or "")
    if not m:
        raise ValueError(f"image size must be H or HxW (say 96 or 64x48), got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def image_size_arg(value: str) -> tuple[int, int]:
    """``--image-size`` for argparse (training and export alike): an ArgumentTypeError in one line."""
    import argparse

    try:
        return parse_image_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
