"""The graph tfmot is given (export.qat.graph), Keras 3 models rebuilt in tf_keras (toolkit.keras3) and
what a .tflite file runs where (export.ops): real tf_keras, Keras 3, tfmot and LiteRT, on the export zoo's
architectures as their users write them, untrained but with batch norms given real-looking statistics (a
fold with the identity's statistics proves nothing)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import export_zoo, zoo_modern  # noqa: E402
from export.tflite.ranges import CLIP_PERCENTILES  # noqa: E402

IMAGES = np.random.default_rng(0).uniform(0, 255, (32, 32, 32, 3)).astype(np.float32)


def with_statistics(model):
    """Every BatchNormalization given random scale, shift, mean and variance."""
    rng = np.random.default_rng(1)
    for layer in getattr(model, "layers", []):
        if type(layer).__name__ == "BatchNormalization":
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, g.shape), rng.normal(0, 0.5, b.shape), rng.normal(0, 0.5, m.shape),
                               rng.uniform(0.2, 3, v.shape)])
    return model


def same_outputs(a, b, x=IMAGES):
    np.testing.assert_allclose(a.predict(x, verbose=0), b.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


def kinds(model) -> set:
    return {type(layer).__name__ for layer in model.layers}


@pytest.mark.parametrize("factory", [export_zoo.mobile_block, zoo_modern.keras_io_augment, zoo_modern.se_hardswish])
def test_mobile_graphs_get_every_kernel_quantised(factory):
    """Batch norm folded, ReLU/ReLU6 fused, SeparableConv2D split, hard-sigmoid split out: the same function, and
    tfmot's default scheme quantises the weights of every convolution and Dense (tfmot's own transforms would
    give a convolution followed by a ReLU layer a no-op config: 4 of keras-io's 14 kernels never quantised)."""
    from export.qat.model import count_quantized, quantize_aware_model
    from toolkit.tfmot import has_kernel
    from export.qat.graph import for_qat
    from toolkit.tf import import_keras

    model = with_statistics(factory(import_keras(), (32, 32, 3), 10))
    flat, dropped = for_qat(model)
    same_outputs(model, flat)
    assert not kinds(flat) & {"BatchNormalization", "SeparableConv2D"}, kinds(flat)  # (a ReLU after an Add stays)
    if factory is zoo_modern.keras_io_augment:
        assert sorted(d.rstrip("_0123456789") for d in dropped) == ["dropout", "random_flip", "random_rotation"], dropped
    qat = quantize_aware_model(model, "default")
    weighted = sum(1 for layer in flat.layers if has_kernel(layer))
    assert count_quantized(qat) == weighted > 5


def test_a_model_used_as_a_layer_is_inlined_for_qat():
    """Transfer learning's shape (a base model under a new head, as with keras.applications): tfmot refuses a
    model used as a layer, so QAT inlines it first: same outputs, and every conv/dense layer quantised."""
    from export.qat.model import count_quantized, quantize_aware_model
    from export.qat.graph import for_qat
    from toolkit.tf import import_keras

    keras = import_keras()
    L = keras.layers
    b_in = keras.Input((16, 16, 3))
    b = L.Conv2D(8, 3, padding="same", use_bias=False)(b_in)
    b = L.ReLU()(L.BatchNormalization()(b))
    base = keras.Model(b_in, L.Add()([L.DepthwiseConv2D(3, padding="same")(b), b]), name="base")
    inp = keras.Input((16, 16, 3))
    x = base(L.Rescaling(1 / 255)(inp))
    model = keras.Model(inp, L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(x)))
    with_statistics(base)
    flat, _ = for_qat(model)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    same_outputs(model, flat, IMAGES[:5, :16, :16])
    assert count_quantized(quantize_aware_model(model, "default")) == 3


def test_attention_stays_float_and_counts_against_coverage():
    from export.qat.model import count_quantized, float_layers, quantize_aware_model
    from toolkit.tfmot import has_kernel
    from export.qat.graph import for_qat
    from toolkit.tf import import_keras

    model = zoo_modern.vit(import_keras(), (32, 32, 3), 10)
    flat, _ = for_qat(model)
    assert sum(1 for layer in flat.layers if has_kernel(layer)) == 8  # 6 Conv2D/Dense and 2 attention layers
    assert count_quantized(quantize_aware_model(model, "default")) == 6
    whys = sorted(float_layers(flat, "default").values())
    assert len(whys) == 7 and sum(w.startswith("attention: fine-tuned in float") for w in whys) == 2, whys
    assert sum("no rule for LayerNormalization" in w for w in whys) == 5, whys


@pytest.mark.parametrize("name", ["keras3_modern"])
def test_keras3_models_are_rebuilt_in_tf_keras(name):
    """Keras 3's hard_swish, hard_sigmoid (relu6(x + 3) / 6, not tf_keras's), x + 3.0 operations, attention and
    LayerNormalization, weights copied: the same outputs, and tfmot's default scheme takes the rebuild."""
    import keras as keras3

    from toolkit.keras3 import to_tf_keras
    from export.qat.model import count_quantized, quantize_aware_model

    model = with_statistics(getattr(zoo_modern, name)(keras3, (32, 32, 3), 10))
    rebuilt = to_tf_keras(model)
    same_outputs(model, rebuilt)
    assert count_quantized(quantize_aware_model(rebuilt, "default")) >= 9


def test_a_keras3_layer_without_counterpart_is_named():
    import keras as keras3

    from toolkit.keras3 import NoTfKerasCounterpart, to_tf_keras

    class Gate(keras3.layers.Layer):
        def call(self, x):
            return x * keras3.ops.sigmoid(x)

    inp = keras3.Input((8, 8, 3))
    model = keras3.Model(inp, keras3.layers.Dense(2)(Gate(name="my_gate")(keras3.layers.Conv2D(4, 3)(inp))))
    with pytest.raises(NoTfKerasCounterpart) as raised:  # (a registered one runs as it is: tests/test_keras3.py)
        to_tf_keras(model)
    assert str(raised.value) == ("no tf_keras counterpart for my_gate (Gate: a Keras 3 layer of its own that Keras "
                                 "cannot make again from its configuration: register it with "
                                 "keras.saving.register_keras_serializable)")


def timed_result(name: str, path, p50_ms: float, fmt: str = "tflite"):
    """A built variant's result with only its file and its batch-1 latency measured (what the speed notes read)."""
    from export.results import Measurement, VariantResult

    m = Measurement(accuracy=0.5, agreement=1.0, latency_ms_p50=p50_ms, latency_ms_p90=p50_ms,
                    throughput_images_per_s=1.0, throughput_batch=1, predictions_file="", input={}, output={})
    return VariantResult(name, fmt, "ok", path=str(path), size_bytes=path.stat().st_size, measured=m, drop_pp=0.0)


def test_ops_read_from_a_tflite_file(tmp_path):
    """A plain CNN: XNNPACK takes every float32 op; the int8 file computes nothing in float and has exactly the
    input QUANTIZE and output DEQUANTIZE casts. A speed note names the variant slower than float32; the same for
    ONNX Runtime's graph and onnx_int8."""
    from export import tflite
    from export.ops import speed_notes, tflite_ops
    from toolkit.tf import import_keras

    keras = import_keras()
    model = export_zoo.logits_cnn(keras, (32, 32, 3), 10)
    paths = {"float32": tmp_path / "float32.tflite", "int8": tmp_path / "int8.tflite"}
    paths["float32"].write_bytes(tflite.convert_float32(model))
    paths["int8"].write_bytes(tflite.convert_int8(model, IMAGES[:8].astype(np.uint8)))
    f32, i8 = tflite_ops(str(paths["float32"])), tflite_ops(str(paths["int8"]))
    assert f32["not_delegated"] == {} and f32["ops"]["CONV_2D"] == 2
    assert i8["float_ops"] == {} and i8["casts"] == 2 and i8["ops"]["FULLY_CONNECTED"] == 2
    rows = [timed_result(n, p, ms) for (n, p), ms in zip(paths.items(), (0.10, 0.25))]
    note = speed_notes(rows)["int8"]
    assert note["ratio"] == pytest.approx(2.5) and note["text"].startswith("`int8` is slower than float32 at batch 1")
    rows[1] = timed_result("int8", paths["int8"], 0.05)
    assert speed_notes(rows) == {}
    # ONNX: the graph ONNX Runtime runs after its optimisations. Its static quantisation of this CNN fuses every
    # convolution into an int8 kernel (QLinearConv), nothing computed in float; onnx_int8 slower than onnx_float32
    # gets its note too.
    from export import onnx as onnx_export
    from export.ops import onnx_ops

    onnx_paths = {"onnx_float32": tmp_path / "float32.onnx", "onnx_int8": tmp_path / "int8.onnx"}
    onnx_export.convert_float32(model, str(onnx_paths["onnx_float32"]))
    onnx_export.quantize_static(str(onnx_paths["onnx_float32"]), IMAGES[:8].astype(np.uint8),
                                str(onnx_paths["onnx_int8"]))
    f32, i8 = onnx_ops(str(onnx_paths["onnx_float32"])), onnx_ops(str(onnx_paths["onnx_int8"]))
    assert f32["casts"] == 0 and f32["float_ops"] == {} and "QLinearConv" not in f32["ops"], f32
    assert i8["ops"].get("QLinearConv") == 2 and "Conv" not in i8["float_ops"], i8
    rows += [timed_result(n, p, ms, "onnx") for (n, p), ms in zip(onnx_paths.items(), (0.10, 0.30))]
    note = speed_notes(rows)["onnx_int8"]
    assert note["ratio"] == pytest.approx(3.0) and set(speed_notes(rows)) == {"onnx_int8"}
    assert note["text"].startswith("`onnx_int8` is slower than onnx_float32 at batch 1 (0.300 vs 0.100 ms"), note


def test_int8_selective_runs_to_every_op_in_float():
    """An impossible budget walks int8_selective through every ranked tensor: once all are denylisted, TFLite's
    debugger refuses to rebuild its instrumented model ("Please check if the quantized model is in debug
    mode", issue 19's --max-drop 0 failure); the model to ship is still built, and said to be over budget."""
    from export.tflite.selective import search_selective
    from toolkit.tf import import_keras, import_tf

    keras = import_keras()
    L = keras.layers
    model = keras.Sequential([L.InputLayer(input_shape=(16, 16, 3)), L.Rescaling(1 / 255), L.Conv2D(4, 3, activation="relu"),
                              L.GlobalAveragePooling2D(), L.Dense(3, activation="softmax")])
    x = IMAGES[:16, :16, :16].astype(np.uint8)
    y = np.arange(16) % 3
    lines = []
    res = search_selective(import_tf().lite.TFLiteConverter.from_keras_model(model), x, x, y,
                               output_kind="probabilities", float_val_accuracy=1.0, max_drop_pp=-1000, max_steps=100,
                               log=lines.append)
    steps = [line for line in lines if "int8_selective step" in line]
    ranked = len({r["tensor"] for r in res.ranking})
    # full int8 with min/max ranges, then min/max and each clipped range with the softmax's logits given their
    # decision range, then one more tensor in float per step, to the last
    assert len(steps) == 2 + len(CLIP_PERCENTILES) + ranked and ranked >= 3, lines
    assert sum("the logits' range chosen for the top-1" in line for line in steps) == 1 + len(CLIP_PERCENTILES)
    assert not res.within_budget and res.blob


def test_int8_selective_clips_a_rare_outlier_and_keeps_every_op_in_int8(tmp_path):
    """One hidden unit fires at up to 800 on about one image in a hundred (its first pixel near white) and is
    cut from the output: the model computes what it did, but min/max calibration stretches the hidden layer's
    range over it and the ordinary units' values (a few units) fall within one or two int8 steps. Clipping every
    activation's range at a percentile of its values brings int8 back within budget with no op in float, the
    file a microcontroller can run; the ONNX route takes the same percentile."""
    from export.tflite.selective import search_selective
    from toolkit.tf import import_keras, import_tf

    keras = import_keras()
    L = keras.layers
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, (2000, 4, 4, 1)).astype(np.uint8)
    x[rng.random(len(x)) < 0.01, 0, 0, 0] = 255
    y = (x[:, :2].mean(axis=(1, 2, 3)) > x[:, 2:].mean(axis=(1, 2, 3))).astype(int)  # the top half brighter
    model = keras.Sequential([L.InputLayer(input_shape=(4, 4, 1)), L.Rescaling(1 / 255), L.Flatten(),
                              L.Dense(16, activation="relu", name="hidden"), L.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x[:1500], y[:1500], epochs=30, batch_size=64, verbose=0)
    hidden = model.get_layer("hidden")
    k, b = hidden.get_weights()
    k[:, 0], k[0, 0], b[0] = 0.0, 4000.0, -3200.0  # relu(4000 * pixel / 255 - 3200): 800 at 255, 0 under 204
    hidden.set_weights([k, b])
    k2, b2 = model.layers[-1].get_weights()
    k2[0, :] = 0.0
    model.layers[-1].set_weights([k2, b2])
    x_val, y_val = x[1500:], y[1500:]
    float_acc = float(np.mean(model.predict(x_val, verbose=0).argmax(1) == y_val))
    assert float_acc > 0.9
    lines = []
    res = search_selective(import_tf().lite.TFLiteConverter.from_keras_model(model), x[:500], x_val, y_val,
                               output_kind="probabilities", float_val_accuracy=float_acc, max_drop_pp=1.0,
                               log=lines.append)
    minmax = next(line for line in lines if "min/max ranges" in line)
    assert float(minmax.split("drop ")[1].split(" pp")[0]) > 10, lines  # the outlier ruins plain int8
    assert res.within_budget and res.float_tensors == [] and res.clip_percentile in CLIP_PERCENTILES, lines

    # The int8 variant's own path (export.tflite.int8.int8_ranges): the converter's calibration, each percentile
    # read from each of four sets of 64 of the 500 images (a set may hold an outlier image or not), the one agreeing
    # most with the float model kept, finished as the converter finishes int8 (uint8 in and out, every op integer:
    # what TFLite Micro runs).
    from export.tflite import ranges
    from export.model.predictions import class_predictions, tflite_accuracy
    from export.runtime import TFLiteModel

    calibrated = ranges.calibrate(import_tf().lite.TFLiteConverter.from_keras_model(model), x[:500])
    float_pred = model.predict(x_val, verbose=0).argmax(1)

    def measure(blob):
        pred = class_predictions(TFLiteModel(content=blob).predict(x_val), "probabilities")
        return (float_acc - np.mean(pred == y_val)) * 100, float(np.mean(pred == float_pred))

    chosen = ranges.best_clipped_ranges(calibrated, x[:500], measure, 1.0)
    # twelve clipped ranges and min/max, each with the softmax's logits given the decision range
    assert len(chosen["held_out_agreement"]) == 1 + len(ranges.CLIP_PERCENTILES) * ranges.RANGE_SETS == 13, chosen
    assert all(k.endswith(ranges.HEAD) for k in chosen["held_out_agreement"]), chosen
    within = {k: a for k, a in chosen["held_out_agreement"].items() if chosen["held_out_drop_pp"][k] <= 1.0}
    assert chosen["clip"] == max(within, key=within.get), chosen
    clipped = chosen["blob"]
    assert tflite_accuracy(ranges.quantize(calibrated), x_val, y_val, "probabilities") < float_acc - 0.1
    assert tflite_accuracy(clipped, x_val, y_val, "probabilities") >= float_acc - 0.01
    io = TFLiteModel(content=clipped)
    assert io.input.dtype == "uint8" and io.input.scale == pytest.approx(1.0, abs=0.01) and io.output.dtype == "uint8"

    import onnxruntime as ort

    from export import onnx as onnx_export

    onnx_export.convert_float32(model, str(tmp_path / "float.onnx"))
    accuracy = {}
    for name, percentile in (("minmax", None), ("clipped", res.clip_percentile)):
        path = str(tmp_path / f"{name}.onnx")
        # 500 images: batches of 25, the last as long as the others (ONNX Runtime's percentile calibrater)
        onnx_export.quantize_static(str(tmp_path / "float.onnx"), x[:500], path, percentile=percentile)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x_val.astype(np.float32)})[0]
        accuracy[name] = float(np.mean(out.argmax(1) == y_val))
    assert accuracy["minmax"] < float_acc - 0.1 and accuracy["clipped"] >= float_acc - 0.02, accuracy


def test_the_logits_get_the_range_that_keeps_the_top_class():
    """Ten classes a few tenths of a logit apart, and one image in a hundred (a marker pixel) with an eleventh
    class's logit at 1,000: min/max calibration spreads the logits' 256 steps over [0, 1,000], every ordinary
    image's logits round to the same step and the tie goes to the lowest class index. The decision range (the
    logits' range whose int8 top-1 agrees most with the float one on the calibration images) brings int8 back to
    the float answers, and a clip_key names it so that int8_selective and the speed step rebuild the same file."""
    from export.tflite import ranges
    from export.model.predictions import class_predictions
    from export.runtime import TFLiteModel
    from toolkit.tf import import_keras, import_tf

    keras = import_keras()
    L = keras.layers
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1500, 4, 4, 1)).astype(np.float32)
    x[:, 0, 0, 0] = 0.0
    x[rng.random(len(x)) < 0.01, 0, 0, 0] = 255.0  # the marker
    model = keras.Sequential([L.InputLayer(input_shape=(4, 4, 1)), L.Flatten(), L.Dense(11, activation="softmax")])
    w = np.zeros((16, 11), np.float32)
    w[1:11, 1:] = np.eye(10) * 0.02  # class c's logit: pixel c / 50, within [0, 5.1]
    w[0, 0] = 1000 / 255  # the marker: class 0's logit 1,000 (a weight column of its own: per-channel scales)
    model.layers[-1].set_weights([w, np.zeros(11, np.float32)])
    calibration, x_val = x[:500], x[500:]
    float_pred = model.predict(x_val, verbose=0).argmax(1)
    calibrated = ranges.calibrate(import_tf().lite.TFLiteConverter.from_keras_model(model), calibration)

    def agreement(blob):
        return float(np.mean(class_predictions(TFLiteModel(content=blob).predict(x_val), "probabilities")
                             == float_pred))

    head = ranges.decision_range(calibrated, calibration)
    assert head is not None and head["recorded_agreement"] < 0.3 and head["agreement"] > 0.9, head
    assert head["high"] < 10 and head["low"] <= 0, head
    assert agreement(ranges.quantize(calibrated)) < 0.3
    with_head = ranges.clipped_as(calibrated, calibration, ranges.clip_key(None, 0, head=True))
    assert agreement(ranges.quantize(with_head)) > 0.9
    assert ranges.describe("99.9/2+head") == ("activation ranges clipped at 99.9/2, the logits' range chosen for the "
                                              "top-1") and ranges.parse_clip_key("99.9/2+head") == (99.9, 2)
    chosen = ranges.best_clipped_ranges(calibrated, calibration, lambda b: (0.0, agreement(b)), 1.0)
    assert chosen["clip"].endswith(ranges.HEAD) and chosen["decision_range"]["high"] == head["high"], chosen
    assert ranges.quantize(ranges.clipped_as(calibrated, calibration, chosen["clip"])) == chosen["blob"]

    # The same classifier putting out its logits (no softmax; trained with from_logits=True, as keras-io's examples
    # are): its output's range is the one that ties, and "logits" names it; a model whose output kind is not
    # known to be logits (a regression head) keeps its output range.
    logits_model = keras.Sequential([L.InputLayer(input_shape=(4, 4, 1)), L.Flatten(), L.Dense(11)])
    logits_model.layers[-1].set_weights([w, np.zeros(11, np.float32)])
    plain = ranges.calibrate(import_tf().lite.TFLiteConverter.from_keras_model(logits_model), calibration)
    assert ranges.decision_tensor(plain) is None and ranges.decision_range(plain, calibration) is None
    head = ranges.decision_range(plain, calibration, "logits")
    assert head is not None and head["recorded_agreement"] < 0.3 and head["agreement"] > 0.9, head

    def logits_agreement(blob):
        return float(np.mean(class_predictions(TFLiteModel(content=blob).predict(x_val), "logits") == float_pred))

    assert logits_agreement(ranges.quantize(plain)) < 0.3
    key = ranges.clip_key(None, 0, head=True)
    assert logits_agreement(ranges.quantize(ranges.clipped_as(plain, calibration, key, "logits"))) > 0.9


def test_the_selective_error_ignores_vanishing_channels_but_not_crushed_ones():
    """int8_selective's ranking error: channels that carry (almost) nothing are not ranked (EfficientNetB0's
    1e46 errors), while ordinary channels crushed by one outlier channel's range still count fully."""
    from export.tflite.selective import _nmse

    rng = np.random.default_rng(0)
    f = rng.normal(size=(64, 8)).astype(np.float32)
    scale = 0.01
    q = np.round(f / scale)
    assert _nmse(f, q, scale, 0) < 1e-3  # well quantised
    tiny = f.copy()
    tiny[:, 3] *= 1e-20  # a vanishing channel: exact zero after quantisation, its ratio would be 1.0 or worse
    assert _nmse(tiny, np.round(tiny / scale), scale, 0) < 1e-3
    outlier = f.copy()
    outlier[:, 0] *= 1e4  # one huge channel sets the scale: the other seven round to zero
    big = float(np.abs(outlier).max()) / 127
    assert _nmse(outlier, np.round(outlier / big), big, 0) > 0.5


def test_int8_selective_ranks_op_types_by_what_they_do_to_accuracy():
    """Past --selective-steps single tensors, whole op types: each alone on top of those tensors (fewest tensors
    first, so the smallest float part within budget wins), then the most accurate types together. The ranking is
    the measured accuracy, not the debugger's error: here MUL has the worst error and LOGISTIC the effect."""
    from export.tflite.selective import search_denylist, tensors_by_op_type

    ranked = [{"tensor_name": t, "op_name": op, "nmse": e} for t, op, e in [
        ("a", "MUL", "0.5"), ("b", "CONV_2D", "0.3"), ("c", "MUL", "0.2"), ("d", "LOGISTIC", "0.1"),
        ("e", "CONV_2D", "0.01"), ("f", "ADD", "nan")]]
    names = [r["tensor_name"] for r in ranked]
    gain = {"a": 1.0, "b": 0.0, "c": 0.5, "d": 3.0, "e": 0.25, "f": 0.125}  # accuracy points each gives back

    whats = []

    def search(need, max_steps=1, max_op_types=2):
        whats.clear()
        def measure(keep, what):
            acc = 90 + sum(gain[t] for t in keep)
            whats.append(what)
            return acc, acc >= need
        return search_denylist(measure, names, tensors_by_op_type(ranked, names[:max_steps]), max_steps,
                               max_op_types)

    assert tensors_by_op_type(ranked, ["a"]) == {"MUL": ["c"], "LOGISTIC": ["d"], "ADD": ["f"], "CONV_2D": ["b", "e"]}
    assert [k for k, _ in search(91)] == [[], ["a"]]
    assert [k for k, _ in search(94)] == [[], ["a"], ["a", "c"], ["a", "d"]]
    never = search(99)  # every type alone, then LOGISTIC (94) and MUL (91.5) together, and no further
    assert [k for k, _ in never] == [[], ["a"], ["a", "c"], ["a", "d"], ["a", "f"], ["a", "b", "e"], ["a", "d", "c"]]
    assert never[-1][1] == 94.5
    assert whats == ["full int8", "+a", "+every MUL (1)", "+every LOGISTIC (1)", "+every ADD (1)", "+every CONV_2D (2)",
                     "+every LOGISTIC and MUL"]
    assert [k for k, _ in search(99, max_op_types=0)] == [[], ["a"]]
    assert [k for k, _ in search(99, max_steps=6)] == [[], ["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"],
                                                       ["a", "b", "c", "d", "e"], names]


def test_a_keras3_normalization_converts_to_onnx_with_one_input(tmp_path):
    """A Keras 3 Normalization (as in keras.applications' EfficientNet) is captured by its SavedModel function as
    constant tensors; frozen before tf2onnx, the ONNX model has the image as its only input (the zoo's
    EfficientNetB0 had two more: "Required inputs ... are missing"), and computes what the model does."""
    import keras as keras3
    import onnxruntime as ort

    from export import onnx as onnx_export
    from export.model.load import load_source_model

    L = keras3.layers
    inp = keras3.Input((32, 32, 3))
    x = L.Normalization(mean=[120.0, 115.0, 100.0], variance=[4000.0, 3900.0, 4200.0])(inp)
    x = L.GlobalAveragePooling2D()(L.Conv2D(8, 3, activation="relu")(x))
    path = tmp_path / "normalized.keras"
    keras3.Model(inp, L.Dense(10, activation="softmax")(x)).save(path)
    source = load_source_model(str(path))
    onnx_export.convert_float32(source, str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert [i.name for i in session.get_inputs()] == ["image"]
    np.testing.assert_allclose(session.run(None, {"image": IMAGES[:4]})[0], source.predict(IMAGES[:4]), atol=1e-4)


def test_16_bit_activations_refuse_hard_swish_in_one_line():
    """TFLite's 16x8 mode (int8_selective's last resort, export.tflite.convert_int16x8) has no HARD_SWISH kernel: the
    converter says so once per op, and the reason a variant fails with says it once."""
    from export.tflite import convert_int16x8
    from toolkit.errors import one_line
    from toolkit.tf import import_keras

    model = zoo_modern.se_hardswish(import_keras(), (32, 32, 3), 10)
    with pytest.raises(RuntimeError) as caught:
        convert_int16x8(model, IMAGES[:4].astype(np.uint8))
    line = one_line(caught.value)
    assert line.count("not yet supported for op: 'HARD_SWISH'") == 1 and "\n" not in line, line


@pytest.fixture(scope="module")
def two_outputs_model(tmp_path_factory, tiny_tree_tgz, cache_dir):
    """A small CNN with a team's two-output layer (benchmarks.zoo_layers.TwoScales) between its convolution and its
    dense head, trained two epochs on the tiny colour tree: tfmot's default scheme refuses it, every time (its
    QuantizeWrapper quantises one output)."""
    from benchmarks.zoo_layers import TwoScales
    from toolkit.data import load_dataset
    from toolkit.tf import import_keras, save_model

    keras = import_keras()
    L = keras.layers
    keras.utils.set_random_seed(0)
    ds = load_dataset(str(tiny_tree_tgz), cache_dir)
    inp = keras.Input((32, 32, 3))
    h = L.MaxPooling2D(4)(L.Conv2D(8, 3, activation="relu")(L.Rescaling(1 / 255)(inp)))
    a, b = TwoScales()(h)
    model = keras.Model(inp, L.Dense(10, activation="softmax")(L.Flatten()(L.Add()([a, b]))))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(ds.x_train, ds.y_train, epochs=2, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("two_outputs") / "two_outputs.keras"
    save_model(model, str(path))
    return path


def qat_export(model, data, out, cache_dir, *extra):
    from conftest import export_in_process

    return export_in_process("export", [str(model), "--data", str(data), "--out", str(out), "--cache-dir", cache_dir,
                                        "--custom-objects", "benchmarks.zoo_layers", "--variants", "int8,qat_int8",
                                        "--qat-epochs", "1", "--latency-runs", "5", "--micro-samples", "10", *extra])


def test_qat_falls_back_to_conv_dense_when_the_default_scheme_cannot_rebuild(two_outputs_model, tiny_tree_tgz,
                                                                             tmp_path, cache_dir):
    """The default scheme raises on the two-output layer; QAT goes on with conv_dense (convolutions and dense layers
    quantised, the rest in float), and the report says which scheme, why the default failed, and the coverage."""
    proc = qat_export(two_outputs_model, tiny_tree_tgz, tmp_path / "out", cache_dir)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    q = next(r for r in report["variants"] if r["name"] == "qat_int8")
    assert q["status"] in ("ok", "skipped"), (q.get("reason"), proc.stdout[-3000:])  # skipped: worse than int8
    qat = q["qat"]
    assert qat["scheme"] == "conv_dense" and len(qat["schemes_failed"]) == 1, qat
    assert qat["schemes_failed"][0].startswith("default: ") and "QuantizeWrapper" in qat["schemes_failed"][0], qat
    assert "qat scheme default cannot rebuild this model" in proc.stdout
    assert (qat["quantized_layers"], qat["weighted_layers"]) == (2, 2), qat  # the convolution and the dense layer
    assert any(k.startswith("two_scales") for k in qat["float_layers"]), qat["float_layers"]


def test_a_qat_rebuild_past_its_timeout_fails_qat_alone(two_outputs_model, tiny_tree_tgz, tmp_path, cache_dir):
    """--qat-build-timeout: a scheme whose rebuild sends no word for that long is killed (tfmot loops forever on some
    graphs) and the next scheme tried in a new worker; here every rebuild takes longer than 0.05 s, so both schemes
    are killed, qat_int8 fails naming each, and int8, built in the same export, is kept."""
    proc = qat_export(two_outputs_model, tiny_tree_tgz, tmp_path / "out", cache_dir, "--qat-build-timeout", "0.05")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["int8"]["status"] == "ok" and (tmp_path / "out" / "int8.tflite").exists(), rows["int8"]
    q = rows["qat_int8"]
    assert q["status"] == "failed" and "qat_int8" in report["failed"] and proc.returncode == 1, q
    assert q["reason"] == ("no sign of life for 0.05 s while tfmot default scheme: rebuilding the model for QAT; "
                           "killed; no sign of life for 0.05 s while tfmot conv_dense scheme: rebuilding the model "
                           "for QAT; killed"), q["reason"]
    assert "qat_int8: " in proc.stdout and "trying its next way (attempt 2 of 2)" in proc.stdout
