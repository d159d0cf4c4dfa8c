"""``--baseline``: what the new model is compared with, image by image.

A previous export folder gives its stored per-image predictions (``predictions.npz``, every variant's) without
running anything again; a model file is evaluated here, on the same test images, as its float model. Either
way the predictions must be of the same test images: a baseline made on other images is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.errors import ExportInputError

PREDICTIONS = "predictions.npz"


def load_baseline(path: str, digest: str, x_test: np.ndarray, num_classes: int, custom_objects: str = "") -> dict:
    """{"source": what it is, "predictions": {variant or "float": top-1 class ids}}; ExportInputError (one
    line) when it cannot be used."""
    p = Path(path)
    if not p.exists():
        raise ExportInputError(f"--baseline {path}: does not exist")
    if p.is_dir() and (p / "report.json").exists():
        return _from_export(p, digest)
    from export.model.load import load_source_model
    from export.model.predictions import class_predictions, inspect_model

    source = load_source_model(str(p), custom_objects)  # ExportInputError names the file
    info = inspect_model(source, x_test[:256], num_classes, "the test images")
    return {"source": f"model {p}", "predictions": {"float": class_predictions(source.predict(x_test),
                                                                               info.output_kind).astype(np.int64)}}


def read_export(folder: Path) -> tuple[str, dict, np.ndarray]:
    """(test images' sha256, {variant or "float": top-1 class ids}, labels) stored by an export in ``folder``;
    ExportInputError (one line) when it has none."""
    try:
        report = json.loads((folder / "report.json").read_text())
        stored = report["predictions"]
        with np.load(folder / stored["file"]) as z:
            preds = {k: z[k].astype(np.int64) for k in z.files if not k.endswith("_scores") and k != "labels"}
            labels = z["labels"].astype(np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise ExportInputError(f"{folder}: an export folder without its per-image predictions "
                               f"({type(e).__name__}: {e}); export the model again with this version") from None
    return str(stored.get("test_images_sha256")), preds, labels


def _from_export(folder: Path, digest: str) -> dict:
    try:
        stored_digest, preds, _ = read_export(folder)
    except ExportInputError as e:
        raise ExportInputError(f"--baseline {e}") from None
    if stored_digest != digest:
        raise ExportInputError(f"--baseline {folder}: made on other test images (sha256 {stored_digest[:12]} "
                               f"here {digest[:12]}): a paired comparison needs the same images; pass the baseline "
                               "model file to evaluate it on these")
    return {"source": f"export {folder}", "predictions": preds}
