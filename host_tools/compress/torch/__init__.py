"""PyTorch passes: knowledge distillation, and the fine-tuning that recovers pruned models
(extra `distill`; torch is imported only when one of them runs)."""

from host_tools.compress.torch import distill  # noqa: F401  (it registers)
