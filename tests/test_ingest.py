"""--ingest stream (Ray Data reads, decodes and shards the files) and --data s3:// (a class-folder tree
in a bucket on a real local S3 endpoint, moto's server), against the in-memory path on real CIFAR-10
images."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import BUCKET, ROOT, require_shared_cifar

TRAIN = str(ROOT / "jobs" / "train.py")
pytestmark = pytest.mark.usefixtures("joined_ray_node")  # one Ray for the module's runs
PER_CLASS = {"train": 200, "test": 100}


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory) -> Path:
    """The first 200 train and 100 test JPEGs of each class of the shared CIFAR-10 copy, as a folder tree."""
    src = require_shared_cifar()
    root = tmp_path_factory.mktemp("cifar_subset")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(src) as tar:
        for m in tar:
            parts = m.name.lstrip("./").split("/")
            if not m.isfile() or len(parts) < 3 or parts[-3] not in PER_CLASS:
                continue
            split, cls = parts[-3], parts[-2]
            if taken.get((split, cls), 0) >= PER_CLASS[split]:
                continue
            taken[(split, cls)] = taken.get((split, cls), 0) + 1
            target = root / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
    assert sum(taken.values()) == 10 * sum(PER_CLASS.values())
    return root


@pytest.fixture(scope="module")
def cifar_bucket(s3, cifar_tree):
    """The same tree uploaded to s3://runs/cifar-subset/."""
    for p in sorted(cifar_tree.rglob("*.jpg")):
        s3["client"].put_object(Bucket=BUCKET, Key=f"cifar-subset/{p.relative_to(cifar_tree)}", Body=p.read_bytes())
    return f"s3://{BUCKET}/cifar-subset/"


def train(args, env=None, timeout=900):
    import os

    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


COMMON = ["--num-workers", "2", "--recipe", "adam", "--epochs", "2", "--batch-size", "64", "--no-export"]


def _open(data, tmp_path, monkeypatch, env=None, **options):
    """toolkit.data.open_data as jobs/train.py calls it (no training: what it decides and loads)."""
    from toolkit.config import TrainConfig
    from toolkit.data import open_data

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return open_data(TrainConfig(data=data, cache_dir=str(tmp_path / "cache"), **options))


def test_streaming_from_a_bucket_trains_on_what_the_memory_path_would_load(cifar_bucket, cifar_tree, s3, tmp_path,
                                                                            cache_dir, monkeypatch):
    """Training on a bucket, streamed: two workers each read their shard through Ray Data, and the run sees the
    tree the in-memory path would load (its class counts, decoded in this process); that the images themselves
    are the same, pixel for pixel, is test_streamed_images_are_the_in_memory_images_pixel_for_pixel's."""
    proc = train(["--data", cifar_bucket, "--ingest", "stream", *COMMON, "--cache-dir", cache_dir,
                  "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray")], env=s3["env"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ingest: stream" in proc.stdout and "read and decoded by Ray Data" in proc.stdout
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    mem = _open(str(cifar_tree), tmp_path, monkeypatch, ingest="memory")
    assert m["ingest"] == "stream" and mem.ingest == "memory"
    assert m["num_train_images"] == len(mem.x_train) == 2000
    assert m["class_counts"] == mem.class_counts()
    assert len(m["workers"]) == 2 and all(w["batches"] > 0 for w in m["workers"])
    # It learns (chance is 0.10). Streamed and in-memory accuracies are not compared: the same images in another
    # order gave 0.33 against 0.39 after 4 epochs on 2,000 images (measured once), so a window wide enough for
    # that noise proves nothing.
    assert m["test_accuracy"] > 0.2, m["test_accuracy"]


def test_memory_ingest_from_a_bucket_downloads_once(cifar_bucket, cifar_tree, s3, tmp_path, monkeypatch, capsys):
    from toolkit.data import Dataset, load_dataset

    ds = _open(cifar_bucket, tmp_path, monkeypatch, s3["env"], ingest="memory", limit=500)
    assert isinstance(ds, Dataset) and ds.source == cifar_bucket and len(ds.x_train) == 500
    assert "ingest: memory" in capsys.readouterr().out
    trees = list((tmp_path / "cache" / "trees").iterdir())
    assert len(trees) == 1 and len(list(trees[0].rglob("*.jpg"))) == 500 + 500, "only the --limit sample"
    local = load_dataset(str(cifar_tree), str(tmp_path / "local-cache")).limited(500)
    assert local.class_names == ds.class_names
    # The same seeded 500 images of each split, pixel for pixel, as from the local copy of the tree.
    np.testing.assert_array_equal(ds.x_train, local.x_train)
    np.testing.assert_array_equal(ds.y_train, local.y_train)
    np.testing.assert_array_equal(ds.x_test, local.x_test)
    again = _open(cifar_bucket, tmp_path, monkeypatch, s3["env"], ingest="memory", limit=500)
    assert list((tmp_path / "cache" / "trees").iterdir()) == trees and (again.x_train == ds.x_train).all()


def test_auto_streams_when_the_arrays_exceed_the_budget(cifar_tree, tmp_path, monkeypatch, capsys):
    from toolkit.data import Dataset
    from toolkit.data import Stream

    stream = _open(str(cifar_tree), tmp_path, monkeypatch, memory_budget=1e-7)
    assert isinstance(stream, Stream) and stream.image_shape == (32, 32, 3)
    assert stream.class_counts()["train"]["cat"] == PER_CLASS["train"]
    assert "ingest: stream (decoded arrays 0.01 GiB" in capsys.readouterr().out
    assert isinstance(_open(str(cifar_tree), tmp_path, monkeypatch), Dataset), "the default budget holds it"


def test_stream_needs_a_tree_and_a_readable_bucket(s3, tmp_path):
    data = require_shared_cifar()
    proc = train(["--data", str(data), "--ingest", "stream", "--output", str(tmp_path / "o")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {data}: --ingest stream reads class-folder trees (a folder or an s3:// prefix); unpack the "
        "archive, or use --ingest memory"]
    proc = train(["--data", "s3://no-such-bucket/cifar/", "--output", str(tmp_path / "o")], env=s3["env"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: s3://no-such-bucket/cifar/: ") and "bucket" in line.lower(), line


def _as_set(x, y) -> list:
    """Images with their labels, order aside (Ray Data may deliver blocks in any order)."""
    return sorted((int(label), img.tobytes()) for img, label in zip(x, y))


def test_streamed_images_are_the_in_memory_images_pixel_for_pixel(cifar_tree, tmp_path, monkeypatch):
    """What Ray Data delivers when streaming is what the in-memory path decodes: the test split through Ray
    Data's tasks, image for image and label for label, and the same seeded validation split."""
    import ray

    from toolkit.data import Dataset, Stream
    from toolkit.data.decode import decode_image

    mem = _open(str(cifar_tree), tmp_path, monkeypatch, ingest="memory")
    stream = _open(str(cifar_tree), tmp_path, monkeypatch, ingest="stream")
    assert isinstance(mem, Dataset) and isinstance(stream, Stream)
    # The validation split: the same seeded files, in the same order, as the arrays' split.
    _, _, val_paths, val_labels = stream.train_val(0.1, 0)
    _, _, x_val, y_val = mem.train_val(0.1, 0)
    np.testing.assert_array_equal(val_labels, y_val)
    np.testing.assert_array_equal(np.stack([decode_image(stream.tree.read(p), p) for p in val_paths]), x_val)
    ray.init(logging_level="ERROR", log_to_driver=False)  # the module's Ray node (joined_ray_node)
    try:
        batches = list(stream.iter_test(batch_size=256))
    finally:
        ray.shutdown()
    x, y = np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])
    assert x.shape == mem.x_test.shape and x.dtype == np.uint8
    assert _as_set(x, y) == _as_set(mem.x_test, mem.y_test)
