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
        kl = torch.zeros(mask.shape, device=mask.device)
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
    elif opt.estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        # REINFORCE++ (Hu et al. 2025): token rewards with KL, discounted returns, batch-whitened;
        # the baseline variant first takes each group's mean score off its samples' last token.
        placed = batch.placed_scores
        if opt.estimator == "reinforce_pp_baseline":
            baseline = batch.seq_scores - M.group_advantages(batch.seq_scores, batch.group_size, "dr_grpo")
            placed = M.add_at_last_action(placed, mask, -baseline)
        rewards = M.token_rewards(placed, kl, mask, in_reward)
        advantages = M.masked_whiten(M.discounted_returns(rewards, mask, opt.gamma), mask)
    else:
        seq = M.kl_shaped_scores(batch.seq_scores, kl_per_seq, in_reward)
        seq_adv = M.group_advantages(seq, batch.group_size, opt.estimator, scale_std=opt.grpo_scale_std)
        advantages = torch.where(mask, seq_adv[:, None].expand_as(mask), 0.0)
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
        sampling = fw.old_logprobs if batch.policy_version_lag == 0 else fw.sampling_logprobs
        stats.update(sequence_statistics(batch, fw.old_logprobs, sampling, config))
    return Advantages(advantages=advantages, returns=returns, beta=beta, kl_per_seq=kl_per_seq, stats=stats)


def sequence_statistics(batch: TrainBatch, old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor | None,
                        config: Any) -> dict[str, float]:
    """Statistics of the log-probs: the sequence entropy estimate, sum of -log pi_old over the sampled
    tokens (open-instruct's objective/entropy); and the gap between the engine and the learner.

    The engine's and the learner's log-probs of the same tokens differ by two things: numerics
    (kernels, dtype, batching) on the same weights, and, one update old in asynchronous runs, the
    policy's own change since the batch was sampled. `sampling_logprobs` (the learner's log-probs
    under the weights that sampled the batch; None when not kept) separates them:
      val/engine_logprob_diff, rollout/kl_numerical, rollout/ratio_numerical_*   engine vs the
        learner, same weights
      val/policy_change_logprob_diff, rollout/kl_staleness, rollout/ratio_staleness_*   the
        sampling weights vs pi_old
      rollout/kl, rollout/ratio_*   engine vs pi_old, both parts: what rollout correction corrects
    KLs are k3 estimates per action token (the tokens were drawn from the engine). A token's ratio
    pi_old / engine is the product of its numerical and its staleness ratio.
    """
    mask = batch.action_mask
    stats = {"objective/entropy": (-M.masked_sum(old_logprobs, mask, dim=1)).mean().item()}
    engine = batch.engine_logprobs
    if engine is None or not bool(mask.any()):
        return stats
    opt = config.optim

    def kl(p_logp, q_logp):  # KL(p || q) from samples of p
        return M.masked_mean(M.kl_penalty(p_logp, q_logp, "k3"), mask).item()

    stats["rollout/kl"] = kl(engine, old_logprobs)
    mode = "tis" if opt.rollout_correction == "none" else opt.rollout_correction
    _, ratio, touched = M.rollout_correction_weights(old_logprobs, engine, mask, mode, opt.rollout_correction_low,
                                                     opt.rollout_correction_high)
    r = ratio[mask]
    stats.update({"rollout/ratio_mean": r.mean().item(), "rollout/ratio_min": r.min().item(),
                  "rollout/ratio_max": r.max().item(),
                  "rollout/ratio_corrected_frac": touched[mask].float().mean().item()})
    if sampling_logprobs is not None:
        stats["val/engine_logprob_diff"] = M.engine_logprob_gap(sampling_logprobs, engine, mask).item()
        stats["rollout/kl_numerical"] = kl(engine, sampling_logprobs)
        stats["rollout/kl_staleness"] = kl(sampling_logprobs, old_logprobs)
        for part, ratio in (("numerical", torch.exp(sampling_logprobs - engine)),
                            ("staleness", torch.exp(old_logprobs - sampling_logprobs))):
            r = ratio[mask]
            stats.update({f"rollout/ratio_{part}_mean": r.mean().item(), f"rollout/ratio_{part}_min": r.min().item(),
                          f"rollout/ratio_{part}_max": r.max().item()})
        stats["val/policy_change_logprob_diff"] = M.engine_logprob_gap(old_logprobs, sampling_logprobs, mask).item()
    return stats
