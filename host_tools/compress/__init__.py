"""Model compression on the host, each result checked against the original."""

from host_tools.compress.evaluate import EvalData, ModelReport, evaluate_model
from host_tools.compress.onnx_dynamic import quantize_dynamic_int8

__all__ = ["EvalData", "ModelReport", "evaluate_model", "quantize_dynamic_int8"]
