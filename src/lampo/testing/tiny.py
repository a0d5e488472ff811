"""Offline tiny models: causal LMs of several families and a tokenizer, built from a seed.

No hub download is possible on Lampo's CI machines, so tests, the demo and the benchmarks
build their own models. The tokenizer is a byte-level BPE trained on `corpus.txt` (written
for this project), with a ChatML chat template, `<|im_end|>` as end of turn and a pad token.
The model is built from transformers' own config class of its family (`FAMILIES`: Llama with
an untied or a tied head, Qwen2, Qwen3, Mistral, Gemma 2, GPT-2) with random weights, and
everything is saved in Hugging Face format, so `AutoModelForCausalLM.from_pretrained` and vLLM
load it like any hub model of that family.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = Path(__file__).with_name("corpus.txt")


@dataclass(frozen=True)
class TinySpec:
    """Shape of a built model. head_dim is 64 because vLLM's CPU attention rejects 16."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int = 1024
    max_position_embeddings: int = 1024


MARKER = "lampo-tiny.json"  # a build's recipe, written last: its presence means the build is complete

SIZES = {
    # ~0.2M parameters: unit and end-to-end tests, the demo.
    "tiny": TinySpec(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128),
    # ~26.7M parameters: the benchmark model (benchmarks/trl_compare.py).
    "small": TinySpec(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
}

# The config key each family uses for a TinySpec field. Decoders after Llama share one set of
# names; GPT-2 has its own (and no key-value heads or head_dim: it computes n_embd / n_head).
_DECODER_KEYS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}
_GPT2_KEYS = {
    "hidden_size": "n_embd",
    "num_layers": "n_layer",
    "num_heads": "n_head",
    "intermediate_size": "n_inner",
    "max_position_embeddings": "n_positions",
}


@dataclass(frozen=True)
class Family:
    """A model family: transformers' config class, its names for the shape, its own settings."""

    config_class: str
    """Name of the config class in `transformers` (the model class follows from it)."""
    shape_keys: dict[str, str]
    """TinySpec field -> this family's config key."""
    settings: dict[str, object]
    """The family's own config values: what makes it differ from the others."""
    trait: str
    """What the family adds to the test matrix (docs/models.md lists it)."""
    attn_implementation: str | None = None
    """transformers attention kernels that compute the family exactly (None: its default will do).
    Gemma 2: `eager`, the only one that applies its attention soft-capping (transformers' sdpa
    and flash paths leave it out, vLLM applies it)."""


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", _DECODER_KEYS, {"tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                                                   "attention_dropout": 0.0},
                    "rotary positions, RMSNorm, SwiGLU, an untied LM head (the default model)"),
    "llama-tied": Family("LlamaConfig", _DECODER_KEYS, {"tie_word_embeddings": True, "rms_norm_eps": 1e-6,
                                                        "attention_dropout": 0.0},
                         "the LM head is the input embedding (Llama 3.2 1B/3B)"),
    "qwen2": Family("Qwen2Config", _DECODER_KEYS, {"tie_word_embeddings": True, "rms_norm_eps": 1e-6,
                                                   "attention_dropout": 0.0, "use_sliding_window": False},
                    "biases on the q/k/v projections, tied head (Qwen2/2.5 0.5B-3B)"),
    "qwen3": Family("Qwen3Config", _DECODER_KEYS, {"tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                                                   "attention_dropout": 0.0, "attention_bias": False,
                                                   "use_sliding_window": False},
                    "RMSNorm on queries and keys per head (q_norm, k_norm)"),
    "mistral": Family("MistralConfig", _DECODER_KEYS, {"tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                                                       "attention_dropout": 0.0, "sliding_window": None},
                      "Mistral's own model classes (v0.2+ without a sliding window)"),
    # Gemma 2 alternates sliding-window and global attention layers; a window of 16 tokens is
    # shorter than the tests' conversations, so its sliding layers really drop keys there.
    # Soft-capping (cap * tanh(x / cap)) is scaled down to a random model's numbers (attention
    # scores under 0.1, logits under 1; Gemma 2 itself caps at 50 and 30), so that it binds: an
    # engine or attention kernel that skipped it would fail the parity tests.
    # query_pre_attn_scalar is head_dim (64 in every size), as in Gemma 2 2B/9B.
    "gemma2": Family("Gemma2Config", _DECODER_KEYS, {"tie_word_embeddings": True, "rms_norm_eps": 1e-6,
                                                     "attention_dropout": 0.0, "sliding_window": 16,
                                                     "query_pre_attn_scalar": 64, "attn_logit_softcapping": 0.05,
                                                     "final_logit_softcapping": 0.5},
                     "soft-capped attention and output logits, sliding-window layers, scaled embedding, "
                     "tied head", attn_implementation="eager"),
    "gpt2": Family("GPT2Config", _GPT2_KEYS, {"tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                              "attn_pdrop": 0.0},
                   "learned absolute positions, Conv1D layers (transposed weights), LayerNorm with bias, "
                   "tied head"),
}
"""The model families `build_tiny_model(arch=...)` builds (`lampo tiny-model --arch`)."""


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE on the shipped corpus and wrap it with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        clean_up_tokenization_spaces=False,
        padding_side="left",  # generation pads on the left (open-instruct's implementation detail 1)
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str, spec: TinySpec, tokenizer, num_labels: int = 1):
    """The transformers config of family `arch` (a key of FAMILIES) in the shape `spec`."""
    import transformers

    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {sorted(FAMILIES)}, got {arch!r}")
    family = FAMILIES[arch]
    shape = {"hidden_size": spec.hidden_size, "num_layers": spec.num_layers, "num_heads": spec.num_heads,
             "kv_heads": spec.num_heads, "head_dim": spec.hidden_size // spec.num_heads,
             "intermediate_size": spec.intermediate_size, "max_position_embeddings": spec.max_position_embeddings}
    values = {family.shape_keys[k]: v for k, v in shape.items() if k in family.shape_keys}
    values.update(family.settings)
    config_class = getattr(transformers, family.config_class)
    return config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        num_labels=num_labels,
        **values,
    )


def build_tiny_model(
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    kind: str = "causal-lm",
    overwrite: bool = False,
    pretrain_steps: int = 0,
    arch: str = "llama",
) -> Path:
    """Create (deterministically from `seed`) a model of family `arch` + tokenizer in `out_dir`.

    arch: a key of FAMILIES (`llama`, the default, `llama-tied`, `qwen2`, `qwen3`, `mistral`,
    `gemma2`, `gpt2`). kind: `causal-lm` (policy) or `classifier` (a 1-label sequence
    classifier in the same vocabulary, standing in for a Hugging Face reward model).
    Returns the directory.
    pretrain_steps: train the causal LM this many steps on the corpus's chat examples first,
    so that it answers in short sentences and ends its turns with `<|im_end|>` (the demo's
    starting point: a chat model, not random weights).
    An existing complete build is reused unless `overwrite`.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if kind not in ("causal-lm", "classifier"):
        raise ValueError(f"kind must be 'causal-lm' or 'classifier', got {kind!r}")
    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {sorted(FAMILIES)}, got {arch!r}")
    out = Path(out_dir)
    marker = out / MARKER
    recipe: dict[str, object] = {"size": size, "seed": seed, "kind": kind}
    if arch != "llama":  # the default's recipe is unchanged, so its existing builds stay valid
        recipe["arch"] = arch
    if pretrain_steps:
        recipe["pretrain_steps"] = pretrain_steps
    if not overwrite and _built(marker, recipe):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        # One builder at a time (pytest-xdist's workers share build/test-models): the second finds
        # the first's build complete and keeps it, rather than deleting a copy the first may read.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not overwrite and _built(marker, recipe):
            return out
        _write(out, recipe, SIZES[size], seed, kind, pretrain_steps, arch)
    return out


def _write(out: Path, recipe: dict[str, object], spec: TinySpec, seed: int, kind: str, pretrain_steps: int,
           arch: str) -> None:
    """Build the model and tokenizer beside `out` and rename the folder into place when complete,
    so that a reader never finds a half-written model; the marker is the last file written."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = build_tokenizer(spec.vocab_size)
    config = tiny_config(arch, spec, tokenizer)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(config).to(torch.float32)
    if pretrain_steps and kind == "causal-lm":
        _pretrain_on_chats(model, tokenizer, pretrain_steps, seed)
    model.eval()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if kind == "causal-lm":
        gen = model.generation_config
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
        gen.bos_token_id = None
        gen.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(recipe))
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


def _built(marker: Path, recipe: dict[str, object]) -> bool:
    """Whether a complete build of `recipe` is in place (the marker is written last)."""
    return marker.exists() and json.loads(marker.read_text()) == recipe


def chat_examples() -> list[tuple[str, str]]:
    """The (question, answer) pairs of the corpus's ChatML lines."""
    pattern = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>")
    return pattern.findall(CORPUS.read_text())


def _pretrain_on_chats(model, tokenizer, steps: int, seed: int, batch_size: int = 16) -> None:
    """A short supervised warm-up on 1-3-turn conversations built from the corpus's chat pairs."""
    pairs = chat_examples()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = []
        for _ in range(batch_size):
            turns = int(torch.randint(1, 4, (1,), generator=gen))
            messages = []
            for k in torch.randint(len(pairs), (turns,), generator=gen).tolist():
                messages += [{"role": "user", "content": pairs[k][0]}, {"role": "assistant", "content": pairs[k][1]}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def num_parameters(path: str | Path) -> int:
    """Parameter count of a saved model, from its safetensors header (no model load)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            total += _prod(f.get_slice(key).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
