"""`AutoModelForCausalLMWithValueHead`: a causal LM with a scalar value head (TRL-classic's class).

    model = AutoModelForCausalLMWithValueHead.from_pretrained("gpt2")
    logits, loss, value = model(input_ids)       # value: [batch, seq], one per position
    model.save_pretrained("out/")                # the LM as transformers saves it + value_head.safetensors

The head is Lampo's critic head (`lampo.optimize.models.init_value_head`): `PPOTrainer` trains it
as the critic of `value_model: head` and the policy's trunk with it. The saved folder loads in
plain transformers (`AutoModelForCausalLM.from_pretrained`, which ignores the head's file) and
back into this class with the head (TRL saved the head inside the model's weights under
`v_head.*`; Lampo keeps it in its own file so that the model's files stay transformers' own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lampo.optimize.models import VALUE_HEAD_FILE, init_value_head


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A causal LM (`pretrained_model`) and a linear value head (`v_head`) on its last hidden state."""

    def __init__(self, pretrained_model: nn.Module, v_head: nn.Linear | None = None):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.v_head = v_head if v_head is not None else fresh_value_head(pretrained_model.config.hidden_size)
        self.config = pretrained_model.config
        self.is_peft_model = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | nn.Module, *args: Any,
                        **kwargs: Any) -> AutoModelForCausalLMWithValueHead:
        """Load the causal LM (extra arguments go to `AutoModelForCausalLM.from_pretrained`; weights
        in fp32 unless `dtype` says otherwise) and the head when the folder holds one (a fresh head
        otherwise). A model object is wrapped as it is, as TRL allowed."""
        if isinstance(pretrained_model_name_or_path, nn.Module):
            return cls(pretrained_model_name_or_path)
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("dtype", torch.float32)
        lm = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = cls(lm)
        head_file = Path(pretrained_model_name_or_path) / VALUE_HEAD_FILE
        if head_file.is_file():
            from safetensors.torch import load_file

            model.v_head.load_state_dict(load_file(str(head_file)))
        return model

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(lm_logits, loss, value), as TRL-classic's forward; `loss` is the LM loss when `labels` are given."""
        kwargs["output_hidden_states"] = True
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                    past_key_values=past_key_values, **kwargs)
        hidden = out.hidden_states[-1]
        value = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
        return out.logits, getattr(out, "loss", None), value

    def generate(self, *args: Any, **kwargs: Any):
        """The causal LM's `generate` (transformers' keywords)."""
        return self.pretrained_model.generate(*args, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """The causal LM as transformers saves it, and the head beside it (`value_head.safetensors`)."""
        self.pretrained_model.save_pretrained(save_directory, **kwargs)
        save_value_head(self.v_head, save_directory)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.pretrained_model.gradient_checkpointing_enable(**kwargs)


HEAD_SEED = 0
"""The seed of a fresh head's weights."""


def fresh_value_head(hidden_size: int) -> nn.Linear:
    """Lampo's critic head (`init_value_head`), drawn from its own seeded generator: a run does not
    depend on what used the global generator before the model was loaded (transformers' loading
    does, in an order that varies between processes), and the global generator is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        return init_value_head(hidden_size)


def save_value_head(head: nn.Module, folder: str | Path) -> Path:
    """The head's weights as `folder/value_head.safetensors` (the file `from_pretrained` reads)."""
    from safetensors.torch import save_file

    path = Path(folder) / VALUE_HEAD_FILE
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path))
    return path


def split_value_head(model: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """(the causal LM, its value head) of a model with a value head; (model, None) for any other model."""
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        return model.pretrained_model, model.v_head
    return model, None
