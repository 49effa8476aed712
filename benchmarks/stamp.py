"""Benchmarks import the stamp from here; it lives in the package so that `lightning-distill evaluate` uses it too."""

from lightning_distill.provenance import commit, hardware, stamp

__all__ = ["commit", "hardware", "stamp"]
