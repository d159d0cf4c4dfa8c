"""Data-parallel training on Ray Train.

    worker      the per-worker function (build or restore, fit with an epoch reporter, report)
    checkpoint  what a checkpoint holds: save and report, restore, read the final one
    raysupport  Ray start-up, log filtering, the Ctrl-C-aware trainer, the run tracker
    driver      fit_distributed: layout, run, trainer, outcome
"""

from toolkit.train.checkpoint import MODEL_FILE
from toolkit.train.driver import TrainingDiverged, TrainOutcome, fit_distributed
from toolkit.train.raysupport import TrainingInterrupted
from toolkit.train.worker import train_loop_per_worker

__all__ = ["MODEL_FILE", "TrainOutcome", "TrainingDiverged", "TrainingInterrupted", "fit_distributed",
           "train_loop_per_worker"]
