"""Rotary tables in the autocast dtype: bf16 queries and keys stay bf16 (docs/performance.md, change 10)."""

from __future__ import annotations

import copy

import pytest
import torch

from lampo.optimize.rotary_dtype import rotary_in_autocast_dtype

pytestmark = pytest.mark.slow


@pytest.fixture()
def models(tiny_model_path):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation="eager")
    hooked = copy.deepcopy(plain)
    assert rotary_in_autocast_dtype(hooked) == 1
    assert rotary_in_autocast_dtype(hooked) == 0  # hooked once only
    return plain, hooked


def _ids():
    return torch.tensor([[5, 9, 17, 33, 65, 100, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18]])


def test_without_autocast_nothing_changes(models):
    plain, hooked = models
    with torch.no_grad():
        assert torch.equal(plain(_ids()).logits, hooked(_ids()).logits)


def test_under_bf16_autocast_keys_stay_bf16(models):
    plain, hooked = models
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain = plain(_ids(), use_cache=True)
        out_hooked = hooked(_ids(), use_cache=True)
    # fp32 tables promote the bf16 keys to fp32 (then cast back for attention); bf16 tables do not
    assert out_plain.past_key_values.layers[0].keys.dtype == torch.float32
    assert out_hooked.past_key_values.layers[0].keys.dtype == torch.bfloat16
    lp_plain = torch.log_softmax(out_plain.logits.float(), -1)
    lp_hooked = torch.log_softmax(out_hooked.logits.float(), -1)
    # bf16 rounding of cos/sin, the size of the other bf16 roundings in the pass
    assert (lp_plain - lp_hooked).abs().max() < 0.1


def test_learner_hooks_only_in_bf16(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lampo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)

    def hooked(**kw) -> bool:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        trainer = PPOTrainer(PPOConfig(estimator="grpo", num_generations=2, batch_size=2, mini_batch_size=4,
                                       max_new_tokens=4, seed=0, **kw), model, tok)
        return any(getattr(m, "_lampo_rotary_hook", False) for m in trainer.model.modules())

    assert hooked(bf16=True)
    assert not hooked(bf16=True, bf16_rotary=False)
    assert not hooked(bf16=False)
