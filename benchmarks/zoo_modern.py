"""The export zoo's architectures of today's edge teams (issue 18), as their users take or write them.

Each factory is pure: ``keras`` is the Keras the model is built with (tf_keras, or Keras 3 for the
``keras3_*`` ones), ``shape`` the image shape, ``n`` the number of classes. Sizes are cut to what trains
in a minute or two on two cores; the layer kinds are the architectures' own.

  se_hardswish       a MobileNetV3-style inverted residual block of our own: expand 1x1, depthwise 3x3,
                     squeeze-and-excitation (GAP, Dense relu, Dense hard-sigmoid, Reshape, Multiply),
                     hard-swish written as tf_keras's MobileNetV3 writes it (x * ReLU6(x + 3) / 6)
  mobilenet_v3       tf_keras.applications.MobileNetV3Small (weights=None, alpha 0.75, its own Rescaling)
  keras3_mobilenet_v3  the same from Keras 3's keras.applications (Activation("hard_swish") layers)
  vit                a two-block ViT-style classifier: patches by a strided Conv2D, LayerNormalization,
                     MultiHeadAttention, GELU MLPs, residual Adds, global average pooling over patches
  convnext           ConvNeXt-style blocks: depthwise 7x7, LayerNormalization, Dense(4c, GELU), Dense(c)
                     (pointwise convolutions as Dense on channels, as the paper's code), residual Add
  keras3_efficientnet  Keras 3 keras.applications.EfficientNetB0 (weights=None: its Rescaling and
                     Normalization inside, swish, squeeze-and-excitation, DropConnect)
  keras_io_augment   keras-io's "image classification from scratch" model, smaller: RandomFlip and
                     RandomRotation inside, Rescaling, SeparableConv2D residual blocks, BatchNormalization
"""

from __future__ import annotations

# name -> (factory name, Keras: 2 for tf_keras, 3 for Keras 3)
MODERN = {"se_hardswish": 2, "mobilenet_v3": 2, "keras3_mobilenet_v3": 3, "vit": 2, "convnext": 2,
          "keras3_efficientnet": 3, "keras_io_augment": 2, "keras3_modern": 3}


def _hard_swish(L, x):  # tf_keras.applications.mobilenet_v3's own
    return L.Multiply()([x, L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])


def se_hardswish(keras, shape, n):
    L = keras.layers
    inp = keras.Input(shape)
    x = L.Rescaling(1 / 255)(inp)
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = _hard_swish(L, L.BatchNormalization(momentum=0.9)(x))
    for expand, out, stride in ((48, 24, 2), (72, 24, 1)):
        y = _hard_swish(L, L.BatchNormalization(momentum=0.9)(L.Conv2D(expand, 1, use_bias=False)(x)))
        y = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False)(y)
        y = _hard_swish(L, L.BatchNormalization(momentum=0.9)(y))
        s = L.GlobalAveragePooling2D()(y)
        s = L.Dense(expand // 4, activation="relu")(s)
        s = L.Dense(expand, activation="hard_sigmoid")(s)
        y = L.Multiply()([y, L.Reshape((1, 1, expand))(s)])  # the excitation's gating
        y = L.BatchNormalization(momentum=0.9)(L.Conv2D(out, 1, use_bias=False)(y))
        x = L.Add()([x, y]) if stride == 1 else y
    x = _hard_swish(L, L.BatchNormalization(momentum=0.9)(L.Conv2D(96, 1, use_bias=False)(x)))
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def short_training(model):
    """Batch-norm momentum 0.9 instead of the applications' 0.99, as one trains them briefly from scratch: at 0.99
    the moving statistics have not settled after a few hundred steps (measured: MobileNetV3Small at 31% training
    accuracy and 10.2%, chance, on the test split after 3 epochs; 28.6% at 0.9)."""
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.momentum = 0.9
    return model


def mobilenet_v3(keras, shape, n):
    """As transfer learning takes it: the application without its top, a new head. Its own preprocessing
    (a Rescaling to [-1, 1]) is inside."""
    base = keras.applications.MobileNetV3Small(input_shape=shape, alpha=0.75, include_top=False, weights=None,
                                               include_preprocessing=True)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    return short_training(keras.Model(base.input, keras.layers.Dense(n, activation="softmax")(x)))


keras3_mobilenet_v3 = mobilenet_v3


def vit(keras, shape, n, dim: int = 64, heads: int = 4, blocks: int = 2):
    L = keras.layers
    inp = keras.Input(shape)
    x = L.Conv2D(dim, 4, strides=4)(L.Rescaling(1 / 255)(inp))  # 4x4 patches, embedded
    x = L.Reshape((-1, dim))(x)
    for _ in range(blocks):
        y = L.LayerNormalization(epsilon=1e-6)(x)
        y = L.MultiHeadAttention(heads, dim // heads)(y, y)
        x = L.Add()([x, y])
        y = L.LayerNormalization(epsilon=1e-6)(x)
        y = L.Dense(2 * dim, activation="gelu")(y)
        x = L.Add()([x, L.Dense(dim)(y)])
    x = L.GlobalAveragePooling1D()(L.LayerNormalization(epsilon=1e-6)(x))
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def convnext(keras, shape, n, dims=(32, 64)):
    L = keras.layers
    inp = keras.Input(shape)
    x = L.Conv2D(dims[0], 2, strides=2)(L.Rescaling(1 / 255)(inp))  # stem: patchify
    x = L.LayerNormalization(epsilon=1e-6)(x)
    for i, dim in enumerate(dims):
        if i:  # downsampling between stages
            x = L.Conv2D(dim, 2, strides=2)(L.LayerNormalization(epsilon=1e-6)(x))
        y = L.DepthwiseConv2D(7, padding="same")(x)
        y = L.LayerNormalization(epsilon=1e-6)(y)
        y = L.Dense(4 * dim, activation="gelu")(y)
        x = L.Add()([x, L.Dense(dim)(y)])
    x = L.LayerNormalization(epsilon=1e-6)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def keras3_efficientnet(keras, shape, n):
    return short_training(keras.applications.EfficientNetB0(input_shape=shape, weights=None, classes=n))


def keras_io_augment(keras, shape, n):
    """keras-io's "Image classification from scratch" make_model at two block widths (the example's are
    128 to 728); its augmentation is inside the model, as the example's first option puts it."""
    L = keras.layers
    augment = keras.Sequential([L.RandomFlip("horizontal"), L.RandomRotation(0.1)], name="augmentation")
    inp = keras.Input(shape)
    x = L.Rescaling(1.0 / 255)(augment(inp))
    x = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(32, 3, strides=2, padding="same")(x)))
    previous = x
    for size in (64, 128):
        x = L.Activation("relu")(x)
        x = L.BatchNormalization()(L.SeparableConv2D(size, 3, padding="same")(x))
        x = L.Activation("relu")(x)
        x = L.BatchNormalization()(L.SeparableConv2D(size, 3, padding="same")(x))
        x = L.MaxPooling2D(3, strides=2, padding="same")(x)
        residual = L.Conv2D(size, 1, strides=2, padding="same")(previous)
        x = L.add([x, residual])
        previous = x
    x = L.Activation("relu")(L.BatchNormalization()(L.SeparableConv2D(256, 3, padding="same")(x)))
    x = L.Dropout(0.25)(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def keras3_modern(keras, shape, n):
    """Every kind above in one small Keras 3 model (the test suite's: one export instead of seven): RandomFlip
    and Rescaling inside, hard-swish (as an Activation, and in Keras 3 operations), a squeeze-and-excitation gate with a hard-sigmoid 1x1 convolution, a
    SeparableConv2D with batch norm, a ConvNeXt block (depthwise 7x7, LayerNormalization, GELU Dense), and
    MultiHeadAttention over the 16 patches of the last feature map."""
    L = keras.layers
    inp = keras.Input(shape)
    x = L.Rescaling(1 / 255)(L.RandomFlip("horizontal")(inp))
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = L.Activation("hard_swish")(L.BatchNormalization(momentum=0.9)(x))
    y = L.BatchNormalization(momentum=0.9)(L.DepthwiseConv2D(3, padding="same", use_bias=False)(x))
    y = y * (L.ReLU(6.0)(y + 3.0) * (1.0 / 6.0))  # hard-swish in Keras 3 operations, as its MobileNetV3 writes hard-sigmoid
    s = L.GlobalAveragePooling2D(keepdims=True)(y)
    s = L.Conv2D(16, 1, activation="hard_sigmoid")(L.Conv2D(4, 1, activation="relu")(s))
    x = L.Add()([x, L.Multiply()([y, s])])
    x = L.SeparableConv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = L.Activation("relu")(L.BatchNormalization(momentum=0.9)(x))
    y = L.LayerNormalization(epsilon=1e-6)(L.DepthwiseConv2D(7, padding="same")(x))
    x = L.Add()([x, L.Dense(32)(L.Dense(64, activation="gelu")(y))])
    t = L.Reshape((16, 32))(L.MaxPooling2D()(x))
    a = L.LayerNormalization(epsilon=1e-6)(t)
    t = L.Add()([t, L.MultiHeadAttention(2, 16)(a, a)])
    x = L.GlobalAveragePooling1D()(L.LayerNormalization(epsilon=1e-6)(t))
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))
