"""The learner: from a batch of scored conversations to updated weights.

One call to `Learner.train(batch)` is the optimisation half of a PPO step:
  1. forward:    old log-probs, reference log-probs, values and entropy, without gradients
  2. advantages: rewards with KL, then GAE (critic) or a group estimator
  3. optimise:   `ppo_epochs` passes over shuffled minibatches, micro-batches accumulated
Each phase is timed. The maths lives in `maths.py`; this file only moves tensors around.
How a loss becomes a gradient and a gradient a step (one process, DDP, DeepSpeed ZeRO) is the
`Strategy`'s (lampo/distributed/strategy.py): the learner calls it and nothing else for that.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from lampo.config import ConfigError, LampoConfig
from lampo.distributed.strategy import StepOutcome, Strategy, TrainedModels
from lampo.optimize import maths as M
from lampo.optimize import shared_prefix as SP
from lampo.optimize.models import (
    ValueModel,
    base_causal_lm,
    build_reference,
    build_value_model,
    init_value_head,
    is_peft_model,
    reference_mode,
)
from lampo.optimize.onednn_linear import use_onednn_linear
from lampo.perf import ModelShape

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainBatch:
    """What the learner trains on: B conversations, right-padded to T tokens.

    Attributes:
        input_ids: LongTensor [B, T].
        attention_mask: LongTensor [B, T].
        action_mask: BoolTensor [B, T], True on generated (trained) tokens.
        placed_scores: FloatTensor [B, T], each score on the last token of its turn.
        seq_scores: FloatTensor [B], the conversation's total score (after the non-stop penalty).
        stopped: BoolTensor [B], every turn ended with the stop token.
        group_size: samples per prompt; groups are contiguous (grpo, rloo, dr_grpo).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    placed_scores: torch.Tensor
    seq_scores: torch.Tensor
    stopped: torch.Tensor
    group_size: int = 1
    engine_logprobs: torch.Tensor | None = None
    """Optional [B, T]: the engine's sampling log-probs, compared with the recomputed ones."""
    temperature: float | None = None
    """The temperature the batch was sampled at; None: the config's. The learner's log-probs use it,
    so that pi / pi_old compares the distribution the tokens were drawn from."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> TrainBatch:
        """Rows `idx`, trimmed to their longest sequence (right padding makes that safe)."""
        length = int(self.attention_mask[idx].sum(1).max().item()) if len(idx) else 1
        return TrainBatch(
            input_ids=self.input_ids[idx, :length],
            attention_mask=self.attention_mask[idx, :length],
            action_mask=self.action_mask[idx, :length],
            placed_scores=self.placed_scores[idx, :length],
            seq_scores=self.seq_scores[idx],
            stopped=self.stopped[idx],
            group_size=self.group_size,
            temperature=self.temperature,
        )


@dataclass
class Forwarded:
    """Per-token tensors [B, T] from the no-grad forward pass (aligned with tokens)."""

    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor


def fed_columns(length: int) -> int:
    """How many leading columns of a [B, length] batch the model passes compute.

    The last token is only ever predicted, never an input to a prediction (generation never feeds
    its last sampled token back either), so its position is not computed: 1/length less work.
    One column stays for a batch of width 1 (nothing is predicted there, all outputs are 0).
    """
    return max(length - 1, 1)


def shift_align(per_position: torch.Tensor, length: int) -> torch.Tensor:
    """Move values computed at position t-1 (which predicts token t) onto token t; token 0 gets 0."""
    return torch.nn.functional.pad(per_position[:, : length - 1], (1, 0))


def check_fp16_device(config: LampoConfig, device_type: str) -> None:
    """fp16 needs a GPU: stop at start, naming the key, on any other device."""
    if config.model.fp16 and device_type != "cuda":
        raise ConfigError(
            f"config key 'fp16' = true, but the models train on {device_type}: float16 autocast and its loss "
            "scaler are for GPUs. Use bf16: true instead (bfloat16 needs no loss scaling and runs on CPUs), "
            "or leave both false for fp32"
        )


class Learner:
    """Holds the policy, critic, reference, optimisers and schedulers; trains on TrainBatches.

    strategy: how gradients and steps are made (lampo.distributed); default the single process.
    accelerator: shorthand for `strategy=AccelerateDDP(accelerator)`.
    """

    def __init__(
        self,
        config: LampoConfig,
        policy: nn.Module,
        *,
        ref_model: nn.Module | None = None,
        value_model: nn.Module | None = None,
        num_training_steps: int | None = None,
        accelerator=None,
        strategy: Strategy | None = None,
        seed: int | None = None,
    ):
        self.cfg = config
        self.opt_cfg = config.optim
        if strategy is None and accelerator is not None:
            from lampo.distributed.ddp import AccelerateDDP

            strategy = AccelerateDDP(accelerator)
        self.strategy = strategy if strategy is not None else Strategy()
        device = next(policy.parameters()).device.type
        if self.strategy.world > 1 and torch.cuda.is_available():
            device = "cuda"  # accelerate and DeepSpeed move the models to the GPU
        check_fp16_device(config, device)
        self.temperature = config.generation.temperature
        self.policy = policy
        # With kl_coef 0 (and no adaptive controller that could raise it) the reference never
        # enters a reward or a loss: skip its forward pass and its copy of the weights. Its
        # log-probs are then the old policy's, so objective/kl reads exactly 0 (as beta = 0 in TRL).
        self.uses_reference = config.optim.kl_coef > 0 or config.optim.adaptive_kl
        if not self.uses_reference:
            self.ref_model = None
        else:
            self.ref_model = ref_model if ref_model is not None else build_reference(policy, config.model)
        self.value_head: nn.Linear | None = None
        self.value_model: nn.Module | None = None
        if config.uses_critic:
            if config.model.value_model == "head":
                hidden = base_causal_lm(policy).config.hidden_size
                self.value_head = init_value_head(hidden)
            else:
                self.value_model = value_model if value_model is not None else build_value_model(config.model, policy)
        if self.ref_model is not None:
            self.ref_model.requires_grad_(False).eval()
        if config.model.onednn_linear:  # docs/performance.md, change 9
            for model in (self.policy, self.ref_model, self.value_model, self.value_head):
                if model is not None:
                    use_onednn_linear(model)

        self.kl_ctl = (
            M.AdaptiveKLController(self.opt_cfg.kl_coef, self.opt_cfg.kl_target, self.opt_cfg.kl_horizon)
            if self.opt_cfg.adaptive_kl
            else M.FixedKLController(self.opt_cfg.kl_coef)
        )
        steps = num_training_steps or config.num_steps
        self.optimizer = self._make_optimizer(policy, self.value_head, config.optim.learning_rate)
        self.critic_optimizer = None
        if self.value_model is not None:
            self.critic_optimizer = self._make_optimizer(self.value_model, None, config.critic_learning_rate)
        prepared = self.strategy.prepare(
            TrainedModels(self.policy, self.value_model, self.value_head, self.ref_model, self.optimizer,
                          self.critic_optimizer),
            config,
        )
        self.policy, self.value_model, self.value_head = prepared.policy, prepared.value_model, prepared.value_head
        self.ref_model, self.optimizer, self.critic_optimizer = (prepared.ref_model, prepared.optimizer,
                                                                 prepared.critic_optimizer)
        # on the optimisers as prepared: a strategy may wrap them, or merge them into one (DeepSpeed)
        self.scheduler = self._make_scheduler(self.optimizer, steps)
        self.critic_scheduler = (self._make_scheduler(self.critic_optimizer, steps)
                                 if self.critic_optimizer is not None else None)
        self.generator = torch.Generator().manual_seed(config.train.seed if seed is None else seed)
        self.consecutive_bad_steps = 0
        self.skipped_updates = 0
        self.global_step = 0
        self.autocast_dtype = torch.bfloat16 if config.model.bf16 else torch.float16 if config.model.fp16 else None
        self._fused_old = False
        self._prefix_unsupported = False
        self._packing: tuple[ModelShape, str | None] | None = None  # for shared_prefix.should_pack, read once

    # ------------------------------------------------------------------ set-up helpers
    def _make_optimizer(self, model: nn.Module, extra_head: nn.Module | None, lr: float):
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": lr}]
        if extra_head is not None:
            groups.append({"params": list(extra_head.parameters()), "lr": self.cfg.critic_learning_rate})
        # fused AdamW is a single kernel per step on CPU and GPU (torch >= 2.4)
        return torch.optim.AdamW(
            groups, lr=lr, weight_decay=self.opt_cfg.weight_decay, eps=self.opt_cfg.adam_eps, fused=True
        )

    def _make_scheduler(self, optimizer, steps: int):
        # one factor for every parameter group: each group's own learning rate times it
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(self.opt_cfg.lr_scheduler_type,
                                                                      self.opt_cfg.warmup_ratio, steps))

    def unwrapped_policy(self) -> nn.Module:
        return self.strategy.unwrap(self.policy)

    def unwrapped_value_model(self) -> nn.Module | None:
        return self.strategy.unwrap(self.value_model) if self.value_model is not None else None

    def full_weights(self, *models: nn.Module):
        """Context in which `models` (default: every trained model) hold all their parameters.

        Under ZeRO-3 the parameters are partitioned over the ranks and this gathers them, on
        every rank: every rank must enter it, also where only rank 0 saves.
        """
        trained = models or tuple(m for m in (self.policy, self.value_model, self.value_head) if m is not None)
        return self.strategy.full_weights(*trained)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.policy.parameters()).device.type
        return torch.autocast(device_type=device, dtype=self.autocast_dtype)

    @property
    def micro_batch_size(self) -> int:
        return self.opt_cfg.mini_batch_size // self.opt_cfg.gradient_accumulation_steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ model calls
    def _policy_forward(self, model: nn.Module, mb: TrainBatch, want_hidden: bool = False):
        fed = fed_columns(mb.input_ids.shape[1])
        with self._autocast():
            out = model(
                input_ids=mb.input_ids[:, :fed],
                attention_mask=mb.attention_mask[:, :fed],
                use_cache=False,
                output_hidden_states=want_hidden,
            )
        return out

    def _shares_prefix(self, group_size: int) -> bool:
        """Whether the passes share each group's prompt (see optimize/shared_prefix.py).

        Needs several samples per prompt; not with a value head (it needs the hidden state of
        every position) nor with gradient checkpointing (transformers turns the KV cache off
        under it); off for good once the model's cache turned out unsupported.
        """
        return (self.opt_cfg.share_prefix and group_size >= 2 and self.value_head is None
                and not self.cfg.model.gradient_checkpointing and not self._prefix_unsupported)

    def _prefix_plan(self, mb: TrainBatch) -> SP.PrefixPlan | None:
        if not self._shares_prefix(mb.group_size):
            return None
        return SP.plan_prefixes(mb.input_ids, mb.attention_mask, mb.action_mask)

    def _policy_logprobs(self, model: nn.Module, mb: TrainBatch, with_entropy: bool = True):
        """(log-probs, entropy or None, model output or None) of `mb`, aligned with its tokens."""
        plan = self._prefix_plan(mb)
        if plan is not None:
            try:
                if self._packing is None:
                    policy = self.unwrapped_policy()
                    self._packing = (ModelShape.from_model(policy),
                                     getattr(base_causal_lm(policy).config, "_attn_implementation", None))
                shape, attn = self._packing
                with self._autocast():
                    lp, ent = SP.shared_prefix_logprobs(model, plan, mb.input_ids.shape[1], self._temperature(mb),
                                                        with_entropy=with_entropy,
                                                        pack_for=attn if SP.should_pack(attn, plan, shape) else None)
                return lp, ent, None
            except (SP.UnsupportedModel, TypeError, AttributeError) as exc:
                # e.g. sliding-window caches, or remote code without past_key_values/logits_to_keep
                log.warning("share_prefix: falling back to the plain forward pass for this run (%s)", exc)
                self._prefix_unsupported = True
        out = self._policy_forward(model, mb, want_hidden=self.value_head is not None)
        lp, ent = self._logprobs_entropy(out.logits, mb, with_entropy)
        return lp, ent, out

    def _temperature(self, mb: TrainBatch) -> float:
        return self.temperature if mb.temperature is None else mb.temperature

    def _logprobs_entropy(self, logits: torch.Tensor, mb: TrainBatch,
                          with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        # logits at t-1 predict token t (logits of the fed columns, see `fed_columns`): compute
        # against tokens [:, 1:], then align.
        L = mb.input_ids.shape[1]
        lp, ent = M.logprobs_and_entropy(logits[:, : L - 1], mb.input_ids[:, 1:], self._temperature(mb),
                                         with_entropy)
        pad = torch.nn.functional.pad
        return pad(lp, (1, 0)), (pad(ent, (1, 0)) if with_entropy else None)

    def _values(self, mb: TrainBatch, policy_out=None) -> torch.Tensor | None:
        L = mb.input_ids.shape[1]
        if self.value_model is not None:
            fed = fed_columns(L)
            with self._autocast():
                v = self.value_model(mb.input_ids[:, :fed], mb.attention_mask[:, :fed])
            return shift_align(v.float(), L)
        if self.value_head is not None:
            hidden = policy_out.hidden_states[-1]
            return shift_align(self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float(), L)
        return None

    # ------------------------------------------------------------------ 1. forward
    def fuses_old_logprobs(self, batch: TrainBatch) -> bool:
        """Whether the old log-probs can come from the first (only) training pass.

        With one epoch and one minibatch, every micro-batch is trained on the weights that
        sampled the batch, so pi_old = pi_theta detached: a separate no-grad forward would
        compute the same numbers again. Without a reference or a critic nothing else needs that
        forward, and the phase disappears (TRL's GRPOTrainer does the same with num_iterations=1).
        """
        return (
            self.opt_cfg.ppo_epochs == 1
            and self.opt_cfg.mini_batch_size >= len(batch)
            and not self.uses_reference
            and not self.cfg.uses_critic
        )

    @torch.no_grad()
    def forward_batch(self, batch: TrainBatch, policy_pass: bool = True) -> Forwarded:
        """Old log-probs, reference log-probs, values and entropy in micro-batches (no grad).

        Without `policy_pass` the old log-probs are left at 0 for the training pass to fill
        (see `fuses_old_logprobs`). Without a reference pass (kl_coef 0) the reference
        log-probs are the same tensor as the old ones.
        """
        B, T = batch.input_ids.shape
        old = torch.zeros(B, T)
        ref = torch.zeros(B, T) if self.uses_reference else old
        ent = torch.zeros(B, T)
        values = torch.zeros(B, T) if self.cfg.uses_critic else None
        if not policy_pass and not self.uses_reference and values is None:
            return Forwarded(old_logprobs=old, ref_logprobs=ref, values=values, entropy=ent)
        self.policy.eval()
        for start in range(0, B, self.micro_batch_size):
            idx = torch.arange(start, min(start + self.micro_batch_size, B))
            mb = batch.select(idx)
            L = mb.input_ids.shape[1]
            lp, e, v, r = self.strategy.forward(self._no_grad_pass, mb, policy_pass or values is not None,
                                                values is not None)
            if lp is not None:
                old[idx, :L], ent[idx, :L] = lp, e
            if v is not None:
                values[idx, :L] = v
            if r is not None:
                ref[idx, :L] = r
        return Forwarded(old_logprobs=old, ref_logprobs=ref, values=values, entropy=ent)

    def _no_grad_pass(self, mb: TrainBatch, policy_pass: bool, want_values: bool):
        """(log-probs, entropy, values, reference log-probs) of one micro-batch; None where not asked."""
        lp = e = v = r = None
        if policy_pass:
            lp, e, out = self._policy_logprobs(self.policy, mb)
            if want_values:
                v = self._values(mb, out)
            del out
        if self.uses_reference:
            # log-probs only: the reference's entropy is never used
            with reference_mode(self.unwrapped_policy(), self.ref_model) as ref_model:
                r = self._policy_logprobs(ref_model, mb, with_entropy=False)[0]
        return lp, e, v, r

    # ------------------------------------------------------------------ 2. advantages
    def compute_advantages(self, batch: TrainBatch, fw: Forwarded) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """Advantages [B, T] (and returns for the critic) plus the objective/* statistics."""
        opt = self.opt_cfg
        mask = batch.action_mask
        beta = self.kl_ctl.value
        kl = M.kl_penalty(fw.old_logprobs, fw.ref_logprobs, opt.kl_estimator)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        kl_per_seq = kl.sum(1)
        returns = None
        if opt.estimator == "gae":
            rewards = M.token_rewards(batch.placed_scores, kl, mask, beta if self.cfg.kl_in_reward else 0.0)
            if opt.whiten_rewards:
                rewards = M.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = M.gae(rewards, fw.values, mask, opt.gamma, opt.lam)
            if opt.whiten_advantages:
                advantages = M.masked_whiten(advantages, mask)
        elif opt.estimator == "reinforce_pp":
            # REINFORCE++ (Hu 2025): token rewards with KL, discounted returns, batch-whitened.
            rewards = M.token_rewards(batch.placed_scores, kl, mask, beta if self.cfg.kl_in_reward else 0.0)
            advantages = M.masked_whiten(M.discounted_returns(rewards, mask, opt.gamma), mask)
        else:
            seq = batch.seq_scores - (beta * kl_per_seq if self.cfg.kl_in_reward else 0.0)
            seq_adv = M.group_advantages(seq, batch.group_size, opt.estimator, scale_std=opt.grpo_scale_std)
            advantages = torch.where(mask, seq_adv[:, None].expand_as(mask), torch.zeros(mask.shape))
        non_score = -beta * kl_per_seq
        stats = {
            "objective/kl": kl_per_seq.mean().item(),
            "objective/kl_coef": beta,
            "objective/scores": batch.seq_scores.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (batch.seq_scores + non_score).mean().item(),
            # sequence entropy estimate: sum of -log pi over the sampled tokens (open-instruct)
            "objective/entropy": (-M.masked_sum(fw.old_logprobs, mask, dim=1)).mean().item(),
            "val/sequence_lengths": mask.sum(1).float().mean().item(),
            "val/num_stop_token_ids": batch.stopped.float().sum().item(),
        }
        return advantages, returns, stats

    # ------------------------------------------------------------------ 3. optimise
    def train(self, batch: TrainBatch) -> dict[str, float]:
        """One PPO step on `batch`; returns flat float metrics."""
        timings = {}
        t0 = time.perf_counter()
        self._fused_old = self.fuses_old_logprobs(batch)
        fw = self.forward_batch(batch, policy_pass=not self._fused_old)
        timings["time/forward"] = time.perf_counter() - t0
        finite = self._fused_old or all(bool(torch.isfinite(x).all()) for x in (fw.old_logprobs, fw.ref_logprobs))
        if not self.strategy.all_true(finite):  # every rank skips, or none
            return self._bad_step("old or reference log-probs are not finite (the weights may hold NaN)", timings)

        t0 = time.perf_counter()
        # With fused old log-probs these are still zeros here; that is safe because then there is
        # no reference and no critic: the KL is old - old = 0 and the group advantages use scores only.
        advantages, returns, stats = self.compute_advantages(batch, fw)
        timings["time/advantages"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        acc = self._optimise(batch, fw, advantages, returns)
        timings["time/optimize"] = time.perf_counter() - t0
        if self._fused_old:  # the training pass has filled in the old log-probs only now
            stats["objective/entropy"] = (-M.masked_sum(fw.old_logprobs, batch.action_mask, dim=1)).mean().item()
        if batch.engine_logprobs is not None:
            # A large gap between the engine's and the learner's log-probs of the same tokens is the
            # classic sign of a weight-sync or temperature bug.
            gap = (fw.old_logprobs - batch.engine_logprobs).abs()
            stats["val/engine_logprob_diff"] = M.masked_mean(gap, batch.action_mask).item()

        lr_used = self.lr
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        self.kl_ctl.update(stats["objective/kl"], n_steps=len(batch))
        self.global_step += 1

        skipped = acc.pop("_skipped")
        updates = acc.pop("_updates")
        scaler_skipped = acc.pop("_scaler_skipped")
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
        stats.update({k: (v / max(updates, 1)) for k, v in acc.items()})
        if "loss/policy_avg" in stats:  # absent when every minibatch of the step was skipped
            stats["objective/loss"] = stats["loss/policy_avg"] + self.opt_cfg.vf_coef * stats.get("loss/value_avg", 0.0)
        stats["optim/skipped_steps"] = float(skipped)
        loss_scale = self.strategy.loss_scale()
        if loss_scale is not None:  # fp16
            stats["optim/loss_scale"] = loss_scale
            stats["optim/scaler_skipped_steps"] = float(scaler_skipped)
        stats["lr"] = lr_used
        if fw.values is not None:
            stats["val/explained_variance"] = M.explained_variance(fw.values, returns, batch.action_mask).item()
        stats.update(timings)
        return stats

    def _optimise(self, batch, fw, advantages, returns) -> dict[str, float]:
        opt = self.opt_cfg
        B = len(batch)
        acc: dict[str, float] = defaultdict(float)
        agg = self.cfg.loss_aggregation
        beta = self.kl_ctl.value
        models = [m for m in (self.policy, self.value_model, self.value_head) if m is not None]
        for m in models:
            m.train()
        for _epoch in range(opt.ppo_epochs):
            order = self._shuffled(batch)
            for mb_start in range(0, B, opt.mini_batch_size):
                mb_idx = order[mb_start : mb_start + opt.mini_batch_size]
                num_tokens = float(batch.action_mask[mb_idx].sum())
                # what the token-mean losses divide by: num_tokens, or with several ranks the
                # mean over ranks of their minibatches' tokens (Strategy.token_normaliser)
                loss_tokens = self.strategy.token_normaliser(num_tokens)
                num_seqs = float(len(mb_idx))
                self.strategy.zero_grad()
                mb_stats: dict[str, float] = defaultdict(float)
                finite = True
                micro_chunks = mb_idx.split(self.micro_batch_size)
                for i, micro_idx in enumerate(micro_chunks):
                    last = i == len(micro_chunks) - 1
                    with self.strategy.no_sync(not last):
                        finite &= self._micro_step(
                            batch.select(micro_idx), fw, advantages, returns, micro_idx,
                            num_tokens, loss_tokens, num_seqs, agg, beta, mb_stats,
                        )
                # Clip and apply; or skip: weights and optimiser state stay as they were before
                # this minibatch.
                outcome = self.strategy.step(finite)
                if outcome is StepOutcome.APPLIED:
                    acc["_updates"] += 1
                    for k, v in mb_stats.items():
                        acc[k] += v
                elif outcome is StepOutcome.LOSS_SCALE:
                    acc["_scaler_skipped"] += 1
                else:
                    acc["_skipped"] += 1
                self.strategy.zero_grad()
        for m in models:
            m.eval()
        for key in ("_skipped", "_updates", "_scaler_skipped"):
            acc.setdefault(key, 0)
        return acc

    def _shuffled(self, batch: TrainBatch) -> torch.Tensor:
        """A random order of the rows; whole groups stay together when prefixes are shared.

        Keeping a group's G answers in one micro-batch is what lets them share their prompt's
        forward pass; the order of the groups is still random.
        """
        G = batch.group_size
        if not self._shares_prefix(G) or len(batch) % G:
            return torch.randperm(len(batch), generator=self.generator)
        groups = torch.randperm(len(batch) // G, generator=self.generator)
        return (groups[:, None] * G + torch.arange(G)[None, :]).reshape(-1)

    def _micro_step(self, mb, fw, advantages, returns, idx, num_tokens, loss_tokens, num_seqs, agg, beta,
                    stats) -> bool:
        """Forward and backward of one micro-batch; adds its statistics to `stats`. False: the loss is
        not finite (the minibatch will be skipped)."""
        loss, mb_stats = self.strategy.forward(self._micro_loss, mb, fw, advantages, returns, idx, num_tokens,
                                               loss_tokens, num_seqs, agg, beta)
        finite = bool(torch.isfinite(loss))
        self.strategy.backward(loss, finite)
        if finite:
            for k, v in mb_stats.items():
                stats[k] += v
        return finite

    def _micro_loss(self, mb, fw, advantages, returns, idx, num_tokens, loss_tokens, num_seqs, agg, beta):
        """The PPO loss of one micro-batch, and its statistics (floats)."""
        opt = self.opt_cfg
        L = mb.input_ids.shape[1]
        mask = mb.action_mask
        old_lp = fw.old_logprobs[idx, :L]
        adv = advantages[idx, :L]
        norm_len = float(self.cfg.generation.max_new_tokens)
        logp, entropy, out = self._policy_logprobs(self.policy, mb)
        if self._fused_old:
            # First and only pass on the sampling weights: pi_old is pi_theta, detached.
            old_lp = logp.detach()
            fw.old_logprobs[idx, :L] = old_lp
        # Off the action tokens the log-probs are never used, but an exp() of a large gap there
        # would still send inf * 0 = NaN through the backward: pin the ratio to 1 off the mask.
        old_lp = torch.where(mask, old_lp, logp.detach())
        pg_mat, clipped, ratio = M.clipped_policy_loss(logp, old_lp, adv, opt.cliprange, opt.dual_clip)
        if not self.cfg.kl_in_reward and beta > 0:
            # GRPO puts the KL in the loss, per token (DeepSeekMath eq. 3).
            pg_mat = pg_mat + beta * M.kl_penalty(logp, fw.ref_logprobs[idx, :L], opt.kl_estimator)
        pg_loss = M.aggregate(pg_mat, mask, agg, loss_tokens, num_seqs, norm_len)
        loss = pg_loss
        w = 1.0 / max(num_tokens, 1)
        stats = {}
        if returns is not None:
            values = self._values(mb, out)
            vf_mat, vf_clipped = M.clipped_value_loss(values, fw.values[idx, :L], returns[idx, :L], opt.cliprange_value)
            vf_loss = M.aggregate(vf_mat, mask, "token-mean", loss_tokens, num_seqs)
            loss = loss + opt.vf_coef * vf_loss
            stats["loss/value_avg"] = vf_loss.item()
            stats["val/clipfrac_avg"] = M.masked_sum(vf_clipped.float(), mask).item() * w
        with torch.no_grad():
            stats["loss/policy_avg"] = pg_loss.item()
            stats["policy/approxkl_avg"] = M.masked_sum(M.approx_kl(logp, old_lp), mask).item() * w
            stats["policy/clipfrac_avg"] = M.masked_sum(clipped.float(), mask).item() * w
            stats["policy/entropy_avg"] = M.masked_sum(entropy, mask).item() * w
            stats["val/ratio"] = M.masked_sum(ratio, mask).item() * w
        return loss, stats

    def _bad_step(self, why: str, timings: dict) -> dict[str, float]:
        self.consecutive_bad_steps += 1
        self.skipped_updates += 1
        if self.consecutive_bad_steps >= self.opt_cfg.max_bad_steps:
            raise TrainingDiverged(f"{self.consecutive_bad_steps} steps in a row were skipped: {why}")
        return {"optim/skipped_steps": 1.0, "lr": self.lr, **timings}

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict:
        state = {
            **self.strategy.state_dict(),  # the optimisers (unless they are in per-rank shards)
            "scheduler": self.scheduler.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "generator": self.generator.get_state(),
            "global_step": self.global_step,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "skipped_updates": self.skipped_updates,
        }
        if self.critic_scheduler is not None:
            state["critic_scheduler"] = self.critic_scheduler.state_dict()
        if self.value_head is not None and not self.strategy.saves_weights:
            state["value_head"] = self.value_head.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.generator.set_state(state["generator"])
        self.global_step = state["global_step"]
        self.consecutive_bad_steps = state["consecutive_bad_steps"]
        self.skipped_updates = state["skipped_updates"]
        if self.critic_scheduler is not None:
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        if self.value_head is not None and not self.strategy.saves_weights:
            self.value_head.load_state_dict(state["value_head"])

    def save_shards(self, staged) -> list[str]:
        """Write this rank's part of the training state into a staged checkpoint (every rank calls it)."""
        return self.strategy.save_shards(staged)

    def load_shards(self, checkpoint) -> None:
        """Read this rank's part back (after `load_state_dict`; every rank calls it)."""
        self.strategy.load_shards(checkpoint)


def _schedule(kind: str, warmup_ratio: float, total_steps: int):
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def value_model_for_saving(learner: Learner) -> ValueModel | None:
    return learner.unwrapped_value_model()


__all__ = ["Forwarded", "Learner", "TrainBatch", "TrainingDiverged", "is_peft_model"]
