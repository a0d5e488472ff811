"""Offline tiny models: a Llama-architecture causal LM and tokenizer built from a seed.

No hub download is possible on Lampo's CI machines, so tests, the demo and the benchmarks
build their own models. The tokenizer is a byte-level BPE trained on `corpus.txt` (written
for this project), with a ChatML chat template, `<|im_end|>` as end of turn and a pad token.
Everything is saved in Hugging Face format, so `AutoModelForCausalLM.from_pretrained` and
vLLM load it like any hub model.
"""

from __future__ import annotations

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


SIZES = {
    # ~0.2M parameters: unit and end-to-end tests, the demo.
    "tiny": TinySpec(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128),
    # ~26.7M parameters: the benchmark model (the same shape TRL was measured on here).
    "small": TinySpec(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408),
}


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


def build_tiny_model(
    out_dir: str | Path,
    size: str = "tiny",
    seed: int = 0,
    kind: str = "causal-lm",
    overwrite: bool = False,
    pretrain_steps: int = 0,
) -> Path:
    """Create (deterministically from `seed`) a Llama model + tokenizer in `out_dir`.

    kind: `causal-lm` (policy) or `classifier` (a 1-label sequence classifier in the same
    vocabulary, standing in for a Hugging Face reward model). Returns the directory.
    pretrain_steps: train the causal LM this many steps on the corpus's chat examples first,
    so that it answers in short sentences and ends its turns with `<|im_end|>` (the demo's
    starting point: a chat model, not random weights).
    An existing complete build is reused unless `overwrite`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if kind not in ("causal-lm", "classifier"):
        raise ValueError(f"kind must be 'causal-lm' or 'classifier', got {kind!r}")
    out = Path(out_dir)
    marker = out / "lampo-tiny.json"
    recipe = {"size": size, "seed": seed, "kind": kind}
    if pretrain_steps:
        recipe["pretrain_steps"] = pretrain_steps
    if marker.exists() and not overwrite and json.loads(marker.read_text()) == recipe:
        return out
    spec = SIZES[size]
    tokenizer = build_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
        num_labels=1,
    )
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if kind == "causal-lm" else LlamaForSequenceClassification
    model = cls(config).to(torch.float32)
    if pretrain_steps and kind == "causal-lm":
        _pretrain_on_chats(model, tokenizer, pretrain_steps, seed)
    model.eval()
    # Build beside the target and rename when complete, so that concurrent test processes
    # never read a half-written model.
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
    (tmp / marker.name).write_text(json.dumps(recipe))
    if out.exists():
        shutil.rmtree(out)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
