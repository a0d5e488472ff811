"""The learner's one seam: the model passes of a minibatch, by the fastest way that computes the same.

The learner asks for log-probs and values; it never sees how they were computed:

    passes = Passes(cfg)
    lp, entropy, hidden = passes.logprobs(policy, minibatch)     # [B, T] each, aligned with the tokens
    values = passes.values(critic, minibatch, hidden)              # [B, T]

Three passes give the same numbers (up to float rounding; tests/unit/test_perf_learner.py):
- plain: one forward over the right-padded batch;
- shared prefix: with G samples per prompt, each distinct prompt once and every answer on its KV
  cache (speed/shared_prefix.py);
- packed: the shared prefix pass with the distinct prompts as one packed row, when the cost model
  says it pays (`should_pack`).
Every pass leaves out a batch's last column (`fed_columns`). The decisions that change how much
work a step does, never its result, are here too: whether the old log-probs come from the first
training pass (`fuses_old_logprobs`) and the minibatch order that keeps groups together.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any

import torch
from torch import nn

from lampo.optimize import maths as M
from lampo.optimize.batch import Sampling
from lampo.speed import shared_prefix as SP
from lampo.speed.cost import ModelShape

log = logging.getLogger(__name__)


def fed_columns(length: int) -> int:
    """How many leading columns of a [B, length] batch the passes compute.

    The last token is only ever predicted, never an input to a prediction (generation never feeds
    its last sampled token back either), so its position is not computed: 1/length less work.
    One column stays for a batch of width 1 (nothing is predicted there, all outputs are 0).
    """
    return max(length - 1, 1)


def shift_align(per_position: torch.Tensor, length: int) -> torch.Tensor:
    """Move values computed at position t-1 (which predicts token t) onto token t; token 0 gets 0."""
    return torch.nn.functional.pad(per_position[:, : length - 1], (1, 0))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted over the real tokens of its row, as `generate` counts them.

    The policy and the critic get the same positions whatever side a row is padded on: without
    them transformers numbers columns, so a left-padded row would be read at shifted positions
    (it matters for learned absolute positions, GPT-2's; rotary embeddings are shift-invariant).
    """
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def aligned_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, sampling: Sampling,
                     with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) [B, T] of the tokens, from the logits of a pass over the first columns:
    the logits at t - 1 predict token t, so entry t is the log-prob of token t and entry 0 is 0."""
    L = input_ids.shape[1]
    lp, ent = M.logprobs_and_entropy(logits[:, : L - 1], input_ids[:, 1:], sampling.temperature, with_entropy,
                                     sampling.top_k, sampling.top_p)
    pad = torch.nn.functional.pad
    return pad(lp, (1, 0)), (pad(ent, (1, 0)) if with_entropy else None)


def should_pack(attn_implementation: str | None, plan: SP.PrefixPlan, shape: ModelShape) -> bool:
    """Whether one packed row of the distinct prefixes costs fewer FLOPs than the padded batch.

    U prefixes left-padded to P compute U P positions and U P^2 attention pairs; packed, N real
    tokens compute N positions and N^2 pairs (the block-diagonal mask is applied, not skipped),
    each costed by `ModelShape.flops`.
    """
    U, P = plan.prefix_ids.shape
    N = int(plan.prefix_mask.sum())
    if attn_implementation not in SP.PACKING_ATTENTION or U < 2 or N == U * P or N > SP.MAX_PACKED_TOKENS:
        return False
    return shape.flops(N, N * N) < shape.flops(U * P, U * P * P)


def inner_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a data-parallel wrapper (`.module`) and a PEFT wrapper."""
    from lampo.optimize.models import base_causal_lm

    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return base_causal_lm(model)


def takes_a_kv_cache(model: nn.Module) -> bool:
    """Whether the model's forward takes what the shared-prefix pass passes it (transformers' causal
    LMs do), read from its signature so that the pass is never tried on a model that cannot run
    it: a TypeError inside the pass is then a bug, not a reason to fall back."""
    params = inspect.signature(inner_causal_lm(model).forward).parameters
    return all(name in params for name in ("past_key_values", "position_ids", "logits_to_keep"))


class Passes:
    """The passes of one learner (see the module docstring); switched by the `speed` config section."""

    def __init__(self, config: Any, autocast_dtype: torch.dtype | None = None) -> None:
        self.cfg = config
        self.share_prefix = config.speed.share_prefix
        self.autocast_dtype = autocast_dtype
        g = config.generation
        self.sampling = Sampling(g.temperature, g.top_k, g.top_p)
        """The config's sampling, for batches that do not say how they were sampled."""
        self._packing: tuple[ModelShape, str | None] | None = None  # read once, on the first shared pass
        self.cache_unsupported = False
        """Set once a model's KV cache turned out to be one the shared pass does not know."""
        self._takes_cache: dict[int, bool] = {}  # per model, from its signature

    # ------------------------------------------------------------------ models
    def prepare(self, *models: nn.Module | None) -> None:
        """Put the models' fp32 linear layers on oneDNN's kernels (`onednn_linear`); same parameters."""
        if not self.cfg.speed.onednn_linear:
            return
        from lampo.speed.onednn_linear import use_onednn_linear

        for model in models:
            if model is not None:
                use_onednn_linear(model)

    def autocast(self, device_type: str):
        """bf16/fp16 autocast over the fp32 master weights, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ decisions
    def shares_prefix(self, group_size: int, value_head: bool = False) -> bool:
        """Whether the passes share each group's prompt (speed/shared_prefix.py).

        Needs several samples per prompt; not with a value head (it needs the hidden state of every
        position) nor with gradient checkpointing (transformers turns the KV cache off under it);
        off once a model's cache turned out to be one the pass does not know (sliding windows).
        """
        return (self.share_prefix and group_size >= 2 and not value_head
                and not self.cfg.model.gradient_checkpointing and not self.cache_unsupported)

    def fuses_old_logprobs(self, batch_len: int, uses_reference: bool) -> bool:
        """Whether the old log-probs come from the first (only) training pass, not a pass of their own.

        With one epoch and one minibatch, every micro-batch is trained on the weights that sampled
        the batch, so pi_old = pi_theta detached: a separate no-grad forward would compute the same
        numbers again. Without a reference or a critic nothing else needs that forward, and the
        phase disappears (TRL's GRPOTrainer does the same with num_iterations=1).
        """
        opt = self.cfg.optim
        return (opt.ppo_epochs == 1 and opt.mini_batch_size >= batch_len and not uses_reference
                and not self.cfg.uses_critic)

    def order(self, batch: Any, generator: torch.Generator, value_head: bool = False) -> torch.Tensor:
        """A random order of the rows for an epoch; whole groups stay together when prefixes are shared,
        so that a group's answers share their prompt's pass in one micro-batch."""
        G = batch.group_size
        if not self.shares_prefix(G, value_head) or len(batch) % G:
            return torch.randperm(len(batch), generator=generator)
        groups = torch.randperm(len(batch) // G, generator=generator)
        return (groups[:, None] * G + torch.arange(G)[None, :]).reshape(-1)

    # ------------------------------------------------------------------ passes
    def logprobs(self, model: nn.Module, mb: Any, *, with_entropy: bool = True, hidden: bool = False):
        """(log-probs [B, T], entropy [B, T] or None, last hidden states [B, fed, H] or None) of `mb`.

        Entry t belongs to token t (computed from position t - 1, under the batch's sampling
        distribution); hidden states are per computed position, for a value head (`values`).
        """
        sampling = self.sampling if mb.sampling is None else mb.sampling
        if not hidden and self.shares_prefix(mb.group_size):
            plan = SP.plan_prefixes(mb.input_ids, mb.attention_mask, mb.action_mask)
            if plan is not None and self._takes_cache.setdefault(id(model), takes_a_kv_cache(model)):
                try:
                    pack_for = self._pack_for(model, plan)
                    with self.autocast(mb.input_ids.device.type):
                        lp, ent = SP.shared_prefix_logprobs(model, plan, mb.input_ids.shape[1], sampling,
                                                            with_entropy=with_entropy, pack_for=pack_for)
                    return lp, ent, None
                except SP.UnsupportedModel as exc:
                    log.warning("share_prefix: falling back to the plain forward pass for this run (%s)", exc)
                    self.cache_unsupported = True
        L = mb.input_ids.shape[1]
        fed = fed_columns(L)
        mask = mb.attention_mask[:, :fed]
        with self.autocast(mb.input_ids.device.type):
            out = model(input_ids=mb.input_ids[:, :fed], attention_mask=mask, position_ids=position_ids(mask),
                        use_cache=False, output_hidden_states=hidden)
        lp, ent = aligned_logprobs(out.logits, mb.input_ids, sampling, with_entropy)
        return lp, ent, (out.hidden_states[-1] if hidden else None)

    def values(self, critic: nn.Module, mb: Any, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, T], entry t read before token t is chosen: a separate critic's pass over `mb`,
        or a value head (`critic` an `nn.Linear`) over the policy pass's `hidden` states."""
        L = mb.input_ids.shape[1]
        if hidden is not None:
            v = critic(hidden.to(next(critic.parameters()).dtype)).squeeze(-1)
        else:
            fed = fed_columns(L)
            mask = mb.attention_mask[:, :fed]
            with self.autocast(mb.input_ids.device.type):
                v = critic(mb.input_ids[:, :fed], mask, position_ids=position_ids(mask))
        return shift_align(v.float(), L)

    def _pack_for(self, model: nn.Module, plan: SP.PrefixPlan) -> str | None:
        if self._packing is None:
            inner = inner_causal_lm(model)
            self._packing = (ModelShape.from_model(inner), getattr(inner.config, "_attn_implementation", None))
        shape, attn = self._packing
        return attn if should_pack(attn, plan, shape) else None
