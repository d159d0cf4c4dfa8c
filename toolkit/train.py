"""Data-parallel training on Ray Train: ``train_loop_per_worker`` and the driver ``fit_distributed``.

The worker function reads like single-process Keras: build and compile the model inside
``MultiWorkerMirroredStrategy``, ``fit`` on a sharded tf.data pipeline, and report every epoch to
Ray Train with a checkpoint. Ray restarts the worker group from the latest checkpoint when a
worker dies (``max_failures``), and a new driver with the same run name and storage path resumes.

A checkpoint folder holds:
  ``model.keras``        the model after that epoch, with optimizer state (for resuming);
  ``best_weights.npz``   the weights with the best validation accuracy so far;
  ``state.json``         epoch, history, best epoch, and the full config that made it.
The final report (``final: True``) carries the best-validation model as ``model.keras``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from toolkit.cluster import LayoutError, wait_until_placeable, worker_node_id
from toolkit.config import TrainConfig
from toolkit.data import Dataset, make_eval_dataset, make_train_dataset, split_validation
from toolkit.storage import filesystem as storage_filesystem, has_checkpoint, is_uri
from toolkit.step import DEFERRED_KEY, communication_options, has_deferred_metrics, install_train_step, metric_results
from toolkit.tf import (
    LEGACY_KERAS_ENV, import_keras, import_tf, is_noise, quiet_tf_logs, save_model, set_threads, set_tf_env,
)

if TYPE_CHECKING:
    from toolkit.ingest import Stream

MODEL_FILE = "model.keras"
BEST_WEIGHTS_FILE = "best_weights.npz"
STATE_FILE = "state.json"


def compile_model(model, learning_rate: float, steps_per_execution: int = 1) -> None:
    """Adam, categorical cross-entropy, and the tutorial's metrics (accuracy, precision, recall)."""
    keras = import_keras()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.Precision(name="precision"), keras.metrics.Recall(name="recall")],
        steps_per_execution=steps_per_execution,
    )


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report (full metrics dict) and checkpoint upload at INFO from each
    worker; our one progress line per epoch says the same. Its loggers are named after module
    files, so they are looked up through the modules (a no-op if Ray moves them)."""
    import importlib

    for name in ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        logging.getLogger(module.__file__).setLevel(logging.WARNING)
        logging.getLogger(name).setLevel(logging.WARNING)


def _progress(line: str) -> None:
    # The process's real stdout, which Ray forwards to the driver once; Ray Train's patched
    # print() would both log and tee it, printing every line twice.
    print(line, file=sys.__stdout__, flush=True)


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: one data-parallel replica. ``config`` = {"train": TrainConfig dict,
    "data": ObjectRef of the split arrays, "num_classes": int}."""
    import ray
    import ray.train

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray pins OMP_NUM_THREADS=1; TensorFlow's pools must be sized before the runtime starts.
    set_threads(cfg.cpus_per_worker)
    tf = import_tf()
    keras = import_keras()
    keras.utils.set_random_seed(cfg.seed)
    quiet_tf_logs()
    _quiet_ray_train_reports()

    stream = config.get("stream")  # None: arrays through the object store; else Ray Data shards
    if stream is None:
        arrays = config["data"]
        if isinstance(arrays, ray.ObjectRef):
            arrays = ray.get(arrays)
        x_train, y_train, x_val, y_val = arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"]
        num_train, image_shape = len(x_train), tuple(x_train.shape[1:])
    else:
        from toolkit.ingest import quiet_ray_data

        quiet_ray_data()
        # The validation set is small (a tenth, or the tree's val/): each worker keeps all of it.
        x_val, y_val = _collect(ray.train.get_dataset_shard("val"))
        x_train = y_train = None
        num_train, image_shape = int(stream["num_train"]), tuple(stream["image_shape"])
    num_classes = int(config["num_classes"])

    options = communication_options(cfg.bytes_per_pack)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    per_worker_batch = cfg.batch_size // world
    # Streaming: Ray Data splits the rows equally (dropping at most world-1), each worker drops its last
    # partial batch: every worker runs the same number of steps.
    steps_per_epoch = num_train // cfg.batch_size if stream is None else (num_train // world) // per_worker_batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({num_train} images)")
    # Evaluation has no gradients to all-reduce: a large batch makes validation cheap even when
    # the training batch is small (batch 32 on 2 workers = 16 per worker).
    val_batch = max(per_worker_batch, 256)
    val_steps = math.ceil(len(x_val) / val_batch)

    def train_fn(input_ctx):
        if stream is not None:
            # Exactly the batches this fit will take: a generator that read on would start another Ray Data
            # epoch, which blocks until every worker starts it, and a worker that has finished never does.
            return _stream_dataset(ray.train.get_dataset_shard("train"), per_worker_batch, image_shape,
                                   num_classes=num_classes, augment=cfg.augment,
                                   class_weights=config.get("class_weights"),
                                   total_batches=lambda: steps_per_epoch * max(cfg.epochs - int(state["epoch"]), 0))
        return make_train_dataset(
            x_train, y_train, input_ctx.get_per_replica_batch_size(cfg.batch_size),
            num_classes=num_classes, augment=cfg.augment, seed=cfg.seed,
            num_shards=input_ctx.num_input_pipelines, shard_index=input_ctx.input_pipeline_id,
            class_weights=config.get("class_weights"),
        )

    def val_fn(input_ctx):
        # Every worker evaluates the whole validation set: the summed metric counts give the
        # same ratios, and no worker waits on a shorter shard.
        return make_eval_dataset(x_val, y_val, val_batch, num_classes=num_classes)

    train_ds = strategy.distribute_datasets_from_function(train_fn)
    val_ds = strategy.distribute_datasets_from_function(val_fn)

    state: dict[str, Any] = {"epoch": 0, "history": {}, "best_epoch": None, "best_val_accuracy": -1.0}
    best_weights: Optional[list] = None
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                with open(os.path.join(d, STATE_FILE)) as f:
                    state = json.load(f)
                state.pop("diverged", None)  # a rerun (say, at a smaller learning rate) starts clean
                model = keras.models.load_model(os.path.join(d, MODEL_FILE))
                best_path = os.path.join(d, BEST_WEIGHTS_FILE)
                if os.path.exists(best_path):
                    with np.load(best_path) as z:
                        best_weights = [z[f"arr_{i}"] for i in range(len(z.files))]
            if rank == 0:
                _progress(f"resuming from checkpoint after epoch {state['epoch']}")
        else:
            from toolkit.models import build_model

            content = config.get("model_file")
            content = ray.get(content) if isinstance(content, ray.ObjectRef) else content
            model = build_model(cfg.model, image_shape, num_classes, content)
            compile_model(model, cfg.learning_rate, cfg.steps_per_execution)
        install_train_step(model, accumulate_steps=cfg.accumulate_steps, grad_dtype=cfg.grad_dtype, options=options,
                           deferred_metrics=False if cfg.step_metrics else None)

    tracker = config.get("tracker")
    if tracker is not None and rank == 0:
        try:
            ray.get(tracker.started.remote(int(state["epoch"]), worker_node_id()), timeout=60)
        except Exception as e:  # bookkeeping only: never the reason a run fails
            _progress(f"warning: restart bookkeeping unavailable ({type(e).__name__}); training goes on")
            tracker = None

    worker = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "node_id": worker_node_id(),
              "cpus": cfg.cpus_per_worker, "batches": 0, "batch_size": per_worker_batch,
              "micro_batch_size": per_worker_batch // cfg.accumulate_steps}

    class ReportEpoch(keras.callbacks.Callback):
        """Per epoch: progress line, best-weights tracking, early stopping, Ray Train report."""

        # No per-batch hook: Keras would copy every batch's logs to Python, a sync per step.
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            self.iterations = int(self.model.optimizer.iterations.numpy())

        def on_test_begin(self, logs=None):
            self.t_val = time.perf_counter()  # images/s counts training steps, not validation
            # Deferred metrics (toolkit.step): read the epoch's training results before validation resets them.
            self.train_logs = metric_results(self.model) if has_deferred_metrics(self.model) else {}

        def on_test_end(self, logs=None):
            self.val_logs = {f"val_{k}": v for k, v in metric_results(self.model).items()} \
                if has_deferred_metrics(self.model) else {}

        def on_epoch_end(self, epoch, logs=None):
            nonlocal best_weights
            now = time.perf_counter()
            # steps this worker's optimizer applied: proof it did its share, read back by the driver
            worker["batches"] += int(self.model.optimizer.iterations.numpy()) - self.iterations
            seconds = now - self.t0
            images_per_s = steps_per_epoch * cfg.batch_size / (self.t_val - self.t0)
            logs = {k: float(v) for k, v in (logs or {}).items() if DEFERRED_KEY not in k}
            logs.update(getattr(self, "train_logs", {}), **getattr(self, "val_logs", {}))
            logs.update(epoch_time_s=seconds, train_time_s=self.t_val - self.t0, images_per_s=images_per_s)
            if not math.isfinite(logs.get("loss", 0.0)):
                # Diverged: the weights are NaN/inf from here on. Stop, keep the last good checkpoint and
                # the best weights, and tell the driver (every worker sees the same all-reduced loss).
                last_step = int(self.model.optimizer.iterations.numpy())
                state["diverged"] = {"epoch": epoch + 1, "loss": logs["loss"],
                                     "steps": [self.iterations + 1, last_step]}
                self.model.stop_training = True
                if rank == 0:
                    _progress(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {logs['loss']}: training diverged, stopping")
                return
            for k, v in logs.items():
                state["history"].setdefault(k, []).append(v)
            state["epoch"] = epoch + 1
            if logs["val_accuracy"] > state["best_val_accuracy"]:
                state["best_val_accuracy"], state["best_epoch"] = logs["val_accuracy"], epoch + 1
                best_weights = self.model.get_weights()
            stale = state["epoch"] - state["best_epoch"]
            if cfg.patience and stale >= cfg.patience:
                self.model.stop_training = True
            if rank == 0:
                eta = seconds * (cfg.epochs - state["epoch"])
                _progress(
                    f"epoch {state['epoch']:>3}/{cfg.epochs}  loss {logs['loss']:.4f}  acc {logs['accuracy']:.4f}  "
                    f"val_loss {logs['val_loss']:.4f}  val_acc {logs['val_accuracy']:.4f}  "
                    f"{images_per_s:,.0f} img/s  {seconds:.1f}s  left {_fmt_duration(eta)}"
                    + ("  (early stop)" if self.model.stop_training else "")
                )
            if tracker is not None and rank == 0:
                tracker.epoch_done.remote(state["epoch"])
            _report(self.model, best_weights, state, cfg, rank, final=False,
                    metrics={**logs, "epoch": state["epoch"]})

    start_epoch = int(state["epoch"])
    stopped_early = cfg.patience and state["best_epoch"] and start_epoch - state["best_epoch"] >= cfg.patience
    if start_epoch < cfg.epochs and not stopped_early:
        model.fit(
            train_ds, epochs=cfg.epochs, initial_epoch=start_epoch, steps_per_epoch=steps_per_epoch,
            validation_data=val_ds, validation_steps=val_steps, callbacks=[ReportEpoch()], verbose=0,
        )
    if cfg.profile_steps and stream is None:
        from toolkit.profile import step_breakdown

        hist = state["history"]
        breakdown = step_breakdown(
            model, strategy, lambda: make_train_dataset(
                x_train, y_train, per_worker_batch, num_classes=num_classes, augment=cfg.augment, seed=cfg.seed,
                num_shards=world, shard_index=rank),
            steps=cfg.profile_steps, accumulate_steps=cfg.accumulate_steps, grad_dtype=cfg.grad_dtype, options=options)
        if hist.get("train_time_s"):
            breakdown["step_ms"] = hist["train_time_s"][-1] / steps_per_epoch * 1000.0
        worker["step_breakdown"] = breakdown
    # The final report carries the best-validation model: model selection never sees the test set.
    if best_weights is not None:
        model.set_weights(best_weights)
    elif state.get("diverged"):
        model = None  # diverged before any good epoch: there is no model worth saving
    import resource

    worker["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    final_metrics = {"epoch": state["epoch"], "best_epoch": state["best_epoch"],
                     "val_accuracy": state["best_val_accuracy"], "final": True,
                     "diverged": bool(state.get("diverged"))}
    _report(model, best_weights, state, cfg, rank, final=True, metrics=final_metrics, worker=worker)


def _collect(iterator) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a Ray Data iterator as (images, labels) arrays."""
    xs, ys = [], []
    for batch in iterator.iter_batches(batch_size=1024, batch_format="numpy"):
        xs.append(batch["image"])
        ys.append(batch["label"])
    return np.concatenate(xs), np.concatenate(ys)


def _stream_dataset(shard, batch_size: int, image_shape, *, num_classes: int, augment: bool, class_weights,
                    total_batches: Callable[[], int]):
    """A worker's Ray Data shard as an endless tf.data pipeline of per-worker batches: one pass over the
    shard per epoch (Ray Data re-reads and re-decodes the files). The file order is shuffled once on
    the driver, so every block mixes the classes, and the block order every epoch. No row-level
    shuffle buffer on top: one run with it and one without (1,627 and 1,401 images/s, on an earlier
    read path) differed within this machine's noise, and the classes are already mixed."""
    import tensorflow as tf

    from toolkit.data import prepare_batches

    def batches():
        left = total_batches()  # read when fit starts iterating: after a checkpoint's epoch is known
        while left > 0:
            for b in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        prefetch_batches=4):
                yield b["image"], b["label"]
                left -= 1
                if left == 0:
                    return

    ds = tf.data.Dataset.from_generator(batches, output_signature=(
        tf.TensorSpec((batch_size, *image_shape), tf.uint8), tf.TensorSpec((batch_size,), tf.int64)))
    return prepare_batches(ds, num_classes=num_classes, augment=augment, class_weights=class_weights)


def _report(model, best_weights, state: dict, cfg: TrainConfig, rank: int, *, final: bool,
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
            json.dump({**state, "final": final, "config": cfg.to_dict()}, f)
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


def balanced_class_weights(y: np.ndarray, num_classes: int) -> list[float]:
    """total / (classes x count) per class, as scikit-learn's compute_class_weight("balanced"); a class
    with no training images gets weight 0 (there is nothing to weigh)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    return [float(len(y) / (num_classes * c)) if c else 0.0 for c in counts]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stopped, nothing was written as the model."""


class TrainingInterrupted(RuntimeError):
    """The user pressed Ctrl-C: Ray Train aborted the run gracefully; its checkpoints are kept."""


def _trainer_class():
    """TensorflowTrainer that also records a Ctrl-C. Ray Train installs its own SIGINT handler inside
    ``fit`` (it aborts the run gracefully, then leaves with a SystemExit or an actor error); wrapping
    it is how the driver knows the run ended because the user asked, and can say how to resume."""
    import signal
    import threading

    from ray.train.tensorflow import TensorflowTrainer

    class Trainer(TensorflowTrainer):
        interrupted = threading.Event()

        def _register_sigint_handler(self, controller):  # Ray Train V2's hook (a no-op if it is renamed)
            super()._register_sigint_handler(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                Trainer.interrupted.set()
                if callable(ray_handler):
                    ray_handler(signum, frame)

            signal.signal(signal.SIGINT, handler)

    return Trainer


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


def _run_tracker(ray):
    """A small actor on the driver's node that outlives worker-group restarts: the workers' rank 0
    tells it when a group starts (and from which epoch) and when an epoch is done, so the driver can
    count restarts and the epochs each one lost. Ray Train's own failure count stays in its controller."""

    @ray.remote(num_cpus=0, max_restarts=0)
    class RunTracker:
        def __init__(self):
            self.starts, self.epochs_done = [], 0

        def started(self, from_epoch: int, node_id: Optional[str]) -> None:
            self.starts.append({"from_epoch": from_epoch, "epochs_done_before": self.epochs_done,
                                "node_id": node_id, "time": time.time()})

        def epoch_done(self, epoch: int) -> None:
            self.epochs_done = max(self.epochs_done, epoch)

        def get_starts(self) -> list[dict]:
            return self.starts

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    # Pinned (not soft: Ray's soft affinity passes over a head with no CPUs) to the node the driver is on,
    # which lives as long as the driver does.
    return RunTracker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def _filter_worker_logs() -> None:
    """Drop known noise (``toolkit.tf.KNOWN_NOISE``) from the worker logs Ray forwards to this driver
    (its ``log_to_driver`` handler, wrapped; if Ray's internals move, logs pass through unfiltered)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        wrapped = []
        for name, handler in dispatcher.handlers:
            if name == "ray_print_logs":
                def handler(data, _print=handler):
                    lines = [line for line in data.get("lines", []) if not is_noise(line)]
                    if lines:
                        _print({**data, "lines": lines})
            wrapped.append((name, handler))
        dispatcher.handlers = wrapped


def init_ray() -> Optional[str]:
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``) or start a local one,
    with legacy Keras selected in every worker process. Returns the dashboard's URL (None without one)."""
    import ray

    if ray.is_initialized():
        return None
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": dict(LEGACY_KERAS_ENV)}, "log_to_driver": True}
    context = ray.init(**kwargs)
    _filter_worker_logs()
    url = getattr(context, "dashboard_url", None)
    return (url if "://" in url else f"http://{url}") if url else None


def fit_distributed(cfg: TrainConfig, ds: "Dataset | Stream", workdir: str,
                    log: Callable[[str], None] = lambda line: print(line, flush=True)) -> TrainOutcome:
    """Train ``cfg.model`` on ``ds`` with Ray Train; copy the final model into ``workdir``.
    ``num_workers``/``cpus_per_worker`` left as None are resolved from the cluster (toolkit.cluster);
    the outcome's ``config`` is the resolved one."""
    set_tf_env()  # ray.train.tensorflow imports TensorFlow
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    dashboard = init_ray()
    layout, _ = wait_until_placeable(cfg, cfg.resource_timeout, log=log)
    try:
        cfg = dataclasses.replace(cfg, num_workers=layout.num_workers, cpus_per_worker=layout.cpus_per_worker)
    except ValueError as e:  # e.g. the global batch does not split over the workers found
        raise LayoutError(f"{e} ({layout.how})") from None
    log(layout.describe(cfg))
    from toolkit.ingest import Stream

    datasets, stream, data_ref = None, None, None
    if isinstance(ds, Stream):  # Ray Data reads and decodes; each worker streams its shard
        from toolkit.ingest import ray_dataset, split_files

        train_paths, val_paths = split_files(ds.tree, cfg.val_fraction, cfg.seed)
        # One seeded shuffle of the file order (trees list class by class); Ray Data then shuffles
        # the block order every epoch and each worker shuffles rows within a buffer.
        train_paths = [train_paths[i] for i in np.random.default_rng(cfg.seed).permutation(len(train_paths))]
        y_tr = ds.labels_of(train_paths)
        datasets = {"train": ray_dataset(ds.tree, train_paths, ds.spec).randomize_block_order(),
                    "val": ray_dataset(ds.tree, val_paths, ds.spec)}
        stream = {"num_train": len(train_paths), "image_shape": list(ds.image_shape)}
        log(f"ingest: stream ({len(train_paths):,} train, {len(val_paths):,} val files read and decoded by "
            "Ray Data, sharded over the workers)")
    else:
        if ds.x_val is not None:  # the data's own val/ split
            x_tr, y_tr, x_val, y_val = ds.x_train, ds.y_train, ds.x_val, ds.y_val
        else:
            x_tr, y_tr, x_val, y_val = split_validation(ds.x_train, ds.y_train, cfg.val_fraction, cfg.seed)
        # One copy in the object store, read zero-copy by workers on the same node and shipped to
        # others: no worker needs the data path, so this works unchanged on a multi-node cluster.
        data_ref = ray.put({"x_train": x_tr, "y_train": y_tr, "x_val": x_val, "y_val": y_val})
    class_weights = balanced_class_weights(y_tr, ds.num_classes) if cfg.class_weights == "balanced" else None
    if class_weights is not None:
        log("class weights (balanced): " + ", ".join(f"{c} {w:.2f}" for c, w in zip(ds.class_names, class_weights)))
    from toolkit.models import model_kind

    model_file = None
    if model_kind(cfg.model) == "file":  # workers on other machines get the driver's copy of the file
        with open(cfg.model, "rb") as f:
            model_file = ray.put(f.read())
    name = cfg.name or time.strftime(f"{cfg.model}-%Y%m%d-%H%M%S")
    storage_fs, storage_path = None, cfg.storage_path
    if is_uri(cfg.storage_path):  # an object store: one filesystem object, endpoint and keys included
        storage_fs, storage_path = storage_filesystem(cfg.storage_path, cfg.s3_endpoint)
    elif cfg.storage_path:
        storage_path = os.path.abspath(os.path.expanduser(cfg.storage_path))
    run_dir = f"{(cfg.storage_path if storage_fs else storage_path).rstrip('/')}/{name}" if storage_path \
        else f"~/ray_results/{name}"
    if has_checkpoint(cfg.storage_path or "~/ray_results", name, cfg.s3_endpoint):
        log(f"run {name}: checkpoints found in {run_dir}; resuming from the latest")
    else:
        log(f"run {name}: checkpoints go to {run_dir}")
    if dashboard:
        log(f"ray dashboard: {dashboard}")
    tracker = _run_tracker(ray)
    # Ray Train registers a reported checkpoint when its controller next polls the workers (every 2 s by
    # default). A failure before that poll loses every epoch reported since the last one: with epochs
    # shorter than the poll, more than one (measured: a killed node cost 2 one-second epochs). Polling
    # at 0.5 s bounds the loss at one epoch for epochs of 0.5 s and up, for a negligible cost in the
    # controller. Ray propagates this variable from the driver; one set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    TensorflowTrainer = _trainer_class()
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "data": data_ref, "num_classes": ds.num_classes,
                           "tracker": tracker, "model_file": model_file, "class_weights": class_weights,
                           "stream": stream},
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]) if datasets else None,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": layout.cpus_per_worker,
                                  **({"GPU": layout.gpus_per_worker} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    t0 = time.perf_counter()

    def resume_hint() -> str:
        if not has_checkpoint(cfg.storage_path or "~/ray_results", name, cfg.s3_endpoint):
            return f"no checkpoint of run {name} was saved yet ({run_dir}): the same command starts it again"
        return (f"the checkpoints of run {name} are kept ({run_dir}); run the same command again (same --name "
                f"{name} and --storage-path) to resume from the last one")

    try:
        result = trainer.fit()
    except BaseException:  # Ray Train's SIGINT handler leaves with SystemExit or an actor error
        if TensorflowTrainer.interrupted.is_set():
            raise TrainingInterrupted(f"interrupted; {resume_hint()}") from None
        raise
    if TensorflowTrainer.interrupted.is_set():
        raise TrainingInterrupted(f"interrupted; {resume_hint()}")
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} ended without a checkpoint")
    os.makedirs(workdir, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            state = json.load(f)
        workers_dir = os.path.join(d, "workers")
        workers = [json.load(open(os.path.join(workers_dir, n))) for n in sorted(os.listdir(workers_dir))] \
            if os.path.isdir(workers_dir) else []
        if state.get("diverged"):
            dv = state["diverged"]
            good = (f"the best model so far (epoch {state['best_epoch']}) is in the checkpoints under {result.path}"
                    if state.get("best_epoch") else "no epoch finished with a finite loss")
            raise TrainingDiverged(f"training diverged: loss {dv['loss']} in epoch {dv['epoch']} (steps "
                                   f"{dv['steps'][0]}-{dv['steps'][1]}); no model.keras written; {good}; "
                                   "try a smaller --learning-rate")
        model_path = os.path.join(workdir, MODEL_FILE)
        with open(os.path.join(d, MODEL_FILE), "rb") as src, open(model_path, "wb") as dst:
            dst.write(src.read())
    hist = state["history"]
    train_time = sum(hist.get("train_time_s", []))
    images = sum(s * r for s, r in zip(hist.get("train_time_s", []), hist.get("images_per_s", [])))
    return TrainOutcome(
        model_path=model_path, history=hist, best_epoch=state["best_epoch"], workers=workers, epochs_run=state["epoch"],
        wall_time_s=wall, train_images_per_s=float(images / train_time) if train_time else 0.0,
        run_path=result.path, config=cfg, starts=_tracked_starts(tracker),
    )


def _tracked_starts(tracker) -> list[dict]:
    import ray

    try:
        return ray.get(tracker.get_starts.remote(), timeout=60)
    except Exception:
        return []
