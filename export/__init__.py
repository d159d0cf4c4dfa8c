"""Edge export: TFLite and ONNX variants, measured in device runtimes, with an accuracy-drift gate.

The commands are ``python -m export``, ``python -m export.tflite`` and ``python -m export.onnx``;
the library entry point is :func:`export.run.pipeline.run_export`.
"""
