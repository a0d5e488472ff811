"""Performance shortcuts of the Learner change nothing but the time: same updates, same statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lampo import PPOConfig, PPOTrainer
from lampo.optimize.batch import Sampling
from lampo.speed.passes import aligned_logprobs
from lampo.speed.shared_prefix import plan_prefixes

pytestmark = pytest.mark.slow


def _trainer(path, **kw):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    defaults = dict(estimator="grpo", num_generations=4, batch_size=2, mini_batch_size=8,
                    gradient_accumulation_steps=2, max_new_tokens=6, non_stop_penalty=False, seed=0,
                    learning_rate=1e-2, lr_scheduler_type="constant", kl_coef=0.0)
    defaults.update(kw)
    return PPOTrainer(PPOConfig(**defaults), model, tok), tok


def _batch(trainer, tok):
    q = [torch.tensor(tok(t).input_ids) for t in ("Hi there.", "Hi there.", "Hi there.", "Hi there.",
                                                     "Say a word.", "Say a word.", "Say a word.", "Say a word.")]
    torch.manual_seed(1)
    responses = trainer.generate(q)
    return trainer.make_batch(q, responses, [0.1, 0.9, 0.4, 0.3, 0.0, 1.0, 0.5, 0.2])


def test_kl_coef_zero_skips_the_reference(tiny_model_path):
    trainer, tok = _trainer(tiny_model_path)
    assert trainer.learner.ref_model is None and not trainer.learner.uses_reference
    batch = _batch(trainer, tok)
    fw = trainer.learner.forward(batch)
    assert fw.ref_logprobs is None  # no reference pass: the KL to the reference reads exactly 0
    from lampo.optimize.advantages import compute_advantages

    assert compute_advantages(batch, fw, 0.0, trainer.config).stats["objective/kl"] == 0.0
    with_kl, _ = _trainer(tiny_model_path, kl_coef=0.01)
    assert with_kl.learner.ref_model is not None


def test_fused_old_logprobs_give_the_same_update_and_stats(tiny_model_path):
    # adam_eps 1e-3: Adam's first step is lr * g / (|g| + eps); with the default 1e-8 a weight whose
    # gradient is ~1e-12 moves by a full +-lr whatever the sign of rounding noise, and the separate
    # pass (other micro-batch padding) differs from the fused one in the last bits.
    fused, tok = _trainer(tiny_model_path, adam_eps=1e-3)
    plain = copy.deepcopy(fused)
    batch = _batch(fused, tok)
    assert fused.learner.fuses_old_logprobs(batch)
    plain.learner.fuses_old_logprobs = lambda b: False  # the separate no-grad forward pass
    s_fused = fused.learner.train(batch)
    s_plain = plain.learner.train(batch)
    for key in ("objective/entropy", "loss/policy_avg", "val/ratio", "policy/entropy_avg", "objective/kl"):
        assert s_fused[key] == pytest.approx(s_plain[key], abs=1e-6), key
    assert s_fused["val/ratio"] == pytest.approx(1.0, abs=1e-6)  # on-policy: pi/pi_old = 1
    for (name, a), b in zip(fused.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # Two epochs (or a critic, or a reference) need the separate pass.
    two_epochs, _ = _trainer(tiny_model_path, ppo_epochs=2)
    assert not two_epochs.learner.fuses_old_logprobs(batch)
    with_kl, _ = _trainer(tiny_model_path, kl_coef=0.01)
    assert not with_kl.learner.fuses_old_logprobs(batch)


def test_learner_step_flops_follow_the_skipped_passes(tiny_model_path):
    from lampo import perf
    from lampo.speed import cost

    trainer, tok = _trainer(tiny_model_path, share_prefix=False)  # shared prompts: the test below
    batch = _batch(trainer, tok)
    shape = cost.ModelShape.from_model(trainer.model)
    lens = batch.attention_mask.sum(1).tolist()
    flops = perf.learner_step_flops(trainer.learner, batch)
    assert flops == cost.count_flops(shape, lens, old_logprobs=False, reference=False)
    assert flops["forward"] == 0
    with_kl, _ = _trainer(tiny_model_path, kl_coef=0.01, ppo_epochs=2, share_prefix=False)
    flops = perf.learner_step_flops(with_kl.learner, batch)
    assert flops["forward"] == 2 * flops["rollout"]  # old log-probs and reference
    assert flops["optimize"] == 2 * 3 * flops["rollout"]  # 2 epochs x 6N


def _multi_turn_batch(tok):
    """Two groups of three, varied prompt lengths, a user turn between two answers in one group."""
    from lampo.optimize.learner import TrainBatch

    g = torch.Generator().manual_seed(3)
    rows = []
    for prompt_len in (5, 9):
        prompt = torch.randint(3, 60, (prompt_len,), generator=g).tolist()
        for k in range(3):
            ans = torch.randint(3, 60, (4 + k,), generator=g).tolist()
            user = [7, 8] if prompt_len == 9 else []
            ans2 = torch.randint(3, 60, (2,), generator=g).tolist() if user else []
            rows.append((prompt, ans, user, ans2))
    T = max(sum(map(len, r)) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    act = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (p, a, u, a2) in enumerate(rows):
        seq = p + a + u + a2
        ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
        act[b, len(p): len(p) + len(a)] = True
        act[b, len(p) + len(a) + len(u): len(seq)] = True
    scores = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.0, 1.0])
    placed = torch.zeros(len(rows), T)
    placed[torch.arange(len(rows)), mask.sum(1) - 1] = scores
    return TrainBatch(input_ids=ids, attention_mask=mask, action_mask=act, placed_scores=placed, seq_scores=scores,
                      stopped=torch.ones(len(rows), dtype=torch.bool), group_size=3)


def test_shared_prefix_forward_equals_the_plain_forward_and_its_gradients(tiny_model_path):
    from lampo.speed.shared_prefix import plan_prefixes, shared_prefix_logprobs

    trainer, tok = _trainer(tiny_model_path, num_generations=3, mini_batch_size=6, temperature=0.7)
    model = trainer.model
    batch = _multi_turn_batch(tok)
    plan = plan_prefixes(batch.input_ids, batch.attention_mask, batch.action_mask)
    assert plan is not None and plan.prefix_ids.shape[0] == 2
    lp_shared, ent_shared = shared_prefix_logprobs(model, plan, batch.input_ids.shape[1], trainer.learner.passes.sampling)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    lp_plain, ent_plain = aligned_logprobs(out.logits, batch.input_ids, trainer.learner.passes.sampling)
    act = batch.action_mask
    assert torch.allclose(lp_shared[act], lp_plain[act], atol=1e-5)
    assert torch.allclose(ent_shared[act], ent_plain[act], atol=1e-5)
    in_prompt = torch.arange(act.shape[1])[None, :] < act.int().argmax(1)[:, None]
    assert bool((lp_shared[in_prompt] == 0).all())  # the prompt's own tokens are never computed per row
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.linspace(0.5, 1.5, act.numel()).reshape(act.shape)  # every token's gradient counts
    g_shared = torch.autograd.grad((lp_shared * weights)[act].sum(), params)
    g_plain = torch.autograd.grad((lp_plain * weights)[act].sum(), params)
    for a, b in zip(g_shared, g_plain, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_prefixes_give_the_padded_batchs_logprobs_and_gradients(tiny_model_path, attn):
    # prompts of 5 and 9 tokens: the padded prefix batch is [2, 9], the packed row [1, 14]
    from lampo.speed.shared_prefix import plan_prefixes, shared_prefix_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation=attn)
    batch = _multi_turn_batch(tok)
    plan = plan_prefixes(batch.input_ids, batch.attention_mask, batch.action_mask)
    L, act = batch.input_ids.shape[1], batch.action_mask
    shapes = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    padded = shared_prefix_logprobs(model, plan, L, Sampling(0.7))
    packed = shared_prefix_logprobs(model, plan, L, Sampling(0.7), pack_for=attn)
    hook.remove()
    assert shapes[0] == (2, 9) and shapes[2] == (1, 14)
    for a, b in zip(padded, packed, strict=True):  # log-probs and entropy, at every position
        assert torch.allclose(a, b, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.linspace(0.5, 1.5, act.numel()).reshape(act.shape)
    g_padded = torch.autograd.grad((padded[0] * weights)[act].sum(), params)
    g_packed = torch.autograd.grad((packed[0] * weights)[act].sum(), params)
    for a, b in zip(g_padded, g_packed, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_the_learner_packs_prefixes_of_different_lengths(tiny_model_path):
    # the tiny model's products outweigh the extra attention (shared_prefix.should_pack)
    trainer, tok = _trainer(tiny_model_path, num_generations=3, mini_batch_size=6)
    batch = _multi_turn_batch(tok)
    shapes = []
    hook = trainer.model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                   with_kwargs=True)
    with torch.no_grad():
        lp, _, _ = trainer.learner.passes.logprobs(trainer.model, batch)
    hook.remove()
    assert shapes[0] == (1, 14)
    with torch.no_grad():
        out = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        want, _ = aligned_logprobs(out.logits, batch.input_ids, trainer.learner.passes.sampling)
    assert torch.allclose(lp[batch.action_mask], want[batch.action_mask], atol=1e-5)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_share_prefix_changes_the_time_not_the_update(tiny_model_path, kl_coef):
    # Same batch, one minibatch accumulated over two micro-batches (loss denominators are the
    # minibatch's, so the order of the rows does not matter): same weights, same statistics.
    shared, tok = _trainer(tiny_model_path, adam_eps=1e-3, kl_coef=kl_coef)
    plain = copy.deepcopy(shared)
    plain.learner.passes.share_prefix = False
    batch = _batch(shared, tok)
    assert plan_prefixes(batch.input_ids, batch.attention_mask, batch.action_mask) is not None
    assert shared.learner.passes.shares_prefix(batch.group_size) and not plain.learner.passes.shares_prefix(batch.group_size)
    s_shared = shared.learner.train(batch)
    s_plain = plain.learner.train(batch)
    for key in ("objective/entropy", "loss/policy_avg", "val/ratio", "policy/entropy_avg", "objective/kl"):
        assert s_shared[key] == pytest.approx(s_plain[key], abs=1e-5), key
    for (name, a), b in zip(shared.model.named_parameters(), plain.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_shuffle_keeps_groups_together_when_sharing(tiny_model_path):
    trainer, tok = _trainer(tiny_model_path)
    batch = _batch(trainer, tok)
    order = trainer.learner.passes.order(batch, trainer.learner.generator).tolist()
    assert sorted(order) == list(range(8))
    assert [sorted(order[i: i + 4]) for i in (0, 4)] in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[4, 5, 6, 7], [0, 1, 2, 3]])


def test_cost_model_counts_each_groups_prompt_once(tiny_model_path):
    from lampo import perf
    from lampo.speed import cost

    trainer, tok = _trainer(tiny_model_path)
    batch = _batch(trainer, tok)
    flops = perf.learner_step_flops(trainer.learner, batch)
    prompt_lens = batch.action_mask.int().argmax(1).tolist()
    saved = [prompt_lens[i] for i in (1, 2, 3, 5, 6, 7)]  # all but the first answer of each group
    shape = cost.ModelShape.from_model(trainer.model)
    assert flops == cost.count_flops(shape, batch.attention_mask.sum(1).tolist(), old_logprobs=False,
                                     reference=False, shared_prefix_lens=saved)
    # With vLLM's prefix cache (blocks of 2 tokens here), the rollout computes the whole blocks
    # of each group's prompt once; the learner's passes are counted as before.
    cached = perf.learner_step_flops(trainer.learner, batch, cache_block=2)
    assert cached == cost.count_flops(shape, batch.attention_mask.sum(1).tolist(), old_logprobs=False,
                                      reference=False, shared_prefix_lens=saved,
                                      cached_prompt_lens=[(p - 1) // 2 * 2 for p in saved])
    assert cached["rollout"] < flops["rollout"] and cached["optimize"] == flops["optimize"]


def test_shared_prefix_with_an_empty_generation_in_the_batch(tiny_model_path):
    from lampo.speed.shared_prefix import plan_prefixes, shared_prefix_logprobs

    trainer, tok = _trainer(tiny_model_path, num_generations=3, mini_batch_size=6)
    batch = _multi_turn_batch(tok)
    batch.action_mask[2] = False  # the third answer of the first group generated nothing
    plan = plan_prefixes(batch.input_ids, batch.attention_mask, batch.action_mask)
    assert plan is not None
    with torch.no_grad():
        lp_shared, _ = shared_prefix_logprobs(trainer.model, plan, batch.input_ids.shape[1], Sampling())
        out = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    lp_plain, _ = aligned_logprobs(out.logits, batch.input_ids, trainer.learner.passes.sampling)
    act = batch.action_mask
    assert torch.allclose(lp_shared[act], lp_plain[act], atol=1e-5)
    assert bool((lp_shared[2] == 0).all())


def test_unsupported_cache_falls_back_to_the_plain_pass(tiny_model_path, monkeypatch, caplog):
    from lampo.speed import shared_prefix as SP

    def refuse(cache):
        raise SP.UnsupportedModel("sliding-window cache")

    shared, tok = _trainer(tiny_model_path, adam_eps=1e-3)
    plain = copy.deepcopy(shared)
    plain.learner.passes.share_prefix = False
    batch = _batch(shared, tok)
    monkeypatch.setattr(SP, "check_cache", refuse)
    s_shared = shared.learner.train(batch)
    assert shared.learner.passes.cache_unsupported and "falling back to the plain forward" in caplog.text
    s_plain = plain.learner.train(batch)
    assert s_shared["loss/policy_avg"] == pytest.approx(s_plain["loss/policy_avg"], abs=1e-6)
    for a, b in zip(shared.model.parameters(), plain.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("value_model", ["separate", "head"])
def test_the_passes_never_compute_the_last_position(tiny_model_path, value_model):
    # A last token is only predicted, never an input to a prediction: the plain pass feeds L - 1
    # columns, and its log-probs, entropy and values equal those of a forward over all L.
    from lampo.optimize import maths as M

    trainer, tok = _trainer(tiny_model_path, estimator="gae", num_generations=1, batch_size=8,
                            value_model=value_model)
    learner = trainer.learner
    batch = _batch(trainer, tok)
    L = batch.input_ids.shape[1]
    widths = []
    hooks = [m.register_forward_pre_hook(lambda _m, args, kw: widths.append((args or [kw["input_ids"]])[0].shape[1]),
                                         with_kwargs=True)
             for m in (learner.policy, learner.value_model) if m is not None]
    with torch.no_grad():
        lp, ent, hidden = learner.passes.logprobs(learner.policy, batch, hidden=value_model == "head")
        values = learner._values(batch, hidden)
    for h in hooks:
        h.remove()
    assert widths == [L - 1] * len(hooks)
    with torch.no_grad():
        full = learner.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        if value_model == "head":
            full_values = learner.value_head(full.hidden_states[-1]).squeeze(-1)
        else:
            full_values = learner.value_model(batch.input_ids, batch.attention_mask)
    want_lp, want_ent = M.logprobs_and_entropy(full.logits[:, :-1], batch.input_ids[:, 1:], learner.passes.sampling.temperature)
    act = batch.action_mask[:, 1:]
    assert torch.allclose(lp[:, 1:][act], want_lp[act], atol=1e-5)
    assert torch.allclose(ent[:, 1:][act], want_ent[act], atol=1e-5)
    assert torch.allclose(values[:, 1:][act], full_values[:, :-1][act], atol=1e-5)
    assert bool((lp[:, 0] == 0).all()) and bool((values[:, 0] == 0).all())


def test_the_shared_suffix_pass_leaves_out_the_last_column(tiny_model_path):
    from lampo.speed.shared_prefix import plan_prefixes, shared_prefix_logprobs

    trainer, tok = _trainer(tiny_model_path, num_generations=3, mini_batch_size=6)
    batch = _multi_turn_batch(tok)
    plan = plan_prefixes(batch.input_ids, batch.attention_mask, batch.action_mask)
    widths = []
    hook = trainer.model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
    with torch.no_grad():
        shared_prefix_logprobs(trainer.model, plan, batch.input_ids.shape[1], Sampling())
        # answers of one token each: the prefix pass alone predicts them, no suffix pass runs
        one = plan_prefixes(batch.input_ids[:, :6], batch.attention_mask[:, :6], batch.action_mask[:, :6])
        lp_one, _ = shared_prefix_logprobs(trainer.model, one, 6, Sampling())
    hook.remove()
    assert widths == [plan.prefix_ids.shape[1], plan.suffix_ids.shape[1] - 1, one.prefix_ids.shape[1]]
    assert one.suffix_ids.shape[1] == 1 and bool((lp_one[batch.action_mask[:, :6]] < 0).all())
