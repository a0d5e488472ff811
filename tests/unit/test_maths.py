"""The PPO/GRPO maths against numbers worked out by hand (arithmetic in the comments)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lampo.optimize import maths as M


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_gae_four_tokens_gamma_09_lambda_08():
    # r = [0, 0, 0, 1], V = [0.5, 0.4, 0.3, 0.2], gamma 0.9, lambda 0.8 (gamma*lambda = 0.72)
    # t=3: delta = 1 + 0.9*0   - 0.2 =  0.8    A3 = 0.8
    # t=2: delta = 0 + 0.9*0.2 - 0.3 = -0.12   A2 = -0.12 + 0.72*0.8     = 0.456
    # t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13   A1 = -0.13 + 0.72*0.456   = 0.19832
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14   A0 = -0.14 + 0.72*0.19832 = 0.0027904
    # returns = A + V = [0.5027904, 0.59832, 0.756, 1.0]
    rewards = t([[0.0, 0.0, 0.0, 1.0]])
    values = t([[0.5, 0.4, 0.3, 0.2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = M.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t([[0.0027904, 0.19832, 0.456, 0.8]]), atol=1e-6)
    assert torch.allclose(ret, t([[0.5027904, 0.59832, 0.756, 1.0]]), atol=1e-6)


def test_gae_skips_non_action_tokens_and_padding():
    # The same four actions with a two-token user turn between them and padding after:
    # the recursion jumps over the user turn, so the advantages equal the dense case.
    rewards = t([[0.0, 0.0, 9.0, 9.0, 0.0, 1.0, 5.0]])  # rewards on non-actions must be ignored
    values = t([[0.5, 0.4, 7.0, 7.0, 0.3, 0.2, 3.0]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    adv, ret = M.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t([[0.0027904, 0.19832, 0, 0, 0.456, 0.8, 0]]), atol=1e-6)
    assert ret[0, 2] == 0 and ret[0, 6] == 0


def test_gae_matches_plain_loop_on_random_input():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 9), torch.randn(3, 9)
    mask = torch.rand(3, 9) > 0.3
    adv, _ = M.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for b in range(3):
        idx = [i for i in range(9) if mask[b, i]]
        last, nxt = 0.0, 0.0
        for i in reversed(idx):
            delta = rewards[b, i].item() + 0.95 * nxt - values[b, i].item()
            last = delta + 0.95 * 0.9 * last
            nxt = values[b, i].item()
            assert adv[b, i].item() == pytest.approx(last, abs=1e-5)


def test_clipped_policy_loss_below_inside_above_with_both_signs():
    # cliprange 0.2, so clip(r) lies in [0.8, 1.2]; loss = max(-A r, -A clip(r)).
    # A=+1: r=0.5 -> max(-0.5, -0.8) = -0.5 (not clipped)   r=1.1 -> -1.1   r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
    # A=-1: r=0.5 -> max( 0.5,  0.8) =  0.8 (clipped)       r=1.1 ->  1.1   r=1.5 -> max( 1.5,  1.2) =  1.5 (not clipped)
    ratios = t([0.5, 1.1, 1.5, 0.5, 1.1, 1.5])
    adv = t([1, 1, 1, -1, -1, -1])
    old = torch.zeros(6)
    loss, clipped, ratio = M.clipped_policy_loss(torch.log(ratios), old, adv, cliprange=0.2)
    assert torch.allclose(loss, t([-0.5, -1.1, -1.2, 0.8, 1.1, 1.5]), atol=1e-6)
    assert clipped.tolist() == [False, False, True, True, False, False]
    assert torch.allclose(ratio, ratios)
    # Dual clip c = 1.3 caps the loss of a negative advantage at -c*A = 1.3: only r=1.5, A=-1 changes.
    loss_dc, _, _ = M.clipped_policy_loss(torch.log(ratios), old, adv, cliprange=0.2, dual_clip=1.3)
    assert torch.allclose(loss_dc, t([-0.5, -1.1, -1.2, 0.8, 1.1, 1.3]), atol=1e-6)


def test_clipped_value_loss():
    # old V = 1.0, eps = 0.2 -> clipped V in [0.8, 1.2]; returns R = 2.0
    # V = 1.5: unclipped (1.5-2)^2 = 0.25, clipped (1.2-2)^2 = 0.64 -> 0.5*0.64 = 0.32 (clipped)
    # V = 1.1: both (1.1-2)^2 = 0.81 -> 0.405 (not clipped)
    # V = 0.5: unclipped (0.5-2)^2 = 2.25, clipped (0.8-2)^2 = 1.44 -> 0.5*2.25 = 1.125 (not clipped)
    loss, clipped = M.clipped_value_loss(t([1.5, 1.1, 0.5]), t([1.0, 1.0, 1.0]), t([2.0, 2.0, 2.0]), 0.2)
    assert torch.allclose(loss, t([0.32, 0.405, 1.125]), atol=1e-6)
    assert clipped.tolist() == [True, False, False]


def test_kl_estimators_on_a_known_pair():
    # pi = 0.5, pi_ref = 0.25: log r = log(0.25/0.5) = -log 2 = -0.693147, r = 0.5
    # k1 = -log r = 0.693147;  k2 = (log r)^2 / 2 = 0.480453 / 2 = 0.240227;  k3 = r - 1 - log r = 0.193147
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert M.kl_penalty(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert M.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert M.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    with pytest.raises(ValueError, match="k4"):
        M.kl_penalty(logp, ref, "k4")


def test_group_advantages_grpo_rloo_dr_grpo():
    # Group of 4 scores [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], squares sum 14,
    # unbiased std = sqrt(14/3) = 2.160247.
    s = t([1, 2, 3, 6])
    grpo = M.group_advantages(s, 4, "grpo", eps=0.0)
    assert torch.allclose(grpo, t([-2, -1, 0, 3]) / 2.160247, atol=1e-5)  # [-0.92582, -0.46291, 0, 1.38873]
    assert torch.allclose(M.group_advantages(s, 4, "grpo", scale_std=False), t([-2, -1, 0, 3]))
    assert torch.allclose(M.group_advantages(s, 4, "dr_grpo"), t([-2, -1, 0, 3]))
    # rloo baselines: for 1 -> (2+3+6)/3 = 3.6667, for 2 -> 10/3, for 3 -> 9/3 = 3, for 6 -> 6/3 = 2
    # advantages [-2.6667, -1.3333, 0, 4] = 4/3 * [-2, -1, 0, 3]
    assert torch.allclose(M.group_advantages(s, 4, "rloo"), t([-8 / 3, -4 / 3, 0, 4]), atol=1e-6)
    # two groups are independent
    two = M.group_advantages(t([1, 2, 3, 6, 10, 10, 10, 10]), 4, "dr_grpo")
    assert torch.allclose(two[4:], torch.zeros(4))
    with pytest.raises(ValueError, match="groups of 3"):
        M.group_advantages(s, 3, "grpo")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=40),
    st.integers(0, 2**16),
)
def test_whitening_gives_mean_zero_unit_variance_over_the_mask(values, seed):
    x = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(len(values), generator=g) > 0.3
    mask[:2] = True
    if float(x[mask].std()) < 1e-3:  # constant input has no scale to normalise
        return
    w = M.masked_whiten(x, mask)
    assert M.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    # unit variance but for the 1e-8 the whitening adds to the variance: var / (var + 1e-8)
    var = M.masked_var(x, mask).item()
    assert M.masked_var(w, mask).item() == pytest.approx(var / (var + 1e-8), abs=1e-6)
    assert torch.all(w[~mask] == 0)


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert M.masked_mean(t([1.0, 2.0]), torch.zeros(2, dtype=torch.bool)).item() == 0.0


def test_logprobs_and_entropy_use_temperature():
    # logits [0, log 3] at temperature 1: p = [1/4, 3/4]; at temperature 2: z = [0, log(3)/2],
    # p = [1, sqrt 3] / (1 + sqrt 3) = [0.366025, 0.633975]
    logits = t([[0.0, math.log(3)]])
    lp1 = M.logprobs_from_logits(logits, torch.tensor([1]), 1.0)
    assert lp1.item() == pytest.approx(math.log(0.75), abs=1e-6)
    lp2 = M.logprobs_from_logits(logits, torch.tensor([0]), 2.0)
    assert lp2.item() == pytest.approx(math.log(0.366025), abs=1e-5)
    # entropy at T=1: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    assert M.entropy_from_logprobs(torch.log(t([[0.25, 0.75]]))).item() == pytest.approx(0.562335, abs=1e-5)
    lp, ent = M.logprobs_and_entropy(logits.clone().requires_grad_(), torch.tensor([1]))
    assert (lp.item(), ent.item()) == pytest.approx((math.log(0.75), 0.562335), abs=1e-5)
    assert lp.requires_grad and not ent.requires_grad  # the entropy is a statistic


def test_logprob_gradient_is_onehot_minus_softmax_over_temperature():
    # d log p_k / d logits = (onehot_k - p) / T. logits [0, log 3], token 1:
    # T = 1: p = [1/4, 3/4] -> [-0.25, 0.25]; T = 2: p = [0.366025, 0.633975] -> [-0.183013, 0.183013]
    for temperature, expected in ((1.0, [-0.25, 0.25]), (2.0, [-0.183013, 0.183013])):
        logits = t([[0.0, math.log(3)]]).requires_grad_()
        M.logprobs_from_logits(logits, torch.tensor([1]), temperature).sum().backward()
        assert logits.grad[0].tolist() == pytest.approx(expected, abs=1e-5)


def test_token_rewards_place_score_on_last_turn_token_and_penalise_kl():
    # Two assistant turns at positions 1-2 and 4-5; per-turn scores 0.3 and 0.7 on tokens 2 and 5.
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    placed = M.place_scores([[0.3, 0.7]], [[2, 5]], (1, 7))
    kl = torch.full((1, 7), 0.5)
    r = M.token_rewards(placed, kl, mask, kl_coef=0.1)
    # action tokens get -0.1*0.5 = -0.05, plus the score on the turn's last token
    assert torch.allclose(r, t([[0, -0.05, 0.25, 0, -0.05, 0.65, 0]]), atol=1e-6)
    with pytest.raises(ValueError, match="2 scores for 1 assistant turns"):
        M.place_scores([[0.3, 0.7]], [[2]], (1, 7))


def test_nonstop_penalty_replaces_score():
    out = M.apply_nonstop_penalty(t([0.5, 0.9]), torch.tensor([True, False]), -10.0)
    assert out.tolist() == [0.5, -10.0]


def test_aggregation_modes():
    # seq 0: losses [1, 2, 3] on 3 tokens; seq 1: loss [6] on 1 token (rest masked)
    loss = t([[1, 2, 3], [6, 100, 100]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    # token-mean: (1+2+3+6)/4 = 3
    assert M.aggregate(loss, mask, "token-mean", num_tokens=4, num_seqs=2).item() == pytest.approx(3.0)
    # seq-mean-token-mean: (mean[1,2,3] + 6)/2 = (2 + 6)/2 = 4
    assert M.aggregate(loss, mask, "seq-mean-token-mean", num_tokens=4, num_seqs=2).item() == pytest.approx(4.0)
    # seq-mean-token-sum-norm with budget 4: (6 + 6) / (4 * 2) = 1.5
    assert M.aggregate(loss, mask, "seq-mean-token-sum-norm", 4, 2, norm_len=4).item() == pytest.approx(1.5)
    # an all-masked micro-batch gives 0, not NaN
    assert M.aggregate(loss, torch.zeros_like(mask), "token-mean", 0, 0).item() == 0.0


def test_adaptive_kl_controller():
    # KL 8 vs target 6: error = 8/6 - 1 = 0.333 -> clipped to 0.2; 100 episodes over horizon 10000:
    # beta = 0.05 * (1 + 0.2 * 100 / 10000) = 0.05 * 1.002 = 0.0501
    ctl = M.AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(8.0, n_steps=100)
    assert ctl.value == pytest.approx(0.0501)
    # KL 3 vs 6: error -0.5 -> -0.2: beta = 0.0501 * (1 - 0.002)
    ctl.update(3.0, n_steps=100)
    assert ctl.value == pytest.approx(0.0501 * 0.998)
    fixed = M.FixedKLController(0.05)
    fixed.update(100.0, 100)
    assert fixed.value == 0.05


def test_explained_variance():
    mask = torch.ones(1, 4, dtype=torch.bool)
    r = t([[1.0, 2.0, 3.0, 4.0]])
    assert M.explained_variance(r, r, mask).item() == pytest.approx(1.0)
    # predicting the mean everywhere explains nothing
    assert M.explained_variance(torch.full((1, 4), 2.5), r, mask).item() == pytest.approx(0.0)


def test_kl_in_the_loss_and_in_the_scores():
    # logp = log 0.5, ref = log 0.25: k1 = log 2 = 0.693147; with coefficient 0.1, 0.0693147
    logp, ref = torch.log(t([[0.5]])), torch.log(t([[0.25]]))
    assert M.kl_loss(logp, ref, 0.1, "k1").item() == pytest.approx(0.0693147, abs=1e-6)
    # k3 = r - 1 - log r with r = ref/pi = 0.5: 0.5 - 1 + 0.693147 = 0.193147
    assert M.kl_loss(logp, ref, 1.0, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    # scores [1, 2] minus 0.5 x KL [0.4, 1.0] = [0.8, 1.5]
    assert M.kl_shaped_scores(t([1.0, 2.0]), t([0.4, 1.0]), 0.5).tolist() == pytest.approx([0.8, 1.5])


def test_engine_logprob_gap_is_the_mean_absolute_gap_on_the_action_tokens():
    # gaps |-1 - -1.5| = 0.5 and |-2 - -1| = 1 on the mask; the unmasked 9 is ignored: mean 0.75
    gap = M.engine_logprob_gap(t([[-1.0, -2.0, 5.0]]), t([[-1.5, -1.0, -4.0]]), torch.tensor([[True, True, False]]))
    assert gap.item() == pytest.approx(0.75)


def test_the_ratio_is_pinned_to_one_off_the_mask():
    logp = t([[-1.0, -2.0]]).requires_grad_()
    old = t([[-1.5, 50.0]])  # a huge gap off the mask would overflow exp()
    pinned = M.pin_ratio_off_mask(old, logp, torch.tensor([[True, False]]))
    assert pinned.tolist() == [[-1.5, -2.0]] and not pinned.requires_grad
    ratio = torch.exp(logp - pinned)
    assert ratio[0, 1].item() == 1.0 and ratio[0, 0].item() == pytest.approx(math.exp(0.5))


def test_clip_higher_raises_only_the_upper_bound():
    # ratio e^0.5 = 1.648721, A = 1: clipped at 1 + 0.28 = 1.28 (clip-higher), at 1.2 without it
    logp, old, adv = t([[0.5]]), t([[0.0]]), t([[1.0]])
    loss, clipped, _ = M.clipped_policy_loss(logp, old, adv, cliprange=0.2, cliprange_high=0.28)
    assert loss.item() == pytest.approx(-1.28) and clipped.item()
    assert M.clipped_policy_loss(logp, old, adv, cliprange=0.2)[0].item() == pytest.approx(-1.2)
    # the lower bound stays 1 - 0.2: ratio 0.5 with A = -1 gives max(0.5, 0.8) = 0.8
    low, _, _ = M.clipped_policy_loss(torch.log(t([[0.5]])), old, t([[-1.0]]), cliprange=0.2, cliprange_high=0.28)
    assert low.item() == pytest.approx(0.8)


def test_gspo_clips_the_length_normalised_sequence_ratio():
    # log-ratios 0.1 and 0.3 on the two action tokens (the third, 5.0, is off the mask): mean 0.2,
    # s = e^0.2 = 1.221403. A = 1: clipped to 1 + 4e-4 = 1.0004 at both tokens.
    old = t([[0.0, 0.0, 0.0]])
    logp = t([[0.1, 0.3, 5.0]]).requires_grad_()
    mask = torch.tensor([[True, True, False]])
    loss, clipped, ratio = M.gspo_policy_loss(logp, old, t([[1.0, 1.0, 1.0]]), mask, 3e-4, 4e-4)
    assert loss[0, :2].tolist() == pytest.approx([-1.0004, -1.0004], abs=1e-6) and clipped[0, :2].all()
    assert ratio[0, 0].item() == pytest.approx(math.exp(0.2))
    # A = -1: max(1.221403, 1.0004) keeps the unclipped term; each token's gradient is -A s = 1.221403
    loss, clipped, _ = M.gspo_policy_loss(logp, old, t([[-1.0, -1.0, -1.0]]), mask, 3e-4, 4e-4)
    assert loss[0, 0].item() == pytest.approx(1.221403, abs=1e-6) and not clipped[0, :2].any()
    (grad,) = torch.autograd.grad(loss[0, :2].sum(), logp)
    assert grad[0, :2].tolist() == pytest.approx([1.221403, 1.221403], abs=1e-6)


def test_cispo_weights_the_log_prob_by_a_clipped_stopped_ratio():
    # ratio 2, eps_high 0.5: weight 1.5 (no gradient); A = 2, log pi = ln 0.5 = -0.693147:
    # loss = -1.5 * 2 * -0.693147 = 2.079442, and d loss / d log pi = -1.5 * 2 = -3
    logp = torch.log(t([[0.5]])).requires_grad_()
    old = torch.log(t([[0.25]]))
    loss, truncated, ratio = M.cispo_policy_loss(logp, old, t([[2.0]]), None, 0.5)
    assert loss.item() == pytest.approx(2.079442, abs=1e-6) and truncated.item() and ratio.item() == pytest.approx(2.0)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert grad.item() == pytest.approx(-3.0)
    # no lower bound: a ratio of 0.1 stays 0.1
    assert not M.cispo_policy_loss(torch.log(t([[0.1]])), t([[0.0]]), t([[1.0]]), None, 0.5)[1].item()


def test_rollout_correction_truncates_or_masks_the_engine_ratio():
    # pi_old / pi_engine: 0.5 / 0.25 = 2 on token 0, 0.25 / 0.5 = 0.5 on token 1; token 2 off the mask
    old, engine = torch.log(t([[0.5, 0.25, 0.9]])), torch.log(t([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[True, True, False]])
    w, r, touched = M.rollout_correction_weights(old, engine, mask, "tis", 0.5, 1.5)
    assert w[0].tolist() == pytest.approx([1.5, 0.5, 1.0]) and touched.tolist() == [[True, False, False]]
    assert r[0, :2].tolist() == pytest.approx([2.0, 0.5])
    w, _, touched = M.rollout_correction_weights(old, engine, mask, "mis", 0.6, 1.5)  # 2 and 0.5 fall outside
    assert w.tolist() == [[0.0, 0.0, 1.0]] and touched.tolist() == [[True, True, False]]
    # sequence ratio 2 x 0.5 = 1: kept whole by both sequence modes
    for mode in ("seq_tis", "seq_mis"):
        w, r, touched = M.rollout_correction_weights(old, engine, mask, mode, 0.5, 1.5)
        assert w[0].tolist() == pytest.approx([1.0, 1.0, 1.0]) and not touched.any()


def test_overlong_penalty_is_linear_in_the_buffer():
    # max 32, buffer 8: free up to 24 tokens, then -(length - 24) / 8: 28 -> -0.5, 32 -> -1; factor 2 doubles it
    got = M.overlong_penalty(torch.tensor([20, 24, 28, 32]), 32, 8, 1.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    assert M.overlong_penalty(torch.tensor([28]), 32, 8, 2.0).item() == pytest.approx(-1.0)


def test_top_p_and_top_k_log_probs_are_renormalised_over_what_sampling_keeps():
    # logits [2, 1, 0, -1]: p = [0.6439, 0.2369, 0.0871, 0.0321]. top_p 0.8 keeps tokens 0 and 1
    # (0.6439 < 0.8 before token 1; 0.8808 before token 2); the sampled token 3 is kept too:
    # log p(3) = -1 - log(e^2 + e^1 + e^-1) = -1 - log(10.475217) = -1 - 2.349012 = -3.349012
    logits = t([[2.0, 1.0, 0.0, -1.0]])
    assert M.sampled_support(logits, torch.tensor([3]), top_p=0.8).tolist() == [[True, True, False, True]]
    lp, ent = M.logprobs_and_entropy(logits, torch.tensor([3]), top_p=0.8)
    assert lp.item() == pytest.approx(-3.349012, abs=1e-5) and math.isfinite(ent.item())
    # top_k 1 keeps the argmax: its log-prob is 0
    lp, _ = M.logprobs_and_entropy(logits, torch.tensor([0]), top_k=1)
    assert lp.item() == pytest.approx(0.0, abs=1e-6)


def test_add_at_last_action():
    mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    got = M.add_at_last_action(torch.zeros(2, 4), mask, t([2.0, 5.0]))
    assert got.tolist() == [[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # a row without actions is left alone


def _group_batch(scores):
    from lampo.optimize.batch import Forwarded, TrainBatch

    B = len(scores)
    mask = torch.tensor([[False, True]] * B)
    placed = torch.zeros(B, 2)
    placed[:, 1] = t(scores)
    batch = TrainBatch(input_ids=torch.zeros(B, 2, dtype=torch.long), attention_mask=torch.ones(B, 2, dtype=torch.long),
                       action_mask=mask, placed_scores=placed, seq_scores=t(scores),
                       stopped=torch.ones(B, dtype=torch.bool), group_size=2)
    return batch, Forwarded(old_logprobs=torch.zeros(B, 2), ref_logprobs=None, values=None)


def test_reinforce_pp_and_its_group_baseline_by_hand():
    from lampo.config import LampoConfig
    from lampo.optimize.advantages import compute_advantages

    # Two groups of two one-token answers scoring [1, 3] and [10, 12], no KL, gamma 1.
    batch, fw = _group_batch([1.0, 3.0, 10.0, 12.0])
    cfg = LampoConfig(estimator="reinforce_pp", num_generations=2, batch_size=2, mini_batch_size=4, kl_coef=0.0)
    # REINFORCE++: returns are the scores, whitened over the batch: mean 6.5, deviations
    # [-5.5, -3.5, 3.5, 5.5], unbiased variance 85 / 3 = 28.333, std 5.322906
    adv = compute_advantages(batch, fw, 0.0, cfg).advantages[:, 1]
    assert adv.tolist() == pytest.approx([-1.033270, -0.657536, 0.657536, 1.033270], abs=1e-5)
    # With the group baseline each score first loses its group's mean (2 and 11): [-1, 1, -1, 1],
    # mean 0, unbiased variance 4 / 3, std 1.154701: the better answer of each group is positive
    cfg = LampoConfig(estimator="reinforce_pp_baseline", num_generations=2, batch_size=2, mini_batch_size=4,
                      kl_coef=0.0)
    adv = compute_advantages(batch, fw, 0.0, cfg).advantages[:, 1]
    assert adv.tolist() == pytest.approx([-0.866025, 0.866025, -0.866025, 0.866025], abs=1e-5)


def test_the_engine_ratio_splits_into_a_numerical_and_a_staleness_part_by_hand():
    # One row, two action tokens. Engine log-probs -1.0, -2.0; the learner on the weights that
    # sampled them -0.9, -2.2; pi_old (one update later) -0.5, -2.2.
    #   numerical ratio exp(sampling - engine): e^0.1 = 1.10517, e^-0.2 = 0.81873
    #   staleness ratio exp(old - sampling):    e^0.4 = 1.49182, e^0   = 1
    #   their product, the whole ratio exp(old - engine): e^0.5 = 1.64872, e^-0.2 = 0.81873
    from lampo.config import LampoConfig
    from lampo.optimize.advantages import sequence_statistics
    from lampo.optimize.batch import TrainBatch

    mask = torch.tensor([[False, True, True]])
    batch = TrainBatch(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long),
                       action_mask=mask, placed_scores=torch.zeros(1, 3), seq_scores=torch.zeros(1),
                       stopped=torch.ones(1, dtype=torch.bool), engine_logprobs=torch.tensor([[0.0, -1.0, -2.0]]))
    stats = sequence_statistics(batch, torch.tensor([[0.0, -0.5, -2.2]]), torch.tensor([[0.0, -0.9, -2.2]]),
                                LampoConfig())
    expected = {"rollout/ratio_numerical_mean": (1.10517 + 0.81873) / 2, "rollout/ratio_numerical_min": 0.81873,
                "rollout/ratio_numerical_max": 1.10517, "rollout/ratio_staleness_mean": (1.49182 + 1.0) / 2,
                "rollout/ratio_staleness_min": 1.0, "rollout/ratio_staleness_max": 1.49182,
                "rollout/ratio_mean": (1.64872 + 0.81873) / 2, "rollout/ratio_min": 0.81873,
                "rollout/ratio_max": 1.64872}
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-5), key
    # without the sampling weights' log-probs (synchronous runs keep none) there is no split
    assert not any("numerical" in k or "staleness" in k for k in sequence_statistics(
        batch, torch.tensor([[0.0, -0.5, -2.2]]), None, LampoConfig()))
