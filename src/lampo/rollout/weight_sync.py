"""The policy's weights under the base model's transformers names, for `engine.update_weights`.

A plain model yields its state dict. A PEFT (LoRA) model yields the base weights with the
adapter merged in, computed tensor by tensor into new tensors (W + scale * B @ A), so the
trained model keeps its separate adapter; names lose PEFT's wrappers
(`base_model.model.`, `.base_layer`, `modules_to_save.<adapter>`) and the `lora_` tensors
are dropped. The engine then receives exactly the names of the base checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_PEFT_PREFIX = "base_model.model."


def engine_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of the merged policy weights with the base model's names.

    Pass the causal-LM module itself (for a policy with a value head, its LM submodule).
    Tensors are detached; merged LoRA weights are fresh tensors, others share storage with
    the model (the engine copies them).
    """
    deltas = _lora_deltas(model)
    for name, tensor in model.state_dict().items():
        mapped = _base_name(name)
        if mapped is None:
            continue
        delta = deltas.get(name)
        if delta is not None:
            tensor = tensor + delta.to(tensor.dtype)
        yield mapped, tensor.detach()


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
