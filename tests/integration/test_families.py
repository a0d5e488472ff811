"""Every model family of `lampo.testing.FAMILIES` through both engines, training, saving and resume.

The matrix of docs/models.md, per family:
- build: the tiny model has the family's traits (tied head or not, Conv1D, q/k norm, ...).
- engines: greedy decoding on the `hf` engine (batched, left-padded) and on vLLM equals
  transformers' `generate` on each prompt alone, token for token, with log-probs within 1e-4 of
  a forward pass; after a full Adam step, and after LoRA steps, `update_weights(engine_weights)`
  makes each engine equal transformers again (the weight contract of lampo.rollout.weight_sync).
- training: two `PPOTrainer` steps, gae and grpo, LoRA on and off: the weights move (with LoRA
  exactly the adapted ones), the stats are finite, and the learner's log-probs (its shared-prefix
  pass under grpo) equal a plain forward of each sequence alone.
- saving: `PPOTrainer.save_model` loads back in transformers with the same logits (LoRA: the
  adapter, and the merged model); vLLM's engine starts from that saved directory.
- resume: the application's `Trainer` (hf engine, in-process VowelReward): resumed from the
  checkpoint of step 2 to step 3, it equals 3 uninterrupted steps to 1e-6.

Time: the fixtures are module-scoped and parametrized by family, so pytest runs one family's
cells together; each family is built once (build/test-models/<arch>), its vLLM engine started
once (eager, 0.25 GiB of KV cache, 256 tokens), and closed before the next family's.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lampo.rollout.engines import HFEngine, SamplingSettings
from lampo.rollout.weight_sync import engine_weights
from lampo.testing import FAMILIES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Tell me something about the moon.", "Why do rivers bend?", "Hi.", "The cat sat on the mat and then"]
NEW_TOKENS = 12  # the chat-templated prompts are 9-15 tokens: with 12 more, Gemma 2's 16-token window slides


# ---------------------------------------------------------------------------------------
# Fixtures: one family at a time
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(FAMILIES))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_dir(arch, family_model_path) -> Path:
    return family_model_path(arch)


@pytest.fixture(scope="module")
def tok(family_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family_dir)


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)["input_ids"]
            for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy(tok) -> SamplingSettings:
    return SamplingSettings(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=[tok.eos_token_id])


def load_hf(path: Path, arch: str):
    """The model in transformers, with the attention kernels that compute its family exactly."""
    from transformers import AutoModelForCausalLM

    attn = FAMILIES[arch].attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                **({"attn_implementation": attn} if attn else {}))


MERGED_SAVE = frozenset({"llama-tied", "qwen2", "gemma2", "gpt2"})
"""Families whose vLLM cells start from a LoRA run's merged save (the others: a full-weight save)."""


@pytest.fixture(scope="module")
def saved_dir(arch, family_dir, tok, tmp_path_factory) -> Path:
    """What `PPOTrainer.save_model` writes after two grpo steps: the directory vLLM starts from. For
    the families in MERGED_SAVE the steps train a LoRA adapter and the save merges it, so vLLM also
    loads merged saves where a merge could go wrong (tied heads, GPT-2's Conv1D)."""
    lora = arch in MERGED_SAVE
    run = train_two_steps(arch, family_dir, tok, "grpo", lora=lora)
    return run.trainer.save_model(tmp_path_factory.mktemp(f"saved-{arch}"), merged=lora)


@pytest.fixture(scope="module")
def vllm_engine(saved_dir, tok):
    pytest.importorskip("vllm")
    from lampo.config import GenerationConfig
    from lampo.rollout.engines import VLLMEngine

    engine = VLLMEngine(saved_dir, tok, GenerationConfig(vllm_kv_cache_gb=0.25, vllm_enforce_eager=True),
                        max_model_len=256, seed=0)
    try:
        yield engine
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def reference_greedy(model, prompts, stop_id: int) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy `generate` on each prompt alone (no padding), and each response
    token's log-prob from one forward pass over prompt + response."""
    model.eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=stop_id, pad_token_id=stop_id)[0]
        response = seq[len(p):].tolist()
        logits = model(input_ids=seq[None]).logits[0, len(p) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, seq[len(p):, None]).squeeze(1)
        out.append((response, lp.tolist()))
    return out


def assert_matches(reference, generations, tol: float = 1e-4) -> None:
    for (tokens, logprobs), g in zip(reference, generations, strict=True):
        assert g.token_ids == tokens
        assert max(abs(x - y) for x, y in zip(logprobs, g.logprobs, strict=True)) < tol


def nll_step(model, tok, params, lr: float) -> None:
    """One Adam step on the NLL of a fixed conversation."""
    opt = torch.optim.Adam(params, lr=lr)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Bees make honey."}],
                                   tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------

MODEL_CLASS = {"llama": "LlamaForCausalLM", "llama-tied": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "gpt2": "GPT2LMHeadModel"}
TIED = {"llama": False, "llama-tied": True, "qwen2": True, "qwen3": False, "mistral": False, "gemma2": True,
        "gpt2": True}


def test_the_tiny_model_has_its_familys_traits(arch, family_dir):
    from transformers.pytorch_utils import Conv1D

    from lampo.testing.tiny import num_parameters

    model = load_hf(family_dir, arch)
    assert type(model).__name__ == MODEL_CLASS[arch]
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == TIED[arch]
    cfg = model.config
    assert cfg.num_attention_heads * 64 == cfg.hidden_size == 64  # head_dim 64: vLLM's CPU attention needs >= 32
    assert cfg.vocab_size == 1024 and num_parameters(family_dir) < 1_000_000
    layer = model.model.layers[0] if arch != "gpt2" else model.transformer.h[0]
    if arch == "qwen2":
        assert layer.self_attn.q_proj.bias is not None
    if arch == "qwen3":
        assert layer.self_attn.q_norm is not None and layer.self_attn.k_norm is not None
    if arch == "gemma2":
        assert "sliding_attention" in cfg.layer_types and cfg.sliding_window == 16
        assert cfg.attn_logit_softcapping and cfg.final_logit_softcapping
    if arch == "gpt2":
        assert isinstance(layer.attn.c_attn, Conv1D)
    assert arch in (ROOT / "docs" / "models.md").read_text()  # the docs list every family


def test_tiny_model_cli_takes_arch(tmp_path, capsys):
    from transformers import AutoConfig

    from lampo.cli import main

    assert main(["tiny-model", str(tmp_path / "m"), "--arch", "qwen3", "--size", "tiny", "--seed", "2"]) == 0
    assert "qwen3 causal-lm model (tiny," in capsys.readouterr().out
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "qwen3"
    with pytest.raises(SystemExit) as exc:
        main(["tiny-model", str(tmp_path / "x"), "--arch", "falcon"])
    assert exc.value.code == 2
    assert "'falcon' is not a model family; choose from llama, llama-tied" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------


def test_hf_engine_greedy_equals_transformers(arch, family_dir, tok, prompts, greedy):
    engine = HFEngine(family_dir, tok, attn_implementation=FAMILIES[arch].attn_implementation)
    reference = reference_greedy(load_hf(family_dir, arch), prompts, tok.eos_token_id)
    assert all(len(tokens) > 0 for tokens, _ in reference)
    assert_matches(reference, [g[0] for g in engine.generate(prompts, greedy)])


@pytest.mark.vllm
def test_vllm_starts_from_the_saved_model_and_equals_transformers(arch, saved_dir, tok, prompts, greedy, vllm_engine):
    # the engine holds the weights it loaded from saved_dir (the sync tests put them back after)
    assert_matches(reference_greedy(load_hf(saved_dir, arch), prompts, tok.eos_token_id),
                   [g[0] for g in vllm_engine.generate(prompts, greedy)])


def update(model, tok, how: str):
    """A full Adam step, or three steps of a LoRA adapter on every linear layer; returns the model."""
    if how == "full":
        nll_step(model, tok, model.parameters(), lr=1e-2)
        return model
    from peft import LoraConfig, get_peft_model

    # GPT-2's Conv1D layers store their weight transposed: peft sets fan_in_fan_out for them
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for _ in range(3):
        nll_step(peft_model, tok, trainable, lr=3e-2)
    return peft_model


@pytest.mark.parametrize("how", ["full", "lora"])
@pytest.mark.parametrize("engine_name", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_weight_sync_after_an_update(arch, family_dir, saved_dir, tok, prompts, greedy, engine_name, how, request):
    if engine_name == "hf":
        start = family_dir
        engine = HFEngine(start, tok, attn_implementation=FAMILIES[arch].attn_implementation)
    else:
        start = saved_dir
        engine = request.getfixturevalue("vllm_engine")  # it holds the saved weights
    before = [g[0] for g in engine.generate(prompts, greedy)]
    model = update(load_hf(start, arch), tok, how)
    seen, reload_log = Records(), logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    reload_log.addHandler(seen)
    try:
        engine.update_weights(engine_weights(model))
        after = [g[0] for g in engine.generate(prompts, greedy)]
    finally:
        reload_log.removeHandler(seen)
        engine.update_weights(engine_weights(load_hf(start, arch)))  # back to the saved weights
    # vLLM: every layer the contract fills reloaded; tied heads and rotary tables are vLLM's own
    assert not [m for m in seen.messages if "Failed to load weights" in m]
    # the engine took the update: its answers or their log-probs moved (a random GPT-2 repeats one
    # token before and after a step, with other log-probs)
    assert any(a.token_ids != b.token_ids or max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) > 1e-3
               for a, b in zip(after, before, strict=True))
    # the reference is the updated transformers model itself (with LoRA: its unmerged adapter)
    assert_matches(reference_greedy(model, prompts, tok.eos_token_id), after)


# ---------------------------------------------------------------------------------------
# training through the library
# ---------------------------------------------------------------------------------------


def vowels(text: str) -> float:
    return min(1.0, sum(c in "aeiou " for c in text) / 40)


@dataclass
class TwoSteps:
    trainer: Any
    before: dict[str, torch.Tensor]
    """engine_weights of the policy before the steps"""
    stats: list[dict[str, float]]
    logprob_gap: float
    """largest |learner's old log-prob - plain forward's| over the response tokens"""


def train_two_steps(arch: str, path: Path, tok, estimator: str, lora: bool) -> TwoSteps:
    """Two PPOTrainer steps on sampled answers to two prompts, scored by their vowels."""
    from lampo import PPOConfig, PPOTrainer

    G = 2 if estimator == "grpo" else 1
    cfg = PPOConfig(estimator=estimator, batch_size=2, num_generations=G, mini_batch_size=2 * G, max_new_tokens=8,
                    non_stop_penalty=False, seed=0, learning_rate=1e-2, lr_scheduler_type="constant", use_peft=lora,
                    lora_r=4, lora_alpha=8)
    trainer = PPOTrainer(cfg, load_hf(path, arch), tok)
    policy = trainer.learner.unwrapped_policy()
    before = {n: t.clone() for n, t in engine_weights(policy)}
    queries = [torch.tensor(q) for q in
               (tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
                ["input_ids"] for p in PROMPTS[:2]) for _ in range(G)]
    stats, gap = [], 0.0
    for _ in range(2):
        responses = trainer.generate(queries)
        scores = [vowels(tok.decode(r)) for r in responses]
        batch = trainer.make_batch(queries, responses, scores)
        old = trainer.learner.forward(batch).old_logprobs
        with torch.no_grad():
            for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
                seq = torch.cat([q, r])[None]
                lp = torch.log_softmax(policy(input_ids=seq).logits[0, len(q) - 1 : -1].float(), -1)
                plain = lp.gather(1, r[:, None]).squeeze(1)
                gap = max(gap, (plain - old[i, len(q) : len(q) + len(r)]).abs().max().item())
        stats.append(trainer.step(queries, responses, scores))
    return TwoSteps(trainer, before, stats, gap)


def adapted_weights(peft_model) -> set[str]:
    """Base-model names of the weights a LoRA adapter changes."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {f"{n.removeprefix(prefix)}.weight" for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_two_training_steps(arch, family_dir, tok, estimator, lora):
    run = train_two_steps(arch, family_dir, tok, estimator, lora)
    assert all(math.isfinite(v) for s in run.stats for v in s.values()), run.stats
    policy = run.trainer.learner.unwrapped_policy()
    after = dict(engine_weights(policy))
    assert after.keys() == run.before.keys()
    changed = {n for n in after if not torch.equal(after[n], run.before[n])}
    expected = adapted_weights(policy) if lora else set(after)
    assert changed == expected and expected  # LoRA: the adapted weights, and only those
    # the learner's log-probs (grpo: each prompt once per group) equal a plain forward
    assert run.logprob_gap < 1e-5


# ---------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_saved_model_loads_back_with_the_same_logits(arch, family_dir, tok, tmp_path, lora):
    run = train_two_steps(arch, family_dir, tok, "grpo", lora)
    policy = run.trainer.learner.unwrapped_policy()
    ids = torch.tensor([tok("The moon is made of rock and dust, and it")["input_ids"]])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    saved = run.trainer.save_model(tmp_path / "saved")
    attn = FAMILIES[arch].attn_implementation
    if lora:
        from peft import AutoPeftModelForCausalLM

        adapter = AutoPeftModelForCausalLM.from_pretrained(saved, **({"attn_implementation": attn} if attn else {}))
        merged = load_hf(run.trainer.save_model(tmp_path / "merged", merged=True), arch)
        with torch.no_grad():
            assert torch.allclose(adapter(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
            assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        loaded = merged
    else:
        loaded = load_hf(saved, arch)
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == TIED[arch]  # still tied


# ---------------------------------------------------------------------------------------
# resume through the application
# ---------------------------------------------------------------------------------------


def run_app(arch: str, path: Path, out: Path, steps: int, mode: str, resume: bool) -> None:
    """The application's Trainer in this process: hf engine, VowelReward in-process, a checkpoint
    every step. Sync mode and a constant learning rate: a run of 2 steps then resumed to 3 does
    exactly the work of a 3-step run (async mode would roll out step 3 one policy earlier)."""
    from lampo.config import LampoConfig
    from lampo.trainer import Trainer

    estimator, _, lora = mode.partition("-")
    cfg = LampoConfig(
        model_name_or_path=str(path), query_dataset=str(ROOT / "examples" / "data" / "multistep"),
        output_dir=str(out), engine="hf", estimator=estimator, batch_size=2,
        num_generations=2 if estimator == "grpo" else 1, mini_batch_size=4 if estimator == "grpo" else 2,
        max_new_tokens=6, max_steps=steps, save_step=1, async_mode=False, non_stop_penalty=False,
        learning_rate=1e-2, lr_scheduler_type="constant", use_peft=bool(lora), lora_r=4, lora_alpha=8,
        reward_model="lampo.reward.rules.VowelReward", resume_from_checkpoint="auto" if resume else None,
        attn_implementation=FAMILIES[arch].attn_implementation, seed=3, progress=False, report_to=[],
        log_samples_steps=0, keep_freed_memory=False,
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        for s, h in handlers.items():  # the Trainer installs its own; give pytest its own back
            signal.signal(s, h)


@pytest.mark.parametrize("mode", ["gae", "grpo-lora", "gae-lora"])
def test_resumed_run_equals_uninterrupted(arch, family_dir, tmp_path, mode, monkeypatch):
    monkeypatch.setenv("LAMPO_PEAK_FLOPS", "2e11")  # skip measuring this machine's peak
    run_app(arch, family_dir, tmp_path / "a", 3, mode, resume=False)
    # A run stopped after step 2 leaves exactly a's checkpoint-2 (sync mode, constant learning
    # rate: nothing in steps 1-2 depends on max_steps), so b starts from a copy of it rather than
    # training those two steps again; tests/integration/test_app_e2e.py kills a real run instead.
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run_app(arch, family_dir, tmp_path / "b", 3, mode, resume=True)
    # the final policy (or adapter) and everything in checkpoint-3 (policy, critic) agree
    a = tmp_path / "a"
    files = [p.relative_to(a) for p in [*a.glob("*.safetensors"), *(a / "checkpoint-3").rglob("*.safetensors")]]
    assert len(files) >= 2, files
    for f in files:
        wa, wb = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert wa.keys() == wb.keys(), f
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), (f, k)
    w0 = load_file(str(family_dir / "model.safetensors"))
    final = load_file(str(tmp_path / "a" / ("adapter_model.safetensors" if "lora" in mode else "model.safetensors")))
    assert not all(k in w0 and torch.equal(w0[k], v) for k, v in final.items())  # training moved it

