"""Phase 4, advantages: a pure function of the batch, the forward phase's outputs and beta.

    adv = compute_advantages(batch, forwarded, beta=kl_controller.value, config=cfg)

The estimator branch is here, in one `if`: `gae` (PPO with a critic), `reinforce_pp`, and the
group estimators (`grpo`, `rloo`, `dr_grpo`). The formulas are in `maths.py`; docs/algorithms.md
gives each with its paper and keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lampo.optimize import maths as M
from lampo.optimize.batch import Forwarded, TrainBatch


@dataclass
class Advantages:
    """What the optimise phase trains on.

    advantages: [B, T], 0 off the action tokens.
    returns: [B, T], the critic's targets (gae only; None otherwise).
    beta: the KL coefficient these were computed with; the loss uses the same one.
    kl_per_seq: [B], the KL to the reference summed over each conversation's action tokens
        (what an adaptive KL controller follows).
    stats: the objective/* and val/* statistics of the batch.
    """

    advantages: torch.Tensor
    returns: torch.Tensor | None
    beta: float
    kl_per_seq: torch.Tensor
    stats: dict[str, float]


def compute_advantages(batch: TrainBatch, fw: Forwarded, beta: float, config: Any) -> Advantages:
    """Rewards with KL (in the reward or left to the loss), then the estimator's advantages."""
    opt = config.optim
    mask = batch.action_mask
    if fw.ref_logprobs is None:  # no reference (kl_coef 0): the KL is exactly 0, as beta = 0 in TRL
        kl = torch.zeros(mask.shape)
    else:
        kl = torch.where(mask, M.kl_penalty(fw.old_logprobs, fw.ref_logprobs, opt.kl_estimator), 0.0)
    kl_per_seq = kl.sum(1)
    in_reward = beta if config.kl_in_reward else 0.0
    returns = None
    if opt.estimator == "gae":
        rewards = M.token_rewards(batch.placed_scores, kl, mask, in_reward)
        if opt.whiten_rewards:
            rewards = M.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = M.gae(rewards, fw.values, mask, opt.gamma, opt.lam)
        if opt.whiten_advantages:
            advantages = M.masked_whiten(advantages, mask)
    elif opt.estimator == "reinforce_pp":
        # REINFORCE++ (Hu 2025): token rewards with KL, discounted returns, batch-whitened.
        rewards = M.token_rewards(batch.placed_scores, kl, mask, in_reward)
        advantages = M.masked_whiten(M.discounted_returns(rewards, mask, opt.gamma), mask)
    else:
        seq = M.kl_shaped_scores(batch.seq_scores, kl_per_seq, in_reward)
        seq_adv = M.group_advantages(seq, batch.group_size, opt.estimator, scale_std=opt.grpo_scale_std)
        advantages = torch.where(mask, seq_adv[:, None].expand_as(mask), torch.zeros(mask.shape))
    non_score = -beta * kl_per_seq
    stats = {
        "objective/kl": kl_per_seq.mean().item(),
        "objective/kl_coef": beta,
        "objective/scores": batch.seq_scores.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (batch.seq_scores + non_score).mean().item(),
        "val/sequence_lengths": mask.sum(1).float().mean().item(),
        "val/num_stop_token_ids": batch.stopped.float().sum().item(),
    }
    if fw.old_logprobs is not None:
        stats.update(sequence_statistics(batch, fw.old_logprobs))
    return Advantages(advantages=advantages, returns=returns, beta=beta, kl_per_seq=kl_per_seq, stats=stats)


def sequence_statistics(batch: TrainBatch, old_logprobs: torch.Tensor) -> dict[str, float]:
    """Statistics of the sampling policy's log-probs: the sequence entropy estimate, sum of -log pi
    over the sampled tokens (open-instruct's objective/entropy), and the gap to the engine's."""
    stats = {"objective/entropy": (-M.masked_sum(old_logprobs, batch.action_mask, dim=1)).mean().item()}
    if batch.engine_logprobs is not None:
        stats["val/engine_logprob_diff"] = M.engine_logprob_gap(old_logprobs, batch.engine_logprobs,
                                                                batch.action_mask).item()
    return stats
