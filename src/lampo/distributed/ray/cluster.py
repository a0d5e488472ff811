"""Joining or starting the Ray cluster, and where each actor goes on it.

A local cluster (`ray.address: null`) binds to loopback and starts without the dashboard unless
`ray.dashboard` asks for it: Ray's dashboard and job API execute whatever code they are sent
and have no authentication of their own (ShadowRay, CVE-2023-48022). docs/ray.md says how to
secure a multi-node cluster.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from lampo.speed.machine import usable_cpus

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """The Ray resources of each actor."""

    engine_options: list[dict[str, Any]]
    """One per rollout worker of its own (none when colocated)."""
    learner_options: list[dict[str, Any]]


def connect(ray_cfg: Any, cpus_needed: int) -> bool:
    """Connect this process to the cluster `ray_cfg.address` names, or start a local one. Returns
    whether this process started Ray (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, **quiet)
        return True
    cpus = max(ray_cfg.local_num_cpus or usable_cpus(), cpus_needed)
    ray.init(address="local", num_cpus=cpus, include_dashboard=ray_cfg.dashboard, _node_ip_address="127.0.0.1",
             **quiet)
    return True


def actor_cpus(ray_cfg: Any) -> int:
    """CPUs the actors ask for in all: one per rollout worker and learner (colocated pairs share one)."""
    if ray_cfg.colocate:
        return ray_cfg.num_learners
    return ray_cfg.num_engines + ray_cfg.num_learners


def computing_at_once(ray_cfg: Any, role: str) -> int:
    """How many actors of this run may compute at the same time beside one of `role` ("engine" or
    "learner"): its cores are shared that many ways (`speed.machine.share_cores`). On-policy or
    colocated, the workers generate while the learners wait and the other way round; with batches
    in flight, both compute together."""
    if ray_cfg.colocate or ray_cfg.max_staleness == 0:
        return ray_cfg.num_engines if role == "engine" else ray_cfg.num_learners
    return ray_cfg.num_engines + ray_cfg.num_learners


def weight_sync_mode(ray_cfg: Any) -> str:
    """How this run's weights reach the rollout workers: in memory when colocated (engine i lives in
    learner i's process), else `ray.weight_sync`, with auto resolved to a broadcast on GPUs (NCCL
    skips the host copy) for on-policy runs, else the object store."""
    if ray_cfg.colocate:
        return "in_process"
    if ray_cfg.weight_sync != "auto":
        return ray_cfg.weight_sync
    on_policy_gpus = torch.cuda.is_available() and ray_cfg.max_staleness == 0
    return "broadcast" if on_policy_gpus else "object_store"


def plan(ray_cfg: Any) -> Placement:
    """Each actor's resources. A learner takes one GPU (on CPU, one CPU), a rollout worker
    `engine_tensor_parallel_size` GPUs. Colocated, there are no rollout workers of their own:
    each learner's actor also holds engine i (`learners.ColocatedWorker`), on the learner's device."""
    gpu = torch.cuda.is_available()
    learner = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
    engine = {"num_cpus": 1, "num_gpus": ray_cfg.engine_tensor_parallel_size if gpu else 0}
    return Placement([] if ray_cfg.colocate else [dict(engine) for _ in range(ray_cfg.num_engines)],
                     [dict(learner) for _ in range(ray_cfg.num_learners)])


def free_port() -> int:
    """A free TCP port on this node's loopback (the learner group's rendezvous on one node)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_address() -> tuple[str, int]:
    """(this node's address as the cluster knows it, a free port on it): rank 0's rendezvous point."""
    import socket

    import ray

    address = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((address, 0))
        return address, s.getsockname()[1]
