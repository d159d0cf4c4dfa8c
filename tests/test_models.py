"""The model registry: seed_cnn is the tutorial's network, with pixel scaling inside."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.models import MODELS, make_model


def test_seed_cnn_matches_the_tutorial():
    m = make_model("seed_cnn")
    assert m.count_params() == 315_722
    assert sum(int(np.prod(w.shape)) for w in m.trainable_weights) == 315_722
    shapes = [(l.__class__.__name__, tuple(l.output_shape[1:])) for l in m.layers]
    assert shapes == [
        ("Rescaling", (32, 32, 3)),
        ("Conv2D", (30, 30, 32)),
        ("MaxPooling2D", (15, 15, 32)),
        ("Conv2D", (13, 13, 64)),
        ("MaxPooling2D", (6, 6, 64)),
        ("Flatten", (2304,)),
        ("Dense", (128,)),
        ("Dense", (10,)),
    ]
    assert [l.activation.__name__ for l in m.layers if hasattr(l, "activation")] == ["relu", "relu", "relu", "softmax"]
    assert m.layers[0].scale == pytest.approx(1 / 255)


def test_models_take_raw_pixels():
    """Scaling is inside the model: feeding 0-255 uint8 gives the same output as the math on x/255."""
    m = make_model("seed_cnn")
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    p = m.predict(x, verbose=0)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    inner = type(m)(m.layers[1:])  # the same layers without the scaling
    np.testing.assert_allclose(p, inner.predict(x.astype("float32") / 255, verbose=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds(name):
    m = make_model(name, num_classes=7)
    assert m.output_shape == (None, 7)
    assert m.input_shape == (None, 32, 32, 3)


def test_edge_resnet_has_the_edge_layers():
    kinds = {l.__class__.__name__ for l in make_model("edge_resnet").layers}
    assert {"BatchNormalization", "Add", "DepthwiseConv2D", "Dropout", "GlobalAveragePooling2D"} <= kinds


def test_resnet8_is_mlperf_tinys():
    """MLPerf Tiny's image-classification ResNet-8: 78,666 parameters, 12.5 M multiply-accumulates at 32x32x3."""
    m = make_model("resnet8")
    assert m.count_params() == 78_666
    convs = [l for l in m.layers if l.__class__.__name__ == "Conv2D"]
    assert [(l.filters, l.kernel_size, l.strides) for l in convs] == [
        (16, (3, 3), (1, 1)), (16, (3, 3), (1, 1)), (16, (3, 3), (1, 1)),
        (32, (3, 3), (2, 2)), (32, (3, 3), (1, 1)), (32, (1, 1), (2, 2)),
        (64, (3, 3), (2, 2)), (64, (3, 3), (1, 1)), (64, (1, 1), (2, 2))]
    assert all(l.kernel_regularizer.get_config()["l2"] == pytest.approx(1e-4) for l in convs)
    macs = sum(int(np.prod(l.kernel.shape)) * l.output_shape[1] * l.output_shape[2] for l in convs)
    macs += sum(int(np.prod(l.kernel.shape)) for l in m.layers if l.__class__.__name__ == "Dense")
    assert macs == 12_501_632
    assert m.layers[-1].output_shape == (None, 10) and m.layers[1].scale == pytest.approx(1 / 255)


def test_unknown_model_names_the_argument():
    with pytest.raises(ValueError, match="model: unknown model 'resnet9000'"):
        make_model("resnet9000")
