"""Run exported models in the runtimes devices use: LiteRT for .tflite, ONNX Runtime for .onnx.

Both wrappers take raw uint8 images (N, H, W, C), quantise them if the model's input is
integer, and return float class probabilities (dequantised when the output is integer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """What an app needs to feed or read a tensor: dtype, shape, and int quantisation if any."""

    name: str
    dtype: str
    shape: list
    scale: Optional[float] = None
    zero_point: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Raw pixels in ``spec``'s dtype: quantised with its scale and zero point when it is an integer tensor."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return x.astype(dtype)
    if spec.scale is None or spec.scale == 0:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float32) / spec.scale + spec.zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float values of an output in ``spec``'s dtype."""
    if np.dtype(spec.dtype).kind == "f" or spec.scale in (None, 0):
        return y.astype(np.float32)
    return (y.astype(np.float32) - spec.zero_point) * spec.scale


class _RuntimeModel:
    """What both runtimes share: uint8 images in, float probabilities out. Subclasses set
    ``input``/``output`` (TensorSpec) and ``run(x)`` (one invocation on prepared input)."""

    input: TensorSpec
    output: TensorSpec

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def prepare(self, x_uint8: np.ndarray) -> np.ndarray:
        """Raw pixels in the model's input dtype (quantised with its scale/zero point if integer)."""
        return quantize(x_uint8, self.input)

    def predict(self, x_uint8: np.ndarray, batch_size: int = 250) -> np.ndarray:
        outs = [self.run(self.prepare(x_uint8[i:i + batch_size])) for i in range(0, len(x_uint8), batch_size)]
        return dequantize(np.concatenate(outs), self.output)


class TFLiteModel(_RuntimeModel):
    """A .tflite file (or its bytes, ``content``) in the LiteRT interpreter."""

    format = "tflite"

    def __init__(self, path: Optional[str] = None, num_threads: int = 1, content: Optional[bytes] = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = path
        self._interp = Interpreter(model_path=str(path) if content is None else None, model_content=content,
                                   num_threads=num_threads)
        self._interp.allocate_tensors()
        i, o = self._interp.get_input_details()[0], self._interp.get_output_details()[0]
        self._in_index, self._out_index = i["index"], o["index"]
        self.input = self._spec(i)
        self.output = self._spec(o)
        self._batch = None

    @staticmethod
    def _spec(d: dict) -> TensorSpec:
        scale, zp = d["quantization"]
        quantized = np.dtype(d["dtype"]).kind in "iu" and scale != 0
        return TensorSpec(d["name"], np.dtype(d["dtype"]).name, [int(v) for v in d["shape_signature"]],
                          float(scale) if quantized else None, int(zp) if quantized else None)

    def _resize(self, n: int) -> None:
        if self._batch != n:
            self._interp.resize_tensor_input(self._in_index, [n, *self.input.shape[1:]])
            self._interp.allocate_tensors()
            self._batch = n

    def run(self, x: np.ndarray) -> np.ndarray:
        """One invocation on a batch (already in the input dtype)."""
        self._resize(len(x))
        self._interp.set_tensor(self._in_index, x)
        self._interp.invoke()
        return self._interp.get_tensor(self._out_index)



class OnnxModel(_RuntimeModel):
    """An .onnx file in ONNX Runtime (CPU)."""

    format = "onnx"

    def __init__(self, path: str, num_threads: int = 1, output_quantization: Optional[tuple[float, int]] = None):
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        i, o = self._sess.get_inputs()[0], self._sess.get_outputs()[0]
        self._in_name = i.name
        in_dtype = _ORT_TYPES[i.type]
        # An integer input that takes raw camera bytes (scale 1, zero point 0), as the int8 TFLite
        # model it came from; float inputs take the same 0-255 values as floats.
        self.input = TensorSpec(i.name, in_dtype, [d if isinstance(d, int) else -1 for d in i.shape],
                                1.0 if np.dtype(in_dtype).kind in "iu" else None,
                                0 if np.dtype(in_dtype).kind in "iu" else None)
        out_dtype = _ORT_TYPES[o.type]
        scale, zp = output_quantization if (np.dtype(out_dtype).kind in "iu" and output_quantization) else (None, None)
        self.output = TensorSpec(o.name, out_dtype, [d if isinstance(d, int) else -1 for d in o.shape], scale, zp)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run(None, {self._in_name: x})[0]



_ORT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
              "tensor(float16)": "float16"}


def open_model(path: str, num_threads: int = 1, **kw):
    """The runtime wrapper for ``path``, chosen by its suffix."""
    if str(path).endswith(".tflite"):
        return TFLiteModel(path, num_threads)
    if str(path).endswith(".onnx"):
        return OnnxModel(path, num_threads, **kw)
    raise ValueError(f"path: {path} is neither .tflite nor .onnx")
