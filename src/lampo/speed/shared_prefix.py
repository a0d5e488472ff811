"""Shared-prefix forward: run each distinct prompt once, then every answer on its KV cache.

GRPO-family estimators sample G answers per prompt, so a batch of B = n x G conversations holds
each prompt G times. A plain forward pass (and its backward) computes the prompt's tokens G
times over. Here the distinct prompts go through the model once, with gradients; their keys and
values are indexed out to the G rows that share them, and the rest of each conversation (its
answers and later turns) runs on that cache. The result is exactly the plain forward (up to
float rounding): attention over the prompt sees the same keys and values, and the backward of
the indexing sums the G rows' gradients into the one prompt computation, as the G copies would
have. With short prompts and long answers this removes a share of the training pass's tokens that
grows with G (docs/performance-log.md).

Layout: the learner's batches are right-padded ([prompt][answer...][pad]); the prefix of a row is
everything before its first action token. Distinct prefixes are left-padded into one batch so
that they all end at the same cache position; each suffix then starts at position `len(prefix)`
of its own row (explicit position ids).

Packing (`lampo.speed.passes.should_pack`): prompts of different lengths pad that batch. Then the distinct prefixes can run instead as one
packed row with a block-diagonal causal mask, every position a real token, and their keys and
values are gathered back into the left-padded layout above. That trades padded positions in every
product for attention over the whole packed row, so the cost model (`lampo.speed.cost.ModelShape`)
decides per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lampo.optimize import maths as M
from lampo.optimize.batch import Sampling


@dataclass
class PrefixPlan:
    """How a right-padded batch splits into shared prefixes and per-row suffixes.

    Attributes:
        prefix_ids / prefix_mask: [U, P] the U distinct prefixes, left-padded to P.
        row_prefix: [B] which distinct prefix each row starts with.
        prefix_len: [B] real length of each row's prefix.
        suffix_ids / suffix_mask: [B, S] what follows each row's prefix, right-padded to S.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    row_prefix: torch.Tensor
    prefix_len: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor

    @property
    def computed_tokens(self) -> int:
        """Token positions the shared forward computes (padding included)."""
        return self.prefix_ids.numel() + self.suffix_ids.numel()


def plan_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor,
                  pad_id: int = 0) -> PrefixPlan | None:
    """Split rows at their first action token and de-duplicate the prefixes.

    A row without any action token (an empty generation) is all prefix: computed, never scored.
    Returns None when sharing saves nothing (every prefix distinct) or a row starts with an
    action token (nothing to share; the plain forward handles it).
    """
    B = input_ids.shape[0]
    if B == 0:
        return None
    lengths = attention_mask.sum(1)
    has_action = action_mask.any(1)
    starts = torch.where(has_action, action_mask.int().argmax(1), lengths)  # first action token of each row
    if bool((starts == 0).any()):
        return None
    keys: dict[tuple[int, ...], int] = {}
    row_prefix = []
    host_ids, host_starts = input_ids.cpu(), starts.tolist()  # one copy off an accelerator, not one per row
    for b in range(B):
        key = tuple(host_ids[b, : host_starts[b]].tolist())
        row_prefix.append(keys.setdefault(key, len(keys)))
    if len(keys) == B:
        return None
    dev = input_ids.device
    P = max(host_starts)
    prefix_ids = torch.full((len(keys), P), pad_id, dtype=input_ids.dtype)
    prefix_mask = torch.zeros((len(keys), P), dtype=attention_mask.dtype)
    for key, u in keys.items():
        prefix_ids[u, P - len(key):] = torch.tensor(key, dtype=input_ids.dtype)
        prefix_mask[u, P - len(key):] = 1
    suffix_len = lengths - starts
    S = max(int(suffix_len.max()), 1)
    cols = starts[:, None] + torch.arange(S, device=dev)[None, :]  # [B, S] positions of the suffix tokens
    inside = torch.arange(S, device=dev)[None, :] < suffix_len[:, None]
    cols = torch.where(inside, cols, torch.zeros_like(cols))
    suffix_ids = torch.where(inside, input_ids.gather(1, cols), torch.full_like(cols, pad_id))
    return PrefixPlan(prefix_ids=prefix_ids.to(dev), prefix_mask=prefix_mask.to(dev),
                      row_prefix=torch.tensor(row_prefix, device=dev),
                      prefix_len=starts, suffix_ids=suffix_ids, suffix_mask=inside.to(attention_mask.dtype))


class UnsupportedModel(RuntimeError):
    """The model's KV cache is not one this module knows to be exact (see `check_cache`)."""


def check_cache(cache) -> None:
    """Only plain full-attention layers of transformers' DynamicCache are known to be exact here.

    Sliding-window, quantised or linear-attention caches keep other state; models loaded with
    trust_remote_code may return tuples. The learner then falls back to the plain pass.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise UnsupportedModel(f"shared prompts need a DynamicCache of full-attention layers, got {type(cache).__name__}")


# Packing needs a custom 4D mask, which transformers passes through as-is to these attention
# implementations (a bool mask to SDPA, an additive one to eager attention); others keep padding.
PACKING_ATTENTION = ("sdpa", "eager")
MAX_PACKED_TOKENS = 8192  # the packed row's [N, N] mask and attention grow with the square of N


def _packed_prefix_pass(model: nn.Module, plan: PrefixPlan, attn_implementation: str):
    """The distinct prefixes as one packed row; returns (each row's cache in the left-padded [B, P] layout, last logits [U, V])."""
    real = plan.prefix_mask.bool()
    U, P = real.shape
    dev = real.device
    ids = plan.prefix_ids[real][None]  # [1, N]: prefix after prefix, no padding
    N = ids.shape[1]
    pos = (plan.prefix_mask.long().cumsum(1) - 1)[real][None]  # each prefix counts from 0 again
    seg = torch.arange(U, device=dev)[:, None].expand(U, P)[real]
    idx = torch.arange(N, device=dev)
    allowed = (seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :])  # causal within each prefix
    if attn_implementation == "eager":
        mask = torch.zeros(N, N, device=dev).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = allowed
    # where each slot of the left-padded layout sits in the packed row; padding slots read token 0,
    # which the answer pass masks out (zero attention weight, so zero gradient too)
    layout = torch.zeros(U, P, dtype=torch.long, device=dev)
    layout[real] = idx
    out = model(input_ids=ids, attention_mask=mask[None, None], position_ids=pos, use_cache=True,
                logits_to_keep=layout[:, -1])  # a left-padded prefix ends in its row's last slot
    cache = out.past_key_values
    check_cache(cache)
    # [1, H, N, d] -> [B, H, P, d] in one gather: every row reads its own prefix's slots, and the
    # backward sums the G rows' gradients into the packed row
    rows = layout.index_select(0, plan.row_prefix)
    B = rows.shape[0]
    for layer in cache.layers:
        layer.keys, layer.values = (t[0].index_select(1, rows.flatten()).unflatten(1, (B, P)).transpose(0, 1)
                                    for t in (layer.keys, layer.values))
    return cache, out.logits[0]


def scatter_suffix(values: torch.Tensor, plan: PrefixPlan, length: int) -> torch.Tensor:
    """Place per-suffix-token values [B, S] back at their positions in the [B, length] layout."""
    B, S = values.shape
    cols = plan.prefix_len[:, None] + torch.arange(S, device=values.device)[None, :]
    out = values.new_zeros(B, length + S)  # room for the padded tail of the longest rows
    return out.scatter(1, cols, values)[:, :length]


def shared_prefix_logprobs(model: nn.Module, plan: PrefixPlan, length: int, sampling: Sampling,
                           with_entropy: bool = True,
                           pack_for: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of every suffix token, aligned with the [B, length] batch.

    Positions inside the prefixes get 0: they are never actions. `model` is a causal LM that
    takes `past_key_values`, `position_ids` and `logits_to_keep` (transformers' models do).
    pack_for: None runs the distinct prefixes as the left-padded batch; "sdpa" or "eager" (the
    model's attention implementation) as one packed row with the mask it takes (`passes.should_pack`).
    Same result either way.
    """
    # 1. each distinct prefix once; only its last position's logits are needed (they predict
    #    the first suffix token), so the LM head runs on one position per prefix.
    if pack_for is not None:
        cache, last_logits = _packed_prefix_pass(model, plan, pack_for)
    else:
        prefix_pos = (plan.prefix_mask.long().cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=plan.prefix_ids, attention_mask=plan.prefix_mask, position_ids=prefix_pos,
                    use_cache=True, logits_to_keep=1)
        cache, last_logits = out.past_key_values, out.logits[:, -1]
        check_cache(cache)
        cache.reorder_cache(plan.row_prefix)  # index_select: its backward sums the G rows' gradients
    first_logits = last_logits.index_select(0, plan.row_prefix)
    # 2. every row's suffix on its prefix's keys and values, without the last column: a last
    #    token is only predicted, never an input (as in `passes.fed_columns`).
    S = plan.suffix_ids.shape[1]
    t, k, p = sampling.temperature, sampling.top_k, sampling.top_p
    first_lp, first_ent = M.logprobs_and_entropy(first_logits, plan.suffix_ids[:, 0], t, with_entropy, k, p)
    lps = [first_lp[:, None]]
    ents = [first_ent[:, None]] if with_entropy else []
    if S > 1:
        fed = plan.suffix_ids[:, :-1]
        suffix_pos = plan.prefix_len[:, None] + torch.arange(S - 1, device=fed.device)[None, :]
        mask = torch.cat([plan.prefix_mask.index_select(0, plan.row_prefix), plan.suffix_mask[:, :-1]], dim=1)
        logits = model(input_ids=fed, attention_mask=mask, position_ids=suffix_pos,
                       past_key_values=cache, use_cache=True).logits
        # suffix token 0 is predicted by the prefix's last position, token j > 0 by suffix position
        # j - 1: [B, ...] log-prob tensors joined, rather than a copy of the [B, S, V] logits.
        rest_lp, rest_ent = M.logprobs_and_entropy(logits, plan.suffix_ids[:, 1:], t, with_entropy, k, p)
        lps.append(rest_lp)
        if with_entropy:
            ents.append(rest_ent)
    # padded suffix positions score the pad id the plain pass does not see: zero them, so both
    # paths agree wherever a caller might look (the learner masks them anyway)
    real = plan.suffix_mask.bool()
    logp = torch.where(real, torch.cat(lps, dim=1), 0.0)
    ent = torch.where(real, torch.cat(ents, dim=1), 0.0) if with_entropy else None
    return scatter_suffix(logp, plan, length), (scatter_suffix(ent, plan, length) if with_entropy else None)
