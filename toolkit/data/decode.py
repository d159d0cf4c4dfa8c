"""Image bytes -> uint8 arrays, converted and resized as an :class:`ImageSpec` says: the one decoder that the
in-memory path, the streaming tasks and the export's samples share."""

from __future__ import annotations

import io

import numpy as np

from toolkit.data.types import DataError, ImageSpec
from toolkit.errors import one_line


def decode_image(raw: bytes, where: str, spec: ImageSpec = ImageSpec()) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, C); DataError naming ``where`` when they cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return spec.apply(im, where)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: cannot decode image ({one_line(e)})") from e


def convert_arrays(x, spec: ImageSpec, where: str):
    """``spec`` applied to images decoded already (the CIFAR-10 batches and download); None stays None."""
    if x is None or spec.is_identity:
        return x
    from PIL import Image

    return np.stack([spec.apply(Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img), where) for img in x])
