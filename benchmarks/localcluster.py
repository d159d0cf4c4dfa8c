"""A real multi-node Ray cluster on one machine (benchmarks/scaling.py, tests): ``ray start --head`` plus one ``ray
start --address`` per worker node, each node's processes pinned to its own cores with ``taskset``. "8 nodes x 2
cores" then means what it says: every node's raylet, and every worker it starts, runs only on that node's cores (CPU
affinity is inherited), and the nodes talk over loopback through Ray's and TensorFlow's real transports. The head
has no CPUs (``--num-cpus=0``), so it runs no training workers, as on a real cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An environment variable every process of a LocalCluster inherits (its value: the cluster's token).
MARKER = "KET_LOCAL_CLUSTER"


def ray_temp_root() -> str:
    """The folder Ray puts its temp folder in: RAY_TMPDIR, else TMPDIR (Linux), else /tmp, as
    ``ray._common.utils.get_default_system_temp_dir`` finds it (read here without importing Ray)."""
    root = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return root or "/tmp"


def address_file() -> str:
    """Where `ray start` records the machine's latest cluster, which ray.init() with no address joins (Ray's
    default temp folder's ray_current_cluster)."""
    return os.path.join(ray_temp_root(), "ray", "ray_current_cluster")


def recorded_address() -> Optional[str]:
    """The cluster a plain ray.init() on this machine would join (address_file()'s record), None without one."""
    return _read(address_file())


def _gcs_running(port: str) -> bool:
    """Whether a Ray GCS server on this machine listens on ``port`` (a cluster that is still up)."""
    return any(args[0].endswith(b"gcs_server") and any(a.endswith(f"={port}".encode()) for a in args)
               for _, args in _processes("cmdline"))


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _processes(what: str):
    """(pid, contents) of this machine's processes, this one aside; ``what`` is the /proc file (cmdline,
    environ), split at its NUL bytes. The one /proc scan the helpers below share."""
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/{what}", "rb") as f:
                    yield int(name), f.read().split(b"\0")
            except OSError:
                continue


def marked_pids(entry: bytes) -> set[int]:
    """Pids of this machine's processes whose environment holds ``entry`` (``NAME=value``), this one aside."""
    return {pid for pid, env in _processes("environ") if entry in env}


def descendants(pids: set[int]) -> set[int]:
    """Every process below ``pids`` (children, their children, ...), from each process's parent in /proc."""
    parent = {}
    for pid, stat in _processes("stat"):
        fields = b"\0".join(stat).rsplit(b")", 1)[-1].split()  # after the name, which may hold spaces
        if len(fields) > 1 and fields[1].isdigit():
            parent[pid] = int(fields[1])
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] != b"Z":
                    out.add(pid)
        except (OSError, IndexError):
            continue
    return out


def raylet_pids() -> set[int]:
    """Pids of the raylet processes running on this machine (one per Ray node)."""
    return {pid for pid, args in _processes("cmdline") if args[0].endswith(b"/raylet")}


def ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


# `ray start --head` waits 30 s for its GCS, which a loaded 2-core machine once missed ("timed out during startup":
# the scaling test beside the zoo's training, 2026-12-07): such a head is stopped and started once more.
HEAD_TRIES = 2


@dataclass
class LocalCluster:
    """``nodes`` worker nodes of ``cpus_per_node`` CPUs each; with ``pin``, node i runs on cores
    [i*cpus_per_node, (i+1)*cpus_per_node) (wrapping round the machine's cores)."""

    nodes: int
    cpus_per_node: int
    pin: bool = True
    # CPUs of the head itself: 0 as on a real cluster (it runs no training workers); a one-node cluster for
    # drivers to join instead of each starting its own Ray (tests/conftest.py's ray_node) gives it the machine's.
    head_cpus: int = 0
    # Whether a plain ray.init() on this machine joins this cluster (`ray start` records the cluster in
    # address_file()); without, the cluster keeps its own Ray temp folder (``temp_dir``), where `ray start` records
    # it instead, and only RAY_ADDRESS (``env``) reaches it. (Writing the record and putting the old record back
    # left a moment in which another process's ray.init() joined the wrong cluster; and every `ray start
    # --address` of a worker node wrote it again.)
    advertise: bool = True
    # The head's dashboard serves `ray job submit` and the state API (Ray Train's placement-group cleaner asks it
    # about every run each second, and warns each time it cannot); off by default (a process and its memory).
    dashboard: bool = False
    auth_token: str = field(default_factory=lambda: secrets.token_hex(32))
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    started: list[dict] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def temp_dir(self) -> Optional[str]:
        """An unadvertised cluster's Ray temp folder (sessions, logs, sockets, its address record); removed by
        :meth:`stop`. None: Ray's default, /tmp/ray."""
        return None if self.advertise else os.path.join(ray_temp_root(), f"ray-{self.port}")

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment every node and every client of this cluster needs (token auth on, as
        Ray 2.60 asks of clusters; RAY_ADDRESS so that ray.init() connects here), and a marker that every
        process of this cluster inherits, so that :meth:`stop` stops those and no other Ray."""
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token,
                "RAY_ADDRESS": self.address, MARKER: self.auth_token,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def cores(self, index: int) -> list[int]:
        total = os.cpu_count() or 1
        return [(index * self.cpus_per_node + k) % total for k in range(self.cpus_per_node)]

    def _run(self, args: list[str], cores: Optional[list[int]] = None) -> None:
        cmd = [ray_executable(), *args]
        if cores is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
        # RAY_ADDRESS too: every process of the cluster then finds its own cluster (Ray Train's placement-group
        # cleaner asks the state API with no address; with two clusters on the machine and no record of which is
        # the latest it found both and died with a traceback, 2026-11-30).
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    @staticmethod
    def agent_ports() -> list[str]:
        """Free ports for a node's agents, the head's included: Ray's defaults (the dashboard agent's 52365) are
        one per machine, and a second cluster's agent that cannot bind leaves its node without one (its head: `ray
        job submit` answered "No available agent to submit job", the suite's two workers each running a cluster
        with a dashboard, 2026-11-30)."""
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def start(self) -> "LocalCluster":
        # An advertised cluster's `ray start --head` records itself as the machine's latest cluster, which a plain
        # ray.init() then joins; stop() puts back what was there before.
        self.previous_address = recorded_address() if self.advertise else None
        dash = ([f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
                if self.dashboard else ["--include-dashboard=false"])
        for attempt in range(HEAD_TRIES):  # (--temp-dir: worker nodes read it from the head)
            try:
                self._run(["start", "--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                           *dash, "--disable-usage-stats", *([f"--temp-dir={self.temp_dir}"] if self.temp_dir else []),
                           f"--ray-client-server-port={free_port()}", *self.agent_ports()])
                break
            except RuntimeError as e:
                if attempt + 1 == HEAD_TRIES or "timed out during startup" not in str(e):
                    raise
                self.stop()
                self.port = free_port()  # what the slow start left is stopped; a fresh port and temp folder
        for _ in range(self.nodes):
            self.add_node()
        if self.dashboard:  # ready for `ray job submit` when start() returns
            self.wait_for_job_agent()
        return self

    def add_node(self) -> list[int]:
        """Start one more worker node (pinned to the next cores); returns its cores."""
        index = len(self.started)
        cores = self.cores(index)
        before = raylet_pids()
        base = 20000 + 1000 * (index % 40)  # each node its own worker-port range
        self._run([
            "start", f"--address={self.address}", f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
            *self.agent_ports(), f"--min-worker-port={base}", f"--max-worker-port={base + 999}", "--disable-usage-stats",
        ], cores if self.pin else None)
        new = raylet_pids() - before
        self.started.append({"index": index, "cores": cores, "raylet_pid": min(new) if new else None})
        self.wait_for_nodes(sum(1 for n in self.started if not n.get("killed")))
        return cores

    def kill_node(self, index: int) -> int:
        """SIGKILL worker node ``index``'s raylet and every process below it, as when a machine dies (Ray's
        workers die with their raylet, its agents would not); returns the raylet's pid."""
        import signal

        node = self.started[index]
        below = descendants({node["raylet_pid"]})
        os.kill(node["raylet_pid"], signal.SIGKILL)
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        node["killed"] = True
        return node["raylet_pid"]

    def ask(self, code: str) -> tuple[Optional[str], str]:
        """Run ``code`` (Python, after ``ray.init()`` joined this cluster) in a short client: (the last line it
        printed, None for none; its stderr's end)."""
        proc = subprocess.run([sys.executable, "-c", f"import ray\nray.init(logging_level='ERROR')\n{code}"],
                              env=self.env, capture_output=True, text=True, timeout=120)
        lines = proc.stdout.strip().splitlines()
        return (lines[-1] if lines else None), proc.stderr[-1000:]

    def wait_until(self, code: str, ready: Callable[[Optional[str]], bool], what: str,
                   timeout_s: float = 120.0) -> None:
        """Ask ``code`` (:meth:`ask`) each second until ``ready`` takes its answer; past ``timeout_s``, a
        RuntimeError saying ``what`` was awaited and the last answer."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer, err = self.ask(code)
            if ready(answer):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout_s:.0f} s (last answer {answer!r}): {err}")
            time.sleep(1.0)

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        """Block until ``count`` worker nodes are alive."""
        self.wait_until("print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0) > 0))",
                        lambda answer: (answer or "").isdigit() and int(answer) >= count,
                        f"{count} Ray worker nodes up", timeout_s)

    def wait_for_job_agent(self, timeout_s: float = 120.0) -> None:
        """Block until the head's job agent has registered its address (what Ray's job head looks up), so that
        `ray job submit` is taken: the dashboard answers before the agent has registered, and its job head waits
        only 10 s for one ("No available agent to submit job, please try again later")."""
        self.wait_until("from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX as PREFIX\n"
                        "from ray.experimental.internal_kv import _internal_kv_get\n"
                        "head = next(n['NodeID'] for n in ray.nodes() if 'node:__internal_head__' in n['Resources'])\n"
                        "print(int(bool(_internal_kv_get(PREFIX + head, namespace=b'dashboard'))))",
                        lambda answer: answer == "1", "the head's job agent registered", timeout_s)

    def ray_nodes(self) -> list[dict]:
        """Ray's view of the cluster's nodes: [{"node_id", "alive", "cpus", "head"}]."""
        import json

        answer, err = self.ask("import json\nprint(json.dumps([{'node_id': n['NodeID'], 'alive': n['Alive'], "
                               "'cpus': n['Resources'].get('CPU', 0), 'head': 'node:__internal_head__' in "
                               "n['Resources']} for n in ray.nodes()]))")
        if answer is None:
            raise RuntimeError(f"the cluster did not answer: {err}")
        return json.loads(answer)

    def pids(self) -> set[int]:
        """The processes this cluster started (its nodes' daemons and workers, and clients given its env), and the
        processes below them: Ray's dashboard and runtime-env agents retitle themselves (setproctitle), which
        overwrites the environment /proc shows them with, marker included (found running orphaned after stop(),
        2026-11-30)."""
        marked = marked_pids(f"{MARKER}={self.auth_token}".encode())
        return marked | descendants(marked)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop this cluster's processes, and only those: SIGTERM, then SIGKILL after ``grace_s``. (``ray stop``
        would stop every Ray on the machine, a user's own included.)"""
        import signal

        seen: set[int] = set()  # every process found: a child outlives its parent, and is no longer found below it
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            seen |= self.pids()
            left = alive(seen)
            for pid in left:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                seen |= self.pids()
                left = alive(seen)
            if not left:
                break
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        else:
            self._put_back_address_file()

    def _put_back_address_file(self) -> None:
        """address_file() as it was before start(), if it still names this cluster."""
        recorded = recorded_address()
        if recorded and recorded.rsplit(":", 1)[-1] == str(self.port):
            previous = getattr(self, "previous_address", None)
            try:
                if previous and _gcs_running(previous.rsplit(":", 1)[-1]):  # never restore a dead cluster's
                    Path(address_file()).write_text(previous)
                else:
                    os.remove(address_file())
            except OSError:
                pass

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
