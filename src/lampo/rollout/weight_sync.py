"""The policy's weights under the base model's transformers names, for `engine.update_weights`.

The weight contract between the learner and both engines: what `engine_weights` yields is
exactly what `HFEngine.update_weights` and `VLLMEngine.update_weights` take.

- Each distinct parameter once, under its canonical name: the name `named_parameters()` gives
  it, i.e. the first place the module tree holds it. A tied LM head is the input embedding's
  tensor, so it goes once, as `model.embed_tokens.weight` (GPT-2: `transformer.wte.weight`);
  the alias `lm_head.weight` is left out. That is also how `save_pretrained` writes a tied
  checkpoint, so vLLM, which loads that checkpoint, knows every name sent (its Gemma 2 has no
  `lm_head` at all, it reads the embedding), and the `hf` engine's own copy of the model has
  the same canonical names.
- Parameters only, no buffers. Training changes parameters only; buffers (rotary tables, causal
  masks, Gemma's embedding scale) are computed by each engine from the config or were loaded
  from the same checkpoint, and vLLM has no place for most of them.
- A PEFT (LoRA) model yields the base weights with the adapter merged in, computed tensor by
  tensor into new tensors (W + scale * B @ A, transposed for GPT-2's Conv1D by peft's
  `fan_in_fan_out`), so the trained model keeps its separate adapter; names lose PEFT's
  wrappers (`base_model.model.`, `.base_layer`, `modules_to_save.<adapter>`) and the `lora_`
  tensors are dropped. The engine then receives the canonical names of the base model.

tests/integration/test_families.py checks the contract on every family of
`lampo.testing.FAMILIES`, tied and untied, with and without LoRA, on both engines.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_PEFT_PREFIX = "base_model.model."


def engine_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of the merged policy weights under the base model's canonical names.

    Pass the causal-LM module itself (for a policy with a value head, its LM submodule).
    Tensors are detached; merged LoRA weights are fresh tensors, others share storage with
    the model (the engine copies them). See the module docstring for the contract.
    """
    deltas = _lora_deltas(model)
    for name, tensor in model.named_parameters():  # each tensor once: tied aliases are skipped
        mapped = _base_name(name)
        if mapped is None:
            continue
        delta = deltas.get(name)
        if delta is not None:
            tensor = tensor + delta.to(tensor.dtype)
        yield mapped, tensor.detach()


def weight_targets(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The tensors of a plain (unwrapped) model that the contract fills, by canonical name."""
    return dict(model.named_parameters())


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Every name of a shared parameter other than its canonical one -> the canonical name."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = canonical.setdefault(id(param), name)
        if first != name:
            aliases[name] = first
    return aliases


def _base_name(name: str) -> str | None:
    """The base checkpoint's name of a (possibly PEFT-wrapped) parameter; None to drop it."""
    if "lora_" in name or ".original_module." in name:
        return None
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    name = name.replace(".base_layer.", ".")
    if ".modules_to_save." in name:  # `x.modules_to_save.default.weight` -> `x.weight`
        head, _, tail = name.partition(".modules_to_save.")
        name = head + "." + tail.split(".", 1)[1]
    return name


@torch.no_grad()
def _lora_deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict name of each LoRA base weight -> the active adapters' delta (scale * B @ A)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    deltas: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False):
            continue  # an already merged adapter is inside the base weight
        if getattr(module, "disable_adapters", False):
            continue
        active = module.active_adapters
        delta = None
        for adapter in active:
            if adapter not in module.lora_A:
                continue
            d = module.get_delta_weight(adapter)  # handles scaling and fan_in_fan_out
            delta = d if delta is None else delta + d
        if delta is not None:
            deltas[f"{mod_name}.base_layer.weight"] = delta
    return deltas
