"""The tutorial's CNN (toolkit.models.seed_cnn) written twice, as a user would: with ``import keras`` (Keras 3, as
keras.io writes models) and with tf_keras. Training both through jobs/train.py side by side measures what training
a Keras 3 model as its tf_keras rebuild (toolkit.keras3) costs:

    for m in seed_keras3 seed_tf_keras seed_keras3 seed_tf_keras; do
      python jobs/train.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz --model benchmarks.keras3_models:$m \\
        --epochs 4 --limit 20000 --num-workers 2 --no-export --output /tmp/side_$m
    done
"""


def _seed_cnn(keras, input_shape, num_classes):
    L = keras.layers
    return keras.Sequential([
        keras.Input(input_shape), L.Rescaling(1 / 255),
        L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(),
        L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(),
        L.Flatten(), L.Dense(128, activation="relu"),
        L.Dense(num_classes, activation="softmax")])


def seed_keras3(input_shape, num_classes):
    import keras

    return _seed_cnn(keras, input_shape, num_classes)


def seed_tf_keras(input_shape, num_classes):
    import tf_keras

    return _seed_cnn(tf_keras, input_shape, num_classes)
