"""ONNX passes, built on ``onnx`` and ``onnxruntime.quantization``."""

from host_tools.compress.onnx import compact, fp16, int4, params, preprocess, prune, quantize  # noqa: F401  (they register)
