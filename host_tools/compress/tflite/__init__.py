"""TFLite passes (litert-quantizer)."""
