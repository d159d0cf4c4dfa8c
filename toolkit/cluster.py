"""What the Ray cluster has, and the worker layout a run uses on it.

The default layout is one Ray Train worker per node, owning all of that node's CPUs (or GPUs):
inside a node, TensorFlow's threads share memory for free, while every extra worker adds a
gradient all-reduce to every step. benchmarks/scaling.py measures both (docs/results.md, "Scaling").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from toolkit.config import TrainConfig


class LayoutError(ValueError):
    """The run asks for a layout the cluster cannot give; the message is one line for the user."""


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    cpus: int
    gpus: int


@dataclass(frozen=True)
class Layout:
    num_workers: int
    cpus_per_worker: int
    gpus_per_worker: int
    how: str  # one line: where the numbers came from

    def describe(self, cfg: TrainConfig) -> str:
        micro = cfg.batch_size // (self.num_workers * cfg.accumulate_steps)
        unit = f"{self.gpus_per_worker} GPU + {self.cpus_per_worker} CPU" if self.gpus_per_worker else \
            f"{self.cpus_per_worker} CPU"
        batch = f"global batch {cfg.batch_size} = {self.num_workers} worker(s)"
        batch += f" x {cfg.accumulate_steps} micro-batches" if cfg.accumulate_steps > 1 else ""
        batch += f" x {micro}"
        return (f"layout: {self.num_workers} worker(s) x {unit} ({self.how}); {batch}, "
                f"learning rate {cfg.learning_rate:g}, gradients on the wire: {cfg.grad_dtype}")


def alive_nodes() -> list[Node]:
    """The cluster's live nodes that offer CPUs or GPUs (a head started with --num-cpus=0 does not)."""
    import ray

    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
        if n.get("Alive") and (cpus or gpus):
            nodes.append(Node(n["NodeID"], n.get("NodeManagerAddress", "?"), cpus, gpus))
    return nodes


def resolve_layout(cfg: TrainConfig, nodes: list[Node]) -> Layout:
    """Fill in what ``cfg`` leaves to auto (``num_workers`` / ``cpus_per_worker`` = None) from ``nodes``.

    - nothing given: one worker per node (per GPU node with ``use_gpu``), each with the node's
      CPUs (and GPUs); on unequal nodes the smallest sets the size, so every worker fits;
    - only ``num_workers``: the nodes' CPUs shared among the workers placed on each;
    - only ``cpus_per_worker``: as many such workers as the nodes hold.
    Raises LayoutError (one line) when the cluster has nothing to run on.
    """
    usable = [n for n in nodes if (n.gpus if cfg.use_gpu else n.cpus) >= 1]
    if not usable:
        what = "GPUs" if cfg.use_gpu else "CPUs"
        raise LayoutError(f"num_workers: the Ray cluster has no node with {what} "
                         f"({len(nodes)} node(s): {', '.join(f'{n.cpus} CPU/{n.gpus} GPU' for n in nodes) or 'none'})")
    min_cpus = min(n.cpus for n in usable)
    gpus = min(n.gpus for n in usable) if cfg.use_gpu else 0
    if cfg.num_workers is None and cfg.cpus_per_worker is None:
        workers, cpus = len(usable), max(1, min_cpus)
        how = f"auto: one per node, {len(usable)} node(s)"
    elif cfg.num_workers is None:
        cpus = int(cfg.cpus_per_worker)
        workers = max(1, sum(n.cpus // cpus for n in usable))
        how = f"auto: as many {cpus}-CPU workers as {len(usable)} node(s) hold"
    elif cfg.cpus_per_worker is None:
        workers = int(cfg.num_workers)
        per_node = math.ceil(workers / len(usable))
        cpus = max(1, min_cpus // per_node)
        how = f"auto CPUs: {min_cpus} per node / {per_node} worker(s) per node"
    else:
        workers, cpus, how = int(cfg.num_workers), int(cfg.cpus_per_worker), "as given"
    if cfg.use_gpu:
        per_node = math.ceil(workers / len(usable))
        gpus = max(1, gpus // per_node)
    return Layout(workers, cpus, gpus, how)


def placeable_workers(layout: Layout, nodes: list[Node]) -> int:
    """How many workers of ``layout``'s size the nodes can hold (by their total resources)."""
    total = 0
    for n in nodes:
        fit = n.cpus // layout.cpus_per_worker if layout.cpus_per_worker else 10**9
        if layout.gpus_per_worker:
            fit = min(fit, n.gpus // layout.gpus_per_worker)
        total += fit
    return total


def describe_nodes(nodes: list[Node]) -> str:
    if not nodes:
        return "no nodes with CPUs or GPUs"
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    return f"{len(nodes)} node(s), {cpus} CPU and {gpus} GPU in all ({', '.join(f'{n.cpus} CPU/{n.gpus} GPU' for n in nodes)})"


def wait_until_placeable(cfg: TrainConfig, timeout_s: float, log=print, poll_s: float = 2.0) -> tuple[Layout, list[Node]]:
    """Resolve the layout and wait, at most ``timeout_s`` (0 = forever: a cluster whose autoscaler adds
    nodes), until the cluster can hold every worker. Raises LayoutError naming what was asked and what
    the cluster has: a run that cannot be scheduled stops instead of waiting forever."""
    import time

    deadline = time.monotonic() + timeout_s
    said = 0.0
    while True:
        nodes = alive_nodes()
        try:
            layout = resolve_layout(cfg, nodes)
            fits = placeable_workers(layout, nodes)
        except LayoutError:
            layout, fits = None, 0
        if layout is not None and fits >= layout.num_workers:
            return layout, nodes
        asked = (f"{layout.num_workers} worker(s) x {layout.cpus_per_worker} CPU"
                 + (f" + {layout.gpus_per_worker} GPU" if layout.gpus_per_worker else "")) if layout else \
            ("GPU workers" if cfg.use_gpu else "CPU workers")
        has = f"the cluster has {describe_nodes(nodes)}"
        now = time.monotonic()
        if timeout_s and now >= deadline:
            raise LayoutError(f"cannot schedule {asked}: {has}, room for {fits} "
                              f"(waited {timeout_s:g}s; see --num-workers, --cpus-per-worker, --use-gpu, --resource-timeout)")
        if now - said >= 15 or not said:
            log(f"waiting for resources: {asked}; {has}, room for {fits}"
                + (f" (up to {timeout_s:g}s)" if timeout_s else " (no timeout: waiting for the autoscaler)"))
            said = now
        time.sleep(poll_s)


def worker_node_id() -> Optional[str]:
    """The Ray node this process runs on (recorded per worker in metrics.json)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray: no node
        return None
