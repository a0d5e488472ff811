"""Weight sync by broadcast: learner rank 0 sends the weights to every rollout worker in a
process group of their own (NCCL between GPUs, gloo between CPUs), beside the learners' group.

`ray.weight_sync: broadcast` (docs/ray.md). The group has rank 0 on learner rank 0 and ranks
1..n on the n rollout workers; it is built from a TCP store of its own and torch's process
group classes directly, so that it neither needs nor disturbs the default torch.distributed
group the learners train in (a process has one default group).

One sync is, in every member, in this order:
  1. the tensor list's description (names, shapes, dtypes), as one pickled byte tensor;
  2. the tensors, packed into flat buckets of one dtype and at most `bucket_bytes` each, one
     broadcast per bucket (a few large collectives, not one per tensor).
Receivers get the weight contract's (name, tensor) list (`lampo.rollout.weight_sync`) as views
of the received buckets. Every collective has the group's timeout: a member that never joins
makes the others fail with an error, not wait for ever.
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 << 20
"""Largest flat buffer of one sync step: large enough that a 7B model takes a few dozen
collectives, small enough that the packed copy on the sender stays a fraction of the weights."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def plan_buckets(specs: list[TensorSpec], bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Consecutive runs of `specs` of one dtype, each at most `bucket_bytes` (a larger tensor alone)."""
    buckets: list[list[int]] = []
    size = 0
    for i, spec in enumerate(specs):
        nbytes = spec.numel * spec.dtype.itemsize
        last = buckets[-1] if buckets else None
        if last is None or specs[last[0]].dtype != spec.dtype or size + nbytes > bucket_bytes:
            buckets.append([i])
            size = nbytes
        else:
            last.append(i)
            size += nbytes
    return buckets


class WeightGroup:
    """One member of the weight-sync group. rank 0 sends (`send`), the others receive (`receive`)."""

    def __init__(self, address: str, port: int, rank: int, world: int, timeout_s: float,
                 device: torch.device | str = "cpu", bucket_bytes: int = BUCKET_BYTES) -> None:
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.bucket_bytes = bucket_bytes
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(address, port, world, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore("lampo-weights", self.store)
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world, options)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Rank 0: broadcast the (name, tensor) list; returns the bytes sent."""
        items = [(name, t.detach()) for name, t in named]
        specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in items]
        self._send_bytes(pickle.dumps(specs))
        sent = 0
        for bucket in plan_buckets(specs, self.bucket_bytes):
            flat = torch.cat([items[i][1].reshape(-1).to(self.device) for i in bucket])
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self) -> list[tuple[str, torch.Tensor]]:
        """The other ranks: the (name, tensor) list rank 0 sent, on this member's device."""
        specs: list[TensorSpec] = pickle.loads(self._receive_bytes())
        out: list[tuple[str, torch.Tensor]] = []
        for bucket in plan_buckets(specs, self.bucket_bytes):
            flat = torch.empty(sum(specs[i].numel for i in bucket), dtype=specs[bucket[0]].dtype, device=self.device)
            self._broadcast(flat)
            for i, part in zip(bucket, flat.split([specs[i].numel for i in bucket]), strict=True):
                out.append((specs[i].name, part.view(specs[i].shape)))
        return out

    def _send_bytes(self, payload: bytes) -> None:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        self._broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
        self._broadcast(data)

    def _receive_bytes(self) -> bytes:
        length = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(length)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        self._broadcast(data)
        return data.cpu().numpy().tobytes()

    def close(self) -> None:
        self.pg = None
        self.store = None
