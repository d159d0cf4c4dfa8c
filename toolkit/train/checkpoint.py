"""Checkpoints: what a worker saves and reports every epoch, what a restarted worker restores, and what
the driver reads from the final one.

A checkpoint folder holds:
  ``model.keras``        the model after that epoch, with optimizer state (for resuming);
  ``best_weights.npz``   the weights with the best validation accuracy so far;
  ``state.json``         epoch, history, best epoch, and the full config that made it;
  ``workers/rank-N.json`` (final report only) what each worker did.
The final report (``final: True``) carries the best-validation model as ``model.keras``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from toolkit.config import TrainConfig
from toolkit.custom import custom_scope
from toolkit.tf import import_keras, save_model

MODEL_FILE = "model.keras"
BEST_WEIGHTS_FILE = "best_weights.npz"
STATE_FILE = "state.json"


@dataclass
class RunState:
    """A run's progress, saved in every checkpoint's state.json."""

    epoch: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: Optional[int] = None
    best_val_accuracy: float = -1.0
    # {"epoch", "loss", "steps": [first, last]} when the loss became NaN or infinite.
    diverged: Optional[dict] = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["diverged"] is None:
            d.pop("diverged")
        return d


def report(model, best_weights: Optional[list], state: RunState, cfg: TrainConfig, rank: int, *, final: bool,
           metrics: dict, worker: Optional[dict] = None) -> None:
    """Write a checkpoint folder and report it to Ray Train (every worker must call this).

    On the final report every worker adds ``workers/rank-N.json``; Ray Train merges the workers'
    folders into one checkpoint, so the driver sees what each worker did."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        # Every worker saves (reading distributed variables may need all of them);
        # only rank 0's folder becomes the checkpoint.
        if model is not None:
            save_model(model, os.path.join(d, MODEL_FILE))
        if best_weights is not None:
            np.savez(os.path.join(d, BEST_WEIGHTS_FILE), *best_weights)
        with open(os.path.join(d, STATE_FILE), "w") as f:
            json.dump({**state.to_dict(), "final": final, "config": cfg.to_dict()}, f)
        if worker is not None:
            os.makedirs(os.path.join(d, "workers"))
            with open(os.path.join(d, "workers", f"rank-{rank}.json"), "w") as f:
                json.dump(worker, f)
        if rank != 0:  # only rank 0's model and state; other workers add just their record
            for name in os.listdir(d):
                if name != "workers":
                    os.remove(os.path.join(d, name))
        has_files = bool(os.listdir(d))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if has_files else None)


def restore(checkpoint, custom_objects: str = "") -> tuple[RunState, Any, Optional[list]]:
    """(state, model with its optimizer, best weights) from a Ray Train checkpoint; call inside the
    strategy's scope. A run that had diverged starts clean (say, at a smaller learning rate)."""
    keras = import_keras()
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            state = RunState.from_dict(json.load(f))
        state.diverged = None
        with custom_scope(custom_objects, keras):  # the model's own layers (--custom-objects)
            model = keras.models.load_model(os.path.join(d, MODEL_FILE))
        best_weights = None
        best_path = os.path.join(d, BEST_WEIGHTS_FILE)
        if os.path.exists(best_path):
            with np.load(best_path) as z:
                best_weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    return state, model, best_weights


def read_final(checkpoint, workdir: str) -> tuple[dict, list[dict], Optional[str]]:
    """(state, worker records, local model path) of the final checkpoint; the model is copied into
    ``workdir`` (None when the run diverged and there is no model)."""
    os.makedirs(workdir, exist_ok=True)
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            state = json.load(f)
        workers_dir = os.path.join(d, "workers")
        workers = []
        if os.path.isdir(workers_dir):
            for name in sorted(os.listdir(workers_dir)):
                with open(os.path.join(workers_dir, name)) as f:
                    workers.append(json.load(f))
        if state.get("diverged"):
            return state, workers, None
        model_path = os.path.join(workdir, MODEL_FILE)
        with open(os.path.join(d, MODEL_FILE), "rb") as src, open(model_path, "wb") as dst:
            dst.write(src.read())
    return state, workers, model_path
