"""Supervising :mod:`export.run.worker`: a crash or a hang fails the variant that was running (or moves it to
its next attempt, e.g. the next QAT scheme), and a new worker process takes the variants that are left.

:func:`follow` turns the worker's events file into a stream of events (and a stall into a kill);
:class:`Supervision` is the state between worker processes; :func:`supervise` is the loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from export.results import VariantResult
from export.variants import FORMAT_OF

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Progress:
    """What the running worker process is doing, from its events."""

    timeout: float  # seconds without an event before it is killed
    current: Optional[str] = None  # the variant being built
    phase: str = "starting"
    attempt: int = 0
    attempts_of: int = 1
    done: bool = False  # it finished every variant
    killed: Optional[float] = None  # the stall timeout it was killed after


@dataclass
class Supervision:
    """What outlives one worker process: the results so far and each variant's next attempt."""

    remaining: list[str]
    rows: dict[str, VariantResult] = field(default_factory=dict)
    start_attempt: dict[str, int] = field(default_factory=dict)
    attempt_failures: dict[str, list[str]] = field(default_factory=dict)

    def fail(self, variant: str, reason: str) -> VariantResult:
        self.rows[variant] = VariantResult(variant, FORMAT_OF[variant], "failed", reason)
        self.remaining.remove(variant)
        return self.rows[variant]


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"crashed ({signal.Signals(-rc).name})"
        except ValueError:
            return f"crashed (signal {-rc})"
    return f"exited with status {rc}"


def tail(path: Path, n: int = 1) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:300]


def follow(proc: subprocess.Popen, events_path: Path, progress: Progress) -> Iterator[dict]:
    """The worker's events as it writes them (a line still being written is waited for), until it has
    exited and all it wrote is read; a worker silent for ``progress.timeout`` is killed."""
    last, exited, partial = time.monotonic(), False, ""
    with open(events_path) as ev:
        while True:
            line = ev.readline()
            if line:
                partial += line
                if partial.endswith("\n"):
                    event, partial, last = json.loads(partial), "", time.monotonic()
                    yield event
                continue
            if proc.poll() is not None:
                if exited:  # and everything it wrote has been read
                    return
                exited = True
                continue
            if time.monotonic() - last > progress.timeout:
                progress.killed = progress.timeout
                proc.kill()
                proc.wait()
                return
            time.sleep(0.1)


def handle(event: dict, progress: Progress, sup: Supervision, stall_timeout: float,
           on_row: Callable[[VariantResult], None], log: Callable[[str], None]) -> None:
    kind = event["event"]
    if kind == "start":
        progress.current, progress.phase = event["variant"], "starting"
        progress.attempt, progress.attempts_of = sup.start_attempt.get(event["variant"], 0), 1
        progress.timeout = stall_timeout
    elif kind == "attempt":
        progress.attempt, progress.attempts_of = event["index"], event["of"]
    elif kind == "phase":
        progress.phase = event["what"]
        progress.timeout = event.get("timeout_s") or stall_timeout
    elif kind == "log":
        log(event["line"])
    elif kind == "row":
        sup.rows[event["variant"]] = VariantResult.from_dict(event["row"])
        sup.remaining.remove(event["variant"])
        on_row(sup.rows[event["variant"]])
        progress.current = None
    elif kind == "done":
        progress.done = True


def after_death(proc: subprocess.Popen, progress: Progress, sup: Supervision, work: Path,
                on_row: Callable[[VariantResult], None], log: Callable[[str], None]) -> None:
    """A worker died or was killed with variants left: fail (or retry) the one it was on."""
    what = (f"no sign of life for {progress.killed:g} s" if progress.killed
            else f"the worker process {describe_exit(proc.returncode)}")
    if progress.current is None:  # died before starting a variant (e.g. could not load the model)
        detail = tail(work / "worker.log")
        for v in list(sup.remaining):
            on_row(sup.fail(v, f"{what} before building it" + (f": {detail}" if detail else "")))
        return
    current = progress.current
    reason = f"{what} while {progress.phase}" + ("; killed" if progress.killed else "")
    if progress.attempt + 1 < progress.attempts_of:
        sup.attempt_failures.setdefault(current, []).append(reason)
        sup.start_attempt[current] = progress.attempt + 1
        log(f"  {current}: {reason}; trying its next way (attempt {progress.attempt + 2} of {progress.attempts_of})")
    else:
        on_row(sup.fail(current, "; ".join(sup.attempt_failures.get(current, []) + [reason])))


def supervise(job: dict, variants: list[str], work: Path, *, stall_timeout: float, debug: bool,
              on_row: Callable[[VariantResult], None], log: Callable[[str], None]) -> list[VariantResult]:
    """Run export.run.worker until every variant has a row; returns the rows in ``variants``' order."""
    sup = Supervision(list(variants))
    # The worker runs in the project's folder; the user's folder stays importable (--custom-objects modules).
    path = [str(ROOT), os.getcwd(), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    proc, run = None, 0
    with open(work / "worker.log", "ab") as logf:
        try:
            while sup.remaining:  # each death ends a variant or moves it to its next (finite) attempt
                run += 1
                events_path, job_path = work / f"events-{run}.jsonl", work / f"job-{run}.json"
                job.update(variants=sup.remaining, prior_rows={k: r.to_dict() for k, r in sup.rows.items()}, start_attempt=sup.start_attempt,
                           attempt_failures=sup.attempt_failures, events=str(events_path))
                job_path.write_text(json.dumps(job))
                events_path.touch()
                proc = subprocess.Popen([sys.executable, "-m", "export.run.worker", str(job_path)], cwd=str(ROOT), env=env,
                                        stdout=None if debug else logf, stderr=None if debug else logf)
                progress = Progress(stall_timeout)
                for event in follow(proc, events_path, progress):
                    handle(event, progress, sup, stall_timeout, on_row, log)
                if progress.done or not sup.remaining:
                    break
                after_death(proc, progress, sup, work, on_row, log)
        finally:
            if proc is not None and proc.poll() is None:  # interrupted: take the worker down with us
                proc.kill()
                proc.wait()
    return [sup.rows[v] for v in variants]
