"""A team's own layer, as it lives in the team's package: registered with ``register_keras_serializable``,
importable, but not imported by the exporter. The export zoo's ``custom_layer`` model uses it, and is
exported with ``--custom-objects benchmarks.zoo_layers``."""

from toolkit.tf import import_keras, import_tf

keras = import_keras()
tf = import_tf()


@keras.saving.register_keras_serializable(package="zoo_layers")
class ScaledSwish(keras.layers.Layer):
    """x * sigmoid(beta x), with a trainable beta per channel (a learned swish, as in some edge nets)."""

    def build(self, input_shape):
        self.beta = self.add_weight(name="beta", shape=(int(input_shape[-1]),), initializer="ones")
        super().build(input_shape)

    def call(self, x):
        return x * tf.sigmoid(self.beta * x)


@keras.saving.register_keras_serializable(package="zoo_layers")
class TwoScales(keras.layers.Layer):
    """Two outputs, x * a and x * b with a trainable scale per channel each: a layer that forks a tensor into two
    branches. tfmot's QuantizeWrapper quantises one output, and refuses it (tests/test_qat_graph.py's fallback)."""

    def build(self, input_shape):
        self.a = self.add_weight(name="a", shape=(int(input_shape[-1]),), initializer="ones")
        self.b = self.add_weight(name="b", shape=(int(input_shape[-1]),), initializer="ones")
        super().build(input_shape)

    def call(self, x):
        return x * self.a, x * self.b
