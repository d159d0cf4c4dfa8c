"""Every data source format loads the same arrays; every bad source fails with one clear line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import (CIFAR_CLASSES, ROOT, make_arrays, sorted_by_label, tar_folder, write_image_tree,
                      write_python_batches)
from toolkit.data import DataError, load_dataset, make_train_dataset, split_validation


def assert_same(ds, arrays, class_names=CIFAR_CLASSES, grouped=False):
    x_train, y_train, x_test, y_test = arrays
    if grouped:
        x_train, y_train = sorted_by_label(x_train, y_train)
        x_test, y_test = sorted_by_label(x_test, y_test)
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.class_names == tuple(class_names)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape[1:] == (32, 32, 3)


@pytest.fixture
def arrays():
    return make_arrays()


def test_python_batches_folder(tmp_path, arrays):
    folder = write_python_batches(tmp_path / "cifar-10-batches-py", arrays)
    assert_same(load_dataset(str(folder), str(tmp_path / "c")), arrays)
    # The folder that holds cifar-10-batches-py/ works too.
    assert_same(load_dataset(str(tmp_path), str(tmp_path / "c2")), arrays)


def test_python_batches_archive(tmp_path, arrays):
    folder = write_python_batches(tmp_path / "src" / "cifar-10-batches-py", arrays)
    archive = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz", arcname="cifar-10-batches-py")
    assert_same(load_dataset(str(archive), str(tmp_path / "c")), arrays)


@pytest.mark.parametrize("packing", ["folder", "tar", "tar.gz", "tar.gz-with-top-folder"])
def test_image_tree(tmp_path, arrays, packing):
    tree = write_image_tree(tmp_path / "tree", arrays)
    if packing == "folder":
        src = tree
    elif packing == "tar":
        src = tar_folder(tree, tmp_path / "tree.tar")
    elif packing == "tar.gz":
        src = tar_folder(tree, tmp_path / "tree.tar.gz")
    else:
        src = tar_folder(tree, tmp_path / "tree.tar.gz", arcname="cifar10")
    assert_same(load_dataset(str(src), str(tmp_path / "c")), arrays, grouped=True)


def test_image_tree_jpeg_and_custom_classes_sorted(tmp_path):
    x_train, y_train, x_test, y_test = make_arrays(n_train=12, n_test=6, num_classes=3)
    # Flat colours survive JPEG almost exactly (random noise would not).
    x_train[:] = x_train[:, :1, :1, :]
    x_test[:] = x_test[:, :1, :1, :]
    arrays = (x_train, y_train, x_test, y_test)
    names = ("zebra", "apple", "mango")  # not CIFAR-10's: class names are sorted
    tree = write_image_tree(tmp_path / "tree", arrays, class_names=names, fmt="jpg")
    ds = load_dataset(str(tree), None)
    assert ds.class_names == ("apple", "mango", "zebra")
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3)
    # JPEG is lossy: labels follow the folders, pixels are close to the originals.
    assert sorted(np.bincount(ds.y_train)) == [4, 4, 4]
    first_zebra = arrays[0][arrays[1] == 0][0].astype(int)
    got = ds.x_train[ds.y_train == ds.class_names.index("zebra")][0].astype(int)
    assert np.abs(got - first_zebra).mean() < 8


def test_image_tree_of_another_size_and_grayscale(tmp_path):
    """Any one image size loads as it is; grayscale (L) images load as one channel."""
    from PIL import Image

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(12, 40, 48), dtype=np.uint8)  # 48 wide, 40 high
    for i, img in enumerate(x):
        split = "train" if i < 8 else "test"
        d = tmp_path / "tree" / split / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(d / f"{i:02d}.png")
    ds = load_dataset(str(tmp_path / "tree"))
    assert ds.x_train.shape == (8, 40, 48, 1) and ds.x_test.shape == (4, 40, 48, 1)
    assert ds.class_names == ("a", "b")
    got = {tuple(v.ravel()[:5]) for v in ds.x_train}
    assert {tuple(x[i].ravel()[:5]) for i in range(8)} == got


def test_cache_is_written_reused_and_keyed_by_source(tmp_path, arrays, monkeypatch):
    import toolkit.data.memory as memory

    tree = write_image_tree(tmp_path / "tree", make_arrays(n_train=400, n_test=100))
    cache = tmp_path / "cache"
    first = load_dataset(str(tree), str(cache))
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*")), "no temporary files left behind"
    # The hit itself: a second load reads the cache and never lists or decodes the tree.
    decoded = []
    real = memory.decode_tree
    monkeypatch.setattr(memory, "decode_tree", lambda *a, **k: decoded.append(a) or real(*a, **k))
    second = load_dataset(str(tree), str(cache))
    assert decoded == [], "the second load decoded the images again: no cache hit"
    np.testing.assert_array_equal(first.x_train, second.x_train)
    # A changed source gets a new cache entry rather than stale arrays.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tree / "train" / "cat" / "extra.png")
    third = load_dataset(str(tree), str(cache))
    assert len(third.x_train) == len(first.x_train) + 1
    assert len(list(cache.glob("*.npz"))) == 2


def test_corrupt_cache_is_rebuilt(tmp_path, arrays):
    folder = write_python_batches(tmp_path / "b", arrays)
    cache = tmp_path / "cache"
    load_dataset(str(folder), str(cache))
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"garbage")
    assert_same(load_dataset(str(folder), str(cache)), arrays)


# -- bad sources ------------------------------------------------------------------------------


def _bad(tmp_path, arrays, case):
    """Build one bad source; return (path, substring the error must contain)."""
    if case == "missing path":
        return tmp_path / "nope", "no such file or directory"
    if case == "missing split":
        tree = write_image_tree(tmp_path / "tree", arrays)
        import shutil
        shutil.rmtree(tree / "test")
        return tree, "missing split 'test/'"
    if case == "empty class folder":
        tree = write_image_tree(tmp_path / "tree", arrays)
        for f in (tree / "train" / "dog").iterdir():
            f.unlink()
        return tree, "train/dog/ has no images"
    if case == "wrong size image":
        tree = write_image_tree(tmp_path / "tree", arrays)
        Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tree / "train" / "cat" / "big.png")
        return tree, "train/cat/big.png: image is 28x28 RGB but train/airplane/"
    if case == "grayscale image":
        tree = write_image_tree(tmp_path / "tree", arrays)
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tree / "test" / "cat" / "gray.png")
        return tree, "test/cat/gray.png: image is 32x32 grayscale but train/airplane/"
    if case == "rgba image":
        tree = write_image_tree(tmp_path / "tree", arrays)
        Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(tree / "train" / "dog" / "alpha.png")
        return tree, "train/dog/alpha.png: image is 32x32 RGBA; expected RGB or grayscale"
    if case == "undecodable image":
        tree = write_image_tree(tmp_path / "tree", arrays)
        (tree / "train" / "frog" / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
        return tree, "train/frog/broken.jpg: cannot decode image"
    if case == "truncated archive":
        tree = write_image_tree(tmp_path / "tree", make_arrays(n_train=300, n_test=50))
        archive = tar_folder(tree, tmp_path / "t.tar.gz")
        raw = archive.read_bytes()
        archive.write_bytes(raw[: len(raw) // 2])
        return archive, "truncated or corrupt archive"
    if case == "label out of range":
        x_train, y_train, x_test, y_test = arrays
        y_train = y_train.copy()
        y_train[7] = 12
        folder = write_python_batches(tmp_path / "b", (x_train, y_train, x_test, y_test))
        return folder, "train label 12 at index 7 is out of range 0..9"
    if case == "missing batch file":
        folder = write_python_batches(tmp_path / "b", arrays)
        (folder / "data_batch_3").unlink()
        return folder, "missing data_batch_3"
    if case == "not a dataset":
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "readme.txt").write_text("hi")
        return tmp_path / "x", "not a recognised dataset"
    if case == "plain file":
        (tmp_path / "data.csv").write_text("1,2,3\n")
        return tmp_path / "data.csv", "not a folder or a .tar/.tar.gz archive"
    raise AssertionError(case)


BAD_CASES = ["missing path", "missing split", "empty class folder", "wrong size image", "grayscale image", "rgba image",
             "undecodable image", "truncated archive", "label out of range", "missing batch file",
             "not a dataset", "plain file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_source_raises_one_clear_error(tmp_path, arrays, case):
    path, expected = _bad(tmp_path, arrays, case)
    with pytest.raises(DataError) as e:
        load_dataset(str(path), str(tmp_path / "cache"))
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg
    assert str(path.name) in msg or str(path) in msg
    assert not list((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


@pytest.mark.parametrize("case", ["missing path", "wrong size image", "truncated archive"])
def test_bad_source_cli_exit_2_one_line(tmp_path, arrays, case):
    path, expected = _bad(tmp_path, arrays, case)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(path), "--output", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "no output written for bad input"


# -- splits and pipelines -------------------------------------------------------------------


def test_validation_split_is_seeded_and_disjoint():
    ids = np.arange(1000)
    a = split_validation(ids, ids, 0.1, seed=3)
    b = split_validation(ids, ids, 0.1, seed=3)
    c = split_validation(ids, ids, 0.1, seed=4)
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[2], c[2])
    assert len(a[2]) == 100 and len(a[0]) == 900
    assert not set(a[0]) & set(a[2])
    assert sorted(np.concatenate([a[0], a[2]])) == list(ids)


def test_train_pipeline_shards_are_disjoint_and_cover_the_epoch():
    n, shards = 64, 2
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)  # the image's id, in a pixel augmentation-free runs keep
    y = np.arange(n) % 10
    seen = []
    for k in range(shards):
        ds = make_train_dataset(x, y, 8, num_classes=10, augment=False, seed=0, num_shards=shards, shard_index=k)
        ids = [int(v) for xb, _ in ds.take(n // shards // 8) for v in xb[:, 0, 0, 0].numpy()]
        seen.append(ids)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(n))


def test_augmentation_keeps_shape_and_changes_images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(64) % 10
    ds = make_train_dataset(x, y, 64, num_classes=10, augment=True, seed=0)
    xb, yb = next(iter(ds))
    assert xb.shape == (64, 32, 32, 3) and xb.dtype.name == "uint8" and yb.shape == (64, 10)
    # Crops and flips move pixels: most augmented images match no original exactly.
    changed = sum(not any(np.array_equal(a, b) for b in x) for a in xb.numpy())
    assert changed > 32


def test_augmentation_follows_the_seed_alone():
    """A batch's crops and flips follow from the run's seed, however many threads tf.data's parallel map runs
    on (stateful random ops drew in the threads' order: a seeded 4-epoch run ended 55.96-61.14% on a busy
    machine); another seed, other crops."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(64) % 10

    def batches(seed, threads):
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        ds = make_train_dataset(x, y, 16, num_classes=10, augment=True, seed=seed).with_options(options)
        return [xb.numpy() for xb, _ in ds.take(12)]  # three epochs

    one = batches(0, 1)
    assert all(np.array_equal(a, b) for a, b in zip(one, batches(0, 8)))
    assert not any(np.array_equal(a, b) for a, b in zip(one, batches(1, 8)))


def test_crop_flip_matches_pad_crop_flip_reference():
    """The one-gather augmentation equals numpy's reflect-pad, crop and mirror, offset by offset."""
    from toolkit.data import crop_flip

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    oy = rng.integers(-4, 5, 24).astype(np.int32)
    ox = rng.integers(-4, 5, 24).astype(np.int32)
    flip = rng.random(24) < 0.5
    got = crop_flip(x, oy, ox, flip).numpy()
    for i in range(24):
        padded = np.pad(x[i], ((4, 4), (4, 4), (0, 0)), mode="reflect")
        want = padded[4 + oy[i]:36 + oy[i], 4 + ox[i]:36 + ox[i]]
        np.testing.assert_array_equal(got[i], want[:, ::-1] if flip[i] else want)
    # Non-square, single-channel images too (any dataset shape).
    g = rng.integers(0, 256, (3, 8, 12, 1), dtype=np.uint8)
    out = crop_flip(g, np.array([0, 2, -3], np.int32), np.array([0, -1, 5], np.int32), np.array([False, True, False]))
    np.testing.assert_array_equal(out.numpy()[0], g[0])
    np.testing.assert_array_equal(out.numpy()[2], np.pad(g[2], ((3, 3), (5, 5), (0, 0)), mode="reflect")[0:8, 10:22])


def test_image_spec_crop_keeps_the_centre_and_stretch_keeps_everything():
    from PIL import Image

    from toolkit.data import ImageSpec

    # 40 high x 80 wide: left half black, right half white, a red 10x10 square in the centre
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, 40:] = 255
    a[15:25, 35:45] = (255, 0, 0)
    crop = ImageSpec((20, 20), "crop").apply(Image.fromarray(a), "x")
    stretch = ImageSpec((20, 20), "stretch").apply(Image.fromarray(a), "x")
    assert crop.shape == stretch.shape == (20, 20, 3)
    # crop: shorter side 40 -> 20 (scale 0.5), the centre 20x20 of the 20x40: the red square fills its middle
    assert crop[10, 10][0] > 200 and crop[10, 10][1] < 60
    assert crop[0, 0].mean() < 60 and crop[0, 19].mean() > 200  # black left edge, white right edge of the centre
    # stretch: the whole width squeezed in: half black, half white, the square now 5 wide
    assert stretch[:, :8].mean() < 40 and stretch[:, 12:].mean() > 200


def test_image_spec_converts_modes_only_when_asked():
    from PIL import Image

    from toolkit.data import DataError, ImageSpec

    rgba = Image.fromarray(np.full((8, 8, 4), 200, np.uint8), "RGBA")
    palette = Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).convert("P")
    with pytest.raises(DataError, match=r"8x8 RGBA; expected RGB or grayscale .*--channels 3 or 1"):
        ImageSpec().apply(rgba, "a.png")
    assert ImageSpec(channels=3).apply(rgba, "a.png").shape == (8, 8, 3)
    assert ImageSpec(channels=1).apply(palette, "p.png").shape == (8, 8, 1)
    assert abs(int(ImageSpec(channels=3).apply(palette, "p.png")[0, 0, 0]) - 90) <= 20  # the web palette's nearest grey
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ImageSpec(channels=2)
    with pytest.raises(ValueError, match="resize must be one of crop, stretch"):
        ImageSpec(resize="pad")


def test_image_size_option_parses_h_and_hxw():
    from toolkit.data import parse_image_size

    assert parse_image_size("96") == (96, 96) and parse_image_size("64x48") == (64, 48)
    with pytest.raises(ValueError, match="H or HxW"):
        parse_image_size("64x")


def test_a_val_folder_becomes_the_validation_split(tmp_path):
    from conftest import make_arrays, write_image_tree
    from toolkit.data import load_dataset

    arrays = make_arrays(n_train=30, n_test=20)
    root = write_image_tree(tmp_path / "tree", arrays)
    # val/ holds copies of the test images: same classes
    import shutil

    shutil.copytree(root / "test", root / "val")
    ds = load_dataset(str(root), str(tmp_path / "cache"))
    assert ds.x_val is not None and len(ds.x_val) == 20 and ds.class_counts()["val"]["cat"] == 2
    again = load_dataset(str(root), str(tmp_path / "cache"))  # through the cache
    assert np.array_equal(again.x_val, ds.x_val) and np.array_equal(again.y_val, ds.y_val)
    small = ds.limited(5)
    assert len(small.x_val) == 5
