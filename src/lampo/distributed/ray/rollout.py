"""Rollout workers: Ray actors that each hold one engine, and the driver's pool of them.

A worker runs the same multi-step rollout as the in-process trainer (`lampo.rollout.multistep`)
on the rows it is given: every turn of a conversation is generated on one worker, so vLLM's
prefix cache serves its later turns. A batch goes out in parts (`chunks_per_engine` per
engine), each to the worker with the fewest rows queued; the driver scores each part as soon as
it comes back.

Each worker records the policy version it holds, and every conversation it returns carries it.
Calls to one worker run one at a time, in the order the driver sent them: a weight update sent
after a part runs after that part, and a part sent after an update samples with the new weights,
without the driver waiting for either.

A worker that dies is restarted by Ray (`engine_max_restarts`), given the current weights
again, and the parts it held go to the workers again; `ray/engine_restarts` counts it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lampo.distributed.ray.wire import from_wire, to_wire, unpack_weights
from lampo.trainer import WorkerLost

log = logging.getLogger(__name__)

RESTART_TIMEOUT = 600.0
"""Seconds to wait for Ray to bring a dead rollout worker back (it loads its model again)."""


class WeightSyncTimeout(WorkerLost):
    """A rollout worker did not take new weights within `weight_sync_timeout`."""


class NoRolloutWorkers(WorkerLost):
    """Every rollout worker died and Ray restarts none of them any more."""


class EngineWorker:
    """One rollout worker (a Ray actor): the tokenizer, an engine, and the policy version it holds."""

    def __init__(self, cfg: Any, index: int, seed: int, vllm_kwargs: dict[str, Any] | None = None) -> None:
        self._start_engine(cfg, index, seed, vllm_kwargs)

    def _start_engine(self, cfg: Any, index: int, seed: int, vllm_kwargs: dict[str, Any] | None) -> None:
        from lampo import speed
        from lampo.distributed.ray.cluster import computing_at_once
        from lampo.distributed.strategy import local_device
        from lampo.speed.machine import share_cores
        from lampo.trainer import build_engine, load_tokenizer

        share_cores(computing_at_once(cfg.ray, "engine"))  # before vLLM starts: it blocks the setting
        speed.apply_machine_settings(cfg.speed)  # the in-process engine's process has them too
        self.cfg, self.index = cfg, index
        self.tokenizer = load_tokenizer(cfg)
        # the hf engine on the GPU Ray gave this actor, if any (vLLM places itself)
        self.engine = build_engine(cfg, self.tokenizer, seed=seed, vllm_kwargs=vllm_kwargs, device=local_device())
        self.version = 0
        # Tells a restarted worker from the one before it (Ray keeps the actor's handle).
        self.incarnation = uuid.uuid4().hex

    def ready(self) -> str:
        return self.incarnation

    def held_version(self) -> int:
        return self.version

    def prompt_cache_block(self) -> int:
        return self.engine.prompt_cache_block

    def rollout(self, rows: list, seed: int | None, first_row: int):
        """The conversations of `rows` (the batch's rows from position `first_row` on), with this
        worker's policy version: a `RolloutBatch` as `wire.to_wire` packs it."""
        from lampo.rollout.multistep import rollout

        return to_wire(rollout(self.engine, self.tokenizer, rows, self.cfg.generation, self.cfg.data,
                               policy_version=self.version, seed=seed, first_row=first_row))

    def update_weights(self, box: list, version: int) -> int:
        """Load the weights in `box` (one object-store reference to the weight contract's list of
        (name, tensor), `lampo.rollout.weight_sync`, as `wire.pack_weights` stores it); the engine drops its
        cached prefixes."""
        import ray

        self.engine.update_weights(unpack_weights(ray.get(box[0])))
        self.version = version
        return version

    def join_weight_group(self, address: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        """Join the weight-sync group of learner rank 0 and the workers (`ray.weight_sync: broadcast`)."""
        from lampo.distributed.ray.broadcast import WeightGroup
        from lampo.distributed.strategy import local_device

        self.weight_group = WeightGroup(address, port, rank, world, timeout_s, device=local_device())

    def receive_weights(self, version: int) -> int:
        """Load the weights learner rank 0 broadcasts now (`WeightGroup.receive`), as `update_weights`
        loads those of the object store."""
        self.engine.update_weights(self.weight_group.receive())
        self.version = version
        return version

    def generate(self, prompts: list[list[int]], settings: Any) -> list:
        return self.engine.generate(prompts, settings)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        self.engine.close()


@dataclass
class Chunk:
    """One part of a batch on its way through a worker."""

    index: int
    rows: list
    first_row: int
    engine: int
    ref: Any = None


@dataclass
class Job:
    """The parts of one batch: rows, its sampling seed, and the parts sent out."""

    seed: int | None
    chunks: list[Chunk]
    started: float


class EnginePool:
    """The driver's side of the rollout workers: where each part goes, weight updates, restarts."""

    def __init__(self, cfg: Any, placement_options: list[dict[str, Any]], vllm_kwargs: dict[str, Any] | None = None,
                 colocated: list | None = None):
        """colocated: the learners' actors, each holding an engine (`learners.ColocatedWorker`), in place
        of rollout workers of their own."""
        import ray

        y = cfg.ray
        self.cfg = cfg
        self.chunks_per_engine = y.chunks_per_engine
        self.sync_timeout = y.weight_sync_timeout
        self.colocated = colocated is not None
        actor = ray.remote(EngineWorker).options
        self.workers = list(colocated) if colocated is not None else [
            actor(max_restarts=y.engine_max_restarts, max_task_retries=0, name=None, **opts)
            .remote(cfg, i, cfg.train.seed + i, vllm_kwargs)
            for i, opts in enumerate(placement_options)
        ]
        self.incarnations = ray.get([w.ready.remote() for w in self.workers])
        self.alive = [True] * len(self.workers)
        self.queued_rows = [0] * len(self.workers)
        self.weights: list | None = None  # the latest weights (a box around their object-store reference)
        self.version = 0
        self.restarts = 0
        self.requeued_chunks = 0
        self._lock = threading.Lock()
        self._engine_locks = [threading.Lock() for _ in self.workers]
        self._updates: list[tuple[int, int, Any, float]] = []  # (engine, version, ref, sent at)
        self.broadcasting = False
        """Whether weights go by broadcast (`open_weight_group`), not the object store."""
        self.learners: Any = None
        self.group_members: list[int] = []
        self.prompt_cache_block = ray.get(self.workers[0].prompt_cache_block.remote())

    # ------------------------------------------------------------------ rollout
    def dispatch(self, rows: list, seed: int | None) -> Job:
        """Send `rows` out in parts, each to the live worker with the fewest rows queued."""
        live = max(sum(self.alive), 1)
        size = max(1, math.ceil(len(rows) / (live * self.chunks_per_engine)))
        chunks = [Chunk(k, rows[start:start + size], start, -1) for k, start in enumerate(range(0, len(rows), size))]
        for chunk in chunks:
            self._send(chunk, seed)
        return Job(seed, chunks, time.perf_counter())

    def _send(self, chunk: Chunk, seed: int | None) -> None:
        with self._lock:
            candidates = [i for i, ok in enumerate(self.alive) if ok]
            if not candidates:
                raise NoRolloutWorkers("every rollout worker died and Ray restarts none of them any more "
                                       "(engine_max_restarts); the run cannot roll out")
            engine = min(candidates, key=lambda i: (self.queued_rows[i], i))
            self.queued_rows[engine] += len(chunk.rows)
        chunk.engine = engine
        chunk.ref = self.workers[engine].rollout.remote(chunk.rows, seed, chunk.first_row)

    def completed(self, job: Job) -> Iterator[tuple[Chunk, Any]]:
        """(part, its RolloutBatch) as each part comes back; a part whose worker died is sent again."""
        import ray

        waiting = {c.ref: c for c in job.chunks}
        while waiting:
            done, _ = ray.wait(list(waiting), num_returns=1)
            chunk = waiting.pop(done[0])
            with self._lock:
                self.queued_rows[chunk.engine] -= len(chunk.rows)
            try:
                batch = from_wire(ray.get(done[0]))
            except ray.exceptions.RayActorError as exc:
                log.warning("rollout worker %d died while rolling out %d rows (%s); its rows go out again",
                            chunk.engine, len(chunk.rows), type(exc).__name__)
                self.recover(chunk.engine)
                self.requeued_chunks += 1
                self._send(chunk, job.seed)
                waiting[chunk.ref] = chunk
                continue
            yield chunk, batch

    # ------------------------------------------------------------------ weights
    def open_weight_group(self, learners: Any) -> None:
        """Build the broadcast group of learner rank 0 and every live worker (`ray.weight_sync:
        broadcast`); `sync_by_broadcast` then sends each update through it."""
        import ray

        self.learners = learners
        live = [i for i, ok in enumerate(self.alive) if ok]
        address, port = learners.rendezvous()
        world = 1 + len(live)
        joins = [self.workers[i].join_weight_group.remote(address, port, rank, world, self.sync_timeout)
                 for rank, i in enumerate(live, start=1)]
        learners.join_weight_group(address, port, world, self.sync_timeout)
        ray.get(joins, timeout=self.sync_timeout)
        self.group_members = live
        self.broadcasting = True

    def sync_by_broadcast(self, version: int) -> None:
        """Learner rank 0 broadcasts the weights to every worker, which loads them; returns when all
        have (on-policy runs only: no rollout is queued on a worker now). A worker that died
        meanwhile is restarted and the pool goes over to the object store for the rest of the run:
        the group cannot take the new process in."""
        import ray

        receives = {i: self.workers[i].receive_weights.remote(version) for i in self.group_members}
        sent_error: Exception | None = None
        try:
            self.learners.send_weights()
        except ray.exceptions.RayTaskError as exc:  # a worker left the group (the cause shows below)
            sent_error = exc
        dead, stuck = [], []
        for i, ref in receives.items():
            try:
                ray.get(ref, timeout=self.sync_timeout)
            except ray.exceptions.RayActorError:
                dead.append(i)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError):
                stuck.append(i)
        if dead:
            self.version = version
            self._stop_broadcasting(dead)
            return
        if sent_error is not None or stuck:
            raise WeightSyncTimeout(
                f"rollout worker(s) {stuck or list(receives)} did not receive the weights of policy version {version} "
                f"from learner rank 0 within weight_sync_timeout = {self.sync_timeout:g} s (ray.weight_sync: "
                f"broadcast). Check the workers' logs (`ray logs`); {sent_error or ''}"
            ) from sent_error
        self.version = version

    def _stop_broadcasting(self, dead: list[int]) -> None:
        self._to_object_store(f"rollout worker(s) {dead} died during a broadcast weight sync")
        for engine in dead:
            self.recover(engine)  # the restarted worker gets the object store's weights
        self.update(self.weights, self.version)  # the workers the failed broadcast left behind
        self.check_updates(block=True)

    def _to_object_store(self, why: str) -> None:
        """Leave the broadcast group for the rest of the run: a restarted process cannot join it.
        On-policy, the learners hold exactly the weights of `self.version` while no update runs."""
        if not self.broadcasting:
            return
        log.warning("%s; the run goes on with ray.weight_sync: object_store (the broadcast group cannot take "
                    "restarted workers in)", why)
        self.broadcasting = False
        self.weights = self.learners.publish_weights()

    def update(self, box: list, version: int) -> None:
        """Send new weights to every live worker. A worker loads them after the parts it already
        holds; the driver does not wait (`check_updates` reports a worker that never does)."""
        self.check_updates(block=False)
        self.weights, self.version = box, version
        now = time.perf_counter()
        for i, worker in enumerate(self.workers):
            if self.alive[i]:
                self._updates.append((i, version, worker.update_weights.remote(box, version), now))

    def check_updates(self, block: bool = True) -> None:
        """Raise for a worker that has not taken its weights within `weight_sync_timeout` of being
        sent them (after the parts queued before them); recover a worker that died meanwhile.
        block: wait for every update sent so far."""
        import ray

        left = []
        for engine, version, ref, sent in self._updates:
            timeout = max(self.sync_timeout - (time.perf_counter() - sent), 0.0)
            try:
                ray.get(ref, timeout=timeout if block else 0)
            except ray.exceptions.GetTimeoutError:
                if block or time.perf_counter() - sent > self.sync_timeout:
                    raise WeightSyncTimeout(
                        f"rollout worker {engine} did not load the weights of policy version {version} within "
                        f"weight_sync_timeout = {self.sync_timeout:g} s of being sent them (after the rollouts "
                        "queued before them); the worker may hang. Check its log (`ray logs`), raise "
                        "weight_sync_timeout for very large models"
                    ) from None
                left.append((engine, version, ref, sent))
            except ray.exceptions.RayActorError:
                self.recover(engine)
        self._updates = left

    def recover(self, engine: int) -> None:
        """After a call to `engine` failed because its actor died: wait for Ray to restart it and give
        it the current weights; a worker Ray no longer restarts leaves the pool. A colocated worker
        was a learner too: its death stops the run as a learner's does (`LearnerDied`)."""
        import ray

        if self.colocated:
            from lampo.distributed.ray.learners import LearnerDied

            world = len(self.workers)
            raise LearnerDied(f"colocated worker {engine} (rollout worker and learner rank {engine}) died",
                              survivor_can_save=engine != 0 and world > 1 and self.cfg.ray.learner_backend == "ddp")
        with self._engine_locks[engine]:
            if not self.alive[engine]:
                return
            incarnation = self._wait_for_restart(engine)
            if incarnation is None:
                with self._lock:
                    self.alive[engine] = False
                return
            if incarnation == self.incarnations[engine]:
                return  # another call already saw this death and recovered the worker
            self.incarnations[engine] = incarnation
            self.restarts += 1
            log.warning("rollout worker %d was restarted by Ray; giving it policy version %d", engine, self.version)
            self._to_object_store(f"rollout worker {engine} was restarted")
            if self.weights is not None:
                ray.get(self.workers[engine].update_weights.remote(self.weights, self.version), timeout=self.sync_timeout)

    def _wait_for_restart(self, engine: int) -> str | None:
        """The incarnation of `engine` once Ray has it running again; None if Ray gave up on it."""
        import ray

        deadline = time.monotonic() + RESTART_TIMEOUT
        while True:
            try:
                return ray.get(self.workers[engine].ready.remote(), timeout=max(deadline - time.monotonic(), 0.0))
            except ray.exceptions.ActorUnavailableError:  # restarting: Ray refuses calls for a moment
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                log.error("rollout worker %d is gone for good (%s); %d workers remain", engine, type(exc).__name__,
                          sum(self.alive) - 1)
                return None
        log.error("rollout worker %d did not come back within %.0f s; %d workers remain", engine, RESTART_TIMEOUT,
                  sum(self.alive) - 1)
        return None

    # ------------------------------------------------------------------ the rest
    def call_all(self, method: str, *args: Any) -> list:
        """`method(*args)` on every live worker, in order; their results."""
        import ray

        return ray.get([getattr(w, method).remote(*args) for i, w in enumerate(self.workers) if self.alive[i]])

    def metrics(self) -> dict[str, float]:
        return {"ray/engine_restarts": float(self.restarts), "ray/requeued_chunks": float(self.requeued_chunks),
                "ray/live_engines": float(sum(self.alive)), "ray/weight_broadcast": float(self.broadcasting)}

    def close(self) -> None:
        import ray

        if self.colocated:
            return  # the learner group closes the actors it shares
        for worker in self.workers:
            try:
                ray.get(worker.close.remote(), timeout=60)
            except Exception as exc:  # shutting down is best effort
                log.debug("rollout worker close: %s", exc)
            ray.kill(worker, no_restart=True)
