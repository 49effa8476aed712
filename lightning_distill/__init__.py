"""lightning-distill: dataset distillation methods as PyTorch Lightning plugins."""

__version__ = "0.1.0"
