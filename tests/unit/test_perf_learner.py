"""Performance shortcuts of the Learner change nothing but the time: same updates, same statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lampo import PPOConfig, PPOTrainer

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
    fw = trainer.learner.forward_batch(_batch(trainer, tok))
    assert fw.ref_logprobs is fw.old_logprobs  # KL to the reference reads exactly 0
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

    trainer, tok = _trainer(tiny_model_path)
    batch = _batch(trainer, tok)
    shape = perf.ModelShape.from_model(trainer.model)
    lens = batch.attention_mask.sum(1).tolist()
    flops = perf.learner_step_flops(trainer.learner, batch)
    assert flops == perf.count_flops(shape, lens, old_logprobs=False, reference=False)
    assert flops["forward"] == 0
    with_kl, _ = _trainer(tiny_model_path, kl_coef=0.01, ppo_epochs=2)
    flops = perf.learner_step_flops(with_kl.learner, batch)
    assert flops["forward"] == 2 * flops["rollout"]  # old log-probs and reference
    assert flops["optimize"] == 2 * 3 * flops["rollout"]  # 2 epochs x 6N
