"""Cluster-grade runs, for real: a Ray head plus worker nodes started with `ray start` on this machine
(token authentication on), a real S3 API endpoint (moto's standalone server), and real failures
(a worker node's raylet SIGKILLed, the driver SIGKILLed, destinations that cannot be written).

Each test asserts what the user sees (the lines, the exit status) and that nothing was lost."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BUCKET, ROOT, s3_json, s3_keys, s3_snapshot, wait_for_registered_epoch
from benchmarks.localcluster import LocalCluster, free_port, ray_executable

TRAIN = str(ROOT / "jobs" / "train.py")


@pytest.fixture(scope="module")
def cluster():
    """A head (no CPUs, dashboard on for `ray job submit`) and two 1-CPU worker nodes. The nodes are
    started without any AWS variables: workers reach the bucket through what the driver hands them. Unadvertised:
    its drivers join it through RAY_ADDRESS, and a plain ray.init() elsewhere does not."""
    with LocalCluster(nodes=2, cpus_per_node=1, dashboard=True, advertise=False) as c:
        yield c


def driver(cluster, s3, args, out_file):
    """jobs/train.py as a driver connected to ``cluster`` (RAY_ADDRESS), its output in ``out_file``."""
    env = {**cluster.env, **s3["env"]}
    return subprocess.Popen([sys.executable, TRAIN, *args], env=env, stdout=open(out_file, "w"),
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for(path, proc, seen, what: str, timeout=300) -> str:
    """The output of ``proc`` (in ``path``) once ``seen(output)``; fails naming ``what`` if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = Path(path).read_text() if Path(path).exists() else ""
        if seen(content):
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"never saw {what}:\n{Path(path).read_text()[-3000:]}")


def wait_for_line(path, text, proc, timeout=300):
    return wait_for(path, proc, lambda content: text in content, repr(text), timeout)


def run_args(tiny_tree_tgz, cache_dir, name, output, epochs):
    return ["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--num-workers", "2", "--cpus-per-worker", "1",
            "--batch-size", "32", "--epochs", str(epochs), "--storage-path", f"s3://{BUCKET}/ray", "--name", name,
            "--output", output, "--no-export", "--resource-timeout", "120"]


def test_job_submit_runs_on_two_nodes_with_checkpoints_and_outputs_in_s3(cluster, s3, tiny_tree_tgz, cache_dir,
                                                                         tmp_path):
    # The data archive is not in the job's working dir: only the driver (on the head) reads it.
    job_env = json.dumps({"env_vars": s3["env"]})
    proc = subprocess.run(
        [ray_executable(), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(ROOT),
         "--runtime-env-json", job_env, "--", "python", "jobs/train.py",
         *run_args(tiny_tree_tgz, cache_dir, "submitted", f"s3://{BUCKET}/submitted-out", 2)],
        env=cluster.env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "succeeded" in text.lower()
    assert f"checkpoints go to s3://{BUCKET}/ray/submitted" in text
    m = s3_json(s3, "submitted-out/metrics.json")
    assert m["epochs"] == 2 and m["restarts"] == 0
    nodes = {n["node_id"]: n for n in cluster.ray_nodes()}
    worker_nodes = [w["node_id"] for w in m["workers"]]
    assert len(set(worker_nodes)) == 2, "the two training workers ran on two different Ray nodes"
    assert all(nodes[n]["cpus"] == 1 and not nodes[n]["head"] for n in worker_nodes)
    assert all(w["batches"] > 0 for w in m["workers"]), "both workers received data and trained"
    keys = s3_keys(s3, "")
    assert "submitted-out/model.keras" in keys and "submitted-out/curves.png" in keys
    assert any(k.startswith("ray/submitted/checkpoint_") and k.endswith("/model.keras") for k in keys)


def wait_for_epoch_after(path, marker, proc, timeout=300):
    """The output of ``proc`` once an epoch line follows the last ``marker`` line (a resumed group trained one)."""
    return wait_for(path, proc, lambda out: marker in out and "epoch " in out[out.rindex(marker):],
                    f"an epoch after {marker!r}", timeout)


def test_a_dead_node_and_then_a_killed_driver_lose_nothing(cluster, s3, tiny_tree_tgz, cache_dir, tmp_path):
    """Two failures in one run, as a long run on a real cluster meets them: a worker node dies (Ray Train restarts
    the group on its replacement), then the driver is SIGKILLed; the same command resumes from the bucket."""
    args = run_args(tiny_tree_tgz, cache_dir, "twofailures", str(tmp_path / "out"), 8) + ["--max-failures", "2"]
    first = driver(cluster, s3, args, tmp_path / "first.txt")
    wait_for_line(tmp_path / "first.txt", "epoch   2/8", first)
    snapshot = s3_snapshot(s3, "ray/twofailures")
    wait_for_registered_epoch(snapshot, 2, first)  # the controller registers a report when it next polls
    alive_before = {n["node_id"] for n in cluster.ray_nodes() if n["alive"] and not n["head"]}
    cluster.kill_node(0)  # its raylet, by pid: the node and its training worker are gone
    cluster.add_node()  # the replacement joins; Ray Train restarts the group on it
    text = wait_for_epoch_after(tmp_path / "first.txt", "resuming from checkpoint after epoch", first)
    resumed = int(re.search(r"resuming from checkpoint after epoch (\d+)", text).group(1))
    done = max(int(e) for e in re.findall(r"epoch +(\d+)/8", text[:text.index("resuming from checkpoint")]))
    assert done - resumed <= 1, f"the node's death lost more than one epoch: done {done}, resumed from {resumed}"
    after_restart = wait_for_registered_epoch(snapshot, resumed + 1, first)  # a checkpoint of the restarted group
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert [k for k in s3_keys(s3, "ray/twofailures/") if k.endswith("state.json")], "checkpoints in the bucket"

    second = driver(cluster, s3, args, tmp_path / "second.txt")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.txt").read_text()[-4000:]
    text = (tmp_path / "second.txt").read_text()
    assert f"run twofailures: checkpoints found in s3://{BUCKET}/ray/twofailures; resuming from the latest" in text
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["resumed_from_epoch"] is not None and m["resumed_from_epoch"] >= after_restart, m["starts"]
    assert f"resuming from checkpoint after epoch {m['resumed_from_epoch']}" in text
    dead = {n["node_id"] for n in cluster.ray_nodes() if not n["alive"]} & alive_before
    assert len(dead) == 1
    assert not dead & {w["node_id"] for w in m["workers"]}, "the finished run ran on the replacement node"
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert m["epochs"] == 8 and all(len(v) == 8 for v in history.values()), "every epoch once, none lost"


# --- destinations that cannot be written: refused before any data is read or worker started ------------

def refused(args, env=None, prefix=()):
    t0 = time.monotonic()
    proc = subprocess.run([*prefix, sys.executable, TRAIN, *args, "--no-export"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=ROOT)
    return proc, time.monotonic() - t0


def assert_refused(proc, seconds, expected):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [expected], proc.stderr[-2000:]
    assert "data:" not in proc.stdout and "layout:" not in proc.stdout, "refused before reading data or starting Ray"
    assert seconds < 60


def test_a_missing_bucket_is_refused_before_training(s3, tiny_tree_tgz):
    proc, seconds = refused(["--data", str(tiny_tree_tgz), "--output", "s3://no-such-bucket/out"], s3["env"])
    assert_refused(proc, seconds,
                   "error: --output s3://no-such-bucket/out: The specified bucket does not exist (NO_SUCH_BUCKET)")
    proc, seconds = refused(["--data", str(tiny_tree_tgz), "--storage-path", "s3://no-such-bucket/ray"], s3["env"])
    assert_refused(proc, seconds, "error: --storage-path s3://no-such-bucket/ray: The specified bucket does not "
                                  "exist (NO_SUCH_BUCKET)")


def test_an_unreachable_endpoint_is_refused_before_training(tiny_tree_tgz):
    port = free_port()  # nothing listens there
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    proc, seconds = refused(["--data", str(tiny_tree_tgz), "--output", f"s3://{BUCKET}/out",
                             "--s3-endpoint", f"http://127.0.0.1:{port}"], env)
    assert_refused(proc, seconds, f"error: --output s3://{BUCKET}/out: cannot connect to the endpoint "
                                  f"(127.0.0.1:{port})")


def test_a_read_only_folder_is_refused_before_training(tmp_path, tiny_tree_tgz):
    """A read-only filesystem (a read-only bind mount, where this process may make one), else a folder
    without write permission (which root ignores, so only for other users)."""
    folder = tmp_path / "results"
    folder.mkdir()
    args = ["--data", str(tiny_tree_tgz), "--output", str(folder / "out")]
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {folder} {folder}"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        proc, seconds = refused(args, prefix=("unshare", "-m", "sh", "-c", script, str(folder)))
        reason = "Read-only file system"
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        proc, seconds = refused(args)
        reason = "Permission denied"
    else:
        pytest.skip("cannot make a read-only folder here: no mount namespace, and root ignores permissions")
    assert_refused(proc, seconds, f"error: --output {folder / 'out'}: {folder} is not writable ({reason})")
    assert list(folder.iterdir()) == []


def test_job_submit_with_a_wrong_token_is_refused(cluster, tmp_path):
    import secrets

    env = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [ray_executable(), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(ROOT), "--",
         "python", "-c", f"open({str(marker)!r}, 'w').write('x')"],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    # Ray's own refusal of the token (the job client's first call, to the cluster's GCS), not any failure
    # that happens to mention a token.
    assert "AuthenticationError" in text and "InvalidAuthToken: Authentication token is missing or incorrect" in text, \
        text[-2000:]
    assert not marker.exists(), "the job must not have run"


def test_stopping_a_local_cluster_leaves_other_ray_instances_alone(cluster):
    """LocalCluster.stop ends the processes it started and no others (``ray stop --force`` would end every Ray
    on the machine, a user's own included): a second cluster is stopped while this module's keeps running."""
    from benchmarks.localcluster import alive, raylet_pids, recorded_address

    ours = cluster.pids()
    assert ours and any(pid in raylet_pids() for pid in ours), "the module's cluster is up"
    recorded_before = recorded_address()
    other = LocalCluster(nodes=0, cpus_per_node=0, head_cpus=1, pin=False).start()  # a head alone: one `ray start`
    # Advertised (the default): a plain ray.init() on this machine would join it now.
    assert (recorded_address() or "").rsplit(":", 1)[-1] == str(other.port)
    # Its dashboard agent retitles itself ("ray::DashboardAgent"), hiding the environment that marks it as the
    # cluster's; found through its raylet, and stopped with the rest (it was left running orphaned before).
    deadline = time.monotonic() + 30
    while not any("DashboardAgent" in _exe(pid) for pid in other.pids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    theirs = other.pids()
    assert any("DashboardAgent" in _exe(pid) for pid in theirs), sorted(map(_exe, theirs))
    assert theirs and not theirs & ours
    other.stop()
    assert not other.pids() and not alive(theirs), "every process of the stopped cluster is gone"
    # Its daemons (idle Ray workers may come and go on their own): every raylet and the GCS server still run.
    daemons = {pid for pid in ours if _exe(pid) in ("raylet", "gcs_server")}
    assert len(daemons) >= 3, daemons
    assert all(os.path.exists(f"/proc/{pid}") for pid in daemons), "this module's cluster lost a daemon"
    assert len(cluster.ray_nodes()) >= 3, "and still answers: head and two worker nodes"
    # ray.init() with no address joins what it joined before, not the stopped cluster.
    assert recorded_address() == recorded_before
    own = Path(cluster.temp_dir, "ray_current_cluster").read_text()  # the unadvertised one records itself there
    assert own.strip().rsplit(":", 1)[-1] == str(cluster.port), own


def _exe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0", 1)[0].decode(errors="replace"))
    except OSError:
        return ""
