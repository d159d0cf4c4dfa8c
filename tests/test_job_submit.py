"""`ray job submit` against a real `ray start --head` cluster with token authentication on."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head node started as a user would, with RAY_AUTH_MODE=token and a generated token."""
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # the job's `python` must be this environment's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dash = _free_port()
    start = subprocess.run(
        [RAY, "start", "--head", f"--port={_free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "token": token}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _submit(head, env, args, timeout=600):
    return subprocess.run(
        [RAY, "job", "submit", "--address", head["address"], "--working-dir", str(ROOT), "--", *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def test_submitted_job_trains_to_the_end(ray_head, tmp_path, tiny_tree_tgz, cache_dir):
    out = tmp_path / "out"
    proc = _submit(ray_head, ray_head["env"], [
        "python", "jobs/train.py", "--data", str(tiny_tree_tgz), "--epochs", "2", "--batch-size", "32",
        "--num-workers", "2", "--output", str(out), "--storage-path", str(tmp_path / "ray"),
        "--cache-dir", cache_dir, "--no-export",
    ])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_workers"] == 2 and len(m["workers"]) == 2 and m["epochs"] == 2
    assert (out / "model.keras").stat().st_size > 100_000


def test_wrong_token_is_refused(ray_head, tmp_path):
    env = {**ray_head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    marker = tmp_path / "ran"
    proc = _submit(ray_head, env, ["python", "-c", f"open({str(marker)!r}, 'w').write('x')"], timeout=120)
    assert proc.returncode != 0
    text = (proc.stdout + proc.stderr).lower()
    assert any(w in text for w in ("401", "403", "unauthorized", "authentication", "token")), text[-2000:]
    assert not marker.exists(), "the job must not have run"
