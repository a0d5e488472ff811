"""The weight-sync broadcast group (lampo.distributed.ray.broadcast) over gloo, its members as
threads of one process (each has its own process group, as each Ray actor would)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lampo.distributed.ray.broadcast import TensorSpec, WeightGroup, plan_buckets
from lampo.distributed.ray.cluster import free_port


def _spec(name, n, dtype=torch.float32):
    return TensorSpec(name, (n,), dtype)


def test_buckets_hold_consecutive_tensors_of_one_dtype_up_to_the_size():
    specs = [_spec("a", 10), _spec("b", 10), _spec("c", 30), _spec("d", 5, torch.bfloat16), _spec("e", 5, torch.bfloat16),
             _spec("f", 1)]
    # 100 bytes: a+b = 80 fit, c (120) alone, the two bf16 (20) together, f after a dtype change
    assert plan_buckets(specs, bucket_bytes=100) == [[0, 1], [2], [3, 4], [5]]


def _run(world, member):
    """member(rank, port) in `world` threads; their results (or exceptions) by rank."""
    port, results = free_port(), {}

    def body(rank):
        try:
            results[rank] = member(rank, port)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            results[rank] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_every_receiver_gets_the_senders_weights_names_shapes_dtypes_and_values():
    torch.manual_seed(0)
    weights = [("model.embed_tokens.weight", torch.randn(7, 3)),
               ("model.layers.0.mlp.up_proj.weight", torch.randn(4, 3).to(torch.bfloat16)),
               ("model.norm.weight", torch.randn(3)), ("lm_head.weight", torch.randn(7, 3))]

    def member(rank, port):
        group = WeightGroup("127.0.0.1", port, rank, 3, timeout_s=30, bucket_bytes=64)
        if rank == 0:
            return group.send(weights)
        return group.receive()

    results = _run(3, member)
    assert results[0] == sum(t.numel() * t.element_size() for _, t in weights)
    for rank in (1, 2):
        got = results[rank]
        assert [n for n, _ in got] == [n for n, _ in weights]
        for (_, a), (_, b) in zip(got, weights, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_a_member_that_never_takes_part_makes_the_sync_fail_after_the_timeout_not_hang():
    def member(rank, port):
        group = WeightGroup("127.0.0.1", port, rank, 2, timeout_s=2)
        if rank == 0:
            began = time.monotonic()
            try:
                group.send([("w", torch.ones(3))])
            except RuntimeError as exc:
                return exc, time.monotonic() - began
            return None
        time.sleep(6)  # in the group, alive, busy elsewhere (a worker still rolling out)
        return group

    error, waited = _run(2, member)[0]
    assert isinstance(error, RuntimeError) and 1.5 < waited < 5


@pytest.mark.parametrize("bucket_bytes", [1, 1 << 20])
def test_bucket_size_does_not_change_what_arrives(bucket_bytes):
    weights = [(f"w{i}", torch.full((i + 1,), float(i))) for i in range(5)]

    def member(rank, port):
        group = WeightGroup("127.0.0.1", port, rank, 2, timeout_s=30, bucket_bytes=bucket_bytes)
        return group.send(weights) if rank == 0 else group.receive()

    got = _run(2, member)[1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, weights, strict=True))
