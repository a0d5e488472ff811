"""The Ray driver: the in-process `Trainer`'s loop, with its rollout, learner and sync phases as
remote calls to the rollout workers and the learner group.

`Trainer.train` runs unchanged. What differs is behind its phases:
  produce       the batch goes out in parts to the rollout workers; each part's conversations go
                to the reward model as soon as the part is back (rewards stream)
  learn         each learner rank trains its part of the batch (`LearnerGroup`); colocated, the
                next batch's parts are sent right behind the learn calls
  sync          learner rank 0 puts the weights in Ray's object store; every worker loads them
                after the rollouts it already holds, without the driver waiting (colocated, each
                engine loads its own learner's weights in the learn call)
  checkpoints   the learners write theirs; the driver adds the batches rolled out ahead

Up to `max_staleness` batches are rolled out ahead of the one training; a batch whose groups
are older than that when their step comes is rolled out again (`Trainer._within_staleness`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from lampo import checkpoint as ckpt
from lampo.config import ConfigError, LampoConfig
from lampo.data.formats import PromptRow
from lampo.distributed.ray import cluster
from lampo.distributed.ray.learners import LearnerGroup
from lampo.distributed.ray.rollout import EnginePool, Job
from lampo.distributed.strategy import Strategy
from lampo.optimize.batch import TrainBatch
from lampo.rollout.batch import RolloutBatch
from lampo.speed.machine import coordinate_only
from lampo.trainer import Produced, Trainer, WorkerLost, _done_future, run_trainer

log = logging.getLogger("lampo")


class RayTrainer(Trainer):
    """`Trainer` with rollout workers and a learner group on a Ray cluster (docs/ray.md)."""

    def __init__(self, cfg: LampoConfig, raw_config: dict | None = None):
        y = cfg.ray
        if y.engine_tensor_parallel_size > 1 and not torch.cuda.is_available():
            raise ConfigError(f"config key 'engine_tensor_parallel_size' = {y.engine_tensor_parallel_size} is "
                              "invalid here: tensor parallel engines need GPUs, and this machine has none")
        # The driver is one process; the learners are `num_learners` data-parallel ranks, and it
        # rolls out all of their prompts each step (in the order their ranks would own them).
        self._set_up_run(cfg, raw_config, Strategy(), y.num_learners, cfg.optim.batch_size * y.num_learners, 1)
        self.max_staleness = y.max_staleness
        self.sync_waits_for_rollouts = False  # a worker loads weights after the rollouts queued before them
        self.started_ray = cluster.connect(y, cluster.actor_cpus(y))
        if "://" in cfg.reward.reward_model:
            # the driver then only joins and pads batches: its cores are the actors'
            # (an in-process reward model computes here and keeps its threads)
            coordinate_only()
        self._dispatched: dict[tuple[int, int], Any] = {}
        # Each part is scored as it comes back, several at once: a reward model's latency per call
        # then overlaps across parts and across the batches in flight.
        self._scoring = concurrent.futures.ThreadPoolExecutor(
            max_workers=y.num_engines * y.chunks_per_engine * (y.max_staleness + 1), thread_name_prefix="lampo-reward")
        self.pool: EnginePool | None = None
        self.group: LearnerGroup | None = None
        try:
            placement = cluster.plan(y)
            vllm_kwargs: dict[str, Any] = {}
            if y.engine_tensor_parallel_size > 1:
                vllm_kwargs["tensor_parallel_size"] = y.engine_tensor_parallel_size
            if y.colocate and torch.cuda.is_available():
                vllm_kwargs["enable_sleep_mode"] = True  # vLLM frees the GPU while its process trains
            t0 = time.perf_counter()
            self.group = LearnerGroup(cfg, placement.learner_options, self.resume_from, self.num_steps,
                                      colocated_engines=vllm_kwargs if y.colocate else None)
            self.pool = EnginePool(cfg, placement.engine_options, vllm_kwargs,
                                   colocated=self.group.workers if y.colocate else None)
            if cluster.weight_sync_mode(y) == "broadcast":
                self.pool.open_weight_group(self.group)
            log.info("ray: %d rollout worker(s) and %d learner(s) ready in %.0f s", y.num_engines, y.num_learners,
                     time.perf_counter() - t0)
        except BaseException:
            self.close()
            raise
        # The trainer's learner and engine, behind remote calls: the group answers `logprobs` and `lr`
        # (the start-up agreement check, a skipped step), the pool `prompt_cache_block`.
        self.learner, self.engine = self.group, self.pool
        if self.resume_from is not None:
            states, trainer_state = ckpt.load_checkpoint(self.resume_from)
            self._check_saved_world(self.resume_from, trainer_state)
            self._restore_progress(self.resume_from, trainer_state, states)
            self.sync()
        self.engine_version = self.policy_version
        self.peak_flops = cfg.speed.peak_flops or self.group.peak_flops
        self._start_tracking()

    # ------------------------------------------------------------------ phases 1-2
    def submit_produce(self, step: int, executor: concurrent.futures.Executor) -> concurrent.futures.Future:
        # The parts go out now (unless `learn` queued them already), from this thread, so they queue on
        # the workers before the next weight update: the batch's policy version does not depend on
        # thread timing.
        self._dispatch(step)
        return executor.submit(self.produce, step)

    def _dispatch(self, step: int) -> Job:
        """Send the parts of `step`'s batch to the workers, once; their Job."""
        if (step, 0) not in self._dispatched:
            self._dispatched[(step, 0)] = self.pool.dispatch(self.sampler.rows_for(step), self._sampling_seed(step))
        return self._dispatched[(step, 0)]

    def _rollout_and_score(self, step: int, rows: list[PromptRow], round_: int = 0) -> Produced:
        job = self._dispatched.pop((step, round_), None)
        if job is None:
            job = self.pool.dispatch(rows, self._sampling_seed(step, round_))
        parts: dict[int, RolloutBatch] = {}
        scores: dict[int, concurrent.futures.Future] = {}
        for chunk, batch in self.pool.completed(job):
            parts[chunk.index] = batch
            scores[chunk.index] = (self._scoring.submit(self.scorer.score, batch.messages) if len(batch)
                                   else _done_future([]))
        rolled_out = time.perf_counter()
        ordered = [parts[k] for k in sorted(parts)]
        all_scores = [score for k in sorted(scores) for score in scores[k].result()]
        done = time.perf_counter()
        batch = (RolloutBatch.concat(ordered, self.tokenizer.pad_token_id) if ordered
                 else _empty_batch(self.tokenizer.pad_token_id))
        # time/reward: how long the rewards took after the last part came back (the rest overlapped)
        times = {"time/rollout": rolled_out - job.started, "time/reward": done - rolled_out}
        return Produced(batch, all_scores, step, times, {**self.scorer.stats(), **self.pool.metrics()})

    # ------------------------------------------------------------------ phases 3-5
    def learn(self, batch: TrainBatch, step: int) -> dict[str, float]:
        # the weights go out at the end of the same call (by broadcast: in `sync`)
        publish_as = None if self.pool.broadcasting else self.policy_version + 1
        queued = []

        def queue_next_rollout() -> None:
            # Colocated, each worker's learn call loads the update into its own engine, and an actor
            # runs its calls in the order they were sent: the next batch's parts, sent now, roll out
            # with the new weights as soon as the update is done, with no round trip through the
            # driver between the two.
            if self.pool.colocated and step + 1 < self.num_steps:
                queued.append(self._dispatch(step + 1))

        stats = self.group.learn(batch, self.pool.prompt_cache_block, self.SUMMED, publish_as=publish_as,
                                 meanwhile=queue_next_rollout)
        for job in queued:
            job.started = time.perf_counter()  # time/rollout counts from the end of the update it waited for
        return stats

    def step_flops(self, batch: TrainBatch) -> dict[str, float]:
        return self.group.flops  # rank 0's part; every rank trains as many rows

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        return stats  # LearnerGroup.learn already summed or averaged over the ranks

    # ------------------------------------------------------------------ phase 6
    def sync(self) -> None:
        if self.pool.colocated:
            self.group.load_own_weights(self.policy_version)
            self.pool.version = self.policy_version
        elif self.pool.broadcasting:
            self.pool.sync_by_broadcast(self.policy_version)
        else:
            self.pool.update(self.group.publish_weights(), self.policy_version)
        self.engine_version = self.policy_version

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, inflight: dict[int, concurrent.futures.Future]) -> Path | None:
        """As the in-process trainer's: the learners write their state, the driver the batches rolled
        out ahead (it waits for them: the weights that sampled them are gone after this step)."""
        concurrent.futures.wait(list(inflight.values()))
        self.checkpoint_refused = self.group.checkpoint_doubt()
        if self.checkpoint_refused:
            self.tracker.print(f"checkpoint-{step} not written: {self.checkpoint_refused}. {self._last_good()}")
            return None
        staged = ckpt.stage_checkpoint(self.cfg.train.output_dir, step)
        return self.group.save_checkpoint(staged, step, self._driver_states(step, inflight), self._trainer_state(step))

    def _driver_states(self, step: int, inflight: dict[int, concurrent.futures.Future]) -> dict[str, Any]:
        return {"rng": ckpt.rng_state(), "pending": self._pending_state(step, inflight)}

    def _worker_lost(self, exc: WorkerLost, step: int, inflight: dict[int, concurrent.futures.Future]) -> str:
        """A learner died: rank 0 writes a checkpoint on its own when it can (data parallel, no update
        half applied); else the latest checkpoint is where to resume from."""
        if getattr(exc, "survivor_can_save", False):
            staged = ckpt.stage_checkpoint(self.cfg.train.output_dir, step)
            path = self.group.save_checkpoint_alone(staged, step, self._driver_states(step, inflight),
                                                    self._trainer_state(step))
            if path is not None:
                return (f"{exc}\nThe run stopped after {step} trained steps; learner rank 0 saved checkpoint {path}. "
                        "Resume with --resume_from_checkpoint auto")
        return super()._worker_lost(exc, step, inflight)

    def save_final(self) -> None:
        out = Path(self.cfg.train.output_dir)
        self.group.save_final(out)
        self.tracker.print(f"final model saved in {out}")
        self._push_final(out)

    def close(self) -> None:
        import ray

        self._scoring.shutdown(wait=False, cancel_futures=True)
        self.scorer.close()
        for part in (self.pool, self.group):
            if part is not None:
                part.close()
        if self.started_ray:
            ray.shutdown()


def _empty_batch(pad_id: int) -> RolloutBatch:
    empty = torch.zeros(0, 0, dtype=torch.long)
    return RolloutBatch(input_ids=empty, attention_mask=empty, action_mask=empty.bool(),
                        engine_logprobs=empty.float(), turn_spans=[], finish_reasons=[], messages=[],
                        prompt_index=torch.zeros(0, dtype=torch.long))


def run(cfg: LampoConfig, raw_config: dict | None = None) -> int:
    """`python -m lampo.ppo_ray`: exit codes as `lampo.ppo_vllm`'s (`lampo.trainer.EXIT_*`)."""
    logging.basicConfig(level=os.environ.get("LAMPO_LOG_LEVEL", "INFO"), format="%(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return run_trainer(lambda: RayTrainer(cfg, raw_config))
