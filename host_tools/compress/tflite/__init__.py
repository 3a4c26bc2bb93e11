"""TFLite passes: quantization built on Google's litert-quantizer (extra `litert`); pruning, compaction
and 8-bit storage of the float constants a quantizer leaves, on the flatbuffer itself (extra `tflite`)."""

from host_tools.compress.tflite import compact, params, prune, quantize  # noqa: F401  (they register)
