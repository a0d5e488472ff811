"""Shared fixtures: offline tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "test-models"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """A ~0.2M-parameter Llama causal LM + ChatML tokenizer (built once, reused)."""
    from lampo.testing import build_tiny_model

    return build_tiny_model(BUILD / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_classifier_path() -> Path:
    """A tiny Llama sequence classifier in the same vocabulary (stands in for an HF reward model)."""
    from lampo.testing import build_tiny_model

    return build_tiny_model(BUILD / "tiny-classifier", size="tiny", seed=1, kind="classifier")


@pytest.fixture(scope="session")
def family_model_path():
    """`family_model_path(arch)`: the tiny causal LM of a family of lampo.testing.FAMILIES
    (build/test-models/<arch>, built once per session and reused by later sessions)."""
    from lampo.testing import build_tiny_model

    return lambda arch: build_tiny_model(BUILD / arch, size="tiny", seed=0, arch=arch)
