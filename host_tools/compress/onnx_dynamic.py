"""ONNX dynamic int8 quantization (weights int8, activations quantized at run time)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError, ModelError


def quantize_dynamic_int8(source: Path, dest: Path) -> dict[str, Any]:
    """Quantize *source* into *dest*; returns the provenance recorded in the bundle manifest.

    The model is pre-processed first (shape inference, constant folding), because
    plain ``quantize_dynamic`` skips or stops on many exported graphs without it.
    """
    source = Path(source)
    if not source.is_file():
        raise ConfigError(f"model file {source} does not exist")
    try:
        import onnx  # noqa: F401  (host extra)
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ConfigError("compression needs the host extra: pip install 'edgefleet[host]'") from None
    logging.getLogger("root").setLevel(logging.ERROR)  # ORT's quantizer logs through the root logger
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(source), str(pre))
            quantize_dynamic(str(pre), str(dest), weight_type=QuantType.QInt8)
        except Exception as exc:  # onnx/ORT raise a wide variety here
            raise ModelError(f"dynamic int8 quantization of {source.name} failed: {exc}") from None
    return {"method": "onnx-dynamic-int8", "tool": "onnxruntime.quantization.quantize_dynamic",
            "weight_type": "QInt8", "preprocess": "quant_pre_process", "source": source.name}
