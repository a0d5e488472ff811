"""Shared fixtures: offline tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def _give_this_worker_its_own_cores() -> None:
    """Under pytest-xdist (`make test` runs two workers) each worker, and every process it starts,
    computes on its own share of the cores. Two workers whose OpenMP threads outnumber the cores
    spin against each other; in-process tests ran several times slower beside another worker
    than alone. Lampo and vLLM size their thread pools from this affinity (speed/machine.py)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0))
    if not worker or count < 2 or len(cores) < count:
        return
    index, share = int(worker.removeprefix("gw")), len(cores) // count
    os.sched_setaffinity(0, cores[index * share:(index + 1) * share])


_give_this_worker_its_own_cores()  # before torch starts its thread pool

# The modules that take longest go first: pytest-xdist (`--dist loadfile`) hands whole modules to
# its workers in this order, and a long module begun last would leave the other worker idle.
LONGEST_FIRST = ("test_ray.py", "test_learning.py", "test_app_e2e.py", "test_deepspeed.py", "test_families.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
