"""The Ray Train worker: one data-parallel replica, reading like single-process Keras. Build (or restore)
and compile the model inside ``MultiWorkerMirroredStrategy``, ``fit`` on this worker's pipeline with a
callback that reports every epoch to Ray Train with a checkpoint, then report the best-validation model.
Ray restarts the worker group from the latest checkpoint when a worker dies (``max_failures``)."""

from __future__ import annotations

import math
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from toolkit.cluster import worker_node_id
from toolkit.config import TrainConfig
from toolkit.train.step import DEFERRED_KEY, communication_options, has_deferred_metrics, install_train_step, metric_results
from toolkit.tf import (compute_dtype, import_keras, import_tf, quiet_tf_logs, resolve_compute_dtype, set_threads,
                        slow_in_bfloat16)
from toolkit.train.checkpoint import RunState, report, restore
from toolkit.train.raysupport import progress, quiet_ray_train_reports


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class WorkerRun:
    """What one worker knows of its run: the config, its place, and the state it checkpoints."""

    cfg: TrainConfig
    rank: int
    steps_per_epoch: int
    state: RunState = field(default_factory=RunState)
    best_weights: Optional[list] = None
    tracker: Any = None  # the driver's RunTracker actor (rank 0 tells it about starts and epochs)
    record: dict = field(default_factory=dict)  # what this worker did, for the final checkpoint


class EpochReporter:
    """Per epoch: progress line, best-weights tracking, divergence and early stopping, Ray Train report.
    No per-batch hook: Keras would copy every batch's logs to Python, a sync per step."""

    def __init__(self, run: WorkerRun, model) -> None:
        self.run, self.model = run, model

    def callback(self):
        keras = import_keras()
        return keras.callbacks.LambdaCallback(on_epoch_begin=self.epoch_begin, on_epoch_end=self.epoch_end,
                                              on_test_begin=self.test_begin, on_test_end=self.test_end)

    def epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()
        self.iterations = int(self.model.optimizer.iterations.numpy())
        self.train_logs, self.val_logs = {}, {}

    def test_begin(self, logs=None):
        self.t_val = time.perf_counter()  # images/s counts training steps, not validation
        # Deferred metrics (toolkit.train.step): read the epoch's training results before validation resets them.
        if has_deferred_metrics(self.model):
            self.train_logs = metric_results(self.model)

    def test_end(self, logs=None):
        if has_deferred_metrics(self.model):
            self.val_logs = {f"val_{k}": v for k, v in metric_results(self.model).items()}

    def epoch_end(self, epoch, logs=None):
        run, cfg, state = self.run, self.run.cfg, self.run.state
        run.record["batches"] += int(self.model.optimizer.iterations.numpy()) - self.iterations
        seconds = time.perf_counter() - self.t0
        images_per_s = run.steps_per_epoch * cfg.batch_size / (self.t_val - self.t0)
        logs = {k: float(v) for k, v in (logs or {}).items() if DEFERRED_KEY not in k}
        logs.update(self.train_logs, **self.val_logs)
        logs.update(epoch_time_s=seconds, train_time_s=self.t_val - self.t0, images_per_s=images_per_s)
        if not math.isfinite(logs.get("loss", 0.0)):
            return self.diverged(epoch, logs["loss"])
        for k, v in logs.items():
            state.history.setdefault(k, []).append(v)
        state.epoch = epoch + 1
        if logs["val_accuracy"] > state.best_val_accuracy:
            state.best_val_accuracy, state.best_epoch = logs["val_accuracy"], epoch + 1
            run.best_weights = self.model.get_weights()
        if cfg.patience and state.epoch - state.best_epoch >= cfg.patience:
            self.model.stop_training = True
        if run.rank == 0:
            progress(
                f"epoch {state.epoch:>3}/{cfg.epochs}  loss {logs['loss']:.4f}  acc {logs['accuracy']:.4f}  "
                f"val_loss {logs['val_loss']:.4f}  val_acc {logs['val_accuracy']:.4f}  "
                f"{images_per_s:,.0f} img/s  {seconds:.1f}s  left {fmt_duration(seconds * (cfg.epochs - state.epoch))}"
                + ("  (early stop)" if self.model.stop_training else ""))
            if run.tracker is not None:
                run.tracker.epoch_done.remote(state.epoch)
        report(self.model, run.best_weights, state, cfg, run.rank, final=False, metrics={**logs, "epoch": state.epoch})

    def diverged(self, epoch: int, loss: float) -> None:
        """The weights are NaN/inf from here on. Stop, keep the last good checkpoint and the best weights,
        and tell the driver (every worker sees the same all-reduced loss)."""
        last_step = int(self.model.optimizer.iterations.numpy())
        self.run.state.diverged = {"epoch": epoch + 1, "loss": loss, "steps": [self.iterations + 1, last_step]}
        self.model.stop_training = True
        if self.run.rank == 0:
            progress(f"epoch {epoch + 1:>3}/{self.run.cfg.epochs}  loss {loss}: training diverged, stopping")


def build_or_restore(run: WorkerRun, config: dict, image_shape, num_classes: int, options):
    """The model, inside the strategy's scope: restored from Ray Train's checkpoint after a failure or on a
    resumed run, else built and compiled; either way with the toolkit's train step."""
    import ray
    import ray.train

    from toolkit.models import build_model, compile_model
    from toolkit.train.recipes import make_optimizer

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        run.state, model, run.best_weights = restore(checkpoint, run.cfg.custom_objects)
        if run.rank == 0:
            progress(f"resuming from checkpoint after epoch {run.state.epoch}")
    else:
        content = config.get("model_file")
        content = ray.get(content) if isinstance(content, ray.ObjectRef) else content
        model = build_in_compute_dtype(run, lambda: build_model(run.cfg.model, image_shape, num_classes, content,
                                                                run.cfg.custom_objects, seed=run.cfg.seed))
        compile_model(model, make_optimizer(run.cfg, run.steps_per_epoch), run.cfg.steps_per_execution,
                      label_smoothing=run.cfg.label_smoothing)
    install_train_step(model, accumulate_steps=run.cfg.accumulate_steps, grad_dtype=run.cfg.grad_dtype, options=options,
                       deferred_metrics=False if run.cfg.step_metrics else None)
    return model


def build_in_compute_dtype(run: WorkerRun, build):
    """``build()`` under the Keras dtype policy TrainConfig.compute_dtype resolves to on this worker; under
    ``auto``, a model with layers that train slower in bfloat16 (toolkit.tf.slow_in_bfloat16) is built again
    in float32. A model file keeps the policy it was saved with."""
    keras = import_keras()
    policy, why = resolve_compute_dtype(run.cfg.compute_dtype, run.cfg.use_gpu)
    keras.mixed_precision.set_global_policy(policy)
    model = build()
    # Only a model that does compute in bfloat16 is checked (a model file keeps the policy it was saved with).
    slow = slow_in_bfloat16(model) if run.cfg.compute_dtype == "auto" and compute_dtype(model) == "bfloat16" else []
    if slow:
        policy = "float32"
        why = (f"auto: {len(slow)} depthwise layer(s) ({', '.join(slow[:2])}{', ...' if len(slow) > 2 else ''}) "
               "train slower in bfloat16")
        keras.mixed_precision.set_global_policy(policy)
        model = build()
    built = compute_dtype(model)
    if built != keras.mixed_precision.Policy(policy).compute_dtype:
        why = "the model file's own"
    if run.rank == 0:
        progress(f"compute dtype: {built} ({why})")
    return model


def tell_tracker(run: WorkerRun) -> None:
    if run.tracker is None or run.rank != 0:
        return
    import ray

    try:
        ray.get(run.tracker.started.remote(int(run.state.epoch), worker_node_id()), timeout=60)
    except Exception as e:  # bookkeeping only: never the reason a run fails
        progress(f"warning: restart bookkeeping unavailable ({type(e).__name__}); training goes on")
        run.tracker = None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker. ``config`` = {"train": TrainConfig dict, "inputs": the data's worker inputs
    (toolkit.data), "num_classes", "class_weights", "model_file", "tracker"}."""
    import ray.train

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(cfg.cpus_per_worker)  # Ray pins OMP_NUM_THREADS=1; TF's pools are sized before it starts
    tf, keras = import_tf(), import_keras()
    keras.utils.set_random_seed(cfg.seed)
    quiet_tf_logs()
    quiet_ray_train_reports()
    data, num_classes, class_weights = config["inputs"], int(config["num_classes"]), config.get("class_weights")
    data.load()
    options = communication_options(cfg.bytes_per_pack)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    per_worker_batch = cfg.batch_size // world
    steps = data.steps_per_epoch(cfg.batch_size, world)
    if steps < 1:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({data.num_train} images)")
    # Evaluation has no gradients to all-reduce: a large batch makes validation cheap even when the
    # training batch is small. Every worker evaluates the whole validation set: the summed metric counts
    # give the same ratios, and no worker waits on a shorter shard.
    val_batch = max(per_worker_batch, 256)
    run = WorkerRun(cfg, rank, steps, tracker=config.get("tracker"), record={
        "rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "node_id": worker_node_id(),
        "cpus": cfg.cpus_per_worker, "batches": 0, "batch_size": per_worker_batch,
        "micro_batch_size": per_worker_batch // cfg.accumulate_steps})
    train_ds = strategy.distribute_datasets_from_function(lambda input_ctx: data.train_dataset(
        input_ctx, cfg, per_worker_batch=per_worker_batch, num_classes=num_classes, class_weights=class_weights,
        total_batches=lambda: steps * max(cfg.epochs - int(run.state.epoch), 0)))
    val_ds = strategy.distribute_datasets_from_function(lambda _: data.validation_dataset(val_batch, num_classes))
    with strategy.scope():
        model = build_or_restore(run, config, data.image_shape, num_classes, options)
    run.record["compute_dtype"] = compute_dtype(model)
    tell_tracker(run)
    start, best = run.state.epoch, run.state.best_epoch
    if start < cfg.epochs and not (cfg.patience and best and start - best >= cfg.patience):
        model.fit(train_ds, epochs=cfg.epochs, initial_epoch=start, steps_per_epoch=steps, validation_data=val_ds,
                  validation_steps=math.ceil(len(data.validation[0]) / val_batch),
                  callbacks=[EpochReporter(run, model).callback()], verbose=0)
    profile_fn = data.profile_dataset_fn(cfg, per_worker_batch, num_classes=num_classes, world=world, rank=rank)
    if cfg.profile_steps and profile_fn is not None:
        run.record["step_breakdown"] = profile(model, strategy, profile_fn, run, options)
    finish(model, run)


def profile(model, strategy, dataset_fn, run: WorkerRun, options) -> dict:
    """Where a step's time goes on this worker (toolkit.train.profile), with the measured step time."""
    from toolkit.train.profile import step_breakdown

    cfg = run.cfg
    breakdown = step_breakdown(model, strategy, dataset_fn, steps=cfg.profile_steps,
                               accumulate_steps=cfg.accumulate_steps, grad_dtype=cfg.grad_dtype, options=options)
    if run.state.history.get("train_time_s"):
        breakdown["step_ms"] = run.state.history["train_time_s"][-1] / run.steps_per_epoch * 1000.0
    return breakdown


def finish(model, run: WorkerRun) -> None:
    """The final report carries the best-validation model: model selection never sees the test set."""
    if run.best_weights is not None:
        model.set_weights(run.best_weights)
    elif run.state.diverged:
        model = None  # diverged before any good epoch: there is no model worth saving
    run.record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    state = run.state
    metrics = {"epoch": state.epoch, "best_epoch": state.best_epoch, "val_accuracy": state.best_val_accuracy,
               "final": True, "diverged": bool(state.diverged)}
    report(model, run.best_weights, state, run.cfg, run.rank, final=True, metrics=metrics, worker=run.record)
