"""Policy, value and reference models.

- Policy: any `AutoModelForCausalLM` id or path; optionally LoRA through PEFT.
- Value model: a separate trunk with a scalar head (initialised from the policy or a given
  path), or a scalar head on the policy's own trunk.
- Reference: a frozen copy of the policy, or, with LoRA, the same weights with the adapter
  disabled, so no second copy of the weights sits in memory.
Dropout is disabled everywhere: with dropout the log-probs of the old and new policy differ
even at identical weights, and the PPO ratio is no longer 1 at the start of an update
(Ziegler et al. 2019, p. 3; open-instruct's implementation detail 2).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from lampo.config import ModelConfig

VALUE_HEAD_FILE = "value_head.safetensors"


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: dropout modules, the probabilities modules copied, the config.

    transformers' attention modules copy `config.attention_dropout` into a float attribute when
    they are built (`self.attention_dropout`) and pass it to the attention kernel in training mode,
    so changing the config afterwards alone leaves dropout on.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def load_policy(model_cfg: ModelConfig, path: str | None = None) -> nn.Module:
    """Load the causal LM named by `model_name_or_path` (hub id or local dir).

    Weights are fp32 master weights; `bf16`/`fp16` switch autocast in the learner.
    """
    from transformers import AutoModelForCausalLM

    name = path or model_cfg.model_name_or_path
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code,
            **_attn_kwargs(attn_implementation_for(name, model_cfg)),
        )
    except OSError as exc:
        raise OSError(
            f"model_name_or_path '{name}' could not be loaded: {exc}\n"
            "Give a local directory with a Hugging Face causal LM, or a hub id reachable from this machine "
            "(`lampo tiny-model build/tiny-model` builds an offline test model)."
        ) from exc
    return prepare_policy(model, model_cfg)


def attn_implementation_for(name_or_path: str, model_cfg: ModelConfig) -> str | None:
    """The attention kernels to load `name_or_path` with: `attn_implementation` when set, else
    eager for a model whose attention soft-caps its scores (Gemma 2), else None (transformers' choice).

    transformers' default SDPA kernel cannot soft-cap attention scores, so with it the learner
    would compute another function than the one vLLM samples from (vLLM soft-caps).
    """
    if model_cfg.attn_implementation:
        return model_cfg.attn_implementation
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


def _attn_kwargs(attn_implementation: str | None) -> dict:
    # null keeps transformers' choice; eager can be the faster kernel for short bf16 sequences on
    # a CPU (docs/performance-log.md)
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


def prepare_policy(model: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    """Disable dropout, wrap with LoRA when asked, switch gradient checkpointing."""
    disable_dropout(model)
    if model_cfg.use_peft and not is_peft_model(model):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_cfg.lora_r,
            lora_alpha=model_cfg.lora_alpha,
            lora_dropout=model_cfg.lora_dropout,
            target_modules=model_cfg.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft_model(model):
            model.enable_input_require_grads()
        model.config.use_cache = False
    return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    if is_peft_model(model):
        return model.get_base_model()
    return model


def trunk_of(causal_lm: nn.Module) -> nn.Module:
    """The decoder trunk (e.g. LlamaModel) of a transformers causal LM."""
    return getattr(causal_lm, causal_lm.base_model_prefix)


def init_value_head(hidden_size: int) -> nn.Linear:
    """The critic's scalar head: weights with std 1/(hidden_size + 1), bias 0 (OpenRLHF's critic).

    The critic starts close to a constant 0. A final hidden state has about unit scale per
    dimension, so the value's initial spread is about sqrt(H) x std: 1/sqrt(H) here. Stiennon et
    al. (2020, p. 11)'s std 1/sqrt(H + 1) is a *reward model's* initialisation, meant to give
    outputs of unit variance; as a critic's it gives random values of spread ~1 at every token,
    often many times the spread of the scores, and GAE turns that noise into the advantages until
    the critic has unlearnt it (measured in docs/algorithms.md, "PPO's critic").
    """
    head = nn.Linear(hidden_size, 1)
    nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1))
    nn.init.zeros_(head.bias)
    return head


class ValueModel(nn.Module):
    """A separate critic: a decoder trunk and a scalar head; `forward` gives one value per token."""

    def __init__(self, trunk: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.trunk = trunk
        self.config = trunk.config
        self.head = head if head is not None else init_value_head(trunk.config.hidden_size)
        disable_dropout(self)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        """Critic initialised from the policy's trunk (a copy: the two are trained apart).

        The critic trains fully, LoRA or not: with a LoRA policy the copy has the adapter folded
        into its weights, which PEFT had frozen, so they are made trainable again here.
        """
        if is_peft_model(policy):
            # A plain copy would carry the policy's LoRA layers: fold them into the weights.
            trunk = trunk_of(copy.deepcopy(policy).merge_and_unload())
        else:
            trunk = copy.deepcopy(trunk_of(policy))
        return cls(trunk.requires_grad_(True))

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False,
                        attn_implementation: str | None = None) -> ValueModel:
        """Load a trunk from `path`; load the head too when `path` is a saved ValueModel."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        trunk = AutoModel.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                          **_attn_kwargs(attn_implementation))
        model = cls(trunk)
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.exists():
            model.head.load_state_dict(load_file(str(head_file)))
        return model

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        from safetensors.torch import save_file

        self.trunk.save_pretrained(path, **kwargs)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(Path(path) / VALUE_HEAD_FILE))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.trunk.gradient_checkpointing_enable(**kwargs)


def build_value_model(model_cfg: ModelConfig, policy: nn.Module) -> nn.Module:
    """The separate critic of `value_model: separate` (a head on the trunk is built by the learner)."""
    if model_cfg.value_model_name_or_path:
        path = model_cfg.value_model_name_or_path
        value = ValueModel.from_pretrained(path, model_cfg.trust_remote_code, attn_implementation_for(path, model_cfg))
    else:
        value = ValueModel.from_policy(policy)
    if model_cfg.gradient_checkpointing:
        value.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return value


def build_reference(policy: nn.Module, model_cfg: ModelConfig) -> nn.Module | None:
    """A frozen copy of the policy; None with LoRA (the adapter is disabled instead)."""
    if is_peft_model(policy):
        return None
    ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    ref.eval()
    return ref


@contextlib.contextmanager
def reference_mode(policy: nn.Module, ref_model: nn.Module | None):
    """Yields the module that computes reference log-probs.

    With LoRA and no separate reference, that is the policy with its adapter disabled: the
    base weights are the reference, at no extra memory.
    """
    if ref_model is not None:
        yield ref_model
        return
    if not is_peft_model(policy):
        raise ValueError("no reference model: pass ref_model, or use a PEFT policy (use_peft: true)")
    with policy.disable_adapter():
        yield policy


def check_same_vocab(policy: nn.Module, reward_model: nn.Module) -> None:
    """An in-process HF reward model must share the policy's vocabulary (open-instruct detail 4)."""
    p = base_causal_lm(policy).config.vocab_size
    r = reward_model.config.vocab_size
    if p != r:
        raise ValueError(
            f"policy vocab_size ({p}) differs from the reward model's ({r}): the reward model cannot score "
            "every token the policy can produce. Use a reward model trained with the policy's tokenizer."
        )
