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


@pytest.fixture(scope="module")
def tied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def test_a_tied_head_is_sent_once_under_the_embeddings_name(tied_model):
    from lampo.rollout.weight_sync import tied_aliases

    sent = list(engine_weights(tied_model))
    names = [n for n, _ in sent]
    # state_dict() holds the head twice (lm_head.weight is the embedding); the contract sends it once
    assert "lm_head.weight" in tied_model.state_dict() and "lm_head.weight" not in names
    assert names == [n for n, _ in tied_model.named_parameters()]
    assert len({id(t) for _, t in sent}) == len(sent) == len(names)  # each tensor once
    assert tied_aliases(tied_model) == {"lm_head.weight": "model.embed_tokens.weight"}
    # no buffers: the rotary table is the engine's own
    assert not {n for n, _ in tied_model.named_buffers()} & set(names)


@pytest.mark.slow
def test_hf_engine_takes_the_contract_of_a_tied_model_and_names_a_tied_alias(tied_model):
    import copy

    from lampo.rollout.engines import HFEngine, SamplingSettings

    class Tok:
        pad_token_id = 0

    engine = HFEngine(tied_model, Tok())
    trained = copy.deepcopy(tied_model)
    with torch.no_grad():
        trained.model.embed_tokens.weight.add_(1.0)  # the head moves with it
    engine.update_weights(engine_weights(trained))
    assert torch.equal(engine.model.lm_head.weight, trained.lm_head.weight)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight  # still tied
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=4)
    expected = HFEngine(trained, Tok()).generate([[5, 6, 7]], greedy)
    assert engine.generate([[5, 6, 7]], greedy)[0][0].token_ids == expected[0][0].token_ids
    with pytest.raises(KeyError, match=r"'lm_head.weight' \(tied to 'model.embed_tokens.weight'\)"):
        engine.update_weights(trained.state_dict().items())


def test_layers_left_to_vllm_are_tied_heads_and_buffer_only_layers():
    import logging

    from torch import nn

    from lampo.rollout import engines as E

    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cos_sin", torch.zeros(4), persistent=False)

    class Head(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(8, 4)
            self.rotary = Rotary()
            self.proj = nn.Linear(4, 4)
            self.lm_head = Head(self.embed.weight)  # tied: the embedding's parameter
            self.other_head = Head(nn.Parameter(torch.zeros(8, 4)))  # same class, a weight of its own

    toy = Toy()
    tied, buffers_only = E._tied_and_bufferonly_layers(toy)
    assert tied == [toy.lm_head] and buffers_only == [toy.rotary]
    count, quiet = E._layers_left_to_vllm(toy)
    # Head also names a layer with its own weight: its notice must still show, so only Rotary is quiet
    assert count == 1 and quiet == {"Rotary"}
    notices = E._ExpectedReloadNotices(quiet)

    def record(layer):
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, "%s: Failed to load weights", (layer,), None)

    assert not notices(record("Rotary")) and not notices(record("LlamaRotaryEmbedding"))
    assert notices(record("Head")) and notices(record("QKVParallelLinear"))
