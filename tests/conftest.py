"""Shared fixtures: small real datasets written in every supported layout, and the shared CIFAR-10 copy."""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from toolkit.tf import set_tf_env

set_tf_env()  # before anything imports TensorFlow (ray.train.tensorflow does)
# Each pytest-xdist worker its own Ray temp folder (sessions, logs, and the record of the latest `ray start`
# cluster, which a plain ray.init() joins): one worker's clusters are never another's runs' (short: Ray's socket
# paths under it must stay within 107 characters).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"/tmp/ray-{os.environ['PYTEST_XDIST_WORKER']}"

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
BUCKET = "runs"  # the bucket the s3 fixture creates
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def in_ci() -> bool:
    """CI's runners set CI=true (GitHub Actions, GitLab, and this project's .ci/run under its CI)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_shared_cifar() -> Path:
    """The shared copy; away from CI a test that needs it skips, saying why (under CI the run has already stopped at
    its start: pytest_configure)."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_CIFAR} (tests that need real data skip without it)")
    return SHARED_CIFAR


def pytest_configure(config):
    # Under CI a missing copy would skip about 39 tests (the gate, TFLite Micro, accuracy, the export zoo) and pass:
    # stop before anything runs, with one line naming it.
    if in_ci() and not SHARED_CIFAR.exists() and not hasattr(config, "workerinput"):
        raise pytest.UsageError(f"CI=true and the shared CIFAR-10 copy is missing: {SHARED_CIFAR} (the tests of "
                                "accuracy, export and the gate need it; see ../shared/data/cifar10/README.md)")


# The suite runs on two pytest-xdist workers (pyproject's addopts: -n 2): one machine's tests are mostly one
# busy thread (imports, graph building, Ray starting processes), and a sampled module ran its two cores 61% busy.
# Each module runs whole on one worker (its module fixtures, its one Ray start); these run on one worker
# together, in this order:
GROUPS = {
    # the session's accuracy-regression run and its export (regression_run, full_export: built once)
    "regression": ("test_accuracy", "test_export", "test_gate", "test_train_ray", "test_targets"),
    # clusters of two worker nodes each (test_cluster's, benchmarks/scaling.py's), on the same worker-port ranges
    "nodes": ("test_cluster", "test_scaling"),
}
# Longest first (module totals of a suite run on two workers, 2026-11-30), so that the two workers finish
# together; a module not named here runs after these.
LONGEST_FIRST = ("regression", "nodes", "test_export_zoo", "test_own_data", "test_keras3", "test_failures",
                 "test_ingest", "test_qat_graph", "test_tfmot_given", "test_recipes", "test_k8s", "test_data",
                 "test_tiny")


def module_of(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


def group_of(nodeid: str) -> str:
    module = module_of(nodeid)
    return next((g for g, modules in GROUPS.items() if module in modules), module)


def pytest_collection_modifyitems(config, items):
    # A module that reads the regression run outside its group would build it again on the other worker (test_targets
    # did: 163 s). Read from what the tests ask for, not kept by hand alone.
    readers = {module_of(item.nodeid) for item in items if "regression_run" in item.fixturenames}
    if readers - set(GROUPS["regression"]):
        raise pytest.UsageError(f"tests/conftest.py: GROUPS['regression'] lacks "
                                f"{sorted(readers - set(GROUPS['regression']))}, which read regression_run")
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))  # stable: a module's own order kept


DEFAULT_WORKERS = 2  # CI's and the development machine's cores


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The suite's default layout, set here rather than in pyproject's addopts (where ``-n`` makes pytest without
    pytest-xdist stop at "unrecognized arguments"): with xdist loaded and no ``-n`` given, DEFAULT_WORKERS workers;
    with workers and no ``--dist`` given, whole modules (``loadscope``, pytest_xdist_make_scheduler). ``-n 0``,
    ``-p no:xdist``, ``--pdb`` and ``-s`` run in this one process; a ``--dist`` named on the command line is xdist's
    own (the shared fixtures are then built on each worker that needs them). Runs before xdist's own hook."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput") \
            or os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    interactive = config.getoption("usepdb", False) or config.getoption("capture", "fd") == "no"
    if config.option.numprocesses is None and not interactive:
        config.option.numprocesses = DEFAULT_WORKERS
    if config.option.numprocesses and config.option.dist == "no" and not config.option.distload:
        config.option.dist = "loadscope"
    return None


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: no error where it is not loaded
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadscope`` (the default here): xdist's scheduler for whole modules, with GROUPS' modules
    as one unit, handed out in collection order (LONGEST_FIRST). Any other ``--dist`` is xdist's own. (Not xdist's
    --dist loadgroup: it marks the groups in the tests' node ids, which pytest 9.2 no longer lets it change, and
    it then spread every test on its own: pytest-dev/pytest-xdist#1386.)"""
    if config.option.dist != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # xdist 3.8 sorts scopes by test count unless told not to; 3.6 does not

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ModuleGroups(config, log)


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    return require_shared_cifar()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One decoded-array cache for the whole session, both xdist workers' (never inside ../shared, which is
    read-only in CI). Its files are written whole and renamed into place, so two writers of one file are safe."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder above the workers'
    (root / "cache").mkdir(exist_ok=True)
    return str(root / "cache")


def make_arrays(n_train: int = 50, n_test: int = 20, num_classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, size=(n_train, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)
    y_train = np.arange(n_train) % num_classes
    y_test = np.arange(n_test) % num_classes
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def write_python_batches(folder: Path, arrays, label_names=CIFAR_CLASSES) -> Path:
    """The official cifar-10-batches-py layout: 5 train batches, a test batch, batches.meta."""
    x_train, y_train, x_test, y_test = arrays
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, x, y):
        data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(v) for v in y], b"batch_label": name.encode()}, f)

    for i, (xs, ys) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5)), 1):
        dump(f"data_batch_{i}", xs, ys)
    dump("test_batch", x_test, y_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in label_names]}, f)
    return folder


def write_image_tree(root: Path, arrays, class_names=CIFAR_CLASSES, fmt: str = "png") -> Path:
    """train/<class>/NNNN.png and test/<class>/NNNN.png (PNG is lossless, so arrays compare exactly)."""
    from PIL import Image

    x_train, y_train, x_test, y_test = arrays
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        for c in class_names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (x, y) in enumerate(zip(xs, ys)):
            Image.fromarray(x).save(root / split / class_names[y] / f"{i:04d}.{fmt}")
    return root


def tar_folder(src: Path, dst: Path, arcname: str | None = None) -> Path:
    mode = "w:gz" if dst.name.endswith(".gz") else "w"
    with tarfile.open(dst, mode) as tar:
        if arcname is None:
            for child in sorted(src.iterdir()):
                tar.add(child, arcname=child.name)
        else:
            tar.add(src, arcname=arcname)
    return dst


def sorted_by_label(x, y):
    """Image-tree loaders return images grouped by class; order the reference the same way."""
    order = np.argsort(y, kind="stable")
    return x[order], y[order]


@pytest.fixture(scope="session")
def tiny_tree_tgz(tmp_path_factory) -> Path:
    """A small but learnable class-folder .tar.gz: each class is a distinct colour plus noise."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, size=(10, 3))

    def make(n):
        y = np.arange(n) % 10
        x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 25, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
        return x, y

    x_train, y_train = make(640)
    x_test, y_test = make(200)
    tree = write_image_tree(root / "tree", (x_train, y_train, x_test, y_test))
    return tar_folder(tree, root / "tiny.tar.gz")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, a bucket, and the standard AWS_* variables that reach it."""
    boto3 = pytest.importorskip("boto3")
    from benchmarks.localcluster import free_port  # (the repository's, imported when a test needs it)

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"moto server did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.3)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"env": env, "url": url, "client": client}
    finally:
        server.terminate()
        server.wait(timeout=30)


def registered_epoch(read) -> int:
    """The epoch of the latest checkpoint Ray Train's controller has registered, 0 for none: read from the run's
    checkpoint_manager_snapshot.json, which the controller writes when it registers one (a report reaches it on its
    next poll of the workers) and a resumed run restores from. ``read()``: the file's text, or None while absent."""
    try:
        text = read()
        latest = json.loads(text)["latest_checkpoint_result"] if text else None
    except (OSError, ValueError, KeyError):  # absent, or caught half-written
        return 0
    return int((latest or {}).get("metrics", {}).get("epoch", 0))


def wait_for_registered_epoch(read, epoch: int, proc=None, timeout: float = 180) -> int:
    """Wait until Ray Train has registered the checkpoint of ``epoch`` or a later one (registered_epoch), while
    ``proc`` (the driver) runs; returns that epoch. An event, not a clock: a poll can come late on a busy machine."""
    deadline = time.monotonic() + timeout
    while (done := registered_epoch(read)) < epoch:
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise AssertionError(f"no checkpoint of epoch {epoch} registered (latest: {done}) within {timeout:.0f} s")
        time.sleep(0.1)
    return done


def local_snapshot(storage_path: Path, name: str):
    """registered_epoch's reader for a run stored in a local folder."""
    path = Path(storage_path) / name / "checkpoint_manager_snapshot.json"
    return lambda: path.read_text() if path.exists() else None


def s3_snapshot(s3, prefix: str):
    """registered_epoch's reader for a run stored in the s3 fixture's bucket under ``prefix`` (its name's folder)."""
    def read():
        try:
            return s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint_manager_snapshot.json")["Body"].read()
        except s3["client"].exceptions.NoSuchKey:
            return None
    return read


def s3_json(s3, key):
    return json.loads(s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read())


def s3_keys(s3, prefix):
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def ray_node():
    """One single-node Ray cluster for the session (`ray start --head` with this machine's CPUs), unadvertised: a
    plain ray.init() elsewhere still starts its own Ray, as on a user's laptop. Yields the variables that join it."""
    from benchmarks.localcluster import LocalCluster

    # With a dashboard: Ray Train's placement-group cleaner asks the state API, which the dashboard serves, about
    # the run every second; without one every run's log filled with "Failed to query Ray Train Controller actor
    # state", and on a busy machine its stop timed out with a traceback in the run's output (2026-11-30).
    with LocalCluster(nodes=0, cpus_per_node=0, head_cpus=os.cpu_count() or 1, advertise=False,
                      dashboard=True) as cluster:
        yield {k: v for k, v in cluster.env.items() if k != "PATH" and os.environ.get(k) != v}


@pytest.fixture(scope="module")
def joined_ray_node(ray_node):
    """Every jobs/train.py the module runs joins ray_node (RAY_ADDRESS and its token in the environment it
    inherits) instead of starting and stopping a Ray of its own, about 8 s each on CI's two cores. For modules
    whose subject is not Ray's start (test_train_ray keeps the laptop path, a local Ray per run)."""
    saved = {k: os.environ.get(k) for k in ray_node}
    os.environ.update(ray_node)
    yield ray_node
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def regression_run(tmp_path_factory, cache_dir) -> Path:
    """The accuracy regression run, done once per session: jobs/train.py as users run it (the default layout:
    one worker owning the node's CPUs), seed_cnn on the full training split of the shared copy, 4 epochs of the
    default recipe (two workers on the same two cores trained about half as many images/s, and the tutorial's
    batch 32 took 129 s for 3 epochs). Its model also feeds the export tests. Two workers taking part in every
    step: tests/test_failures.py's Ctrl-C run."""
    import subprocess
    import sys

    data = require_shared_cifar()
    tmp = tmp_path_factory.mktemp("regression")
    out = tmp / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(data), "--model", "seed_cnn", "--epochs", "4",
         "--output", str(out), "--storage-path", str(tmp / "ray"), "--name", "regression",
         "--cache-dir", cache_dir, "--no-export"],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (tmp / "stdout.txt").write_text(proc.stdout)  # for the tests that read the progress lines
    return out


@pytest.fixture(scope="session")
def full_export(regression_run, tmp_path_factory, cache_dir):
    """`python -m export` with every default variant on the regression model and the real test split (the CI
    gate's tests take it as their baseline)."""
    out = tmp_path_factory.mktemp("export") / "out"
    proc = export_in_process("export", [str(regression_run / "model.keras"), "--data", str(require_shared_cifar()),
                                        "--out", str(out), "--cache-dir", cache_dir, "--qat-epochs", "1",
                                        # QAT on all 45,000 training images took 48 of the export's 73 s
                                        "--qat-images", "5000"])
    return out, proc


EXPORT_FORMATS = {"export": ("tflite", "onnx"), "export.tflite": ("tflite",), "export.onnx": ("onnx",)}


def export_in_process(module: str, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as its main() in this process (TensorFlow is imported already; the export's
    own worker process still builds the variants): exit status, stdout and stderr as a process would give
    them. tests/test_export.py keeps one case through a real process."""
    from export.run.cli import main

    return main_in_process(lambda: main(args, formats=EXPORT_FORMATS[module], prog=f"python -m {module}"),
                           [module, *args])


def train_in_process(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python jobs/train.py ARGS`` as its main() in this process, run from ``cwd``: for refusals, which end
    before any worker starts (a fresh process would spend its seconds importing TensorFlow again).
    tests/test_own_data.py keeps a refusal through a real process."""
    job = train_job()
    return main_in_process(lambda: job.main(args), ["jobs/train.py", *args], cwd)


@functools.cache
def train_job():
    """jobs/train.py as a module, loaded once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def main_in_process(main, argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A command's ``main()`` called here (from ``cwd`` when given), as a CompletedProcess: its exit status
    (argparse's SystemExit included), stdout and stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    where = contextlib.chdir(cwd) if cwd else contextlib.nullcontext()
    with where, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main()
        except SystemExit as e:  # argparse: --help, or a bad option
            status = e.code
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())
