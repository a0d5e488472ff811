"""The maths of PPO and its GRPO-family variants, as pure functions of tensors and masks.

Shapes: B sequences, T token positions. Every token-level tensor is aligned with the token
it describes (entry t belongs to token t). `mask` is True on action tokens: the tokens the
policy generated. Prompts, user turns, template markup and padding are never actions, so
they take no loss, no KL and no part in GAE's recursion.

No I/O, no globals, no modules: each function is tested against numbers worked out by hand
in tests/unit/test_maths.py.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is true (over all elements, or along `dim`)."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over masked entries; 0 (not NaN) when the mask is empty."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked entries (Bessel-corrected by default, as lm-human-preferences)."""
    mean = masked_mean(x, mask)
    centred_sq = (x - mean) ** 2
    n = mask.sum()
    var = masked_sum(centred_sq, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the mask; entries outside the mask become 0.

    With shift_mean False the mean is added back (whitened scale, original centre), which is
    how rewards are whitened in lm-human-preferences.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------
# Log-probs, entropy, KL
# ---------------------------------------------------------------------------------------


def log_softmax_t(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) over the last dimension, in fp32.

    The temperature must be the sampling temperature, otherwise the ratio pi/pi_old compares two
    different distributions (N+ implementation details of RLHF, detail on temperature). One
    fused log_softmax, forward and backward, rather than x - logsumexp(x), whose forward and
    backward are chains of element-wise passes over [B, T, V].
    """
    z = logits.float()
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def sampled_support(logits: torch.Tensor, tokens: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The tokens top-k then top-p sampling can draw from, as a bool mask [..., V], the sampled token kept.

    As transformers' TopKLogitsWarper then TopPLogitsWarper apply them to temperature-scaled logits
    (and vLLM): the top_k largest; of those, the smallest set of most likely tokens whose total
    probability reaches top_p. The token that was sampled is always in: on the sampling weights it
    is anyway, and after an update its log-prob must stay finite.
    """
    with torch.no_grad():
        z = logits.float()
        keep = torch.ones_like(z, dtype=torch.bool)
        if top_k > 0 and top_k < z.shape[-1]:
            kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
            keep &= z >= kth
        if top_p < 1.0:
            z = z.masked_fill(~keep, float("-inf"))
            sorted_z, order = torch.sort(z, dim=-1, descending=True)
            probs = torch.softmax(sorted_z, dim=-1)
            # a token is in the nucleus when the probability above it is below top_p (the first always)
            before = probs.cumsum(-1) - probs
            nucleus = torch.zeros_like(keep).scatter(-1, order, before < top_p)
            keep &= nucleus
        return keep.scatter(-1, tokens.unsqueeze(-1), True)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = True, top_k: int = 0,
                         top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) under the sampling distribution, in fp32, and the entropy per position.

    The sampling distribution is softmax(logits / temperature), renormalised over the tokens top-k
    and top-p keep when they are on (`sampled_support`): the distribution the engine sampled from
    and reports log-probs of, so that the learner's pi/pi_old and the engine's log-probs agree.
    logits [..., V] predict `tokens` [...]. Both come from one log-distribution; the entropy is a
    statistic, computed without gradient (None when `with_entropy` is false).
    """
    if top_k > 0 or top_p < 1.0:
        z = logits.float() / temperature
        support = sampled_support(z, tokens, top_k, top_p)
        logp = torch.log_softmax(z.masked_fill(~support, float("-inf")), dim=-1)
    else:
        support, logp = None, log_softmax_t(logits, temperature)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen, None
    with torch.no_grad():
        if support is not None:  # 0 * -inf off the support would be NaN: those terms are 0
            return chosen, -(logp.exp() * logp.masked_fill(~support, 0.0)).sum(-1)
        return chosen, entropy_from_logprobs(logp)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under softmax(logits / temperature), in fp32: logits [..., V] predict `tokens` [...]."""
    return logprobs_and_entropy(logits, tokens, temperature, with_entropy=False)[0]


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Entropy -sum p log p per position of a log-distribution [..., V]."""
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL").

    With log r = ref_logp - logp: k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.
    k1 is unbiased but can be negative; k3 is unbiased and never negative; k2 is biased but
    low-variance. k3 is GRPO's choice (DeepSeekMath, eq. 4).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # Clamp as OpenRLHF/verl do: exp of a large log-ratio overflows in low precision.
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, kl_coef: float, estimator: str) -> torch.Tensor:
    """Per-token KL penalty in the loss, kl_coef * KL(pi || pi_ref) (GRPO: DeepSeekMath, eq. 3)."""
    return kl_coef * kl_penalty(logp, ref_logp, estimator)


def engine_logprob_gap(logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |log pi_learner - log pi_engine| over the action tokens.

    Both are the log-probs of the same sampled tokens; a large gap is the classic sign of a
    weight-sync, dtype or temperature bug (`val/engine_logprob_diff`).
    """
    return masked_mean((logp - engine_logp).abs(), mask)


# ---------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------


def apply_nonstop_penalty(scores: torch.Tensor, stopped: torch.Tensor, penalty: float) -> torch.Tensor:
    """Replace the score of every sequence that never produced the stop token by `penalty`.

    open-instruct's non-stop penalty (`--penalty_reward_value -10.0`): a truncated answer
    cannot be judged, so it gets a fixed low score instead of the reward model's.
    """
    return torch.where(stopped.bool(), scores, torch.full_like(scores, penalty))


def kl_shaped_scores(scores: torch.Tensor, kl_per_seq: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Sequence scores with the KL in the reward, score - kl_coef * KL(sequence) (Ziegler et al. 2019)."""
    return scores - kl_coef * kl_per_seq


def place_scores(scores: list[list[float]], positions: list[list[int]], shape: tuple[int, int]) -> torch.Tensor:
    """A [B, T] tensor with each score at its token position and 0 elsewhere.

    The score of a turn goes on the last token of that assistant turn: the reward arrives
    when the action that earned it is complete (Ziegler et al. 2019 put the sequence score on
    the last response token; per-turn scores generalise that to multi-step conversations).
    """
    out = torch.zeros(shape, dtype=torch.float32)
    for i, (row_scores, row_pos) in enumerate(zip(scores, positions, strict=True)):
        if len(row_scores) != len(row_pos):
            raise ValueError(f"sequence {i}: {len(row_scores)} scores for {len(row_pos)} assistant turns")
        for s, t in zip(row_scores, row_pos, strict=True):
            out[i, t] += s
    return out


def add_at_last_action(values: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`values` [B, T] with delta[i] added at row i's last action token (rows without one unchanged)."""
    mask = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(1).values  # -1: no action
    onehot = (positions[None, :] == last[:, None]) & mask
    return values + onehot.to(values.dtype) * delta[:, None]


def token_rewards(
    placed_scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward: -kl_coef * KL on every action token, plus the placed scores.

    (Ziegler et al. 2019; Stiennon et al. 2020.) Non-action tokens get 0.
    """
    rewards = -kl_coef * kl + placed_scores
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards))


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the action tokens only.

    delta_t = r_t + gamma * V(next action) - V_t;  A_t = delta_t + gamma * lam * A_(next action).
    Non-action tokens (user turns, padding) are skipped: the recursion jumps from one action
    token to the next, so a multi-step conversation is one episode whose steps are the
    assistant tokens. After the last action the next value is 0 (the episode ends).
    Returns (advantages, returns), both 0 outside the mask; returns = advantages + values.
    """
    mask = mask.bool()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    last_gae = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        last_gae = torch.where(m, gae_t, last_gae)
        next_value = torch.where(m, values[:, t].float(), next_value)
        advantages[:, t] = torch.where(m, gae_t, torch.zeros_like(gae_t))
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_(next action) over action tokens (REINFORCE++ returns)."""
    mask = mask.bool()
    B, T = rewards.shape
    out = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        g = rewards[:, t] + gamma * running
        running = torch.where(m, g, running)
        out[:, t] = torch.where(m, g, torch.zeros_like(g))
    return out


def group_advantages(
    scores: torch.Tensor, group_size: int, estimator: str, scale_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Sequence-level advantages from groups of `group_size` consecutive samples of one prompt.

    grpo:    (s - mean(group)) / (std(group) + eps)   (DeepSeekMath, Shao et al. 2024);
             without scale_std only the mean is removed.
    dr_grpo: s - mean(group)                          (Liu et al. 2025: no std, no length norm)
    rloo:    s - mean(other samples of the group)      (Ahmadian et al. 2024)
             = G / (G - 1) * (s - mean(group)).
    std is the unbiased sample std, as torch.std and TRL.
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    g = scores.float().view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        centred = g - mean
        if scale_std:
            centred = centred / (g.std(dim=1, keepdim=True) + eps)
        return centred.reshape(-1)
    if estimator == "dr_grpo":
        return (g - mean).reshape(-1)
    if estimator == "rloo":
        if group_size < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
        return (g - baseline).reshape(-1)
    raise ValueError(f"unknown group estimator {estimator!r}")


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: float, num_seqs: float, norm_len: float = 1.0
) -> torch.Tensor:
    """Reduce a [B, T] token loss to a scalar.

    The denominators (`num_tokens`, `num_seqs`) are those of the whole minibatch, not of this
    micro-batch, so that accumulating micro-batches gives exactly the minibatch's gradient.
      token-mean:              sum(loss * mask) / num_tokens              (PPO / DAPO default)
      seq-mean-token-mean:     sum_i mean_t(loss_i) / num_seqs            (original GRPO)
      seq-mean-token-sum-norm: sum_i sum_t(loss_i) / (norm_len * num_seqs) (Dr. GRPO: a constant
                               normaliser, the generation budget, removes the length bias)
    """
    mask = mask.bool()
    if mode == "token-mean":
        return masked_sum(loss, mask) / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked_sum(loss, mask, dim=1) / mask.sum(1).clamp(min=1)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked_sum(loss, mask) / (norm_len * max(num_seqs, 1.0))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cliprange: float,
    dual_clip: float | None = None,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level PPO-clip loss (Schulman et al. 2017, eq. 7), optionally clip-higher and dual-clipped.

    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), with eps_low = `cliprange` and
    eps_high = `cliprange_high` (DAPO's clip-higher, Yu et al. 2025: a larger upper bound lets
    unlikely tokens gain probability, against entropy collapse; None: the same as eps_low). With
    dual_clip c (Ye et al. 2020) the loss of a negative advantage is also capped at -c A, so a huge
    ratio cannot blow it up. Returns (loss [B, T], clipped [B, T] bool, ratio [B, T]).
    """
    high = cliprange if cliprange_high is None else cliprange_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * advantages)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clipped, ratio


def gspo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange_low: float,
    cliprange_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO's clipped loss with a sequence-level importance ratio (Zheng et al. 2025, eqs. 5-7).

    s_i = exp(mean over sequence i's action tokens of (log pi - log pi_old)): the length-normalised
    ratio of the whole response, clipped per sequence to [1 - eps_low, 1 + eps_high] (the paper's
    ranges are tiny, 3e-4 and 4e-4, as a sequence ratio moves far less than a token's). In the
    GSPO-token form, s_i,t = sg(s_i) * pi(y_t) / sg(pi(y_t)) equals s_i in value and passes each
    token's gradient; the loss max(-A s, -A clip(s)) is the same at every token of a sequence, so a
    sequence-mean aggregation gives the paper's objective. Returns (loss, clipped, ratio), [B, T].
    """
    mask = mask.bool()
    seq_log_ratio = masked_mean(logp - old_logp, mask, dim=1)  # [B]
    token_ratio = torch.exp(seq_log_ratio.detach()[:, None] + logp - logp.detach())
    loss_unclipped = -advantages * token_ratio
    loss_clipped = -advantages * torch.clamp(token_ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    return loss, loss_clipped > loss_unclipped, token_ratio.detach()


def cispo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    cliprange_low: float | None,
    cliprange_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO's loss (MiniMax-M1, 2025, eq. 4): -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi.

    The importance weight is clipped and its gradient stopped, and it multiplies the REINFORCE
    term, so no token's gradient is dropped the way PPO's clipping drops it (MiniMax-M1 sets no lower
    bound: eps_low None). Returns (loss, truncated, ratio), [B, T].
    """
    ratio = torch.exp(logp - old_logp).detach()
    low = None if cliprange_low is None else 1.0 - cliprange_low
    weight = torch.clamp(ratio, min=low, max=1.0 + cliprange_high)
    return -weight * advantages * logp, weight != ratio, ratio


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) (OpenAI baselines PPO2).

    Returns (loss [B, T], clipped [B, T] bool).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


def pin_ratio_off_mask(old_logp: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_old on the action tokens, log pi_theta (detached) elsewhere: the ratio is exactly 1 off the mask.

    Off the action tokens the log-probs are never used, but an exp() of a large gap there would
    still send inf * 0 = NaN through the backward of a masked loss.
    """
    return torch.where(mask, old_logp, logp.detach())


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """Per-token 0.5 * (log ratio)^2, the approx-KL diagnostic of the N+ details paper."""
    return 0.5 * (logp - old_logp) ** 2


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the mask: 1 is a perfect critic, 0 predicts the mean."""
    var_r = masked_var(returns, mask, unbiased=False)
    var_err = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_r > 0, 1 - var_err / var_r, torch.zeros_like(var_r))


# ---------------------------------------------------------------------------------------
# Rollout correction: the gap between the engine's and the learner's probabilities
# ---------------------------------------------------------------------------------------


def rollout_correction_weights(
    old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance weights [B, T] for the policy loss, correcting for sampling with the engine's pi_engine
    rather than the learner's pi_old (truncated importance sampling, Ionides 2008; for LLM RL Yao et
    al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").

    r = pi_old / pi_engine per token; a sequence's ratio is the product over its action tokens.
      tis:     min(r, high) per token
      mis:     1 where low <= r <= high, else 0 (masked out, as IcePop, Ling team 2025)
      seq_tis: min(r_seq, high) for every token of the sequence
      seq_mis: 1 for the whole sequence where low <= r_seq <= high, else 0
    Returns (weights, the ratio each weight was made from [B, T], touched [B, T] bool: truncated or masked).
    """
    mask = mask.bool()
    log_r = torch.where(mask, old_logp - engine_logp, torch.zeros_like(old_logp))
    if mode in ("seq_tis", "seq_mis"):
        # product over the sequence, in log space; clamped so that exp() stays finite
        log_r = log_r.sum(1, keepdim=True).clamp(-30.0, 30.0).expand_as(log_r)
    r = torch.exp(log_r)
    if mode in ("tis", "seq_tis"):
        weights = torch.clamp(r, max=high)
        touched = r > high
    elif mode in ("mis", "seq_mis"):
        keep = (r >= low) & (r <= high)
        weights, touched = keep.to(r.dtype), ~keep
    else:
        raise ValueError(f"rollout_correction must be tis, mis, seq_tis or seq_mis, got {mode!r}")
    return torch.where(mask, weights, torch.ones_like(weights)), r, touched & mask


# ---------------------------------------------------------------------------------------
# Reward shaping
# ---------------------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of responses of `lengths` tokens.

    0 up to max_len - buffer_len tokens; then falling linearly to -factor at max_len:
    factor * ((max_len - buffer_len) - length) / buffer_len.
    """
    start = max_len - buffer_len
    over = (lengths.float() - start).clamp(min=0.0) / buffer_len
    return -factor * over.clamp(max=1.0)


# ---------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Beta adapted towards a target KL (Ziegler et al. 2019, section 2.2).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon),
    where n_steps is the number of episodes in the batch just trained.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value = kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
