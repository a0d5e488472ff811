"""The learner group: Ray actors that form one torch.distributed group and run the usual Learner.

Each actor is one rank (gloo on CPU, NCCL on GPU). It builds its models and its Strategy as a
rank of `accelerate launch -m lampo.ppo_vllm` would (DDP, or DeepSpeed ZeRO with
`learner_backend: deepspeed`), and trains the rows the driver gives it with `Learner.train`:
the same phases 3-5, the same checkpoint code (`lampo.trainer.save_learner_checkpoint`).

The driver splits a batch into one contiguous part per rank; groups of samples stay whole, as
the group estimators need. Rank 0 publishes the policy's weights to the object store after each
update (under ZeRO-3 every rank takes part in gathering them first).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lampo import checkpoint as ckpt
from lampo.distributed.ray.rollout import EngineWorker
from lampo.distributed.ray.wire import from_wire, pack_weights, to_wire
from lampo.trainer import RANK_STATES, WorkerLost

log = logging.getLogger(__name__)

PEER_GRACE = 60.0
"""Seconds the other learners get to return once one of them died (a collective may be waiting on it)."""


class LearnerDied(WorkerLost):
    """A learner actor died; the run stops (see `RayTrainer._worker_lost`)."""

    def __init__(self, message: str, survivor_can_save: bool):
        super().__init__(message)
        self.survivor_can_save = survivor_can_save


class LearnerWorker:
    """One rank of the learner group (a Ray actor)."""

    def __init__(self, cfg: Any, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.learner = None
        self.consistent = True
        """False while (or after a failed) update is half applied: no checkpoint from these weights."""

    def rendezvous(self) -> tuple[str, int]:
        """Where the group meets: this node's address and a free port on it (asked of rank 0)."""
        from lampo.distributed.ray.cluster import node_address

        return node_address()

    def set_up(self, address: str, port: int, resume: str | None, num_steps: int) -> float | None:
        """Join the group, build the models (from the checkpoint `resume`) and the Learner. Returns the
        device's measured matmul peak on rank 0 (perf/mfu), unless `peak_flops` is set."""
        from lampo import speed
        from lampo.distributed.ray.cluster import computing_at_once
        from lampo.optimize.learner import Learner
        from lampo.optimize.ptx import ptx_batch
        from lampo.speed.machine import machine_peak, share_cores
        from lampo.trainer import _half_dtype_name, _seed_everything, load_models, load_tokenizer

        cfg = self.cfg
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        share_cores(computing_at_once(cfg.ray, "learner"))
        strategy = self._strategy()
        _seed_everything(cfg.train.seed + self.rank)
        speed.apply_machine_settings(cfg.speed)
        path = Path(resume) if resume else None
        policy, value_model, ref_model = load_models(cfg, path)
        ptx = ptx_batch(cfg, load_tokenizer(cfg))
        self.learner = Learner(cfg, policy, ref_model=ref_model, value_model=value_model,
                               num_training_steps=num_steps, strategy=strategy, ptx=ptx,
                               keep_sampling_weights=cfg.ray.max_staleness > 0)
        if path is not None:
            states, _ = ckpt.load_checkpoint(path)  # torch's safe loader, as the in-process trainer
            self.learner.load_state_dict(states["learner"])
            self.learner.load_shards(path)
            own = path / RANK_STATES / f"{self.rank}.pt"
            if own.exists():  # absent for a rank that died (rank 0 saved alone): it keeps its seeded state
                ckpt.set_rng_state(ckpt.load_state_file(own)["rng"])
        if self.rank == 0 and not cfg.speed.peak_flops:
            return machine_peak(getattr(torch, _half_dtype_name(cfg.model) or "float32"), device=self.learner.device)
        return None

    def _strategy(self):
        cfg = self.cfg
        if cfg.ray.learner_backend == "deepspeed":
            import json

            from lampo.distributed.deepspeed_zero import DeepSpeedStrategy

            source = cfg.ray.deepspeed_config
            user = json.loads(Path(source).read_text()) if source else {"zero_optimization": {"stage": 2}}
            return DeepSpeedStrategy(user, source=source or "ray.learner_backend: deepspeed")
        if self.world == 1:
            from lampo.distributed.strategy import Strategy

            return Strategy()
        from accelerate import Accelerator

        from lampo.distributed.ddp import AccelerateDDP

        gpu = torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if gpu else "gloo", rank=self.rank, world_size=self.world)
        return AccelerateDDP(Accelerator(cpu=not gpu))

    # ------------------------------------------------------------------ phases 3-5
    def learn(self, batch, cache_block: int, publish_as: int | None) -> tuple[dict[str, float], dict[str, float],
                                                                              list | None]:
        """`Learner.train` on this rank's part of the batch (as `wire.to_wire` packs it); (its metrics, its
        floating-point work, with `publish_as` (the policy version the update makes) the updated weights
        as `publish_weights` gives them, else None): the object-store sync that follows every update
        costs no call of its own."""
        from lampo import perf

        batch = from_wire(batch)
        before = self._optimizer_steps()
        self.consistent = False
        try:
            stats = self.learner.train(batch)
        except BaseException:
            self.consistent = self._optimizer_steps() == before  # failed before any update: still whole
            raise
        self.consistent = True
        return stats, perf.learner_step_flops(self.learner, batch, cache_block), (
            None if publish_as is None else self.publish_weights())

    def _optimizer_steps(self) -> float:
        """Adam's step count of the first trained parameter: whether an update has been applied."""
        opt = self.learner.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "step" in state:
                    return float(state["step"])
        return 0.0

    def logprobs(self, batch):
        """The policy's log-probs of this rank's part (both packed by `wire.to_wire`)."""
        return to_wire(self.learner.logprobs(from_wire(batch)))

    def publish_weights(self) -> list | None:
        """The policy's weights in the object store (rank 0), as the weight contract's (name, tensor) list;
        a box around the reference, so that Ray hands the reference on rather than the weights."""
        import ray

        from lampo.rollout.weight_sync import engine_weights

        policy = self.learner.unwrapped_policy()
        with self.learner.full_weights(policy):  # ZeRO-3: every rank takes part in the gather
            if self.rank == 0:
                return [ray.put(pack_weights(engine_weights(policy)))]
        return None

    def join_weight_group(self, address: str, port: int, world: int, timeout_s: float) -> None:
        """Rank 0: be the sender (rank 0) of the weight-sync group with the rollout workers."""
        from lampo.distributed.ray.broadcast import WeightGroup

        if self.rank == 0:
            self.weight_group = WeightGroup(address, port, 0, world, timeout_s, device=self.learner.device)

    def send_weights(self) -> int:
        """Broadcast the policy's weights to the rollout workers (rank 0; under ZeRO-3 every rank takes
        part in gathering them first). Returns the bytes sent."""
        from lampo.rollout.weight_sync import engine_weights

        policy = self.learner.unwrapped_policy()
        with self.learner.full_weights(policy):
            return self.weight_group.send(engine_weights(policy)) if self.rank == 0 else 0

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, staged: str, step: int, states: dict, trainer_state: dict) -> str | None:
        """Every rank's part of a checkpoint the driver staged; rank 0 completes it with `states` (the
        driver's) and `trainer_state`. Returns its path on rank 0."""
        from lampo.trainer import save_learner_checkpoint

        path = save_learner_checkpoint(self.learner, self.cfg, Path(staged), step, states=states,
                                       trainer_state=trainer_state, rank_state={"rng": ckpt.rng_state()})
        return None if path is None else str(path)

    def save_checkpoint_alone(self, staged: str, step: int, states: dict, trainer_state: dict) -> str | None:
        """Rank 0 after another rank died: data parallel ranks all hold the whole training state, so
        rank 0 writes it without the group (no collective), if no update was half applied."""
        from lampo.trainer import save_learner_checkpoint

        if not self.consistent or self.rank != 0 or self.cfg.ray.learner_backend != "ddp":
            return None
        path = save_learner_checkpoint(self.learner, self.cfg, Path(staged), step, states=states,
                                       trainer_state=trainer_state, rank_state={"rng": ckpt.rng_state()},
                                       alone=True)
        return None if path is None else str(path)

    def checkpoint_doubt(self) -> str | None:
        return self.learner.checkpoint_doubt()

    def save_final(self, output_dir: str) -> None:
        from lampo.trainer import load_tokenizer, save_final_model

        save_final_model(self.learner, Path(output_dir), load_tokenizer(self.cfg),
                         save_merged=self.cfg.train.save_merged, is_main=self.rank == 0)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if self.learner is not None:
            self.learner.strategy.close()


class ColocatedWorker(LearnerWorker, EngineWorker):
    """Learner rank i and rollout worker i in one process (`ray.colocate`), as verl's hybrid engine:
    the engine loads the policy's weights from memory, and the device (on CPU, the cores) passes
    between generation and training without a hand-off between processes. The driver calls it as a
    learner (`LearnerGroup`) and as a rollout worker (`EnginePool`); one death ends both roles."""

    def set_up(self, address: str, port: int, resume: str | None, num_steps: int,
               vllm_kwargs: dict[str, Any] | None = None) -> float | None:
        """The learner first, then the engine (seeded as rollout worker `rank` would be): the learners'
        process group must exist before vLLM starts in the process, as in `ppo_vllm`'s ranks."""
        from lampo.rollout.engines import VLLMEngine

        peak = LearnerWorker.set_up(self, address, port, resume, num_steps)
        self._start_engine(self.cfg, self.rank, self.cfg.train.seed + self.rank, vllm_kwargs)
        self.sleeps = isinstance(self.engine, VLLMEngine) and bool((vllm_kwargs or {}).get("enable_sleep_mode"))
        return peak

    def learn(self, batch, cache_block: int, publish_as: int | None) -> tuple[dict[str, float], dict[str, float],
                                                                              None]:
        """`LearnerWorker.learn` (on GPU with vLLM asleep, its memory freed for training), then with
        `publish_as` this process's engine loads the updated weights."""
        if self.sleeps:
            self.engine.sleep()
        try:
            stats, flops, _ = LearnerWorker.learn(self, batch, cache_block, None)
        finally:
            if self.sleeps:
                self.engine.wake_up()
        if publish_as is not None:
            self.load_own_weights(publish_as)
        return stats, flops, None

    def load_own_weights(self, version: int) -> int:
        """The engine takes the learner's weights as policy `version` (under ZeRO-3 every rank gathers them
        for its own engine, as in `Trainer.sync`)."""
        from lampo.rollout.weight_sync import engine_weights

        policy = self.learner.unwrapped_policy()
        with self.learner.full_weights(policy):
            self.engine.update_weights(engine_weights(policy))
        self.version = version
        return version

    def close(self) -> None:
        LearnerWorker.close(self)
        if getattr(self, "engine", None) is not None:  # None when set_up failed before the engine started
            EngineWorker.close(self)


class LearnerGroup:
    """The driver's side of the learner group: splits each batch over the ranks, gathers metrics."""

    def __init__(self, cfg: Any, placement_options: list[dict[str, Any]], resume: Path | None, num_steps: int,
                 colocated_engines: dict[str, Any] | None = None):
        """colocated_engines: the vLLM settings of an engine in every rank's process (`ColocatedWorker`)."""
        import ray

        self.cfg = cfg
        self.world = len(placement_options)
        self.colocated = colocated_engines is not None
        actor = ray.remote(ColocatedWorker if self.colocated else LearnerWorker).options
        self.workers = [actor(max_restarts=0, **opts).remote(cfg, rank, self.world)
                        for rank, opts in enumerate(placement_options)]
        address, port = ray.get(self.workers[0].rendezvous.remote())
        engine = (colocated_engines,) if self.colocated else ()
        peaks = self._all("set_up", address, port, None if resume is None else str(resume), num_steps, *engine)
        self.peak_flops = peaks[0]
        self.lr = cfg.optim.learning_rate
        self.flops: dict[str, float] = {}
        self.fresh_weights: list | None = None
        """The weights the last `learn` published (rank 0's box), until `publish_weights` hands them on."""
        self.published_as: int | None = None
        """The policy version the last `learn` published (colocated: loaded into every rank's engine)."""

    def _all(self, method: str, *args: Any, parts: list | None = None,
             meanwhile: Callable[[], None] | None = None) -> list:
        """`method` on every rank (with its own part of `parts` first, when given); their results in
        rank order. meanwhile: called once every rank has been sent the call, before waiting for it.
        A rank that died raises LearnerDied once the others returned or had PEER_GRACE."""
        import ray

        refs = [getattr(w, method).remote(*(([parts[r]] if parts is not None else []) + list(args)))
                for r, w in enumerate(self.workers)]
        if meanwhile is not None:
            meanwhile()
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            first = exc
        dead, stuck = [], []
        for r, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=PEER_GRACE)
            except ray.exceptions.RayActorError:
                dead.append(r)
            except ray.exceptions.GetTimeoutError:
                stuck.append(r)  # waiting in a collective on a dead rank
            except ray.exceptions.RayError:
                continue  # a collective that failed because a peer died, or the error itself
        if not dead:
            raise first
        survivor_can_save = (0 not in dead and 0 not in stuck and self.world > 1
                             and self.cfg.ray.learner_backend == "ddp")
        raise LearnerDied(f"learner rank(s) {dead} of {self.world} died during {method}", survivor_can_save)

    def split(self, batch) -> list:
        """One contiguous part per rank; groups of samples stay whole (batch_size prompts each)."""
        per = len(batch) // self.world
        return [batch.select(torch.arange(r * per, (r + 1) * per if r < self.world - 1 else len(batch)))
                for r in range(self.world)]

    def learn(self, batch, cache_block: int, summed: tuple[str, ...], publish_as: int | None = None,
              meanwhile: Callable[[], None] | None = None) -> dict[str, float]:
        """Train every rank on its part; with `publish_as` (the policy version the update makes), rank 0
        also puts the updated weights in the object store (`publish_weights` hands them on), or
        colocated, every rank's engine loads them. meanwhile: as `_all`'s, once the parts are sent."""
        self.fresh_weights, self.published_as = None, None
        results = self._all("learn", cache_block, publish_as, parts=[to_wire(p) for p in self.split(batch)],
                            meanwhile=meanwhile)
        stats = [s for s, _, _ in results]
        self.flops, self.fresh_weights = results[0][1], results[0][2]
        self.published_as = publish_as
        out = {}
        for key in stats[0]:
            values = [s[key] for s in stats if key in s]
            out[key] = float(sum(values)) if key in summed else float(sum(values) / len(values))
        self.lr = out.get("lr", self.lr)
        return out

    def logprobs(self, batch) -> torch.Tensor:
        width = batch.input_ids.shape[1]  # a part is as wide as its longest row
        parts = self._all("logprobs", parts=[to_wire(p) for p in self.split(batch)])
        return torch.cat([torch.nn.functional.pad(lp, (0, width - lp.shape[1])) for lp in map(from_wire, parts)])

    def load_own_weights(self, version: int) -> None:
        """Colocated: every rank's engine holds the policy's weights as `version` (the last `learn` loaded
        them already, unless nothing was trained or the run resumed)."""
        if self.published_as != version:
            self._all("load_own_weights", version)
        self.published_as = version

    def publish_weights(self) -> list:
        """The policy's weights in the object store: those the last `learn` put there, else put now."""
        box, self.fresh_weights = self.fresh_weights, None
        return box if box is not None else self._all("publish_weights")[0]

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's node address and a free port on it."""
        import ray

        return ray.get(self.workers[0].rendezvous.remote())

    def join_weight_group(self, address: str, port: int, world: int, timeout_s: float) -> None:
        self._all("join_weight_group", address, port, world, timeout_s)

    def send_weights(self) -> int:
        return self._all("send_weights")[0]

    def checkpoint_doubt(self) -> str | None:
        """Rank 0's answer: data parallel ranks hold the same weights (under DeepSpeed it checks its own)."""
        import ray

        return ray.get(self.workers[0].checkpoint_doubt.remote())

    def save_checkpoint(self, staged: Path, step: int, states: dict, trainer_state: dict) -> Path:
        paths = self._all("save_checkpoint", str(staged), step, states, trainer_state)
        return Path(paths[0])

    def save_checkpoint_alone(self, staged: Path, step: int, states: dict, trainer_state: dict) -> Path | None:
        import ray

        try:
            path = ray.get(self.workers[0].save_checkpoint_alone.remote(str(staged), step, states, trainer_state))
        except Exception as exc:
            log.error("rank 0 could not write a checkpoint on its own: %s", exc)
            return None
        return None if path is None else Path(path)

    def save_final(self, output_dir: Path) -> None:
        self._all("save_final", str(output_dir))

    def close(self) -> None:
        import ray

        for worker in self.workers:
            try:
                ray.get(worker.close.remote(), timeout=60)
            except Exception as exc:  # shutting down is best effort
                log.debug("learner close: %s", exc)
            ray.kill(worker, no_restart=True)
