"""The learner: from a batch of scored conversations to updated weights.

One PPO step on a `TrainBatch` is three phases (`Learner.train`; the application's `Trainer`
calls and times them one by one):
  3. forward:    old log-probs, reference log-probs and values, without gradients (`forward`)
  4. advantages: rewards with KL, then GAE or a group estimator (`advantages.compute_advantages`)
  5. optimise:   `ppo_epochs` passes over shuffled minibatches, micro-batches accumulated (`optimise`)
The maths is in `maths.py`. How a pass is computed (shared prompts, packed rows, oneDNN kernels,
the fused old log-probs) is the speed wing's business, behind one seam: `self.passes`. How a loss
becomes a gradient and a gradient a step (one process, DDP, DeepSpeed ZeRO) is the strategy's
(`lampo.distributed`), behind another: `self.strategy`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict

import torch
from torch import nn

from lampo.config import ConfigError, LampoConfig
from lampo.distributed.strategy import StepOutcome, Strategy, TrainedModels
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
from lampo.optimize.optimizers import critic_group, make_optimizer, make_scheduler, policy_group, trainable
from lampo.speed.passes import Passes

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss, gradient or updated weight."""


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
        ptx: TrainBatch | None = None,
        keep_sampling_weights: bool = False,
    ):
        self.cfg = config
        opt = self.opt_cfg = config.optim
        if strategy is None and accelerator is not None:
            from lampo.distributed.ddp import AccelerateDDP

            strategy = AccelerateDDP(accelerator)
        self.strategy = strategy if strategy is not None else Strategy()
        self.device = self.strategy.training_device(policy)
        """Where the models train (`Strategy.prepare` puts them there) and the learner's tensors live."""
        check_fp16_device(config, self.device.type)
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
        optimizer = make_optimizer(groups, opt.learning_rate, opt.weight_decay, opt.adam_eps)
        critic_optimizer = None
        if self.value_model is not None:
            critic_optimizer = make_optimizer([critic_group(config, trainable(self.value_model))],
                                              config.critic_learning_rate, opt.weight_decay, opt.adam_eps)
        prepared = self.strategy.prepare(TrainedModels(self.policy, self.value_model, self.value_head, self.ref_model,
                                                       optimizer, critic_optimizer), config)
        self.policy, self.value_model, self.value_head = prepared.policy, prepared.value_model, prepared.value_head
        self.ref_model, self.optimizer, self.critic_optimizer = (prepared.ref_model, prepared.optimizer,
                                                                 prepared.critic_optimizer)
        # on the optimisers as prepared: a strategy may wrap them, or merge them into one (DeepSpeed)
        schedule = (opt.lr_scheduler_type, opt.warmup_ratio, steps)
        self.scheduler = make_scheduler(self.optimizer, *schedule)
        self.critic_scheduler = None if self.critic_optimizer is None else make_scheduler(self.critic_optimizer,
                                                                                          *schedule)
        self.generator = torch.Generator().manual_seed(config.train.seed if seed is None else seed)
        self.ptx = ptx
        """PPO-ptx's supervised examples (`data.ptx`): tokens, and the tokens they train (`action_mask`)."""
        # A copy of the trainable weights (policy, then critic) as they were before the current step,
        # taken at the start of `optimise` into the same buffers every step: one copy of the trainable
        # parameters, on their device. An update that leaves a weight non-finite is undone from it
        # (in `optimise`). Asynchronous runs also train on batches sampled with exactly these policy
        # weights, which lets the engine's log-probs be compared on them (`val/engine_logprob_diff`)
        # apart from the policy's change since (`rollout/kl_staleness`).
        # Not under DeepSpeed: its partitioned parameters are not the learner's to copy or swap, and
        # its engine skips a step whose gradient overflowed by itself.
        self.guards_weights = not self.strategy.saves_weights
        self.keep_sampling_weights = keep_sampling_weights and self.guards_weights
        self._kept: list[torch.Tensor] | None = None
        self.consecutive_bad_steps = 0
        self.skipped_updates = 0
        self.global_step = 0
        self.weights_doubt: str | None = None
        """Why the weights are unfit for a checkpoint although finite (see `train`), or None."""

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
        batch = batch.to(self.device)  # once: the phases below keep every tensor of the step there
        with timer("forward"):
            fw = self.forward(batch)
        if not self.forward_is_finite(fw):
            # finite weights can still be wrecked (an update that moved them by 1e30): no checkpoint of them
            self.weights_doubt = "the last step's log-probs were not finite on these weights"
            return self.skip_step("old or reference log-probs are not finite (the weights may hold NaN)", timer.times)
        self.weights_doubt = None
        with timer("advantages"):
            adv = compute_advantages(batch, fw, self.kl_ctl.value, self.cfg)
        with timer("optimize"):
            stats = self.optimise(batch, fw, adv)
        return {**stats, **timer.times}

    # ------------------------------------------------------------------ 3. forward
    @torch.no_grad()
    def forward(self, batch: TrainBatch) -> Forwarded:
        """Old log-probs, reference log-probs and values, in micro-batches, without gradients; on the
        learner's device."""
        batch = batch.to(self.device)
        B, T = batch.input_ids.shape
        old = None if self.fuses_old_logprobs(batch) else torch.zeros(B, T, device=self.device)
        ref = torch.zeros(B, T, device=self.device) if self.uses_reference else None
        values = torch.zeros(B, T, device=self.device) if self.cfg.uses_critic else None
        self.policy.eval()
        # no gradients: the micro-batch may differ from training's (forward_batch_size)
        for idx, mb in self._micro_batches(batch, self.opt_cfg.forward_batch_size):
            L = mb.input_ids.shape[1]
            lp, v, r = self.strategy.forward(self._no_grad_pass, mb, old is not None, values is not None)
            if lp is not None:
                old[idx, :L] = lp
            if v is not None:
                values[idx, :L] = v
            if r is not None:
                ref[idx, :L] = r
        sampling = None
        if batch.policy_version_lag == 1 and self._sampling_weights is not None and batch.engine_logprobs is not None:
            # the weights that sampled a batch one update old, kept by that update
            with self._weights(self._sampling_weights):
                sampling = self.logprobs(batch)
        return Forwarded(old_logprobs=old, ref_logprobs=ref, values=values, sampling_logprobs=sampling)

    def _no_grad_pass(self, mb: TrainBatch, policy_pass: bool, want_values: bool):
        """(log-probs, values, reference log-probs) of one micro-batch; None where not asked."""
        lp = v = r = None
        if policy_pass:
            lp, _, hidden = self.passes.logprobs(self.policy, mb, with_entropy=False, hidden=self.value_head is not None)
            if want_values:
                v = self._values(mb, hidden)
        if self.uses_reference:
            with reference_mode(self.unwrapped(self.policy), self.ref_model) as ref_model:
                r = self.passes.logprobs(ref_model, mb, with_entropy=False)[0]
        return lp, v, r

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """The policy's log-probs [B, T] of the batch's tokens, without gradients, on the batch's device."""
        given = batch.input_ids.device
        batch = batch.to(self.device)
        out = torch.zeros(batch.input_ids.shape, device=self.device)
        self.policy.eval()
        for idx, mb in self._micro_batches(batch, self.opt_cfg.forward_batch_size):
            lp = self.strategy.forward(lambda m: self.passes.logprobs(self.policy, m, with_entropy=False)[0], mb)
            out[idx, : mb.input_ids.shape[1]] = lp
        return out.to(given)

    def forward_is_finite(self, fw: Forwarded) -> bool:
        """Whether the forward phase's log-probs are finite on every rank (NaN there means the weights
        hold NaN); every rank skips the step, or none does."""
        return self.strategy.all_true(fw_is_finite(fw))

    def _micro_batches(self, batch: TrainBatch, rows: int | None = None):
        """(row indices, rows) of `batch` in micro-batches of `rows` (default: the training micro-batch), in order."""
        B, rows = len(batch), rows or self.micro_batch_size
        for start in range(0, B, rows):
            idx = torch.arange(start, min(start + rows, B))
            yield idx, batch.select(idx)

    @contextlib.contextmanager
    def _weights(self, tensors: list[torch.Tensor]):
        """The policy's trainable parameters swapped with `tensors` inside the block (and back after)."""
        params = trainable(self.policy)
        for p, t in zip(params, tensors, strict=True):
            p.data, t.data = t.data, p.data
        try:
            yield
        finally:
            for p, t in zip(params, tensors, strict=True):
                p.data, t.data = t.data, p.data

    def _values(self, mb: TrainBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.value_head is not None:
            return self.passes.values(self.value_head, mb, hidden)
        return self.passes.values(self.value_model, mb)

    # ------------------------------------------------------------------ 5. optimise
    def optimise(self, batch: TrainBatch, fw: Forwarded, adv: Advantages) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches; then the schedules and the KL controller step."""
        opt = self.opt_cfg
        batch = batch.to(self.device)  # `fw` and `adv` are the forward and advantages phases', there already
        B, T = batch.input_ids.shape
        # Without a forward pass of its own (one epoch, one minibatch), pi_old is pi_theta on the
        # first and only pass, detached: it is filled in as the pass goes.
        fused = fw.old_logprobs is None
        old_all = torch.zeros(B, T, device=self.device) if fused else fw.old_logprobs
        if self.guards_weights:  # the weights before this step (and, async, those the next batch is sampled with)
            self._keep_weights()
        undone = False
        acc: dict[str, float] = defaultdict(float)
        models = [m for m in (self.policy, self.value_model, self.value_head) if m is not None]
        for m in models:
            m.train()
        for _epoch in range(opt.ppo_epochs):
            order = self.passes.order(batch, self.generator, value_head=self.value_head is not None)
            for mb_start in range(0, B, opt.mini_batch_size):
                mb_idx = order[mb_start : mb_start + opt.mini_batch_size]
                num_tokens = float(batch.action_mask[mb_idx].sum())
                # what the token-mean losses divide by: num_tokens, or with several ranks the mean
                # over ranks of their minibatches' tokens (Strategy.token_normaliser); statistics
                # per token divide by this rank's own
                totals = (self.strategy.token_normaliser(num_tokens), float(len(mb_idx)), num_tokens)
                self.strategy.zero_grad()
                mb_stats: dict[str, float] = defaultdict(float)
                finite = True
                micro_chunks = mb_idx.split(self.micro_batch_size)
                ptx_chunks = self._ptx_chunks(len(micro_chunks))
                for i, idx in enumerate(micro_chunks):
                    with self.strategy.no_sync(i < len(micro_chunks) - 1):
                        finite &= self._micro_step(batch.select(idx), idx, old_all, fused, fw, adv, totals, mb_stats,
                                                   ptx_chunks[i])
                # clip and apply; or skip: weights and optimiser state stay as they were before this minibatch
                outcome = self.strategy.step(finite)
                if outcome is StepOutcome.APPLIED and self.guards_weights and not self._weights_finite():
                    # a finite gradient can still make a non-finite weight (a huge step, an overflow in the
                    # optimiser's arithmetic): the step is undone whole and counts as a bad step
                    undone = True
                    break
                if outcome is StepOutcome.APPLIED:
                    acc["_updates"] += 1
                    for k, v in mb_stats.items():
                        acc[k] += v
                elif outcome is StepOutcome.LOSS_SCALE:
                    acc["_scaler_skipped"] += 1
                else:
                    acc["_skipped"] += 1
                self.strategy.zero_grad()
            if undone:
                break
        if undone:
            self.strategy.zero_grad()
            bad = self.non_finite_weight()
            self._restore_weights()
            minibatches = opt.ppo_epochs * -(-B // opt.mini_batch_size)
            # what the step trained is gone: no loss statistics, every update of the step counted as skipped
            acc = defaultdict(float, _skipped=float(minibatches))
            log.warning("step %d: an optimiser update left weight %s non-finite; the step is undone (the weights "
                        "are those before it; the optimiser's moments keep the update)", self.global_step + 1, bad)
        for m in models:
            m.eval()
        return self._end_step(batch, fw, adv, acc, old_all if fused else None)

    def _micro_step(self, mb, idx, old_all, fused, fw, adv, totals, stats, ptx_mb) -> bool:
        """Forward and backward of one micro-batch; adds its statistics to `stats`. False: the loss is
        not finite (the minibatch will be skipped)."""
        loss, mb_stats = self.strategy.forward(self._micro_loss, mb, idx, old_all, fused, fw, adv, totals, ptx_mb)
        finite = bool(torch.isfinite(loss))
        self.strategy.backward(loss, finite)
        if finite:
            for k, v in mb_stats.items():
                stats[k] += v
        return finite

    def _micro_loss(self, mb, idx, old_all, fused, fw, adv, totals, ptx_mb):
        """The PPO loss of one micro-batch (PPO's clipped objective, Schulman et al. 2017, or the
        configured `policy_loss`; the value loss; PPO-ptx), and its statistics as floats."""
        opt = self.opt_cfg
        L = mb.input_ids.shape[1]
        mask = mb.action_mask
        loss_tokens, num_seqs, num_tokens = totals
        logp, entropy, hidden = self.passes.logprobs(self.policy, mb, hidden=self.value_head is not None)
        if fused:
            old_all[idx, :L] = logp.detach()
        old_lp = M.pin_ratio_off_mask(old_all[idx, :L], logp, mask)
        pg_mat, clipped, ratio = self._policy_loss(logp, old_lp, adv.advantages[idx, :L], mask)
        if opt.rollout_correction != "none" and mb.engine_logprobs is not None:
            # pi_old / pi_engine: the batch was sampled by the engine, not by pi_old (docs/algorithms.md)
            weights, _, _ = M.rollout_correction_weights(old_lp, mb.engine_logprobs, mask, opt.rollout_correction,
                                                         opt.rollout_correction_low, opt.rollout_correction_high)
            pg_mat = pg_mat * weights
        if not self.cfg.kl_in_reward and adv.beta > 0:
            # GRPO puts the KL in the loss, per token (DeepSeekMath eq. 3).
            pg_mat = pg_mat + M.kl_loss(logp, fw.ref_logprobs[idx, :L], adv.beta, opt.kl_estimator)
        pg_loss = M.aggregate(pg_mat, mask, self.cfg.loss_aggregation, loss_tokens, num_seqs,
                              float(self.cfg.generation.max_new_tokens))
        loss = pg_loss
        w = 1.0 / max(num_tokens, 1)
        stats: dict[str, float] = {}
        if adv.returns is not None:
            values = self._values(mb, hidden)
            vf_mat, vf_clipped = M.clipped_value_loss(values, fw.values[idx, :L], adv.returns[idx, :L],
                                                      opt.cliprange_value)
            vf_loss = M.aggregate(vf_mat, mask, "token-mean", loss_tokens, num_seqs)
            loss = loss + opt.vf_coef * vf_loss
            stats["loss/value_avg"] = vf_loss.item()
            stats["val/clipfrac_avg"] = M.masked_sum(vf_clipped.float(), mask).item() * w
        if ptx_mb is not None:
            ptx_loss = self._ptx_loss(*ptx_mb)
            loss = loss + opt.ptx_coef * ptx_loss
            stats["loss/ptx"] = ptx_loss.item()
        with torch.no_grad():
            stats["loss/policy_avg"] = pg_loss.item()
            stats["policy/approxkl_avg"] = M.masked_sum(M.approx_kl(logp, old_lp), mask).item() * w
            stats["policy/clipfrac_avg"] = M.masked_sum(clipped.float(), mask).item() * w
            stats["policy/entropy_avg"] = M.masked_sum(entropy, mask).item() * w
            stats["val/ratio"] = M.masked_sum(ratio, mask).item() * w
        return loss, stats

    def _policy_loss(self, logp, old_lp, advantages, mask):
        """The configured policy loss per token: PPO's clipped ratio, GSPO's sequence ratio or CISPO's weight."""
        kind, low, high = self.opt_cfg.policy_loss, self.cfg.clip_low, self.cfg.clip_high
        if kind == "gspo":
            return M.gspo_policy_loss(logp, old_lp, advantages, mask, low, high)
        if kind == "cispo":
            return M.cispo_policy_loss(logp, old_lp, advantages, low, high)
        return M.clipped_policy_loss(logp, old_lp, advantages, low, self.opt_cfg.dual_clip, high)

    def _ptx_chunks(self, n: int) -> list[tuple[TrainBatch, float] | None]:
        """This minibatch's PPO-ptx examples split over its `n` micro-batches, each with the minibatch's
        count of supervised tokens (the loss's denominator); None without ptx."""
        if self.ptx is None:
            return [None] * n
        size = self.opt_cfg.ptx_batch_size or self.opt_cfg.mini_batch_size
        idx = torch.randint(len(self.ptx), (size,), generator=self.generator)
        tokens = float(self.ptx.action_mask[idx].sum())
        return [(self.ptx.select(part).to(self.device), tokens) if len(part) else None for part in idx.tensor_split(n)]

    def _ptx_loss(self, ptx_mb: TrainBatch, tokens: float) -> torch.Tensor:
        """Negative log-likelihood of the supervised tokens over the minibatch's `tokens` (InstructGPT's
        PPO-ptx, Ouyang et al. 2022, eq. 2): the micro-batches' losses add up to the minibatch's mean."""
        logp, _, _ = self.passes.logprobs(self.policy, ptx_mb, with_entropy=False)
        return -M.masked_sum(logp, ptx_mb.action_mask) / max(tokens, 1.0)

    def _guarded(self) -> list[nn.Parameter]:
        """The trainable weights the learner copies and checks: the policy's first, then the critic's."""
        return [p for m in (self.policy, self.value_model, self.value_head) if m is not None for p in trainable(m)]

    @property
    def _sampling_weights(self) -> list[torch.Tensor] | None:
        """The policy's part of the copy: the weights the batch one update old was sampled with (async)."""
        if not self.keep_sampling_weights or self._kept is None:
            return None
        return self._kept[: len(trainable(self.policy))]

    def _keep_weights(self) -> None:
        params = [p.detach() for p in self._guarded()]
        if self._kept is None:
            self._kept = [p.clone() for p in params]
        else:
            torch._foreach_copy_(self._kept, params)

    @torch.no_grad()
    def _restore_weights(self) -> None:
        torch._foreach_copy_([p.data for p in self._guarded()], self._kept)

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        """Whether every trainable weight is finite, on every rank: one sync.

        Each tensor's largest magnitude (its inf-norm) is finite exactly when all its entries are:
        a max propagates NaN and inf, and unlike a sum or a 2-norm it cannot overflow. One fused
        call over the tensors, with no boolean copy of each weight as `isfinite` would make."""
        params = [p for p in self._guarded() if p.numel()]  # an empty tensor has no inf-norm
        ok = bool(torch.stack(torch._foreach_norm(params, float("inf"))).isfinite().all()) if params else True
        return self.strategy.all_true(ok)

    def checkpoint_doubt(self) -> str | None:
        """Why the current weights must not go into a checkpoint (a weight that is not finite, or a
        last step whose log-probs were not finite on them), or None."""
        bad = self.non_finite_weight()
        return f"weight {bad} is not finite" if bad else self.weights_doubt

    def non_finite_weight(self) -> str | None:
        """The name of a trainable weight holding NaN or inf (None: all finite, or the weights are
        DeepSpeed's to check). A checkpoint is never written while there is one."""
        if not self.guards_weights:
            return None
        for prefix, model in (("policy", self.policy), ("value_model", self.value_model), ("value_head", self.value_head)):
            if model is None:
                continue
            for name, p in self.unwrapped(model).named_parameters():
                if p.requires_grad and not bool(torch.isfinite(p).all()):
                    return f"{prefix}.{name}"
        return None

    def _end_step(self, batch, fw, adv, acc, fused_old) -> dict[str, float]:
        """The schedules and the KL controller step; bad steps are counted; the step's metrics."""
        lr_used = self.lr
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        self.kl_ctl.update(adv.kl_per_seq.mean().item(), n_steps=len(batch))
        self.global_step += 1
        skipped, updates = acc.pop("_skipped", 0), acc.pop("_updates", 0)
        scaler_skipped = acc.pop("_scaler_skipped", 0)
        if skipped:
            self.consecutive_bad_steps += 1
            self.skipped_updates += skipped
            if self.consecutive_bad_steps >= self.opt_cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.consecutive_bad_steps} steps in a row had a non-finite loss, gradient or updated weight "
                    f"({self.skipped_updates} optimiser updates skipped or undone in all). Lower learning_rate, enable "
                    "max_grad_norm, check the reward scale, or use fp32 instead of fp16."
                )
        else:
            self.consecutive_bad_steps = 0
        stats = dict(adv.stats)
        if fused_old is not None:  # the training pass has filled in the old log-probs only now
            sampling = fused_old if fw.sampling_logprobs is None and batch.policy_version_lag == 0 else fw.sampling_logprobs
            stats.update(sequence_statistics(batch, fused_old, sampling, self.cfg))
        stats.update({k: v / max(updates, 1) for k, v in acc.items()})
        if "loss/policy_avg" in stats:  # absent when every minibatch of the step was skipped
            stats["objective/loss"] = stats["loss/policy_avg"] + self.opt_cfg.vf_coef * stats.get("loss/value_avg", 0.0)
        stats["optim/skipped_steps"] = float(skipped)
        loss_scale = self.strategy.loss_scale()
        if loss_scale is not None:  # fp16
            stats["optim/loss_scale"] = loss_scale
            stats["optim/scaler_skipped_steps"] = float(scaler_skipped)
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

    # ------------------------------------------------------------------ whole models (the strategy's)
    def unwrapped(self, model: nn.Module | None) -> nn.Module | None:
        """A model without its data-parallel or DeepSpeed wrapper (saving, weight sync, cost accounting)."""
        return None if model is None else self.strategy.unwrap(model)

    def unwrapped_policy(self) -> nn.Module:
        return self.unwrapped(self.policy)

    def unwrapped_value_model(self) -> nn.Module | None:
        return self.unwrapped(self.value_model)

    def full_weights(self, *models: nn.Module):
        """Context in which `models` (default: every trained model) hold all their parameters.

        Under ZeRO-3 the parameters are partitioned over the ranks and this gathers them, on every
        rank: every rank must enter it, also where only rank 0 saves.
        """
        trained = models or tuple(m for m in (self.policy, self.value_model, self.value_head) if m is not None)
        return self.strategy.full_weights(*trained)

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
        if self.value_head is not None and "value_head" in state:
            self.value_head.load_state_dict(state["value_head"])

    def save_shards(self, staged) -> list[str]:
        """Write this rank's part of the training state into a staged checkpoint (every rank calls it)."""
        return self.strategy.save_shards(staged)

    def load_shards(self, checkpoint) -> None:
        """Read this rank's part back (after `load_state_dict`; every rank calls it)."""
        self.strategy.load_shards(checkpoint)


def fw_is_finite(fw: Forwarded) -> bool:
    """Whether the forward phase's log-probs are finite (NaN there means the weights hold NaN)."""
    return all(torch.isfinite(x).all() for x in (fw.old_logprobs, fw.ref_logprobs) if x is not None)


__all__ = ["Learner", "TrainBatch", "TrainingDiverged"]
