"""Callbacks (one per file)."""

from lightning_distill.callbacks.export import ExportDistilled

__all__ = ["ExportDistilled"]
