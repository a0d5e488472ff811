"""engine_weights: base-model names, LoRA merged into copies, the trained model untouched."""

from __future__ import annotations

import pytest
import torch

from lampo.rollout.weight_sync import _base_name, engine_weights


def test_base_names_of_peft_wrapped_parameters():
    assert _base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert _base_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert _base_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert _base_name("base_model.model.lm_head.original_module.weight") is None
    assert _base_name("model.norm.weight") == "model.norm.weight"


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def test_plain_model_yields_its_state_dict(model):
    names = dict(engine_weights(model))
    assert names.keys() == model.state_dict().keys()
    assert all(torch.equal(names[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_lora_is_merged_into_copies_with_base_names(model):
    import copy

    from peft import LoraConfig, get_peft_model

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero adapter (B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = dict(engine_weights(peft_model))
    assert merged.keys() == base_state.keys()  # exactly the base checkpoint's names
    # q_proj: W + (alpha / r) * B @ A, here 2 * B @ A.
    q = "model.layers.0.self_attn.q_proj"
    a = peft_model.state_dict()[f"base_model.model.{q}.lora_A.default.weight"]
    b = peft_model.state_dict()[f"base_model.model.{q}.lora_B.default.weight"]
    assert torch.allclose(merged[f"{q}.weight"], base_state[f"{q}.weight"] + 2.0 * b @ a, atol=1e-6)
    assert not torch.equal(merged[f"{q}.weight"], base_state[f"{q}.weight"])
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base_state["model.layers.0.mlp.up_proj.weight"])
    # The trained model keeps its separate adapter and unmerged base weights.
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The merged weights reproduce the PEFT model's forward pass.
    merged_model = copy.deepcopy(model)
    merged_model.load_state_dict(merged)
    ids = torch.tensor([[2, 298, 202, 759, 17, 3]])
    with torch.no_grad():
        assert torch.allclose(merged_model(ids).logits, peft_model(ids).logits, atol=1e-5)
