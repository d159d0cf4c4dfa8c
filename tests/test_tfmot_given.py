"""Models tfmot has wrapped already, as its users hand them over (toolkit.tfmot): pruned and saved before
strip_pruning, clustered and saved before strip_clustering, prepared for quantisation-aware training and saved as
tfmot's guide saves it (.h5). Each is trained for real on the tiny colour tree, and exported with no
--custom-objects (tfmot is the toolkit's own dependency)."""

from __future__ import annotations

import json

import pytest

from conftest import export_in_process

SPARSITY, CLUSTERS = 0.5, 8


@pytest.fixture(scope="module")
def given(tmp_path_factory, tiny_tree_tgz, cache_dir):
    """{kind: saved path}: one small CNN (rescaling inside, as users write it), each kind's wrappers on its
    convolution and dense layers (tfmot's way for a model with layers it cannot wrap), trained two epochs."""
    import tensorflow_model_optimization as tfmot

    from toolkit.data import load_dataset
    from toolkit.tf import import_keras

    keras = import_keras()
    L = keras.layers
    ds = load_dataset(str(tiny_tree_tgz), cache_dir)
    tmp = tmp_path_factory.mktemp("tfmot")

    def base():
        keras.utils.set_random_seed(0)
        inp = keras.Input((32, 32, 3))
        h = L.MaxPooling2D(2)(L.Conv2D(8, 3, activation="relu")(L.Rescaling(1 / 255)(inp)))
        h = L.Dense(32, activation="relu")(L.Flatten()(h))
        return keras.Model(inp, L.Dense(10, activation="softmax")(h))

    def wrap(fn):
        return lambda layer: fn(layer) if type(layer).__name__ in ("Conv2D", "Dense") else layer

    schedule = tfmot.sparsity.keras.ConstantSparsity(SPARSITY, begin_step=0, frequency=1)
    pruned = keras.models.clone_model(base(), clone_function=wrap(
        lambda layer: tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)))
    clustered = keras.models.clone_model(base(), clone_function=wrap(
        lambda layer: tfmot.clustering.keras.cluster_weights(
            layer, number_of_clusters=CLUSTERS,
            cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.LINEAR)))
    qk = tfmot.quantization.keras
    qat = qk.quantize_apply(keras.models.clone_model(base(), clone_function=wrap(qk.quantize_annotate_layer)))
    paths = {}
    for kind, model, suffix, callbacks in (("pruned", pruned, ".keras", [tfmot.sparsity.keras.UpdatePruningStep()]),
                                           ("clustered", clustered, ".keras", []), ("qat", qat, ".h5", [])):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(ds.x_train, ds.y_train, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
        paths[kind] = tmp / f"{kind}{suffix}"
        model.save(paths[kind])
    return paths


def export(path, data, out, cache_dir, *extra):
    proc = export_in_process("export", [str(path), "--data", str(data), "--out", str(out), "--cache-dir", cache_dir,
                                        "--latency-runs", "5", "--micro-samples", "10", "--qat-epochs", "1", *extra])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return proc, report


@pytest.mark.parametrize("kind", ["pruned", "clustered"])
def test_a_pruned_or_clustered_model_is_stripped_and_exported(kind, given, tiny_tree_tgz, tmp_path, cache_dir):
    """tfmot's strip (exact), then every variant; the report gives each layer's sparsity or clusters, and each
    file's gzip size: the zeros or repeated values make the float32 file compress where a dense one does not."""
    proc, report = export(given[kind], tiny_tree_tgz, tmp_path / "out", cache_dir)
    assert report is not None and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == (0 if report["passed"] else 1)
    done = report["model_info"]["tfmot"]
    assert done["kind"] == kind and len(done["layers"]) == 3, done  # the convolution and the two dense layers
    for name, figure in done["layers"].items():
        if kind == "pruned":
            assert figure["sparsity"] == pytest.approx(SPARSITY, abs=0.01), (name, figure)
        else:
            assert 2 <= figure["clusters"] <= CLUSTERS, (name, figure)
    rows = {r["name"]: r for r in report["variants"]}
    assert all(rows[v]["status"] == "ok" for v in ("float32", "dynamic", "float16", "int8", "onnx_float32")), rows
    assert rows["float32"]["agreement"] >= 0.99  # the stripped model computes what the wrapped one does
    built = [r for r in rows.values() if r["status"] == "ok"]
    assert all(0 < r["gzip_bytes"] <= r["size_bytes"] for r in built), built
    assert rows["float32"]["gzip_bytes"] < (0.75 if kind == "pruned" else 0.5) * rows["float32"]["size_bytes"]
    assert f"The model as given was {kind} by tfmot" in (tmp_path / "out" / "report.md").read_text()


def test_a_quantisation_aware_model_is_exported_as_given(given, tiny_tree_tgz, tmp_path, cache_dir):
    """qat_int8 is the given model converted from the ranges it learned, with no second fine-tuning; the float
    variants and post-training int8 come from the model with the fake-quant taken out."""
    proc, report = export(given["qat"], tiny_tree_tgz, tmp_path / "out", cache_dir)
    assert report is not None and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["name"]: r for r in report["variants"]}
    q = rows["qat_int8"]
    assert q["status"] == "ok" and q["qat"]["as_given"] and q["qat"]["quantized_layers"] == 3, q
    assert q["qat"]["weighted_layers"] == 3, q
    assert "qat_int8: quantisation-aware model as given (3 of 3 layers with kernels quantised)" in proc.stdout
    assert "quantisation-aware fine-tuning" not in proc.stdout  # not trained again
    assert report["model_info"]["tfmot"]["kind"] == "qat"
    assert rows["float32"]["status"] == "ok" and rows["float32"]["agreement"] >= 0.99
    # The float model inside is the given one without its fake-quant: the int8 file learned with it agrees.
    assert q["agreement"] >= 0.9, q


def test_the_float_model_inside_a_quantisation_aware_one_has_its_weights_and_activations(given):
    """toolkit.tfmot.without_fake_quant, layer by layer: each wrapped layer's kernel and bias as the wrapper
    holds them, its own activation back (tfmot had put a QuantizeAwareActivation in its place), and no fake-quant
    left."""
    import numpy as np
    import tensorflow_model_optimization as tfmot

    from toolkit.tfmot import unwrap
    from toolkit.tf import import_keras

    with tfmot.quantization.keras.quantize_scope():
        qat = import_keras().models.load_model(given["qat"], compile=False)
    plain, kept, done = unwrap(qat)
    # (the convolution and the two dense layers; Keras numbers their names by the layers made before in the process)
    assert kept is qat and done["kind"] == "qat" and list(done["layers"].values()) == [{}, {}, {}], done
    assert not any("Quantize" in type(layer).__name__ for layer in plain.layers)
    wrappers = [layer for layer in qat.layers if type(layer).__name__ == "QuantizeWrapperV2"]
    for w in wrappers:
        if w.layer.name not in done["layers"]:
            continue
        inner = plain.get_layer(w.layer.name)
        weights = {v.name.split("/")[-1]: np.asarray(v) for v in w.weights}
        assert np.array_equal(np.asarray(inner.kernel), weights["kernel:0"]), inner.name
        assert np.array_equal(np.asarray(inner.bias), weights["bias:0"]), inner.name
        assert inner.activation.__name__ == w.layer.activation.activation.__name__, inner.name
    assert [plain.get_layer(n).activation.__name__ for n in done["layers"]] == ["relu", "relu", "softmax"]



@pytest.mark.parametrize("kind", ["pruned", "clustered", "qat"])
def test_a_tfmot_model_given_to_training_trains_as_its_plain_model(kind, given):
    """--model with a file tfmot wrapped, as a worker builds it (the driver's bytes, no --custom-objects): the
    plain model out of the wrappers (what the wrapped model computes, for pruned and clustered ones exactly; the QAT
    one without its fake-quant), and the one line the run prints about it."""
    import numpy as np
    import tensorflow_model_optimization as tfmot

    from toolkit.models import build_model, tfmot_note
    from toolkit.tf import import_keras
    from toolkit.tfmot import unwrap

    path = given[kind]
    model = build_model(str(path), (32, 32, 3), 10, content=path.read_bytes())
    assert not any(type(layer).__module__.startswith("tensorflow_model_optimization") for layer in model.layers)
    with tfmot.quantization.keras.quantize_scope(), tfmot.sparsity.keras.prune_scope(), \
            tfmot.clustering.keras.cluster_scope():
        wrapped = import_keras().models.load_model(path, compile=False)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    expected = (unwrap(wrapped)[0] if kind == "qat" else wrapped).predict(images, verbose=0)
    assert np.allclose(model.predict(images, verbose=0), expected, atol=1e-5)
    words = {"pruned": "pruned", "clustered": "clustered", "qat": "prepared for quantisation-aware training"}[kind]
    assert tfmot_note(str(path)) == (f"model: {path} was {words} by tfmot; its wrappers are taken out and the plain "
                                     "model trains (prune, cluster or prepare it again after training to keep that)")


def test_a_file_from_another_tfmot_is_one_line_before_any_work(given, tiny_tree_tgz, tmp_path, cache_dir):
    """The pruned file with its wrappers saved as a newer tfmot would (an argument the installed one does not know):
    one line naming the wrapper and the installed version, exit 2, nothing written, from the export and from
    training alike."""
    import zipfile

    from conftest import train_in_process

    newer = tmp_path / "pruned_newer.keras"
    with zipfile.ZipFile(given["pruned"]) as z:
        files = {n: z.read(n) for n in z.namelist()}
    files["config.json"] = files["config.json"].replace(b'"class_name": "PruneLowMagnitude", "config": {',
                                                        b'"class_name": "PruneLowMagnitude", "config": '
                                                        b'{"pruning_policy_v2": {"kind": "new"}, ')
    assert b"pruning_policy_v2" in files["config.json"]
    with zipfile.ZipFile(newer, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    import tensorflow_model_optimization as tfmot

    v = tfmot.__version__
    why = (f"tfmot's PruneLowMagnitude as saved cannot be read by the installed tfmot {v} (TypeError: ('Keyword "
           f"argument not understood:', 'pruning_policy_v2')): saved by another tfmot version? Save it with tfmot "
           f"{v}, or strip the wrappers before saving")
    proc, _ = export(newer, tiny_tree_tgz, tmp_path / "out", cache_dir)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {newer}: {why}" and not (tmp_path / "out").exists()
    proc = train_in_process(["--data", str(tiny_tree_tgz), "--model", str(newer), "--epochs", "1", "--output",
                             str(tmp_path / "trained")])
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --model {newer}: cannot be loaded ({why})"
    assert not (tmp_path / "trained").exists()
