"""TFLite passes: quantization built on Google's litert-quantizer (extra `litert`), magnitude
pruning on the flatbuffer itself (extra `tflite`)."""

from host_tools.compress.tflite import compact, prune, quantize  # noqa: F401  (they register)
