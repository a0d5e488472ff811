"""vLLM vs transformers on the same weights: greedy parity, then weight sync after real updates.

One in-process vLLM engine serves the whole module, on the default configuration: compiled
(`vllm_enforce_eager: false`), so every weight-sync test below checks that new weights reach the
compiled model; blocks of 16 tokens (`vllm_block_size`), so the parity tests run vLLM's CPU
"vec16" attention kernel, and a prompt's whole blocks stay cached between calls until a weight
sync drops them. Starting it takes 20-35 s here (10 s eager), its first generate call ~3 s more.
Each test first pushes the checkpoint's weights back in, so the tests do not depend on their
order.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from lampo.rollout.engines import HFEngine, SamplingSettings
from lampo.rollout.weight_sync import engine_weights

pytest.importorskip("vllm")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["Tell me something about the moon.", "Why do rivers bend?", "Hi.", "The cat sat on the mat and then"]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=24, stop_token_ids=[3])


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)["input_ids"]
            for p in PROMPTS]


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_path, tok):
    from lampo.config import GenerationConfig
    from lampo.rollout.engines import VLLMEngine

    engine = VLLMEngine(tiny_model_path, tok, GenerationConfig(vllm_kv_cache_gb=1), max_model_len=512, seed=0)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def base_model(tiny_model_path, vllm_engine):
    """A fresh trainable transformers model; vLLM is reset to the same checkpoint weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    vllm_engine.update_weights(engine_weights(model))
    return model


def hf_greedy(model, tok, prompts):
    return [g[0] for g in HFEngine(model, tok).generate(prompts, GREEDY)]


def assert_same(hf, vl, tol=1e-4):
    for a, b in zip(hf, vl, strict=True):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < tol


def train_step(model, tok, params, lr):
    """One real optimisation step: Adam on the NLL of a fixed answer to every prompt."""
    opt = torch.optim.Adam(params, lr=lr)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Bees make honey."}],
                                   tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def test_greedy_parity_on_the_same_checkpoint(base_model, tok, prompts, vllm_engine):
    hf = hf_greedy(base_model, tok, prompts)
    vl = [g[0] for g in vllm_engine.generate(prompts, GREEDY)]
    assert all(len(g.token_ids) > 0 for g in hf)
    assert_same(hf, vl)  # token for token, log-probs within 1e-4 (fp32)


def test_the_samples_of_a_prompt_share_its_cached_blocks(vllm_engine):
    """`vllm_block_size` (default 16) reaches vLLM: the samples of a 40-token prompt share its
    two whole blocks (32 tokens), where CPU vLLM's own 128 would share none."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vllm_engine.llm.reset_prefix_cache()
    prompt = TokensPrompt(prompt_token_ids=list(range(5, 45)))
    (out,) = vllm_engine.llm.generate([prompt], SamplingParams(n=3, max_tokens=2), use_tqdm=False)
    assert len(out.outputs) == 3
    assert out.num_cached_tokens == 32


def test_samples_sharing_a_prompts_blocks_match_transformers(base_model, tok, prompts, vllm_engine):
    """The samples of a prompt, scheduled in one step, read the blocks the first one writes in
    that step: greedy, every sample of every prompt is transformers' answer, log-probs included."""
    vllm_engine.llm.reset_prefix_cache()
    long_prompts = [*prompts, prompts[0] + prompts[3][1:]]  # 15 + 18 tokens: two whole blocks
    hf = hf_greedy(base_model, tok, long_prompts)
    out = vllm_engine.generate(long_prompts, dataclasses.replace(GREEDY, n=3))
    for h, samples in zip(hf, out, strict=True):
        assert_same([h] * 3, samples)


def test_sampling_returns_n_samples_per_prompt_in_order(base_model, prompts, vllm_engine):
    s = SamplingSettings(temperature=1.0, max_new_tokens=8, stop_token_ids=[3], n=3, seed=5)
    out = vllm_engine.generate(prompts, s)
    assert [len(r) for r in out] == [3] * len(prompts)
    assert len({tuple(g.token_ids) for g in out[0]}) > 1  # the samples of one prompt differ
    for r in out:
        for g in r:
            assert len(g.logprobs) == len(g.token_ids) and all(lp <= 0 for lp in g.logprobs)
            assert g.finish_reason == ("stop" if g.token_ids[-1] == 3 else "length")
    again = vllm_engine.generate(prompts, s)
    assert [[g.token_ids for g in r] for r in again] == [[g.token_ids for g in r] for r in out]  # seeded
    # engine_logprobs: false skips vLLM's log-prob bookkeeping; the samples stay the same
    bare = vllm_engine.generate(prompts, dataclasses.replace(s, logprobs=False))
    assert [[g.token_ids for g in r] for r in bare] == [[g.token_ids for g in r] for r in out]
    assert all(g.logprobs == [0.0] * len(g.token_ids) for r in bare for g in r)


def test_stop_token_truncates_and_is_kept(base_model, tok, prompts, vllm_engine):
    free = vllm_engine.generate(prompts[:1], GREEDY)[0][0].token_ids
    stop_id = free[5]  # a token the model greedily emits: make it the stop token
    first = free.index(stop_id)
    s = SamplingSettings(temperature=0.0, max_new_tokens=24, stop_token_ids=[stop_id])
    vl = vllm_engine.generate(prompts[:1], s)[0][0]
    hf = HFEngine(base_model, tok).generate(prompts[:1], s)[0][0]
    assert vl.token_ids == free[: first + 1] and vl.finish_reason == "stop"
    assert hf.token_ids == vl.token_ids and hf.finish_reason == "stop"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_full_weight_update_synced_into_vllm(base_model, tok, prompts, vllm_engine):
    before = [g[0].token_ids for g in vllm_engine.generate(prompts, GREEDY)]
    train_step(base_model, tok, base_model.parameters(), lr=1e-2)
    # a sound sync logs no "Failed to load weights" (vLLM's notice about its rotary table is dropped)
    seen, reload_log = Records(), logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    reload_log.addHandler(seen)
    try:
        vllm_engine.update_weights(engine_weights(base_model))
    finally:
        reload_log.removeHandler(seen)
    assert not [m for m in seen.messages if "Failed to load weights" in m]
    after = [g[0] for g in vllm_engine.generate(prompts, GREEDY)]
    assert [g.token_ids for g in after] != before  # the step changed the greedy answers
    assert_same(hf_greedy(base_model, tok, prompts), after)


def test_lora_update_merged_and_synced_into_vllm(base_model, tok, prompts, vllm_engine):
    from peft import LoraConfig, get_peft_model

    before = [g[0].token_ids for g in vllm_engine.generate(prompts, GREEDY)]
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(base_model, cfg)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for _ in range(3):
        train_step(peft_model, tok, trainable, lr=3e-2)
    lora_state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    vllm_engine.update_weights(engine_weights(peft_model))
    # engine_weights merged into copies: the trained PEFT model still has its separate adapter.
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in lora_state.items())
    after = [g[0] for g in vllm_engine.generate(prompts, GREEDY)]
    assert [g.token_ids for g in after] != before
    # Reference: the unmerged PEFT model's own forward passes (merged weights round differently,
    # hence a slightly wider log-prob tolerance than the same-weights parity test).
    assert_same(hf_greedy(peft_model, tok, prompts), after, tol=1e-4)


def test_rollout_through_vllm_multistep_matches_hf(base_model, tok, vllm_engine):
    from lampo.config import DataConfig, GenerationConfig
    from lampo.data import PromptRow
    from lampo.rollout.multistep import rollout

    # The random tiny model never says <|im_end|>; a space as stop string ends turns early, so
    # the conversations really go through three steps on the real engine.
    gen_cfg = GenerationConfig(temperature=0.0, max_new_tokens=12, num_generations=2, stop_token=" ")
    rows = [PromptRow(0, ("Hi.", "Why do rivers bend?", "Do ants sleep?")), PromptRow(1, ("Hello!", "What is glass?"))]
    batch = rollout(vllm_engine, tok, rows, gen_cfg, DataConfig(), policy_version=1, seed=0)
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert [len(s) for s in batch.turn_spans] == [3, 3, 2, 2]
    hf_batch = rollout(HFEngine(base_model, tok), tok, rows, gen_cfg, DataConfig(), policy_version=1, seed=0)
    assert torch.equal(batch.input_ids, hf_batch.input_ids)
    assert torch.equal(batch.action_mask, hf_batch.action_mask)
    assert torch.allclose(batch.engine_logprobs, hf_batch.engine_logprobs, atol=1e-4)


def test_a_batch_rolled_out_in_parts_samples_what_one_call_samples(tok, vllm_engine):
    """The Ray rollout workers each roll out part of a batch (`first_row`): every conversation gets
    the same seeds, turn after turn, as in one call, so the samples do not depend on the split."""
    from lampo.config import DataConfig, GenerationConfig
    from lampo.data import PromptRow
    from lampo.rollout.batch import RolloutBatch
    from lampo.rollout.multistep import rollout

    gen_cfg = GenerationConfig(temperature=1.0, max_new_tokens=8, num_generations=2, stop_token=" ")
    rows = [PromptRow(i, (f"Tell me about {word}.", "Why?", "And then?"))
            for i, word in enumerate(["rivers", "glass", "ants", "salt", "clouds"])]
    whole = rollout(vllm_engine, tok, rows, gen_cfg, DataConfig(), policy_version=0, seed=11)
    parts = [rollout(vllm_engine, tok, rows[a:b], gen_cfg, DataConfig(), policy_version=0, seed=11, first_row=a)
             for a, b in ((0, 2), (2, 3), (3, 5))]
    joined = RolloutBatch.concat(parts, tok.pad_token_id)
    assert max(len(s) for s in whole.turn_spans) > 1  # later turns were sampled too
    assert joined.messages == whole.messages
    width = whole.input_ids.shape[1]
    assert torch.equal(joined.input_ids[:, :width], whole.input_ids)
    # the seed matters: another one samples other conversations
    other = rollout(vllm_engine, tok, rows, gen_cfg, DataConfig(), policy_version=0, seed=12)
    assert other.messages != whole.messages
