"""PyTorch passes (knowledge distillation); extra `distill`."""
