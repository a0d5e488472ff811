"""The `ray` config section of `python -m lampo.ppo_ray`: its checks name the key, and the actors'
resources and thread shares follow from it (lampo.distributed.ray.cluster, no cluster started)."""

from __future__ import annotations

import pytest

from lampo.config import ConfigError, LampoConfig
from lampo.distributed.ray.cluster import actor_cpus, computing_at_once, plan, weight_sync_mode


@pytest.mark.parametrize(("kw", "message"), [
    (dict(num_engines=0), r"'num_engines' = 0 is invalid: must be >= 1"),
    (dict(num_learners=0), r"'num_learners' = 0 is invalid: must be >= 1"),
    (dict(engine_tensor_parallel_size=0), r"'engine_tensor_parallel_size' = 0 is invalid: must be >= 1"),
    (dict(chunks_per_engine=0), r"'chunks_per_engine' = 0 is invalid: must be >= 1"),
    (dict(max_staleness=-1), r"'max_staleness' = -1 is invalid: must be >= 0 \(0: on-policy\)"),
    (dict(weight_sync_timeout=0.0), r"'weight_sync_timeout' = 0.0 is invalid: must be > 0"),
    (dict(engine_max_restarts=-1), r"'engine_max_restarts' = -1 is invalid"),
    (dict(local_num_cpus=0), r"'local_num_cpus' = 0 is invalid"),
    (dict(deepspeed_config="ds.json"), r"'deepspeed_config' = 'ds.json' is invalid: is read only with "
                                       r"learner_backend: deepspeed"),
    (dict(learner_backend="fsdp"), r"'learner_backend' = 'fsdp' has the wrong type"),
    (dict(colocate=True, max_staleness=1), r"'colocate' = True is invalid: .*set max_staleness: 0"),
    (dict(weight_sync="broadcast", max_staleness=1), r"'weight_sync' = 'broadcast' is invalid: .*set max_staleness: 0 "
                                                     r"\(now 1\), or weight_sync: object_store"),
    (dict(weight_sync="nccl"), r"'weight_sync' = 'nccl' has the wrong type"),
    (dict(colocate=True, max_staleness=0, num_engines=2, num_learners=1),
     r"'colocate' = True is invalid: .*num_engines = num_learners \(now 2 and 1\)"),
    (dict(colocate=True, max_staleness=0, weight_sync="broadcast"),
     r"'weight_sync' = 'broadcast' is invalid: does not apply with colocate: true.*set weight_sync: auto"),
])
def test_a_bad_ray_key_is_refused_naming_it(kw, message):
    with pytest.raises(ConfigError, match=message):
        LampoConfig(**kw)


def test_the_ray_section_reads_flat_and_sectioned():
    flat = LampoConfig(num_engines=2, max_staleness=0, address="auto")
    nested = LampoConfig.from_dict({"ray": {"num_engines": 2, "max_staleness": 0, "address": "auto"}})
    for cfg in (flat, nested):
        assert (cfg.ray.num_engines, cfg.ray.max_staleness, cfg.ray.address) == (2, 0, "auto")
    assert (LampoConfig().ray.max_staleness, LampoConfig().ray.address, LampoConfig().ray.dashboard) == (1, None, False)


def test_separate_placement_asks_one_cpu_per_actor_on_a_cpu_machine():
    cfg = LampoConfig(num_engines=2, num_learners=3).ray
    placement = plan(cfg)
    assert placement.engine_options == [{"num_cpus": 1, "num_gpus": 0}] * 2
    assert placement.learner_options == [{"num_cpus": 1, "num_gpus": 0}] * 3
    assert actor_cpus(cfg) == 5


def test_colocated_pairs_are_one_actor_each_on_one_device(monkeypatch):
    import torch

    cfg = LampoConfig(colocate=True, max_staleness=0, num_engines=2, num_learners=2).ray
    for gpus in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpus=gpus: gpus)
        placement = plan(cfg)
        # no rollout worker of its own: each learner's actor holds its engine
        assert placement.engine_options == []
        assert placement.learner_options == [{"num_cpus": 1, "num_gpus": int(gpus)}] * 2
    assert actor_cpus(cfg) == 2


@pytest.mark.parametrize(("kw", "engine", "learner"), [
    # on-policy: the workers generate while the learners wait, and the other way round
    (dict(max_staleness=0, num_engines=1, num_learners=1), 1, 1),
    (dict(max_staleness=0, num_engines=2, num_learners=3), 2, 3),
    # colocated (on-policy by rule): the same
    (dict(colocate=True, max_staleness=0, num_engines=2, num_learners=2), 2, 2),
    # batches in flight: every actor computes at once
    (dict(max_staleness=1, num_engines=1, num_learners=1), 2, 2),
    (dict(max_staleness=2, num_engines=2, num_learners=3), 5, 5),
])
def test_cores_are_shared_by_the_actors_that_compute_at_once(kw, engine, learner):
    cfg = LampoConfig(**kw).ray
    assert (computing_at_once(cfg, "engine"), computing_at_once(cfg, "learner")) == (engine, learner)


@pytest.mark.parametrize(("kw", "gpus", "mode"), [
    (dict(max_staleness=0), False, "object_store"),           # CPUs: the object store reads arrays in place
    (dict(max_staleness=0), True, "broadcast"),               # GPUs, on-policy: NCCL skips the host copy
    (dict(max_staleness=1), True, "object_store"),            # batches in flight: the object store's hand-off
    (dict(max_staleness=0, colocate=True), True, "in_process"),  # engine i in learner i's process
    (dict(max_staleness=0, colocate=True), False, "in_process"),
    (dict(max_staleness=0, weight_sync="broadcast"), False, "broadcast"),  # asked for: gloo on CPUs
    (dict(max_staleness=0, weight_sync="object_store"), True, "object_store"),
])
def test_auto_weight_sync_broadcasts_on_gpus_for_on_policy_runs_on_separate_devices(monkeypatch, kw, gpus, mode):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus)
    assert weight_sync_mode(LampoConfig(**kw).ray) == mode


@pytest.mark.parametrize(("local_num_cpus", "usable", "declared"), [(None, 1, 1), (None, 3, 3), (8, 3, 8)])
def test_a_local_cluster_declares_the_cpus_this_process_may_run_on(monkeypatch, local_num_cpus, usable, declared):
    """Under taskset or a container's cpuset the machine has more CPUs than the run may use; a local
    cluster declares the usable ones (and at least one per actor), unless `local_num_cpus` says."""
    ray = pytest.importorskip("ray")
    from lampo.config import RayConfig
    from lampo.distributed.ray import cluster

    monkeypatch.setattr(cluster.os, "sched_getaffinity", lambda pid: set(range(usable)))
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 64)
    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    assert cluster.connect(RayConfig(local_num_cpus=local_num_cpus), cpus_needed=1)
    assert seen["num_cpus"] == declared and seen["address"] == "local"
    seen.clear()
    assert cluster.connect(RayConfig(local_num_cpus=local_num_cpus), cpus_needed=4)  # more actors than CPUs
    assert seen["num_cpus"] == max(declared, 4)
