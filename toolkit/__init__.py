"""keras-edge-toolkit: distributed Ray Train training and edge export for Keras CNNs."""

__version__ = "0.1.0"
