"""The training application: rollout -> reward -> optimise -> weight sync, step after step.

One step, top to bottom (each phase timed):
  1. rollout     generate every step of every conversation (vLLM or transformers engine)
  2. reward      plain-text conversations to the reward server (or an in-process model)
  3. forward     old log-probs, reference log-probs, values          } Learner.train
  4. advantages  KL-shaped rewards, then GAE or a group estimator      }
  5. optimise    ppo_epochs over minibatches                           }
  6. sync        push the new policy weights into the engine
  7. log, checkpoint

Asynchronous mode (Noukhovitch et al. 2024, "Asynchronous RLHF"; the queue design in
open-instruct's notes): phases 1-2 of batch k+1 run in a background thread while phases 3-5
of batch k run here, with the weights from before that optimisation: one step off-policy.
The engine is idle again before phase 6 pushes new weights, so a batch is always generated
by exactly one policy version, which it records.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lampo import checkpoint as ckpt
from lampo import perf, speed
from lampo.config import ConfigError, LampoConfig
from lampo.data.formats import DataFormatError, PromptRow
from lampo.data.loading import load_prompt_dataset
from lampo.distributed.strategy import Strategy
from lampo.files import fsync_tree, install_folder
from lampo.optimize import maths as M
from lampo.optimize.batch import TrainBatch, build_train_batch
from lampo.optimize.learner import Learner, TrainingDiverged, check_fp16_device
from lampo.optimize.models import (
    ValueModel,
    attn_implementation_for,
    check_same_vocab,
    is_peft_model,
    load_policy,
)
from lampo.optimize.ptx import ptx_batch
from lampo.rollout.batch import RolloutBatch
from lampo.rollout.engines import HFEngine, make_engine
from lampo.rollout.multistep import PromptTooLongError, check_prompt_lengths, rollout
from lampo.rollout.weight_sync import engine_weights
from lampo.speed.machine import machine_peak, share_cores
from lampo.tracking import (
    CONFIG_FILE,
    METRICS_FILE,
    ROLLOUTS_FILE,
    TENSORBOARD_DIR,
    WANDB_ID_FILE,
    MetricWindow,
    PhaseTimer,
    Tracker,
)

log = logging.getLogger("lampo")


SEED_STRIDE, RANK_STRIDE, ROUND_STRIDE, SEED_MODULUS = 1_000_003, 10_007, 100_003, 2**31 - 1
"""How a run's seed, a rank, a step number and a refill round mix into a sampling seed (`Trainer._sampling_seed`)."""

REGENERATED_ROUND = 1_000
"""The sampling round of groups rolled out again because they were too stale (above any refill round)."""


class RunStopped(RuntimeError):
    """The run stopped early (reward server gone, signal); a checkpoint was saved."""


class WorkerLost(RuntimeError):
    """A process the run cannot continue without (a learner) died."""


@dataclass
class Produced:
    """One rollout batch with its rewards: what the actor hands the learner."""

    batch: RolloutBatch
    scores: list[Any]
    step: int
    times: dict[str, float] = field(default_factory=dict)
    reward_stats: dict[str, float] = field(default_factory=dict)
    data_stats: dict[str, float] = field(default_factory=dict)
    """Dynamic sampling's counters (data/filtered_groups, data/resample_rounds)."""

    def to_state(self) -> dict:
        """Tensors, lists, strings and numbers only (a checkpoint's async batch in flight): torch's
        safe loader reads it back, where a pickled Produced would be code run at load."""
        return {"batch": self.batch.to_state(),
                "scores": [[float(x) for x in s] if isinstance(s, list) else float(s) for s in self.scores],
                "step": int(self.step),
                **{name: {k: float(v) for k, v in getattr(self, name).items()}
                   for name in ("times", "reward_stats", "data_stats")}}

    @classmethod
    def from_state(cls, state: dict) -> Produced:
        scores = state.get("scores")
        if not isinstance(scores, list) or not all(
                isinstance(s, float) or isinstance(s, list) and all(isinstance(x, float) for x in s) for s in scores):
            raise ValueError("the pending batch's scores are missing or not floats (or lists of floats)")
        stats = {}
        for name in ("times", "reward_stats", "data_stats"):
            value = state.get(name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, float)
                                                      for k, v in value.items()):
                raise ValueError(f"the pending batch's '{name}' is missing or not a dict of floats")
            stats[name] = value
        if not isinstance(state.get("step"), int):
            raise ValueError("the pending batch's step is missing or not an int")
        return cls(RolloutBatch.from_state(state.get("batch") or {}), scores, state["step"], **stats)


class PromptSampler:
    """Deterministic data order: pass e over the prompts uses permutation(seed + e).

    When a run asks for more episodes than the dataset has prompts, the prompts are reshuffled
    each pass and reused (open-instruct's implementation detail 5). The rows of a step depend
    only on the step number, so a resumed run sees exactly the same data order.
    """

    def __init__(self, rows: list[PromptRow], rows_per_step: int, seed: int, rank: int = 0, world: int = 1):
        if not rows:
            raise ValueError("query_dataset has no training rows")
        self.rows, self.per_step, self.seed, self.rank, self.world = rows, rows_per_step, seed, rank, world

    def position(self, step: int) -> tuple[int, int]:
        """(pass over the data, index within the pass) of the first row of `step`."""
        start = step * self.per_step * self.world
        return divmod(start, len(self.rows))

    def refill_rows(self, step: int, round_: int) -> list[PromptRow]:
        """Further rows for refill round `round_` of `step` (dynamic sampling), drawn without
        replacement from the whole dataset by a generator of (seed, rank, step, round) only, so a
        resumed run refills with the same rows."""
        rng = np.random.default_rng([self.seed, self.rank, step, round_])
        picked = rng.choice(len(self.rows), size=min(self.per_step, len(self.rows)), replace=False)
        return [self.rows[i] for i in picked]

    def rows_for(self, step: int) -> list[PromptRow]:
        n = len(self.rows)
        start = step * self.per_step * self.world + self.rank * self.per_step
        out = []
        for k in range(start, start + self.per_step):
            epoch, i = divmod(k, n)
            order = np.random.default_rng(self.seed + epoch).permutation(n)
            out.append(self.rows[order[i]])
        return out


class Trainer:
    """Builds everything from a LampoConfig and runs the loop."""

    def __init__(self, cfg: LampoConfig, raw_config: dict | None = None, strategy: Strategy | None = None):
        # The run's processes and how its gradients are made (lampo.distributed); all rank
        # handling below goes through it.
        strategy = strategy if strategy is not None else Strategy()
        # before minutes go into loading models: the models train on this process's GPU when there is one
        check_fp16_device(cfg, strategy.training_device().type)
        self._set_up_run(cfg, raw_config, strategy, strategy.world, cfg.optim.batch_size, strategy.world)
        policy, value_model, ref_model = load_models(cfg, self.resume_from)
        ptx = ptx_batch(cfg, self.tokenizer)
        self.learner = Learner(cfg, policy, ref_model=ref_model, value_model=value_model,
                               num_training_steps=self.num_steps, strategy=self.strategy, ptx=ptx,
                               keep_sampling_weights=self.max_staleness > 0)
        self._check_reward_vocab(policy)
        self.engine = build_engine(cfg, self.tokenizer, seed=cfg.train.seed + self.rank, device=self.learner.device)
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self.sync()
        self.engine_version = self.policy_version
        # Utilisation is reported against `peak_flops`, or the measured matmul peak of the model's device.
        self.peak_flops = cfg.speed.peak_flops or machine_peak(getattr(torch, _half_dtype_name(cfg.model) or "float32"),
                                                               device=self.learner.device)
        self._start_tracking()

    def _set_up_run(self, cfg: LampoConfig, raw_config: dict | None, strategy: Strategy, world: int,
                    rows_per_step: int, sampler_world: int) -> None:
        """What every trainer needs before its learner and engines: seeds, the reward scorer, the
        tokenizer, the data order and the checkpoint to resume from. `world`: the data-parallel
        learners; `rows_per_step`: the prompts this process rolls out per step, out of
        `rows_per_step * sampler_world` for the whole step."""
        self.cfg = cfg
        self.strategy = strategy
        self.rank, self.world = strategy.rank, world
        self.is_main = self.rank == 0
        self.num_steps = cfg.steps_for(self.world)
        self.stop_requested: str | None = None
        self.checkpoint_refused: str | None = None
        """Why the last checkpoint asked for was not written (bad weights), or None."""
        # A fresh run in another run's output_dir would mix both runs' metrics: refused, or that
        # run's files removed (overwrite_output_dir), before anything is loaded.
        self._prepare_output_dir()
        _seed_everything(cfg.train.seed + self.rank)
        speed.apply_machine_settings(cfg.speed)
        # At most this many policy updates between the weights that sampled a batch and the update
        # that trains on it: one in asynchronous mode, where batch k+1 is sampled while batch k trains.
        self.max_staleness = 1 if cfg.train.async_mode else 0
        # The in-process engine samples and takes weights in this process: a sync waits until no
        # rollout is running, so each batch comes from exactly one policy version.
        self.sync_waits_for_rollouts = True

        # The data and the reward server are checked before minutes go into loading models.
        self.tokenizer = load_tokenizer(cfg)
        splits = load_prompt_dataset(cfg.data, seed=cfg.train.seed)
        # truncation: error: a prompt over max_prompt_len stops the run now, not at the step that meets it
        check_prompt_lengths(self.tokenizer, splits["train"], cfg.data, cfg.data.dataset_train_split)
        check_prompt_lengths(self.tokenizer, splits["test"], cfg.data, cfg.data.dataset_test_split)
        self.test_rows = splits.get("test", [])
        self.sampler = PromptSampler(splits["train"], rows_per_step, cfg.train.seed, self.rank, sampler_world)

        from lampo.reward import make_scorer

        self.scorer = make_scorer(cfg.reward, raw_config if raw_config is not None else cfg.to_dict())
        self.scorer.check_available()

        self.resume_from = ckpt.resolve_checkpoint(cfg.train.output_dir, cfg.train.resume_from_checkpoint)
        self.cleared: list[str] = []
        if self.resume_from is None and cfg.train.resume_from_checkpoint == "auto":
            # a run killed before its first checkpoint: its metrics describe steps that are trained again
            self.cleared = self.strategy.broadcast_object(
                clear_run_files(Path(cfg.train.output_dir), logs_only=True) if self.is_main else None)
        self.start_step, self.policy_version, self.steps_done = 0, 0, 0
        self.pending: list[Produced] = []
        """Batches already rolled out for the steps after `start_step`, from a checkpoint."""

    def _start_tracking(self) -> None:
        self.tracker = Tracker(self.cfg, self.cfg.to_dict(), self.num_steps, is_main_process=self.is_main,
                               resume_step=self.start_step if self.resume_from else None)
        if self.resume_from is not None:
            self.tracker.print(f"resumed from {self.resume_from} at step {self.start_step}")
        else:
            if self.cfg.train.resume_from_checkpoint == "auto":
                note = (f" (the run there left no checkpoint; its {', '.join(self.cleared)} were deleted)"
                        if self.cleared else "")
                self.tracker.print(f"resume_from_checkpoint: auto found no checkpoint in {self.cfg.train.output_dir}: "
                                   f"starting from scratch{note}")
            if self.is_main:  # the dataset's token lengths, once per run (open-instruct's dataset visualisation)
                from lampo.data.stats import log_dataset_lengths

                log_dataset_lengths(self.tracker, self.sampler.rows, self.tokenizer, self.cfg.data,
                                    self.cfg.train.output_dir, self.cfg.train.seed)
        self.hub = None
        if self.cfg.train.push_to_hub and self.is_main:  # the repository first: a refused push fails before training
            from lampo.hub import HubPusher

            self.hub = HubPusher(self.cfg, self.tracker)

    def _prepare_output_dir(self) -> None:
        """Refuse a fresh run in an output_dir that holds another run, or clear it (overwrite_output_dir).
        Rank 0 looks and decides for every rank."""
        t = self.cfg.train
        if t.resume_from_checkpoint is not None:
            return
        out = Path(t.output_dir)
        found = self.strategy.broadcast_object([p.name for p in run_files(out)] if self.is_main else None)
        if not found:
            return
        listed = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
        if not t.overwrite_output_dir:
            raise ConfigError(
                f"output_dir '{out}' holds another run ({listed}): a fresh run there would mix its metrics with that "
                "run's. Resume that run with --resume_from_checkpoint auto, choose another output_dir, or set "
                "overwrite_output_dir: true to delete that run's files first"
            )
        if self.is_main:
            clear_run_files(out)
            log.warning("overwrite_output_dir: deleted the previous run's files in %s (%s)", out, listed)
        self.strategy.barrier()

    # ------------------------------------------------------------------ models
    def _check_reward_vocab(self, policy) -> None:
        """An in-process Hugging Face reward model must share the policy's vocabulary (open-instruct)."""
        from transformers import PreTrainedModel

        reward_net = getattr(getattr(self.scorer, "model", None), "model", None)
        if isinstance(reward_net, PreTrainedModel):
            check_same_vocab(policy, reward_net)

    def _restore(self, path: Path) -> None:
        # torch's safe loader only (ckpt.load_checkpoint's default): a checkpoint holds tensors and
        # plain values, so a planted file cannot run code when a run resumes from it
        states, trainer_state = ckpt.load_checkpoint(path)
        saved_world = self._check_saved_world(path, trainer_state)
        self.learner.load_state_dict(states["learner"])
        self.learner.load_shards(path)
        own = states
        if saved_world > 1:  # each rank's own RNG state and pending batch
            own = ckpt.load_state_file(ckpt.shard_path(path, RANK_STATES) / f"{self.rank}.pt")
        self._restore_progress(path, trainer_state, own)

    def _check_saved_world(self, path: Path, trainer_state: dict) -> int:
        saved_world = trainer_state.get("processes", 1)  # absent: saved before it was recorded
        if saved_world != self.world:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was saved by {saved_world} learner process(es) and this run has {self.world}: "
                f"each rank resumes its own data, sampling and optimiser state. Resume with {saved_world}"
            )
        return saved_world

    def _restore_progress(self, path: Path, trainer_state: dict, own: dict) -> None:
        """The step, the policy version, this process's RNG and the batches rolled out ahead."""
        ckpt.set_rng_state(own["rng"])
        self.start_step = int(trainer_state["step"])
        self.policy_version = int(trainer_state["policy_version"])
        pending = own.get("pending") or {}
        if pending.get("produced") is not None:
            try:
                self.pending = [Produced.from_state(p) for p in [pending["produced"], *pending.get("queue", [])]]
            except (ValueError, TypeError, AttributeError) as exc:
                raise ckpt.CheckpointError(f"checkpoint {path}: a batch rolled out ahead cannot be read back: "
                                           f"{exc}") from exc

    # ------------------------------------------------------------------ phases 1-2: the actor
    def produce(self, step: int, rows: list[PromptRow] | None = None) -> Produced:
        """Rollout then reward for `step` (runs in the background thread in async mode)."""
        produced = self._rollout_and_score(step, self.sampler.rows_for(step) if rows is None else rows)
        if self.cfg.optim.dynamic_sampling and rows is None:
            produced = self._dynamic_sampling(produced)
        return produced

    def _rollout_and_score(self, step: int, rows: list[PromptRow], round_: int = 0) -> Produced:
        timer = PhaseTimer()
        with timer("rollout"):
            batch = rollout(self.engine, self.tokenizer, rows, self.cfg.generation, self.cfg.data,
                            policy_version=self.engine_version, seed=self._sampling_seed(step, round_))
        with timer("reward"):
            scores = self.scorer.score(batch.messages) if len(batch) else []
        return Produced(batch, scores, step, timer.times, self.scorer.stats())

    def _dynamic_sampling(self, first: Produced) -> Produced:
        """DAPO's dynamic sampling (Yu et al. 2025, section 3.2): keep the groups whose samples did not
        all score the same (the others have zero advantage: no signal), and refill the batch from
        further prompts, at most `dynamic_sampling_max_rounds` extra rollout rounds."""
        G, want = self.cfg.generation.num_generations, self.sampler.per_step
        rounds, filtered, have = [first], 0, 0
        kept: list[Produced] = []
        while True:
            produced = rounds[-1]
            scores = self.to_train_batch(produced).seq_scores.view(-1, G)
            informative = (scores.max(1).values > scores.min(1).values).tolist()
            filtered += informative.count(False)
            take = [g for g, ok in enumerate(informative) if ok][: want - have]
            rows = [g * G + j for g in take for j in range(G)]
            if rows:
                kept.append(Produced(produced.batch.select(rows), [produced.scores[i] for i in rows], first.step))
            have += len(take)
            if have >= want or len(rounds) > self.cfg.optim.dynamic_sampling_max_rounds:
                break
            extra = len(rounds)
            rounds.append(self._rollout_and_score(first.step, self.sampler.refill_rows(first.step, extra), extra))
        if have < want:
            log.warning("dynamic sampling: step %d has %d of %d groups with a learning signal after %d extra "
                        "rounds (dynamic_sampling_max_rounds); it trains on those", first.step + 1, have, want,
                        len(rounds) - 1)
        parts = kept or [Produced(first.batch.select([]), [], first.step)]
        return Produced(
            RolloutBatch.concat([p.batch for p in parts], self.tokenizer.pad_token_id),
            [score for p in parts for score in p.scores], first.step,
            {k: sum(r.times[k] for r in rounds) for k in first.times},
            {k: sum(r.reward_stats.get(k, 0.0) for r in rounds) for k in first.reward_stats},
            {"data/filtered_groups": float(filtered), "data/resample_rounds": float(len(rounds) - 1)},
        )

    def _sampling_seed(self, step: int, round_: int = 0) -> int:
        # Sampling depends only on (seed, rank, step, refill round): a resumed run draws the same
        # samples. The parts are spread apart by primes so that no two combinations collide in
        # practice, and the result is a positive 31-bit seed, as engines take.
        mixed = self.cfg.train.seed * SEED_STRIDE + self.rank * RANK_STRIDE + round_ * ROUND_STRIDE + step
        return mixed % SEED_MODULUS

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        if not cfg.train.do_train:  # evaluation only (PaddleNLP's do_train: 0)
            return self.evaluate_only()
        start = time.perf_counter()
        # In-process async with the hf engine: the rollout thread and this one compute at once, each
        # on half the cores; with all of them each, their OpenMP threads would spin against each
        # other. (vLLM binds its own threads.)
        split = self.max_staleness > 0 and self.sync_waits_for_rollouts and isinstance(self.engine, HFEngine)
        threads = torch.get_num_threads()
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_staleness + 1,
                                                         thread_name_prefix="lampo-actor",
                                                         initializer=share_cores if split else None,
                                                         initargs=(2,) if split else ())
        if split:
            share_cores(2)
        # step -> its rollout and rewards, under way or done (batches rolled out ahead of their step)
        inflight: dict[int, concurrent.futures.Future] = {
            self.start_step + i: _done_future(p) for i, p in enumerate(self.pending)}
        last_stats: dict[str, float] = {}
        window = MetricWindow()  # the steps since the last logged one (`logging_steps`)
        self.empty_steps = 0
        self._install_signal_handlers()
        step = self.start_step
        try:
            while step < self.num_steps:
                t_step = time.perf_counter()
                # 1-2. rollout and reward (already under way when batches are rolled out ahead)
                future = inflight.get(step)
                if future is None:
                    future = inflight[step] = _done_future_or_error(lambda s=step: self.produce(s))
                produced = self._within_staleness(self._result(future, step))
                inflight[step] = _done_future(produced)  # until trained: a lost learner checkpoints it
                # the next steps' batches start now, with the weights the engines hold
                self._roll_out_ahead(step + 1, step + self.max_staleness, inflight, executor)

                # 3-5. forward, advantages, optimise
                train_batch = self.to_train_batch(produced)
                if len(train_batch) == 0:
                    stats = self._nothing_to_train(step, produced)
                else:
                    self.empty_steps = 0
                    if step == self.start_step:
                        self.check_engine_agreement(train_batch)
                    stats = self.learn(train_batch, step)
                del inflight[step]
                self.policy_version += 1

                # 6. weight sync (in-process: once the engine is idle, so a batch has one version)
                if self.sync_waits_for_rollouts:
                    concurrent.futures.wait(list(inflight.values()))
                timer = PhaseTimer()
                with timer("weight_sync"):
                    self.sync()
                stats.update(timer.times)
                if not self.sync_waits_for_rollouts:
                    # Remote engines take the next batches right behind the new weights: their
                    # rollout overlaps this batch's last rewards and step 7, within the bound.
                    self._roll_out_ahead(step + 1, step + 1 + self.max_staleness, inflight, executor)

                # 7. log, evaluate, checkpoint
                step += 1
                self.steps_done = step
                stats.update(self._step_metrics(produced, train_batch, step, time.perf_counter() - t_step, start))
                stats.update(perf.step_mfu(stats, self.step_flops(train_batch), self.peak_flops))
                stats = self._reduce(stats)
                last_stats = stats
                stop = self._early_stop(stats)
                window.add(stats)
                if self.tracker.should_log(step) or self.stop_requested or stop:
                    self.tracker.log(step, window.reduce())
                else:
                    self.tracker.advance(step)
                if cfg.train.log_samples_steps and step % cfg.train.log_samples_steps == 0:
                    self.tracker.log_samples(step, self._samples(produced))
                if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and not self.stop_requested:
                    self.tracker.log(step, self.evaluate())
                if self.stop_requested:
                    self.tracker.print(f"{self.stop_requested} received: saving a checkpoint after step {step}")
                if cfg.train.save_step and step % cfg.train.save_step == 0 or self.stop_requested:
                    self._push_checkpoint(self.save_checkpoint(step, inflight), step)
                if self.stop_requested:
                    raise RunStopped(self._stopped_message(step))
                if stop:
                    self.tracker.print(f"early stop at step {step}: {stop}")
                    break
            self.save_final()
        except (RewardFailure, WorkerLost) as exc:
            unlogged = window.reduce()
            if unlogged:  # the trained steps since the last logged one
                self.tracker.log(step, unlogged)
            if isinstance(exc, WorkerLost):
                raise RunStopped(self._worker_lost(exc, step, inflight)) from exc
            saved = self.save_checkpoint(step, {}) is not None or not self.checkpoint_refused
            if self.stop_requested:  # the stop cancelled this reward phase: nothing was trained on it
                raise RunStopped(self._stopped_message(step)) from None
            where = (f"a checkpoint is in {cfg.train.output_dir}" if saved
                     else f"no checkpoint was written ({self.checkpoint_refused}). {self._last_good()}")
            raise RunStopped(
                f"{exc}\nThe run stopped after {step} trained steps, none of them on a made-up reward; {where}. "
                "Restart the reward server, then resume with --resume_from_checkpoint auto"
            ) from exc.__cause__
        except TrainingDiverged as exc:
            unlogged = window.reduce()
            if unlogged:  # the steps since the last logged one: optim/skipped_steps shows the run going bad
                self.tracker.log(step, unlogged)
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: {exc}\nNo checkpoint is written of weights that went bad. "
                f"{self._last_good()}"
            ) from exc
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            self.tracker.close()
            if split:
                torch.set_num_threads(threads)
        return last_stats

    def _roll_out_ahead(self, first: int, last: int, inflight: dict[int, concurrent.futures.Future],
                        executor: concurrent.futures.Executor) -> None:
        """Start the batches of steps first..last not yet under way (the caller keeps last within
        max_staleness versions of the weights the engines hold)."""
        for ahead in range(first, min(last, self.num_steps - 1) + 1):
            if ahead not in inflight:
                inflight[ahead] = self.submit_produce(ahead, executor)

    def submit_produce(self, step: int, executor: concurrent.futures.Executor) -> concurrent.futures.Future:
        """Start the rollout and rewards of `step` ahead of it (asynchronous mode)."""
        return executor.submit(self.produce, step)

    def _within_staleness(self, produced: Produced) -> Produced:
        """The batch with every group sampled more than `max_staleness` policy versions ago rolled out
        again with the current weights: stale data is regenerated, never trained on. Happens when a
        run resumes with a lower bound than the checkpoint's batches were sampled under."""
        b, G = produced.batch, self.cfg.generation.num_generations
        if not len(b):
            return produced
        oldest_allowed = self.policy_version - self.max_staleness
        stale_groups = (b.version_per_row().view(-1, G)[:, 0] < oldest_allowed).tolist()
        if not any(stale_groups):
            return produced
        keep = [g * G + j for g, stale in enumerate(stale_groups) if not stale for j in range(G)]
        by_index = {row.index: row for row in self.sampler.rows}
        rows = [by_index[int(b.prompt_index[g * G])] for g, stale in enumerate(stale_groups) if stale]
        log.info("step %d: %d groups were sampled more than max_staleness = %d versions ago; rolling them out "
                 "again", produced.step + 1, len(rows), self.max_staleness)
        fresh = self._rollout_and_score(produced.step, rows, round_=REGENERATED_ROUND)
        return Produced(
            RolloutBatch.concat([b.select(keep), fresh.batch], self.tokenizer.pad_token_id),
            [produced.scores[i] for i in keep] + fresh.scores, produced.step,
            {k: produced.times.get(k, 0.0) + fresh.times.get(k, 0.0) for k in {*produced.times, *fresh.times}},
            produced.reward_stats, {**produced.data_stats, "data/regenerated_groups": float(len(rows))},
        )

    def _worker_lost(self, exc: WorkerLost, step: int, inflight: dict[int, concurrent.futures.Future]) -> str:
        """What to tell the user when a worker the run needs died (a Ray learner; see lampo.distributed.ray)."""
        latest = ckpt.find_latest_checkpoint(self.cfg.train.output_dir)
        where = f"the latest checkpoint is {latest}" if latest else "no checkpoint was saved yet"
        return f"{exc}\nThe run stopped after {step} trained steps; {where}. Resume with --resume_from_checkpoint auto"

    def _stopped_message(self, step: int) -> str:
        if self.checkpoint_refused:
            return (f"stopped by {self.stop_requested} after step {step}; no checkpoint was written "
                    f"({self.checkpoint_refused}). {self._last_good()}")
        return (f"stopped by {self.stop_requested} after step {step}; checkpoint saved in "
                f"{self.cfg.train.output_dir}. Resume with the same command plus --resume_from_checkpoint auto")

    def _last_good(self) -> str:
        """Where the last good weights are, for the messages of a run whose weights went bad."""
        latest = ckpt.find_latest_checkpoint(self.cfg.train.output_dir)
        if latest is None:
            return ("This run wrote no checkpoint: the last good weights are the ones it started from "
                    f"({self.cfg.model.model_name_or_path}).")
        return (f"The last good weights are those of the last checkpoint, {latest}: resume from it with "
                f"--resume_from_checkpoint {latest} (with a lower learning_rate, or after fixing the cause).")

    def _nothing_to_train(self, step: int, produced: Produced) -> dict[str, float]:
        """A step whose batch holds no conversation (every row skipped or filtered) is not trained;
        a whole pass over the data without one stops the run."""
        self.empty_steps += 1
        b = produced.batch
        self.tracker.print(f"step {step + 1}: no conversation to train on ({b.skipped_rows} rows skipped by "
                           "truncation: skip, groups without a learning signal dropped by dynamic sampling); "
                           "the step is skipped")
        if self.empty_steps * self.cfg.optim.batch_size * self.world >= len(self.sampler.rows):
            raise NothingToTrain(
                f"{self.empty_steps} steps in a row, a whole pass over query_dataset "
                f"({len(self.sampler.rows)} rows), gave no conversation to train on: every row was skipped "
                "(prompts over max_prompt_len with truncation: skip) or filtered (dynamic_sampling). Raise "
                "max_prompt_len, use truncation: left, or check the dataset and the reward"
            )
        return {"optim/skipped_steps": 1.0, "lr": self.learner.lr}

    def check_engine_agreement(self, batch: TrainBatch) -> float | None:
        """Before the first update: the engine's and the learner's log-probs of the first batch on the
        same weights, with the run's own sampling settings; a warning names the likely causes when
        they differ by more than `engine_logprob_tolerance` on average. Returns the mean gap."""
        if batch.engine_logprobs is None or not bool(batch.action_mask.any()):
            return None
        gap = float(M.engine_logprob_gap(self.learner.logprobs(batch), batch.engine_logprobs, batch.action_mask))
        tolerance = self.cfg.generation.engine_logprob_tolerance
        if gap > tolerance:
            g, m = self.cfg.generation, self.cfg.model
            causes = ["a weight sync that did not reach the engine (it loaded model_name_or_path, the learner "
                      "holds other weights)"]
            if m.bf16 or m.fp16:
                causes.insert(0, "the engine generates in bf16/fp16 while the learner keeps fp32 weights")
            if g.repetition_penalty != 1.0:
                causes.insert(0, f"repetition_penalty = {g.repetition_penalty} changes the engine's distribution, "
                                 "which the learner does not reproduce")
            log.warning("the engine's and the learner's log-probs of the first batch differ by %.3g on average "
                        "(engine_logprob_tolerance = %g) on the same weights, with temperature %g, top_k %d, top_p "
                        "%g. Likely causes: %s", gap, tolerance, g.temperature, g.top_k, g.top_p, "; ".join(causes))
        return gap

    # ------------------------------------------------------------------ phases 3-5: the learner
    def learn(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """Forward, advantages and optimise on one batch, each timed (`Learner.train`); the step's metrics.
        step: the step it trains (remote engines may queue the next step's rollout behind the update)."""
        return self.learner.train(batch)

    def step_flops(self, batch: TrainBatch) -> dict[str, float]:
        """The floating-point work of the step that trained `batch` (`perf.learner_step_flops`)."""
        return perf.learner_step_flops(self.learner, batch, self.engine.prompt_cache_block)

    def _result(self, future: concurrent.futures.Future, step: int) -> Produced:
        from lampo.reward import RewardError

        try:
            return future.result()
        except RewardError as exc:
            raise RewardFailure(f"reward phase of step {step + 1} failed: {exc}") from exc

    # ------------------------------------------------------------------ batch conversion
    def to_train_batch(self, produced: Produced) -> TrainBatch:
        """Each score on its turn's last token, the non-stop penalty and the overlong shaping applied
        (`build_train_batch`)."""
        b, opt, g = produced.batch, self.cfg.optim, self.cfg.generation
        return build_train_batch(
            b.input_ids, b.attention_mask, b.action_mask, produced.scores, b.turn_ends, b.stopped,
            # the reward model also read the turns the dataset gave: they come first
            given_turns=[len(m) // 2 - len(ends) for m, ends in zip(b.messages, b.turn_ends, strict=True)],
            non_stop_penalty=opt.penalty_reward_value if opt.non_stop_penalty else None,
            overlong=(g.max_new_tokens, opt.overlong_buffer_len, opt.overlong_penalty_factor)
            if opt.overlong_buffer_len else None,
            turn_lengths=[[end - start for start, end in spans] for spans in b.turn_spans],
            group_size=g.num_generations,
            # without them (engine_logprobs: false) the rollout holds zeros: no val/engine_logprob_diff
            engine_logprobs=b.engine_logprobs if g.engine_logprobs else None,
            policy_version_lag=self._version_lag(b),
        )

    def _version_lag(self, batch: RolloutBatch) -> int | None:
        """Policy updates between the weights that sampled `batch` and the policy now; None when its
        conversations come from several versions."""
        versions = batch.version_per_row()
        if len(versions) and bool((versions != versions[0]).any()):
            return None
        return max(self.policy_version - batch.policy_version, 0)

    # ------------------------------------------------------------------ phase 6: weight sync
    def sync(self) -> None:
        policy = self.learner.unwrapped_policy()
        # Every rank feeds its own engine; under ZeRO-3 every rank gathers the whole policy for it.
        with self.learner.full_weights(policy):
            self.engine.update_weights(engine_weights(policy))
        self.engine_version = self.policy_version

    # ------------------------------------------------------------------ metrics
    def _step_metrics(self, produced: Produced, tb: TrainBatch, step: int, step_time: float, start: float):
        b = produced.batch
        rows_per_pass = len(self.sampler.rows)
        episodes = step * self.cfg.rollout_batch_size * self.world
        metrics = {
            "episode": float(episodes),
            "epoch": step * self.cfg.optim.batch_size * self.world / rows_per_pass,
            "policy/version_lag": float(self.policy_version - 1 - b.policy_version),
            "time/training": step_time,
            "time/from_scratch": time.perf_counter() - start,
            "perf/tokens_per_second": float(tb.action_mask.sum()) / max(step_time, 1e-9),
            "data/skipped_rows": float(b.skipped_rows),
            "data/cut_at_max_prompt_len": float(b.cut_at_max_prompt_len),
            **produced.times,
            **produced.reward_stats,
            **produced.data_stats,
        }
        if getattr(self.scorer, "verifiable", False):
            metrics["objective/verifiable_correct_rate"] = _correct_rate(produced.scores)
        return metrics

    SUMMED = ("val/num_stop_token_ids", *(k for k in MetricWindow.SUMMED if k != "optim/skipped_steps"))
    """Metrics summed over the ranks (counts of the whole step); the rest are averaged. Not
    optim/skipped_steps: a minibatch is skipped on every rank or on none, so each rank counts the
    same skips and their mean is the count."""

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        """Across ranks: counts are summed, everything else averaged (episode/epoch are already global)."""
        if self.world == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
        mean = self.strategy.reduce(t, "mean")
        total = self.strategy.reduce(t, "sum")
        return {k: float(total[i] if k in self.SUMMED else mean[i]) for i, k in enumerate(keys)}

    def _samples(self, produced: Produced, n: int = 3) -> list[dict]:
        b = produced.batch
        return [
            {"messages": b.messages[i], "score": produced.scores[i], "finish_reasons": b.finish_reasons[i],
             "policy_version": b.policy_version}
            for i in range(min(n, len(b)))
        ]

    def _early_stop(self, stats: dict[str, float]) -> str | None:
        for metric, threshold in (self.cfg.train.early_stop or {}).items():
            value = stats.get(metric)
            if value is not None and value >= threshold:
                return f"{metric} = {value:.4g} reached {threshold}"
        return None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Roll out the first `eval_batches` batches of the test split; no training."""
        from lampo.reward import RewardError

        if not self.test_rows:
            return {}
        per = self.cfg.train.eval_batch_size or self.cfg.optim.batch_size
        scores, lengths, stops, replies = [], [], [], []
        for k in range(self.cfg.train.eval_batches):
            rows = self.test_rows[k * per : (k + 1) * per]
            if not rows:
                break
            try:
                p = self.produce(-1 - k, rows=rows)
            except RewardError as exc:  # as in training: checkpoint and stop, no traceback
                raise RewardFailure(f"reward phase of evaluation batch {k + 1} failed: {exc}") from exc
            tb = self.to_train_batch(p)
            replies += p.scores
            scores += tb.seq_scores.tolist()
            lengths += tb.action_mask.sum(1).tolist()
            stops += tb.stopped.tolist()
        out = {"eval/scores": float(np.mean(scores)), "eval/sequence_lengths": float(np.mean(lengths)),
               "eval/num_stop_token_ids": float(np.sum(stops))}
        if getattr(self.scorer, "verifiable", False):
            out["eval/verifiable_correct_rate"] = _correct_rate(replies)
        return out

    def evaluate_only(self) -> dict[str, float]:
        """`do_train: false`: one evaluation of the starting policy, logged at the current step."""
        try:
            stats = self.evaluate()
            if not stats:
                raise RunStopped("do_train is false but the test split is empty: there is nothing to evaluate")
            self.tracker.log(self.start_step, stats)
            return stats
        finally:
            self.tracker.close()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int,
                        inflight: dict[int, concurrent.futures.Future] | None = None) -> Path | None:
        """Everything needed to continue exactly; with batches rolled out ahead (`inflight`, by step;
        asynchronous mode) that includes them: the weights that sampled them no longer exist after
        this step's update."""
        # Never a checkpoint of bad weights: `auto` would resume from it. The same answer on every
        # rank (their weights are the same; under DeepSpeed its own checks stand in).
        self.checkpoint_refused = self.learner.checkpoint_doubt()
        if self.checkpoint_refused:
            self.tracker.print(f"checkpoint-{step} not written: {self.checkpoint_refused}. {self._last_good()}")
            return None
        # Rank 0 stages the temporary directory; every rank writes what only it holds (ZeRO's
        # optimiser partitions, its RNG state and pending batch); then rank 0 adds the models
        # and the shared state and renames it into place (checkpoint.py: atomic).
        staged = self.strategy.broadcast_object(
            ckpt.stage_checkpoint(self.cfg.train.output_dir, step) if self.is_main else None)
        own = {"rng": ckpt.rng_state(), "pending": self._pending_state(step, inflight or {})}
        return save_learner_checkpoint(self.learner, self.cfg, staged, step, states=own,
                                       trainer_state=self._trainer_state(step),
                                       rank_state=own if self.world > 1 else None)

    def _pending_state(self, step: int, inflight: dict[int, concurrent.futures.Future]) -> dict[str, Any]:
        """The batches rolled out ahead, as tensors and plain values (`Produced.to_state`)."""
        ahead = [p.to_state() for p in self._batches_ahead(step, inflight)]
        return {"produced": ahead[0] if ahead else None, "queue": ahead[1:]}

    def _trainer_state(self, step: int) -> dict[str, Any]:
        """The checkpoint's trainer_state.json: where the run is."""
        epoch, position = self.sampler.position(step)
        return {"step": step, "policy_version": self.policy_version,
                "episode": step * self.cfg.rollout_batch_size * self.world, "data_pass": epoch,
                "data_position": position, "seed": self.cfg.train.seed, "processes": self.world}

    def _batches_ahead(self, step: int, inflight: dict[int, concurrent.futures.Future]) -> list[Produced]:
        """The batches of steps `step`, `step + 1`, ... already rolled out with their rewards, in
        order, up to the first one not done (or failed)."""
        out = []
        while step + len(out) in inflight:
            future = inflight[step + len(out)]
            if not future.done() or future.exception() is not None:
                break
            out.append(future.result())
        return out

    def save_final(self) -> None:
        """The final policy in output_dir (full model, or the adapter and optionally merged weights;
        written whole or not at all: `save_final_model`)."""
        out = Path(self.cfg.train.output_dir)
        save_final_model(self.learner, out, self.tokenizer, save_merged=self.cfg.train.save_merged,
                         is_main=self.is_main)
        self.tracker.print(f"final model saved in {out}")
        self._push_final(out)

    def _push_final(self, out: Path) -> None:
        """With push_to_hub, upload the final model; the model is on disk whatever happens."""
        if self.hub is not None:
            try:
                url = self.hub.push_model(out, self.steps_done)
            except Exception as exc:  # the hub's HTTP errors; the model is safe on disk
                raise RunStopped(f"the model is saved in {out}, but pushing it to the hub failed: {exc}") from exc
            self.tracker.print(f"final model pushed to {url}")

    def _push_checkpoint(self, path: Path | None, step: int) -> None:
        """With hub_push_checkpoints, upload the checkpoint just saved; a failure does not stop training."""
        if path is None or self.hub is None or not self.cfg.train.hub_push_checkpoints:
            return
        try:
            self.hub.push_checkpoint(path, step)
        except Exception as exc:  # the hub's HTTP errors: the checkpoint is safe on disk
            log.warning("pushing %s to the hub failed (training goes on): %s", path, exc)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        if threading_is_main():
            def handler(signum, _frame):
                if self.stop_requested and signum == signal.SIGINT:
                    # A second Ctrl-C: the user will not wait for the checkpoint. 130 = 128 + SIGINT.
                    os.write(2, b"lampo: second SIGINT: exiting now, without waiting for a checkpoint\n")
                    os._exit(130)
                # Only set flags: printing from a signal handler can re-enter a print in progress.
                self.stop_requested = signal.Signals(signum).name
                # A reward phase retrying a dead server would hold the stop for up to reward_deadline.
                self.scorer.cancel(f"{self.stop_requested} received")

            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)

    def close(self) -> None:
        self.scorer.close()
        self.engine.close()


class RewardFailure(RuntimeError):
    """The reward phase failed after every retry."""


class NothingToTrain(RuntimeError):
    """A whole pass over the dataset gave no conversation to train on."""


FINAL_TMP_PREFIX = ".tmp-final-"
"""Temporary folder of `Trainer.save_final` in output_dir."""

FINAL_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_config.json",
    "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "merged",
)
"""What `save_pretrained` of a model (transformers, PEFT) and its tokenizer write: the final model's files."""


def final_model_files(out: Path) -> list[Path]:
    return sorted({p for pattern in FINAL_MODEL_FILES for p in out.glob(pattern)})


def run_files(out: Path) -> list[Path]:
    """What marks `out` as another run's output_dir: its metrics or samples, checkpoints, a final model."""
    if not out.is_dir():
        return []
    logs = [out / name for name in (METRICS_FILE, ROLLOUTS_FILE) if (out / name).is_file() and (out / name).stat().st_size]
    checkpoints = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    model = [out / name for name in ("config.json", "adapter_config.json") if (out / name).is_file()]
    return logs + checkpoints + model


def clear_run_files(out: Path, logs_only: bool = False) -> list[str]:
    """Delete what a run writes into `out`: metrics, samples, config.yaml, TensorBoard and W&B files,
    and unless `logs_only`, checkpoints (and their temporary folders) and the final model. Other
    files are left alone. Returns the names deleted."""
    if not out.is_dir():
        return []
    doomed = [out / name for name in (METRICS_FILE, ROLLOUTS_FILE, CONFIG_FILE, TENSORBOARD_DIR, WANDB_ID_FILE, "wandb")]
    if not logs_only:
        doomed += [p for pattern in ("checkpoint-*", f"{ckpt.TMP_PREFIX}*", f"{FINAL_TMP_PREFIX}*")
                   for p in out.glob(pattern)]
        doomed += final_model_files(out)
    deleted = []
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        deleted.append(path.name)
    return deleted


RANK_STATES = "ranks"
"""Checkpoint entry with each rank's own RNG state and pending batch (`<rank>.pt`), with several processes."""


def save_learner_checkpoint(learner: Learner, cfg: LampoConfig, staged: Path, step: int, *, states: dict,
                            trainer_state: dict, rank_state: dict | None = None, alone: bool = False) -> Path | None:
    """Write the learner's part of checkpoint `step` into `staged` and complete it (`checkpoint.py`: atomic).

    Every rank of the learner calls it: each writes what only it holds (ZeRO's optimiser partitions,
    `rank_state` under ranks/<rank>.pt), then rank 0 adds the models, the learner's state, `states`
    and `trainer_state`, and renames the directory into place. alone: rank 0 without the other
    ranks (they died; data parallel ranks hold the same state): no collective. Returns the path on rank 0.
    """
    strategy = learner.strategy
    shards = learner.save_shards(staged)
    if rank_state is not None:
        (staged / RANK_STATES).mkdir(exist_ok=True)
        torch.save(rank_state, staged / RANK_STATES / f"{strategy.rank}.pt")
        shards.append(RANK_STATES)
    if not alone:
        strategy.barrier()
    path = None
    with contextlib.nullcontext() if alone else learner.full_weights():  # ZeRO-3: gathered on every rank
        if strategy.rank == 0:
            models = {"policy": learner.unwrapped_policy()}
            if learner.value_model is not None:
                models["value_model"] = learner.unwrapped_value_model()
            path = ckpt.save_checkpoint(cfg.train.output_dir, step, models=models,
                                        states={"learner": learner.state_dict(), **states},
                                        trainer_state=trainer_state, save_total_limit=cfg.train.save_total_limit,
                                        staged=staged, shards=shards)
    if not alone:
        strategy.barrier()
    return path


def save_final_model(learner: Learner, out: Path, tokenizer, *, save_merged: bool, is_main: bool) -> None:
    """The trained policy and its tokenizer in `out` (with LoRA: the adapter, and the merged model in
    out/merged with `save_merged`). Every rank calls it (ZeRO-3 gathers the weights); rank 0 writes.

    Written into a temporary folder beside it, fsynced, then moved into `out` with config.json
    (adapter_config.json) last (`files.install_folder`): a crash leaves the old final model, none,
    or the new one whole, never a config.json beside other weights.
    """
    learner.strategy.barrier()
    policy = learner.unwrapped_policy()
    with learner.full_weights(policy):  # ZeRO-3: gathered on every rank, saved by rank 0
        if is_main:
            _write_final(out, policy, tokenizer, save_merged)
    learner.strategy.barrier()


def _write_final(out: Path, policy, tokenizer, save_merged: bool) -> None:
    merged = copy.deepcopy(policy).merge_and_unload() if is_peft_model(policy) and save_merged else None
    need = ckpt.estimate_bytes([m for m in (policy, merged) if m is not None], [])
    for old in out.glob(f"{FINAL_TMP_PREFIX}*"):  # left by a save that crashed
        shutil.rmtree(old, ignore_errors=True)
    staged = out / f"{FINAL_TMP_PREFIX}{os.getpid()}"
    what = f"the final model into {out}"
    try:
        ckpt.check_space(out, need, what)
        staged.mkdir(parents=True)
        policy.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if merged is not None:
            merged.save_pretrained(staged / "merged")
            tokenizer.save_pretrained(staged / "merged")
        fsync_tree(staged)
        written = {p.name for p in staged.iterdir()}
        stale = [p.name for p in final_model_files(out) if p.name not in written]
        install_folder(staged, out, last=("config.json", "adapter_config.json"), stale=stale)
    except BaseException as exc:
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, ckpt.CheckpointError)):
            raise
        cause = (ckpt.no_space_message(out, need, what, exc) if ckpt.out_of_space(exc, out, need)
                 else f"could not write {what}: {type(exc).__name__}: {exc}")
        latest = ckpt.find_latest_checkpoint(out)
        raise ckpt.CheckpointWriteError(
            f"{cause}; the previous final model in {out}, if any, is untouched"
            + (f", and {latest} holds the trained weights" if latest else "")
        ) from exc


def load_tokenizer(cfg: LampoConfig):
    """The run's tokenizer (a pad token set to eos where the tokenizer has none)."""
    from transformers import AutoTokenizer

    tok_path = cfg.model.tokenizer_name_or_path or cfg.model.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_models(cfg: LampoConfig, resume: Path | None):
    """(policy, value model, reference) to train: from model_name_or_path, or from a checkpoint. None
    leaves a model to the Learner to build (the reference and the critic of a fresh run)."""
    if resume is None:
        return load_policy(cfg.model), None, None
    policy_dir = ckpt.model_path(resume, "policy")
    if cfg.model.use_peft:
        from peft import PeftModel

        from lampo.optimize.models import prepare_policy

        base = load_policy(_no_peft(cfg.model))
        policy = PeftModel.from_pretrained(base, policy_dir, is_trainable=True)
        policy = prepare_policy(policy, cfg.model)
    else:
        policy = load_policy(cfg.model, path=str(policy_dir))
    value = None
    if cfg.uses_critic and cfg.model.value_model == "separate":
        value_dir = ckpt.model_path(resume, "value_model")
        value = ValueModel.from_pretrained(value_dir, attn_implementation=attn_implementation_for(value_dir, cfg.model))
    # The reference is the model the run started from, not the checkpoint's policy. With LoRA
    # it is the base with the adapter disabled, which the checkpoint never changed.
    ref = None if cfg.model.use_peft else load_policy(_no_peft(cfg.model))
    return policy, value, ref


def build_engine(cfg: LampoConfig, tokenizer, seed: int, **engine_kwargs):
    """The rollout engine of the run's `generation` section, on model_name_or_path. With bf16 or fp16 it
    generates in that precision (faster rollouts; the learner recomputes every log-prob it trains on)."""
    return make_engine(cfg.generation, cfg.model.model_name_or_path, tokenizer,
                       max_prompt_len=cfg.data.max_prompt_len, seed=seed,
                       dtype=_half_dtype_name(cfg.model) or "float32", speed=cfg.speed,
                       attn_implementation=attn_implementation_for(cfg.model.model_name_or_path, cfg.model),
                       **engine_kwargs)


def _half_dtype_name(model_cfg) -> str | None:
    return "bfloat16" if model_cfg.bf16 else "float16" if model_cfg.fp16 else None


def _no_peft(model_cfg):
    return dataclasses.replace(model_cfg, use_peft=False)


def _correct_rate(scores: list) -> float:
    """Share of conversations a verifiable reward judged correct (score 1; with per-turn scores, the last turn's)."""
    last = [s if not isinstance(s, list) else (s[-1] if s else 0.0) for s in scores]
    return float(np.mean([x >= 1.0 for x in last])) if last else 0.0


def _done_future(value) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(value)
    return f


def _done_future_or_error(fn) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    try:
        f.set_result(fn())
    except BaseException as exc:  # handed to _result, which turns reward errors into RewardFailure
        f.set_exception(exc)
    return f


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def run(cfg: LampoConfig, raw_config: dict | None = None) -> int:
    """Entry point shared by `python -m lampo.ppo_vllm` and `lampo train`."""
    logging.basicConfig(level=os.environ.get("LAMPO_LOG_LEVEL", "INFO"), format="%(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs every weight reload at INFO
    from lampo.distributed.launch import strategy_from_environment

    # single process, DDP through accelerate, or DeepSpeed: from what the launcher set
    try:
        strategy = strategy_from_environment()
    except ConfigError as exc:
        print(f"lampo: {exc}", file=sys.stderr)
        return 2
    try:
        return run_trainer(lambda: Trainer(cfg, raw_config, strategy))
    finally:
        strategy.close()  # destroys the process group before the interpreter exits


EXIT_OK, EXIT_BUG, EXIT_CONFIG, EXIT_REWARD, EXIT_DIVERGED, EXIT_DATA, EXIT_CHECKPOINT = 0, 1, 2, 3, 4, 5, 6
"""The application's exit codes (README, docs/reliability.md): 0 finished, or stopped by a signal after
a checkpoint; 1 an unexpected error (a bug: the traceback is printed); 2 configuration or start-up
(a bad key or value, an unreachable reward server, an unusable checkpoint or output_dir); 3 the
reward failed after its retries (checkpoint saved), or under lampo.ppo_ray a learner or every
rollout worker was lost (the message names the checkpoint to resume from); 4 training diverged; 5 the data (a bad row, a
prompt over max_prompt_len, a whole pass with nothing to train); 6 a checkpoint or the final model
could not be written; 130 a second SIGINT."""


def run_trainer(make_trainer: Callable[[], Trainer]) -> int:
    """Build a trainer, train, close it; the exit code (EXIT_*), with one line on stderr for a failure."""
    from lampo.reward import RewardUnavailable

    def fail(exc: BaseException, code: int) -> int:
        print(f"lampo: {exc}", file=sys.stderr)
        return code

    try:
        trainer = make_trainer()
    except (ConfigError, RewardUnavailable) as exc:  # fp16 on a CPU, a DeepSpeed JSON at odds with the config
        return fail(exc, EXIT_CONFIG)
    except ckpt.CheckpointError as exc:  # the checkpoint to resume from is damaged, forged or another layout's
        return fail(exc, EXIT_CONFIG)
    except (DataFormatError, PromptTooLongError) as exc:
        return fail(exc, EXIT_DATA)
    try:
        trainer.train()
    except RunStopped as exc:
        return fail(exc, EXIT_OK if trainer.stop_requested else EXIT_REWARD)
    except (NothingToTrain, DataFormatError, PromptTooLongError) as exc:
        return fail(exc, EXIT_DATA)
    except TrainingDiverged as exc:
        return fail(exc, EXIT_DIVERGED)
    except ckpt.CheckpointWriteError as exc:
        return fail(exc, EXIT_CHECKPOINT)
    finally:
        trainer.close()
    return EXIT_OK


__all__ = ["PromptSampler", "Produced", "RunStopped", "Trainer", "WorkerLost", "build_engine", "load_models",
           "load_tokenizer", "run", "run_trainer"]
