"""`HFSequenceClassifierReward`: any Hugging Face `AutoModelForSequenceClassification` as a reward model.

Settings (config dict or `reward_model_config`):
- `hf_reward_model` (required): hub id or local directory of the classifier and its tokenizer.
- `hf_reward_label` (default 0): which logit is the score when the head has several labels.
- `hf_reward_batch_size` (default 16): conversations per forward pass.
- `hf_reward_max_length` (default 1024): longest input; longer conversations lose their oldest
  tokens (left truncation), so the response being judged is always seen.
- `hf_reward_device` (default "cpu").

The conversation's turns alternate user/assistant and go through the tokenizer's chat template,
as the classifier saw them in training (the usual reward-model recipe, e.g. OpenRLHF and TRL's
RewardTrainer score the templated conversation). The score is the chosen logit.
"""

from __future__ import annotations

from typing import Any

from lampo.reward_model import RewardModelTemplate, Score


class HFSequenceClassifierReward(RewardModelTemplate):
    """Scores the whole templated conversation with a sequence classifier."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        path = self.config.get("hf_reward_model")
        if not isinstance(path, str) or not path:
            raise ValueError(
                "HFSequenceClassifierReward needs setting 'hf_reward_model': a hub id or a local directory "
                "of an AutoModelForSequenceClassification (e.g. `reward_model_config: {hf_reward_model: ./rm}`)"
            )
        self.path = path
        self.label = int(self.config.get("hf_reward_label", 0))
        self.batch_size = int(self.config.get("hf_reward_batch_size", 16))
        self.max_length = int(self.config.get("hf_reward_max_length", 1024))
        self.device = str(self.config.get("hf_reward_device", "cpu"))
        self.model: Any = None
        self.tokenizer: Any = None
        self.load()

    def load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.truncation_side = "left"  # keep the response being judged
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32)
        if self.model.config.pad_token_id is None:  # needed to find each row's last real token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        if not 0 <= self.label < self.model.config.num_labels:
            raise ValueError(
                f"reward model setting 'hf_reward_label' = {self.label} is out of range: {self.path} has "
                f"{self.model.config.num_labels} labels"
            )

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None

    def render(self, conversation: list[str]) -> str:
        """The conversation as the classifier reads it: turns alternate user/assistant, chat template applied."""
        chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(conversation)]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in chat)

    def score_sync(self, messages: list[list[str]]) -> list[float]:
        import torch

        texts = [self.render(c) for c in messages]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                    max_length=self.max_length, add_special_tokens=False,
                ).to(self.device)
                logits = self.model(**enc).logits
                scores.extend(logits[:, self.label].float().tolist())
        return scores

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        # The forward pass is synchronous: run it in a worker thread so /health keeps answering.
        return await self.run_sync(self.score_sync, messages)
