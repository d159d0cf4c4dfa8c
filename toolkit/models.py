"""Model registry: pure factories ``make_model(name, ...)`` returning uncompiled tf_keras models.

Every model takes raw 0-255 pixels: scaling is a layer inside the model, so a saved or exported
model cannot be fed wrongly preprocessed images on a device.
"""

from __future__ import annotations

from typing import Callable

from toolkit.tf import import_keras

INPUT_SHAPE = (32, 32, 3)


def seed_cnn(input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
    """The tutorial's CNN, exactly (315,722 parameters for 32x32x3 and 10 classes)."""
    keras = import_keras()
    L = keras.layers
    return keras.Sequential(
        [
            L.InputLayer(input_shape=input_shape, name="image"),
            L.Rescaling(1.0 / 255, name="rescale"),
            L.Conv2D(32, (3, 3), activation="relu", name="conv1"),
            L.MaxPooling2D((2, 2), name="pool1"),
            L.Conv2D(64, (3, 3), activation="relu", name="conv2"),
            L.MaxPooling2D((2, 2), name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(128, activation="relu", name="fc1"),
            L.Dense(num_classes, activation="softmax", name="probs"),
        ],
        name="seed_cnn",
    )


def edge_resnet(input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
    """A small functional network with the layers edge models use: BatchNormalization,
    residual Add, depthwise-separable convolution, Dropout and global average pooling."""
    keras = import_keras()
    L = keras.layers
    inp = keras.Input(shape=input_shape, name="image")
    x = L.Rescaling(1.0 / 255, name="rescale")(inp)
    x = L.Conv2D(32, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for i, filters in enumerate((32, 64)):
        stride = 1 if i == 0 else 2
        shortcut = x
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"b{i}_dw")(x)
        y = L.BatchNormalization(name=f"b{i}_dw_bn")(y)
        y = L.ReLU(name=f"b{i}_dw_relu")(y)
        y = L.Conv2D(filters, 1, use_bias=False, name=f"b{i}_pw")(y)
        y = L.BatchNormalization(name=f"b{i}_pw_bn")(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"b{i}_proj")(shortcut)
            shortcut = L.BatchNormalization(name=f"b{i}_proj_bn")(shortcut)
        x = L.Add(name=f"b{i}_add")([y, shortcut])
        x = L.ReLU(name=f"b{i}_out")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="edge_resnet")


MODELS: dict[str, Callable] = {"seed_cnn": seed_cnn, "edge_resnet": edge_resnet}


def make_model(name: str, input_shape: tuple[int, int, int] = INPUT_SHAPE, num_classes: int = 10):
    """Build registered model ``name`` (uncompiled)."""
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes)
