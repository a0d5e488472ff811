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
from lampo.optimize.advantages import compute_advantages
from lampo.optimize.batch import TrainBatch, build_train_batch
from lampo.optimize.learner import Learner, TrainingDiverged, check_fp16_device
from lampo.optimize.models import (
    ValueModel,
    attn_implementation_for,
    check_same_vocab,
    is_peft_model,
    load_policy,
)
from lampo.optimize.ptx import load_ptx
from lampo.rollout.batch import RolloutBatch
from lampo.rollout.engines import make_engine
from lampo.rollout.multistep import PromptTooLongError, check_prompt_lengths, rollout
from lampo.rollout.weight_sync import engine_weights
from lampo.speed.machine import machine_peak
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


class RunStopped(RuntimeError):
    """The run stopped early (reward server gone, signal); a checkpoint was saved."""


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
        self.cfg = cfg
        # The run's processes and how its gradients are made (lampo.distributed); all rank
        # handling below goes through it.
        self.strategy = strategy if strategy is not None else Strategy()
        self.rank, self.world = self.strategy.rank, self.strategy.world
        self.is_main = self.rank == 0
        # The single-process learner trains where the models load (CPU); accelerate and DeepSpeed
        # move them to the GPU when there is one.
        check_fp16_device(cfg, "cuda" if self.world > 1 and torch.cuda.is_available() else "cpu")
        self.num_steps = cfg.steps_for(self.world)
        self.stop_requested: str | None = None
        self.checkpoint_refused: str | None = None
        """Why the last checkpoint asked for was not written (bad weights), or None."""
        self.weights_doubt: str | None = None
        """Why the current weights are not fit for a checkpoint although finite (see `learn`), or None."""
        # A fresh run in another run's output_dir would mix both runs' metrics: refused, or that
        # run's files removed (overwrite_output_dir), before anything is loaded.
        self._prepare_output_dir()
        _seed_everything(cfg.train.seed + self.rank)
        speed.apply_machine_settings(cfg.speed)

        # The data and the reward server are checked before minutes go into loading models.
        from transformers import AutoTokenizer

        tok_path = cfg.model.tokenizer_name_or_path or cfg.model.model_name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=cfg.model.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        splits = load_prompt_dataset(cfg.data, seed=cfg.train.seed)
        # truncation: error: a prompt over max_prompt_len stops the run now, not at the step that meets it
        check_prompt_lengths(self.tokenizer, splits["train"], cfg.data, cfg.data.dataset_train_split)
        check_prompt_lengths(self.tokenizer, splits["test"], cfg.data, cfg.data.dataset_test_split)
        self.test_rows = splits.get("test", [])
        self.sampler = PromptSampler(splits["train"], cfg.optim.batch_size, cfg.train.seed, self.rank, self.world)

        from lampo.reward import make_scorer

        self.scorer = make_scorer(cfg.reward, raw_config if raw_config is not None else cfg.to_dict())
        self.scorer.check_available()

        self.resume_from = ckpt.resolve_checkpoint(cfg.train.output_dir, cfg.train.resume_from_checkpoint)
        cleared: list[str] = []
        if self.resume_from is None and cfg.train.resume_from_checkpoint == "auto":
            # a run killed before its first checkpoint: its metrics describe steps that are trained again
            cleared = self.strategy.broadcast_object(
                clear_run_files(Path(cfg.train.output_dir), logs_only=True) if self.is_main else None)
        policy, value_model, ref_model = self._load_models(self.resume_from)
        ptx = None
        if cfg.data.ptx_dataset:
            ptx = load_ptx(cfg.data.ptx_dataset, self.tokenizer, cfg.data.max_prompt_len + cfg.generation.max_new_tokens)
        self.learner = Learner(cfg, policy, ref_model=ref_model, value_model=value_model,
                               num_training_steps=self.num_steps, strategy=self.strategy, ptx=ptx,
                               keep_sampling_weights=cfg.train.async_mode)
        self._check_reward_vocab(policy)
        # With bf16 or fp16 the engine generates in that precision too (faster rollouts); the learner
        # keeps fp32 master weights (under DeepSpeed, its optimiser does) and recomputes every
        # log-prob it trains on.
        self.engine = make_engine(cfg.generation, cfg.model.model_name_or_path, self.tokenizer,
                                  max_prompt_len=cfg.data.max_prompt_len, seed=cfg.train.seed + self.rank,
                                  dtype=_half_dtype_name(cfg.model) or "float32", speed=cfg.speed,
                                  attn_implementation=attn_implementation_for(cfg.model.model_name_or_path,
                                                                               cfg.model))
        self.start_step, self.policy_version, self.pending = 0, 0, None
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self.sync()
        self.engine_version = self.policy_version
        # Utilisation is reported against `peak_flops`, or the measured matmul peak of the model's device.
        self.peak_flops = cfg.speed.peak_flops or machine_peak(getattr(torch, _half_dtype_name(cfg.model) or "float32"),
                                                               device=next(self.learner.policy.parameters()).device)
        self.tracker = Tracker(cfg, cfg.to_dict(), self.num_steps, is_main_process=self.is_main,
                               resume_step=self.start_step if self.resume_from else None)
        if self.resume_from is not None:
            self.tracker.print(f"resumed from {self.resume_from} at step {self.start_step}")
        elif cfg.train.resume_from_checkpoint == "auto":
            note = (f" (the run there left no checkpoint; its {', '.join(cleared)} were deleted)" if cleared else "")
            self.tracker.print(f"resume_from_checkpoint: auto found no checkpoint in {cfg.train.output_dir}: "
                               f"starting from scratch{note}")

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
    def _load_models(self, resume: Path | None):
        cfg = self.cfg
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
        saved_world = trainer_state.get("processes")  # absent: saved before it was recorded
        if saved_world is not None and saved_world != self.world:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was saved by {saved_world} process(es) and this run has {self.world}: each "
                f"rank resumes its own data, sampling and optimiser state. Resume with {saved_world} processes"
            )
        self.learner.load_state_dict(states["learner"])
        self.learner.load_shards(path)
        own = states
        if saved_world is not None and saved_world > 1:  # each rank's own RNG state and pending batch
            own = ckpt.load_state_file(ckpt.shard_path(path, RANK_STATES) / f"{self.rank}.pt")
        ckpt.set_rng_state(own["rng"])
        self.start_step = int(trainer_state["step"])
        self.policy_version = int(trainer_state["policy_version"])
        pending = own.get("pending") or {}
        if pending.get("produced") is not None:
            try:
                self.pending = Produced.from_state(pending["produced"])
            except (ValueError, TypeError, AttributeError) as exc:
                raise ckpt.CheckpointError(f"checkpoint {path}: the async batch in flight cannot be read back: "
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
        G, want = self.cfg.generation.num_generations, self.cfg.optim.batch_size
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
        async_mode = cfg.train.async_mode
        start = time.perf_counter()
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lampo-actor")
        pending: concurrent.futures.Future | None = None
        if self.pending is not None:
            pending = _done_future(self.pending)
        last_stats: dict[str, float] = {}
        window = MetricWindow()  # the steps since the last logged one (`logging_steps`)
        self.empty_steps = 0
        self._install_signal_handlers()
        step = self.start_step
        try:
            while step < self.num_steps:
                t_step = time.perf_counter()
                # 1-2. rollout and reward (already under way in async mode)
                if pending is None:
                    pending = _done_future_or_error(lambda s=step: self.produce(s))
                produced = self._result(pending, step)
                pending = None
                if async_mode and step + 1 < self.num_steps:
                    pending = executor.submit(self.produce, step + 1)

                # 3-5. forward, advantages, optimise
                train_batch = self.to_train_batch(produced)
                if len(train_batch) == 0:
                    stats = self._nothing_to_train(step, produced)
                else:
                    self.empty_steps = 0
                    if step == self.start_step:
                        self.check_engine_agreement(train_batch)
                    stats = self.learn(train_batch)
                self.policy_version += 1

                # 6. weight sync, once the actor is idle (it generates with one version only)
                if pending is not None:
                    concurrent.futures.wait([pending])
                timer = PhaseTimer()
                with timer("weight_sync"):
                    self.sync()
                stats.update(timer.times)

                # 7. log, evaluate, checkpoint
                step += 1
                stats.update(self._step_metrics(produced, train_batch, step, time.perf_counter() - t_step, start))
                flops = perf.learner_step_flops(self.learner, train_batch, self.engine.prompt_cache_block)
                stats.update(perf.step_mfu(stats, flops, self.peak_flops))
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
                    self.save_checkpoint(step, pending)
                if self.stop_requested:
                    raise RunStopped(self._stopped_message(step))
                if stop:
                    self.tracker.print(f"early stop at step {step}: {stop}")
                    break
            self.save_final()
        except RewardFailure as exc:
            unlogged = window.reduce()
            if unlogged:  # the trained steps since the last logged one
                self.tracker.log(step, unlogged)
            saved = self.save_checkpoint(step, None) is not None or not self.checkpoint_refused
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
        return last_stats

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
    def learn(self, batch: TrainBatch) -> dict[str, float]:
        """Forward, advantages and optimise on one batch, each timed; returns the step's metrics."""
        timer = PhaseTimer()
        with timer("forward"):  # 3. old log-probs, reference log-probs, values
            fw = self.learner.forward(batch)
        if not self.learner.forward_is_finite(fw):
            # finite weights can still be wrecked (an update that moved them by 1e30): no checkpoint of them
            self.weights_doubt = "the last step's log-probs were not finite on these weights"
            return self.learner.skip_step("old or reference log-probs are not finite (the weights may hold NaN)",
                                          timer.times)
        self.weights_doubt = None
        with timer("advantages"):  # 4. rewards with KL, then GAE or a group estimator
            adv = compute_advantages(batch, fw, self.learner.kl_ctl.value, self.cfg)
        with timer("optimize"):  # 5. ppo_epochs over minibatches
            stats = self.learner.optimise(batch, fw, adv)
        return {**stats, **timer.times}

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
            policy_version_lag=max(self.policy_version - b.policy_version, 0),
        )

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
        per = self.cfg.optim.batch_size
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

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, pending: concurrent.futures.Future | None) -> Path | None:
        """Everything needed to continue exactly; in async mode that includes the batch already
        generated for the next step (its weights no longer exist after this step's update)."""
        # Never a checkpoint of bad weights: `auto` would resume from it. The same answer on every
        # rank (their weights are the same; under DeepSpeed its own checks stand in).
        bad = self.learner.non_finite_weight()
        self.checkpoint_refused = (f"weight {bad} is not finite" if bad else self.weights_doubt)
        if self.checkpoint_refused:
            self.tracker.print(f"checkpoint-{step} not written: {self.checkpoint_refused}. {self._last_good()}")
            return None
        produced = None
        if pending is not None and pending.done() and pending.exception() is None:
            produced = pending.result()
        pending_state = produced.to_state() if produced is not None else None
        out = self.cfg.train.output_dir
        # Rank 0 stages the temporary directory; every rank writes what only it holds (ZeRO's
        # optimiser partitions, its RNG state and pending batch); then rank 0 adds the models
        # and the shared state and renames it into place (checkpoint.py: atomic).
        staged = self.strategy.broadcast_object(ckpt.stage_checkpoint(out, step) if self.is_main else None)
        shards = self.learner.save_shards(staged)
        if self.world > 1:
            (staged / RANK_STATES).mkdir(exist_ok=True)
            torch.save({"rng": ckpt.rng_state(), "pending": {"produced": pending_state}},
                       staged / RANK_STATES / f"{self.rank}.pt")
            shards.append(RANK_STATES)
        self.strategy.barrier()
        path = None
        with self.learner.full_weights():  # ZeRO-3: gathered on every rank, saved by rank 0
            if self.is_main:
                models = {"policy": self.learner.unwrapped_policy()}
                if self.learner.value_model is not None:
                    models["value_model"] = self.learner.unwrapped_value_model()
                epoch, position = self.sampler.position(step)
                path = ckpt.save_checkpoint(
                    out, step,
                    models=models,
                    states={"learner": self.learner.state_dict(), "rng": ckpt.rng_state(),
                            "pending": {"produced": pending_state}},
                    trainer_state={"step": step, "policy_version": self.policy_version,
                                   "episode": step * self.cfg.rollout_batch_size * self.world,
                                   "data_pass": epoch, "data_position": position, "seed": self.cfg.train.seed,
                                   "processes": self.world},
                    save_total_limit=self.cfg.train.save_total_limit,
                    staged=staged, shards=shards,
                )
        self.strategy.barrier()
        return path

    def save_final(self) -> None:
        """The final policy in output_dir (full model, or the adapter and optionally merged weights).

        Written into a temporary folder beside it, fsynced, then moved into output_dir with
        config.json (adapter_config.json) last (`files.install_folder`): a crash leaves the old
        final model, none, or the new one whole, never a config.json beside other weights.
        """
        self.strategy.barrier()
        out = Path(self.cfg.train.output_dir)
        policy = self.learner.unwrapped_policy()
        with self.learner.full_weights(policy):  # ZeRO-3: gathered on every rank, saved by rank 0
            if self.is_main:
                self._write_final(out, policy)
        self.strategy.barrier()
        self.tracker.print(f"final model saved in {out}")

    def _write_final(self, out: Path, policy) -> None:
        merged = copy.deepcopy(policy).merge_and_unload() if is_peft_model(policy) and self.cfg.train.save_merged else None
        need = ckpt.estimate_bytes([m for m in (policy, merged) if m is not None], [])
        for old in out.glob(f"{FINAL_TMP_PREFIX}*"):  # left by a save that crashed
            shutil.rmtree(old, ignore_errors=True)
        staged = out / f"{FINAL_TMP_PREFIX}{os.getpid()}"
        what = f"the final model into {out}"
        try:
            ckpt.check_space(out, need, what)
            staged.mkdir(parents=True)
            policy.save_pretrained(staged)
            self.tokenizer.save_pretrained(staged)
            if merged is not None:
                merged.save_pretrained(staged / "merged")
                self.tokenizer.save_pretrained(staged / "merged")
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
        return _train(cfg, raw_config, strategy)
    finally:
        strategy.close()  # destroys the process group before the interpreter exits


EXIT_OK, EXIT_BUG, EXIT_CONFIG, EXIT_REWARD, EXIT_DIVERGED, EXIT_DATA, EXIT_CHECKPOINT = 0, 1, 2, 3, 4, 5, 6
"""The application's exit codes (README, docs/reliability.md): 0 finished, or stopped by a signal after
a checkpoint; 1 an unexpected error (a bug: the traceback is printed); 2 configuration or start-up
(a bad key or value, an unreachable reward server, an unusable checkpoint or output_dir); 3 the
reward failed after its retries (checkpoint saved); 4 training diverged; 5 the data (a bad row, a
prompt over max_prompt_len, a whole pass with nothing to train); 6 a checkpoint or the final model
could not be written; 130 a second SIGINT."""


def _train(cfg: LampoConfig, raw_config: dict | None, strategy: Strategy) -> int:
    from lampo.reward import RewardUnavailable

    def fail(exc: BaseException, code: int) -> int:
        print(f"lampo: {exc}", file=sys.stderr)
        return code

    try:
        trainer = Trainer(cfg, raw_config, strategy)
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


__all__ = ["PromptSampler", "Produced", "RunStopped", "Trainer", "run"]
