"""Offline builders for tests, the demo and benchmarks (no hub access needed)."""

from lampo.testing.tiny import FAMILIES, SIZES, build_tiny_model, build_tokenizer

__all__ = ["FAMILIES", "SIZES", "build_tiny_model", "build_tokenizer"]
