"""Shared-prefix plans: how a right-padded batch splits into distinct prompts and per-row suffixes."""

from __future__ import annotations

import torch

from lampo.speed import cost
from lampo.speed.passes import should_pack
from lampo.speed.shared_prefix import plan_prefixes, scatter_suffix


def _batch(rows: list[tuple[list[int], list[int]]]):
    """Right-padded (input_ids, attention_mask, action_mask) from (prompt, answer) pairs."""
    T = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    act = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (p, a) in enumerate(rows):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        mask[b, : len(p) + len(a)] = 1
        act[b, len(p): len(p) + len(a)] = True
    return ids, mask, act


def test_rows_with_the_same_prompt_share_one_left_padded_prefix():
    ids, mask, act = _batch([([5, 6, 7], [8, 9]), ([5, 6, 7], [10]), ([11, 12], [13, 14, 15]), ([11, 12], [16, 17])])
    plan = plan_prefixes(ids, mask, act, pad_id=0)
    assert plan.row_prefix.tolist() == [0, 0, 1, 1]
    assert plan.prefix_ids.tolist() == [[5, 6, 7], [0, 11, 12]]  # left-padded: all end at one cache position
    assert plan.prefix_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert plan.prefix_len.tolist() == [3, 3, 2, 2]
    assert plan.suffix_ids.tolist() == [[8, 9, 0], [10, 0, 0], [13, 14, 15], [16, 17, 0]]
    assert plan.suffix_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert plan.computed_tokens == 2 * 3 + 4 * 3  # vs 4 x 5 for the plain padded batch


def test_multi_turn_suffix_keeps_user_turns_and_later_answers():
    # prompt [1, 2] | answer [3] | user turn [4, 4] | answer [5]: the suffix is everything after the prompt.
    ids = torch.tensor([[1, 2, 3, 4, 4, 5], [1, 2, 6, 4, 4, 7]])
    mask = torch.ones_like(ids)
    act = torch.tensor([[0, 0, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    plan = plan_prefixes(ids, mask, act)
    assert plan.suffix_ids.tolist() == [[3, 4, 4, 5], [6, 4, 4, 7]]
    assert plan.prefix_ids.tolist() == [[1, 2]]


def test_no_plan_when_nothing_is_shared():
    ids, mask, act = _batch([([5, 6], [8]), ([7, 6], [8])])
    assert plan_prefixes(ids, mask, act) is None  # distinct prompts: nothing to save


def test_a_row_without_action_tokens_is_all_prefix_and_does_not_stop_sharing():
    # an empty generation: its row is prompt only; computed once, never scored
    ids, mask, act = _batch([([5, 6], [8, 9]), ([5, 6], [10, 11]), ([3, 4, 4], [])])
    plan = plan_prefixes(ids, mask, act)
    assert plan.row_prefix.tolist() == [0, 0, 1]
    assert plan.prefix_len.tolist() == [2, 2, 3]
    assert plan.prefix_ids.tolist() == [[0, 5, 6], [3, 4, 4]]
    assert plan.suffix_mask.tolist() == [[1, 1], [1, 1], [0, 0]]
    # shared_prefix_logprobs zeroes the masked suffix positions before scattering them back
    out = scatter_suffix(torch.ones(3, 2) * plan.suffix_mask, plan, ids.shape[1])
    assert out.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]


def test_scatter_suffix_puts_values_back_at_their_token_positions():
    ids, mask, act = _batch([([5, 6, 7], [8, 9]), ([5, 6, 7], [10]), ([11, 12], [13, 14, 15]), ([11, 12], [16, 17])])
    plan = plan_prefixes(ids, mask, act)
    vals = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0], [7.0, 8.0, 0.0]])
    out = scatter_suffix(vals, plan, ids.shape[1])
    assert out.tolist() == [[0, 0, 0, 1, 2], [0, 0, 0, 3, 0], [0, 0, 4, 5, 6], [0, 0, 7, 8, 0]]


def test_cost_model_subtracts_the_prompt_copies_not_computed():
    shape = cost.ModelShape(matmul_params=1000, num_layers=2, attn_dim=8)
    # two answers of 3 tokens after one 4-token prompt: sequences of 7, the second prompt copy skipped
    plain = cost.count_flops(shape, [7, 7], old_logprobs=True, reference=False)
    shared = cost.count_flops(shape, [7, 7], old_logprobs=True, reference=False, shared_prefix_lens=[4])
    prefix = 2 * 1000 * 4 + 2 * 2 * 8 * 4 * 5  # 2NP + 2 L d P (P + 1)
    assert plain["forward"] - shared["forward"] == prefix
    assert plain["optimize"] - shared["optimize"] == 3 * prefix
    assert shared["rollout"] == plain["rollout"]  # the engine's work is counted as before


def test_packing_pays_when_the_padding_outweighs_the_extra_attention():
    # prefixes of 9 and 5 tokens: padded, 2 x 9 = 18 positions and 2 x 81 = 162 attention pairs;
    # packed, 14 positions and 14^2 = 196 pairs. FLOPs 2 N_p x positions + 4 L d x pairs, so packing
    # pays iff 2 N_p x 4 > 4 L d x 34, i.e. N_p > 17 L d = 272 for L = 2, d = 8.
    ids, mask, act = _batch([([5] * 9, [8, 9]), ([5] * 9, [10]), ([11] * 5, [13]), ([11] * 5, [16])])
    plan = plan_prefixes(ids, mask, act)
    assert (plan.prefix_ids.shape, int(plan.prefix_mask.sum())) == ((2, 9), 14)
    assert should_pack("sdpa", plan, cost.ModelShape(matmul_params=300, num_layers=2, attn_dim=8))
    assert should_pack("eager", plan, cost.ModelShape(matmul_params=300, num_layers=2, attn_dim=8))
    assert not should_pack("sdpa", plan, cost.ModelShape(matmul_params=250, num_layers=2, attn_dim=8))
    # attention implementations that take no custom 4D mask keep the padded batch
    assert not should_pack("flash_attention_2", plan, cost.ModelShape(matmul_params=300, num_layers=2, attn_dim=8))
    # nothing to gain without padding: prefixes of equal length
    ids, mask, act = _batch([([5] * 4, [8]), ([5] * 4, [9]), ([6] * 4, [8]), ([6] * 4, [9])])
    assert not should_pack("sdpa", plan_prefixes(ids, mask, act), cost.ModelShape(10**9, 2, 8))
