"""lm_ppo's names over Lampo (design document 004): only the import path differs from its README.

    from lampo.compat.lm_ppo import GPT2HeadWithValueModel, respond_to_batch, PPOTrainer
    model = GPT2HeadWithValueModel.from_pretrained("gpt2")
    ppo_trainer = PPOTrainer(model, ref_model, batch_size=1, forward_batch_size=1)
    response = respond_to_batch(model, query_tensor)          # [batch, txt_len]
    stats = ppo_trainer.step(query_tensor, response, torch.tensor([1.0]))

`PPOTrainer` keeps lm_ppo's parameters and defaults (`lm_ppo.ppo.PPOTrainer.default_params`)
and trains with Lampo's learner: GAE with the model's value head as the critic, the adaptive KL
controller (Ziegler et al. 2019, which lm_ppo follows), one sample per optimiser step. Any Lampo
config key may be passed as well (e.g. `mini_batch_size` for larger updates).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lampo.compat.value_head import AutoModelForCausalLMWithValueHead, split_value_head
from lampo.config import LampoConfig
from lampo.optimize.ppo_trainer import PPOTrainer as _LampoPPOTrainer

DEFAULT_PARAMS: dict[str, Any] = {
    "lr": 1.41e-5,
    "adap_kl_ctrl": True,
    "init_kl_coef": 0.2,
    "target": 6,
    "horizon": 10000,
    "gamma": 1,
    "lam": 0.95,
    "cliprange": 0.2,
    "cliprange_value": 0.2,
    "vf_coef": 0.1,
    "batch_size": 256,
    "forward_batch_size": 16,
    "ppo_epochs": 4,
}
"""lm_ppo's PPO parameters and their defaults."""

NAMES = {"lr": "learning_rate", "steps": "total_episodes"}
"""lm_ppo's names that are not config aliases everywhere (too generic outside lm_ppo's calls)."""

SETTINGS = {"mini_batch_size": 1, "lr_scheduler_type": "constant", "non_stop_penalty": False}
"""What lm_ppo did without a parameter: it stepped the optimiser on one sample at a time, with a
constant learning rate, and trained on the rewards given (responses have a fixed length)."""


class GPT2HeadWithValueModel(AutoModelForCausalLMWithValueHead):
    """lm_ppo's GPT-2 with a value head; `forward` returns (lm_logits, past_key_values, value) as lm_ppo's did."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Any = None, **kwargs: Any):
        kwargs.setdefault("use_cache", True)
        kwargs["output_hidden_states"] = True
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                    past_key_values=past_key_values, **kwargs)
        value = self.v_head(out.hidden_states[-1].to(self.v_head.weight.dtype)).squeeze(-1)
        return out.logits, out.past_key_values, value


@torch.no_grad()
def respond_to_batch(model: nn.Module, queries: torch.Tensor, txt_len: int = 20, top_k: int = 0, top_p: float = 1.0,
                     pad_token_id: int | None = None) -> torch.Tensor:
    """Sample `txt_len` tokens after each query ([batch, query_len] -> [batch, txt_len]), as lm_ppo did:
    temperature 1, optional top-k / top-p, no stopping at eos. With `pad_token_id`, leading pad tokens
    of left-padded queries are masked out (lm_ppo's queries had no padding)."""
    from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

    lm = split_value_head(model)[0]
    ids = queries.long()
    if pad_token_id is None:
        mask = torch.ones_like(ids)
    else:  # only the leading pads: a pad id inside the text (pad = eos) is a token like any other
        mask = (ids != pad_token_id).long().cummax(dim=1).values
    warpers = LogitsProcessorList()
    if top_k and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=int(top_k)))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    past, step_ids = None, ids
    for _ in range(txt_len):
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        out = lm(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = warpers(ids, out.logits[:, -1, :].float())
        step_ids = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return ids[:, -txt_len:]


class PPOTrainer:
    """lm_ppo's trainer: `PPOTrainer(model, ref_model, **ppo_params)` and `step(query, response, scores)`."""

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, tokenizer: Any = None,
                 **ppo_params: Any):
        self.ppo_params = {**DEFAULT_PARAMS, **ppo_params}
        values = {NAMES.get(k, k): v for k, v in self.ppo_params.items()}
        values = {**SETTINGS, **values}
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise TypeError("PPOTrainer(model, ...) takes a model with a value head, e.g. "
                            "GPT2HeadWithValueModel.from_pretrained(...)")
        self.model, self.ref_model = model, ref_model
        self.trainer = _LampoPPOTrainer(LampoConfig(values), model, tokenizer or _TokenIds(model.config),
                                        ref_model=ref_model)
        """Lampo's PPOTrainer doing the work (its learner, `generate`, `save_model`)."""
        self.config = self.trainer.config

    def step(self, query: torch.Tensor, response: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
        """One PPO step on a batch: query [batch, query_len], response [batch, response_len], scores [batch]."""
        queries = list(query) if isinstance(query, torch.Tensor) else list(query)
        responses = list(response) if isinstance(response, torch.Tensor) else list(response)
        rewards = [float(s) for s in torch.as_tensor(scores).reshape(-1)]
        return self.trainer.step(queries, responses, rewards)


class _TokenIds:
    """The token ids Lampo's trainer reads off a tokenizer, from the model's config (lm_ppo has no tokenizer)."""

    def __init__(self, model_config: Any):
        self.eos_token_id = getattr(model_config, "eos_token_id", None)
        pad = getattr(model_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self.eos_token_id if self.eos_token_id is not None else 0
        self.unk_token_id = None

    def save_pretrained(self, *_args: Any, **_kwargs: Any) -> None:
        """Nothing to save: there is no tokenizer."""
