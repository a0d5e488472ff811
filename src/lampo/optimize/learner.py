"""The learner: from a batch of scored conversations to updated weights.

One PPO step on a `TrainBatch` is three phases (`Learner.train`; the application's `Trainer`
calls and times them one by one):
  3. forward:    old log-probs, reference log-probs and values, without gradients (`forward`)
  4. advantages: rewards with KL, then GAE or a group estimator (`advantages.compute_advantages`)
  5. optimise:   `ppo_epochs` passes over shuffled minibatches, micro-batches accumulated (`optimise`)
The maths is in `maths.py`. How a pass is computed (shared prompts, packed rows, oneDNN kernels,
the fused old log-probs) is the speed wing's business, behind one seam: `self.passes`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict

import torch
from torch import nn

from lampo.config import LampoConfig
from lampo.optimize import maths as M
from lampo.optimize.advantages import Advantages, compute_advantages, sequence_statistics
from lampo.optimize.batch import Forwarded, TrainBatch
from lampo.optimize.models import (
    base_causal_lm,
    build_reference,
    build_value_model,
    init_value_head,
    reference_mode,
)
from lampo.optimize.optimizers import critic_group, make_optimizer, policy_group, trainable
from lampo.speed.passes import Passes

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Learner:
    """Holds the policy, critic, reference, optimisers and schedulers; trains on TrainBatches."""

    def __init__(
        self,
        config: LampoConfig,
        policy: nn.Module,
        *,
        ref_model: nn.Module | None = None,
        value_model: nn.Module | None = None,
        num_training_steps: int | None = None,
        accelerator=None,
        seed: int | None = None,
    ):
        self.cfg = config
        opt = self.opt_cfg = config.optim
        self.accelerator = accelerator
        self.policy = policy
        # With kl_coef 0 (and no adaptive controller that could raise it) the reference never
        # enters a reward or a loss: no reference pass and no copy of its weights.
        self.uses_reference = opt.kl_coef > 0 or opt.adaptive_kl
        self.ref_model = None
        if self.uses_reference:
            self.ref_model = ref_model if ref_model is not None else build_reference(policy, config.model)
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False).eval()
        self.value_head: nn.Linear | None = None
        self.value_model: nn.Module | None = None
        if config.uses_critic and config.model.value_model == "head":
            self.value_head = init_value_head(base_causal_lm(policy).config.hidden_size)
        elif config.uses_critic:
            self.value_model = value_model if value_model is not None else build_value_model(config.model, policy)
        autocast = torch.bfloat16 if config.model.bf16 else torch.float16 if config.model.fp16 else None
        self.passes = Passes(config, autocast)
        self.passes.prepare(self.policy, self.ref_model, self.value_model, self.value_head)

        self.kl_ctl = (M.AdaptiveKLController(opt.kl_coef, opt.kl_target, opt.kl_horizon) if opt.adaptive_kl
                       else M.FixedKLController(opt.kl_coef))
        steps = num_training_steps or config.num_steps
        groups = [policy_group(config, trainable(policy))]
        if self.value_head is not None:
            groups.append(critic_group(config, list(self.value_head.parameters())))
        self.optimizer, self.scheduler = make_optimizer(groups, opt.learning_rate, opt.weight_decay, opt.adam_eps,
                                                        opt.lr_scheduler_type, opt.warmup_ratio, steps)
        self.critic_optimizer = self.critic_scheduler = None
        if self.value_model is not None:
            self.critic_optimizer, self.critic_scheduler = make_optimizer(
                [critic_group(config, trainable(self.value_model))], config.critic_learning_rate, opt.weight_decay,
                opt.adam_eps, opt.lr_scheduler_type, opt.warmup_ratio, steps)
        if accelerator is not None:
            self._prepare_with_accelerator()
        self.generator = torch.Generator().manual_seed(config.train.seed if seed is None else seed)
        self.consecutive_bad_steps = 0
        self.skipped_updates = 0
        self.global_step = 0

    @property
    def micro_batch_size(self) -> int:
        return self.opt_cfg.mini_batch_size // self.opt_cfg.gradient_accumulation_steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def fuses_old_logprobs(self, batch: TrainBatch) -> bool:
        """Whether this step's old log-probs come from its first training pass (`Passes.fuses_old_logprobs`)."""
        return self.passes.fuses_old_logprobs(len(batch), self.uses_reference)

    # ------------------------------------------------------------------ one step
    def train(self, batch: TrainBatch) -> dict[str, float]:
        """Phases 3-5 on `batch`; returns flat float metrics, phase times included."""
        from lampo.tracking import PhaseTimer

        timer = PhaseTimer()
        with timer("forward"):
            fw = self.forward(batch)
        if not fw_is_finite(fw):
            return self.skip_step("old or reference log-probs are not finite (the weights may hold NaN)", timer.times)
        with timer("advantages"):
            adv = compute_advantages(batch, fw, self.kl_ctl.value, self.cfg)
        with timer("optimize"):
            stats = self.optimise(batch, fw, adv)
        return {**stats, **timer.times}

    # ------------------------------------------------------------------ 3. forward
    @torch.no_grad()
    def forward(self, batch: TrainBatch) -> Forwarded:
        """Old log-probs, reference log-probs and values, in micro-batches, without gradients."""
        B, T = batch.input_ids.shape
        old = None if self.fuses_old_logprobs(batch) else torch.zeros(B, T)
        ref = torch.zeros(B, T) if self.uses_reference else None
        values = torch.zeros(B, T) if self.cfg.uses_critic else None
        self.policy.eval()
        rows = self.opt_cfg.forward_batch_size or self.micro_batch_size  # no gradients: may differ from training's
        for start in range(0, B, rows):
            idx = torch.arange(start, min(start + rows, B))
            mb = batch.select(idx)
            L = mb.input_ids.shape[1]
            if old is not None:
                lp, _, hidden = self.passes.logprobs(self.policy, mb, with_entropy=False,
                                                     hidden=self.value_head is not None)
                old[idx, :L] = lp
                if values is not None:
                    values[idx, :L] = self._values(mb, hidden)
            if ref is not None:
                with reference_mode(self.unwrapped(self.policy), self.ref_model) as ref_model:
                    ref[idx, :L] = self.passes.logprobs(ref_model, mb, with_entropy=False)[0]
        return Forwarded(old_logprobs=old, ref_logprobs=ref, values=values)

    def _values(self, mb: TrainBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.value_head is not None:
            return self.passes.values(self.value_head, mb, hidden)
        return self.passes.values(self.value_model, mb)

    # ------------------------------------------------------------------ 5. optimise
    def optimise(self, batch: TrainBatch, fw: Forwarded, adv: Advantages) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches; then the schedules and the KL controller step."""
        opt = self.opt_cfg
        B, T = batch.input_ids.shape
        # Without a forward pass of its own (one epoch, one minibatch), pi_old is pi_theta on the
        # first and only pass, detached: it is filled in as the pass goes.
        fused = fw.old_logprobs is None
        old_all = torch.zeros(B, T) if fused else fw.old_logprobs
        acc: dict[str, float] = defaultdict(float)
        models = [m for m in (self.policy, self.value_model, self.value_head) if m is not None]
        for m in models:
            m.train()
        for _epoch in range(opt.ppo_epochs):
            order = self.passes.order(batch, self.generator, value_head=self.value_head is not None)
            for mb_start in range(0, B, opt.mini_batch_size):
                mb_idx = order[mb_start : mb_start + opt.mini_batch_size]
                totals = (float(batch.action_mask[mb_idx].sum()), float(len(mb_idx)))
                self._zero_grad()
                mb_stats: dict[str, float] = defaultdict(float)
                finite = True
                micro_chunks = mb_idx.split(self.micro_batch_size)
                for i, idx in enumerate(micro_chunks):
                    with self._no_sync(i < len(micro_chunks) - 1):
                        finite &= self._micro_step(batch.select(idx), idx, old_all, fused, fw, adv, totals, mb_stats)
                grad_norm = self._clip_and_norm()
                if finite and math.isfinite(grad_norm):
                    self._step()
                    acc["_updates"] += 1
                    for k, v in mb_stats.items():
                        acc[k] += v
                else:  # skipped: weights and optimiser state stay as they were before this minibatch
                    acc["_skipped"] += 1
                self._zero_grad()
        for m in models:
            m.eval()
        return self._end_step(batch, fw, adv, acc, old_all if fused else None)

    def _micro_step(self, mb, idx, old_all, fused, fw, adv, totals, stats) -> bool:
        opt = self.opt_cfg
        L = mb.input_ids.shape[1]
        mask = mb.action_mask
        num_tokens, num_seqs = totals
        logp, entropy, hidden = self.passes.logprobs(self.policy, mb, hidden=self.value_head is not None)
        if fused:
            old_all[idx, :L] = logp.detach()
        old_lp = M.pin_ratio_off_mask(old_all[idx, :L], logp, mask)
        pg_mat, clipped, ratio = M.clipped_policy_loss(logp, old_lp, adv.advantages[idx, :L], opt.cliprange,
                                                       opt.dual_clip)
        if not self.cfg.kl_in_reward and adv.beta > 0:
            pg_mat = pg_mat + M.kl_loss(logp, fw.ref_logprobs[idx, :L], adv.beta, opt.kl_estimator)
        pg_loss = M.aggregate(pg_mat, mask, self.cfg.loss_aggregation, num_tokens, num_seqs,
                              float(self.cfg.generation.max_new_tokens))
        loss = pg_loss
        if adv.returns is not None:
            values = self._values(mb, hidden)
            vf_mat, vf_clipped = M.clipped_value_loss(values, fw.values[idx, :L], adv.returns[idx, :L],
                                                      opt.cliprange_value)
            vf_loss = M.aggregate(vf_mat, mask, "token-mean", num_tokens, num_seqs)
            loss = loss + opt.vf_coef * vf_loss
            stats["loss/value_avg"] += vf_loss.item()
            stats["val/clipfrac_avg"] += M.masked_sum(vf_clipped.float(), mask).item() / max(num_tokens, 1)
        if not torch.isfinite(loss):
            return False
        self._backward(loss)
        w = 1.0 / max(num_tokens, 1)
        with torch.no_grad():
            stats["loss/policy_avg"] += pg_loss.item()
            stats["policy/approxkl_avg"] += M.masked_sum(M.approx_kl(logp, old_lp), mask).item() * w
            stats["policy/clipfrac_avg"] += M.masked_sum(clipped.float(), mask).item() * w
            stats["policy/entropy_avg"] += M.masked_sum(entropy, mask).item() * w
            stats["val/ratio"] += M.masked_sum(ratio, mask).item() * w
        return True

    def _end_step(self, batch, fw, adv, acc, fused_old) -> dict[str, float]:
        """The schedules and the KL controller step; bad steps are counted; the step's metrics."""
        lr_used = self.lr
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        self.kl_ctl.update(adv.kl_per_seq.mean().item(), n_steps=len(batch))
        self.global_step += 1
        skipped, updates = acc.pop("_skipped", 0), acc.pop("_updates", 0)
        if skipped:
            self.consecutive_bad_steps += 1
            self.skipped_updates += skipped
            if self.consecutive_bad_steps >= self.opt_cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.consecutive_bad_steps} steps in a row had a non-finite loss or gradient "
                    f"({self.skipped_updates} optimiser updates skipped in all). Lower learning_rate, enable "
                    "max_grad_norm, check the reward scale, or use fp32 instead of fp16."
                )
        else:
            self.consecutive_bad_steps = 0
        stats = dict(adv.stats)
        if fused_old is not None:  # the training pass has filled in the old log-probs only now
            stats.update(sequence_statistics(batch, fused_old))
        stats.update({k: v / max(updates, 1) for k, v in acc.items()})
        if "loss/policy_avg" in stats:  # absent when every minibatch of the step was skipped
            stats["objective/loss"] = stats["loss/policy_avg"] + self.opt_cfg.vf_coef * stats.get("loss/value_avg", 0.0)
        stats["optim/skipped_steps"] = float(skipped)
        stats["lr"] = lr_used
        if fw.values is not None:
            stats["val/explained_variance"] = M.explained_variance(fw.values, adv.returns, batch.action_mask).item()
        return stats

    def skip_step(self, why: str, timings: dict[str, float]) -> dict[str, float]:
        """A step not trained at all (its forward phase failed); counts towards max_bad_steps."""
        self.consecutive_bad_steps += 1
        self.skipped_updates += 1
        if self.consecutive_bad_steps >= self.opt_cfg.max_bad_steps:
            raise TrainingDiverged(f"{self.consecutive_bad_steps} steps in a row were skipped: {why}")
        return {"optim/skipped_steps": 1.0, "lr": self.lr, **timings}

    # ------------------------------------------------------------------ distributed-aware bits
    def _prepare_with_accelerator(self) -> None:
        acc = self.accelerator
        self.policy, self.optimizer = acc.prepare(self.policy, self.optimizer)
        if self.value_model is not None:
            self.value_model, self.critic_optimizer = acc.prepare(self.value_model, self.critic_optimizer)
        if self.value_head is not None:
            self.value_head = acc.prepare(self.value_head)

    def unwrapped(self, model: nn.Module | None) -> nn.Module | None:
        """A model without its data-parallel wrapper (for saving, weight sync and cost accounting)."""
        if model is None or self.accelerator is None:
            return model
        return self.accelerator.unwrap_model(model)

    def unwrapped_policy(self) -> nn.Module:
        return self.unwrapped(self.policy)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _no_sync(self, skip_sync: bool):
        # With DDP, all-reduce only on the last micro-batch of a minibatch.
        if self.accelerator is None or not skip_sync:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in (self.policy, self.value_model):
            if m is not None:
                stack.enter_context(self.accelerator.no_sync(m))
        return stack

    def _trainable(self) -> list[nn.Parameter]:
        return [p for m in (self.policy, self.value_model, self.value_head) if m is not None for p in trainable(m)]

    def _clip_and_norm(self) -> float:
        params = [p for p in self._trainable() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.opt_cfg.max_grad_norm if self.opt_cfg.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _step(self) -> None:
        self.optimizer.step()
        if self.critic_optimizer is not None:
            self.critic_optimizer.step()

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "generator": self.generator.get_state(),
            "global_step": self.global_step,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "skipped_updates": self.skipped_updates,
        }
        if self.critic_optimizer is not None:
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
            state["critic_scheduler"] = self.critic_scheduler.state_dict()
        if self.value_head is not None:
            state["value_head"] = self.value_head.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.generator.set_state(state["generator"])
        self.global_step = state["global_step"]
        self.consecutive_bad_steps = state["consecutive_bad_steps"]
        self.skipped_updates = state["skipped_updates"]
        if self.critic_optimizer is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])


def fw_is_finite(fw: Forwarded) -> bool:
    """Whether the forward phase's log-probs are finite (NaN there means the weights hold NaN)."""
    return all(torch.isfinite(x).all() for x in (fw.old_logprobs, fw.ref_logprobs) if x is not None)


__all__ = ["Learner", "TrainBatch", "TrainingDiverged"]
