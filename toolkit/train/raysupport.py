"""What Ray needs from us, and what we need from Ray, apart from training itself: start-up with legacy
Keras in every worker, quieter logs, a trainer that records a Ctrl-C, and a run tracker that outlives
worker-group restarts."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from toolkit.tf import LEGACY_KERAS_ENV, is_noise

# Ray Train registers a reported checkpoint when its controller next polls the workers (every 2 s by
# default). A failure before that poll loses every epoch reported since the last one: with epochs
# shorter than the poll, more than one (measured: a killed node cost 2 one-second epochs). Polling
# at 0.5 s bounds the loss at one epoch for epochs of 0.5 s and up, for a negligible cost in the
# controller. A value the user set in the environment wins.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def progress(line: str) -> None:
    """A worker's progress line. The process's real stdout, which Ray forwards to the driver once; Ray
    Train's patched print() would both log and tee it, printing every line twice."""
    print(line, file=sys.__stdout__, flush=True)


def quiet_ray_train_reports() -> None:
    """Ray Train logs every report (full metrics dict) and checkpoint upload at INFO from each
    worker; our one progress line per epoch says the same. Its loggers are named after module
    files, so they are looked up through the modules (a no-op if Ray moves them)."""
    for name in ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        logging.getLogger(module.__file__).setLevel(logging.WARNING)
        logging.getLogger(name).setLevel(logging.WARNING)


def filter_worker_logs() -> None:
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


def job_env() -> dict[str, str]:
    """Environment variables every process of the job gets through its runtime_env: legacy Keras, and
    Ray Train's poll interval (unless the user set their own)."""
    return {**LEGACY_KERAS_ENV, **{k: os.environ.get(k, v) for k, v in RAY_TRAIN_ENV.items()}}


def init_ray() -> Optional[str]:
    """Connect to the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``) or start a local one, with
    :func:`job_env` in every process. Returns the dashboard's URL (None without one)."""
    import ray

    if ray.is_initialized():
        return None
    context = ray.init(runtime_env={"env_vars": job_env()}, log_to_driver=True)
    filter_worker_logs()
    url = getattr(context, "dashboard_url", None)
    return (url if "://" in url else f"http://{url}") if url else None


class TrainingInterrupted(RuntimeError):
    """The user pressed Ctrl-C: Ray Train aborted the run gracefully; its checkpoints are kept."""


def trainer_class():
    """TensorflowTrainer that also records a Ctrl-C. Ray Train installs its own SIGINT handler inside
    ``fit`` (it aborts the run gracefully, then leaves with a SystemExit or an actor error); wrapping
    it is how the driver knows the run ended because the user asked, and can say how to resume."""
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


class RunTracker:
    """A small actor on the driver's node that outlives worker-group restarts: the workers' rank 0
    tells it when a group starts (and from which epoch) and when an epoch is done, so the driver can
    count restarts and the epochs each one lost. Ray Train's own failure count stays in its controller."""

    def __init__(self):
        self.starts, self.epochs_done = [], 0

    def started(self, from_epoch: int, node_id: Optional[str]) -> None:
        self.starts.append({"from_epoch": from_epoch, "epochs_done_before": self.epochs_done,
                            "node_id": node_id, "time": time.time()})

    def epoch_done(self, epoch: int) -> None:
        self.epochs_done = max(self.epochs_done, epoch)

    def get_starts(self) -> list[dict]:
        return self.starts


def start_run_tracker() -> Any:
    """A RunTracker actor pinned (not soft: Ray's soft affinity passes over a head with no CPUs) to the
    node the driver is on, which lives as long as the driver does."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_restarts=0)(RunTracker)
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def tracked_starts(tracker) -> list[dict]:
    import ray

    try:
        return ray.get(tracker.get_starts.remote(), timeout=60)
    except Exception:
        return []
