"""TFLite passes, built on Google's litert-quantizer (extra `litert`)."""

from host_tools.compress.tflite import quantize  # noqa: F401  (it registers)
