"""The driver: ``fit_distributed`` trains a model on a dataset with Ray Train and brings the final model
back, in small steps: resolve the layout, resolve the run (name, storage, resume), make the trainer, fit,
read the outcome."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from toolkit.cluster import LayoutError, wait_until_placeable
from toolkit.config import TrainConfig
from toolkit.data import balanced_class_weights
from toolkit.storage import filesystem as storage_filesystem, has_checkpoint, is_uri
from toolkit.tf import set_tf_env
from toolkit.train.checkpoint import read_final
from toolkit.train.raysupport import TrainingInterrupted, init_ray, start_run_tracker, trainer_class, tracked_starts
from toolkit.train.worker import train_loop_per_worker


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stopped, nothing was written as the model."""


@dataclass
class TrainOutcome:
    """What the driver gets back: the final checkpoint's model and state, copied locally."""

    model_path: str
    history: dict[str, list[float]]
    best_epoch: Optional[int]
    workers: list[dict]
    epochs_run: int
    wall_time_s: float
    train_images_per_s: float
    run_path: str
    config: TrainConfig  # with the layout resolved
    # Worker-group starts in this driver's run: [{"from_epoch", "epochs_done_before", "node_id", "time"}].
    # More than one = restarts after failures; a first start from epoch > 0 = a resumed run.
    starts: list[dict] = dataclasses.field(default_factory=list)

    @property
    def restarts(self) -> int:
        return max(len(self.starts) - 1, 0)

    @property
    def resumed_from_epoch(self) -> Optional[int]:
        return self.starts[0]["from_epoch"] if self.starts and self.starts[0]["from_epoch"] > 0 else None


@dataclass
class RunPlace:
    """Where a run's checkpoints live: Ray Train's run name, storage path and filesystem."""

    name: str
    storage_path: Optional[str]
    storage_fs: Any
    display: str  # the run's folder, as the user would write it
    cfg: TrainConfig

    def has_checkpoint(self) -> bool:
        return has_checkpoint(self.cfg.storage_path or "~/ray_results", self.name, self.cfg.s3_endpoint)

    def resume_hint(self) -> str:
        if not self.has_checkpoint():
            return f"no checkpoint of run {self.name} was saved yet ({self.display}): the same command starts it again"
        return (f"the checkpoints of run {self.name} are kept ({self.display}); run the same command again (same "
                f"--name {self.name} and --storage-path) to resume from the last one")


def resolve_run(cfg: TrainConfig) -> RunPlace:
    name = cfg.name or time.strftime(f"{cfg.model}-%Y%m%d-%H%M%S")
    storage_fs, storage_path = None, cfg.storage_path
    if is_uri(cfg.storage_path):  # an object store: one filesystem object, endpoint and keys included
        storage_fs, storage_path = storage_filesystem(cfg.storage_path, cfg.s3_endpoint)
    elif cfg.storage_path:
        storage_path = os.path.abspath(os.path.expanduser(cfg.storage_path))
    display = (f"{(cfg.storage_path if storage_fs else storage_path).rstrip('/')}/{name}" if storage_path
               else f"~/ray_results/{name}")
    return RunPlace(name, storage_path, storage_fs, display, cfg)


def resolve_layout(cfg: TrainConfig, log: Callable[[str], None]):
    """(config with workers and CPUs resolved from the cluster, layout); LayoutError in one line."""
    layout, _ = wait_until_placeable(cfg, cfg.resource_timeout, log=log)
    try:
        cfg = dataclasses.replace(cfg, num_workers=layout.num_workers, cpus_per_worker=layout.cpus_per_worker)
    except ValueError as e:  # e.g. the global batch does not split over the workers found
        raise LayoutError(f"{e} ({layout.how})") from None
    log(layout.describe(cfg))
    return cfg, layout


def make_trainer(cfg: TrainConfig, ds, layout, place: RunPlace, tracker, log: Callable[[str], None]):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    from toolkit.models import model_kind

    inputs = ds.trainer_inputs(cfg.val_fraction, cfg.seed)
    if inputs.note:
        log(inputs.note)
    class_weights = balanced_class_weights(inputs.y_train, ds.num_classes) if cfg.class_weights == "balanced" else None
    if class_weights is not None:
        log("class weights (balanced): " + ", ".join(f"{c} {w:.2f}" for c, w in zip(ds.class_names, class_weights)))
    model_file = None
    if model_kind(cfg.model) == "file":  # workers on other machines get the driver's copy of the file
        with open(cfg.model, "rb") as f:
            model_file = ray.put(f.read())
    return trainer_class()(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "inputs": inputs.worker, "num_classes": ds.num_classes,
                           "tracker": tracker, "model_file": model_file, "class_weights": class_weights},
        datasets=inputs.datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]) if inputs.datasets else None,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": layout.cpus_per_worker,
                                  **({"GPU": layout.gpus_per_worker} if cfg.use_gpu else {})}),
        run_config=RunConfig(
            name=place.name, storage_path=place.storage_path, storage_filesystem=place.storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )


def fit(trainer, place: RunPlace):
    """``trainer.fit()``, with a Ctrl-C turned into TrainingInterrupted (saying how to resume)."""
    try:
        result = trainer.fit()
    except BaseException:  # Ray Train's SIGINT handler leaves with SystemExit or an actor error
        if type(trainer).interrupted.is_set():
            raise TrainingInterrupted(f"interrupted; {place.resume_hint()}") from None
        raise
    if type(trainer).interrupted.is_set():
        raise TrainingInterrupted(f"interrupted; {place.resume_hint()}")
    if result.checkpoint is None:
        raise RuntimeError(f"training run {place.name} ended without a checkpoint")
    return result


def fit_distributed(cfg: TrainConfig, ds, workdir: str,
                    log: Callable[[str], None] = lambda line: print(line, flush=True)) -> TrainOutcome:
    """Train ``cfg.model`` on ``ds`` (a toolkit.data Dataset or Stream) with Ray Train; copy the final model
    into ``workdir``. ``num_workers``/``cpus_per_worker`` left as None are resolved from the cluster
    (toolkit.cluster); the outcome's ``config`` is the resolved one."""
    set_tf_env()  # ray.train.tensorflow imports TensorFlow
    dashboard = init_ray()
    cfg, layout = resolve_layout(cfg, log)
    place = resolve_run(cfg)
    tracker = start_run_tracker()
    trainer = make_trainer(cfg, ds, layout, place, tracker, log)
    log(f"run {place.name}: checkpoints found in {place.display}; resuming from the latest" if place.has_checkpoint()
        else f"run {place.name}: checkpoints go to {place.display}")
    if dashboard:
        log(f"ray dashboard: {dashboard}")
    t0 = time.perf_counter()
    result = fit(trainer, place)
    wall = time.perf_counter() - t0
    state, workers, model_path = read_final(result.checkpoint, workdir)
    if model_path is None:
        dv = state["diverged"]
        good = (f"the best model so far (epoch {state['best_epoch']}) is in the checkpoints under {result.path}"
                if state.get("best_epoch") else "no epoch finished with a finite loss")
        raise TrainingDiverged(f"training diverged: loss {dv['loss']} in epoch {dv['epoch']} (steps "
                               f"{dv['steps'][0]}-{dv['steps'][1]}); no model.keras written; {good}; "
                               "try a smaller --learning-rate")
    hist = state["history"]
    train_time = sum(hist.get("train_time_s", []))
    images = sum(s * r for s, r in zip(hist.get("train_time_s", []), hist.get("images_per_s", [])))
    return TrainOutcome(
        model_path=model_path, history=hist, best_epoch=state["best_epoch"], workers=workers, epochs_run=state["epoch"],
        wall_time_s=wall, train_images_per_s=float(images / train_time) if train_time else 0.0,
        run_path=result.path, config=cfg, starts=tracked_starts(tracker))
