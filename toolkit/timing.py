"""The one timing loop: the step profile (toolkit.train.profile) and the export's latency and throughput
(export.run.worker) both time calls with it."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_calls(fn: Callable[[], object], runs: int, warmup: int) -> np.ndarray:
    """Wall time of each of ``runs`` calls of ``fn`` after ``warmup`` untimed calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = np.empty(runs)
    for k in range(runs):
        t0 = time.perf_counter()
        fn()
        times[k] = (time.perf_counter() - t0) * 1e3
    return times
