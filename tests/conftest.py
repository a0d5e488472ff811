"""Shared fixtures: offline tiny models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _give_this_worker_its_own_cores() -> None:
    """Under pytest-xdist (`make test` runs two workers) each worker, and every process it starts,
    computes on its own share of the cores: two workers whose OpenMP threads outnumber the cores
    spin against each other. torch, Lampo (speed/machine.py) and vLLM size their thread pools
    from this affinity."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return
    # modulo: a worker xdist starts in place of a crashed one is numbered on (gw2, gw3, ...)
    share = cores[int(worker.removeprefix("gw")) % count::count]
    os.sched_setaffinity(0, share)
    if "torch" in sys.modules:  # a plugin imported it first: its thread pool is already sized
        sys.modules["torch"].set_num_threads(len(share))


_give_this_worker_its_own_cores()

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
