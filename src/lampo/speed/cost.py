"""The cost model: the FLOPs of each phase of a step (what `lampo.perf` divides by time for MFU, and
what the packed prompt pass's choice weighs).

The cost model follows Kaplan et al. 2020 (section 2.1) and nanoGPT's `estimate_mfu`: a forward
pass costs 2 FLOPs per matmul parameter per token (one multiply, one add), a training pass 6
(forward 2, backward 4: gradients with respect to activations and to weights), plus attention:
a token at position t attends to t+1 keys, so QK^T and attention x V cost 2 * 2 * (t+1) * d_attn
per layer in the forward pass, three times that in training. Embedding look-ups, norms,
activations, softmax and the optimiser are left out: on the models trained here they are a few
percent of the matmuls. Counts are of USEFUL work: real tokens only, causal attention only, so
padding and masked-out attention entries count as waste, not as work.

Per PPO step, with N the policy's matmul parameters and a batch of sequences of lengths T_i
(prompt plus response):
  rollout   generation with a KV cache: each token passes once through the model, so the same
            count as one forward over the final sequence.
  forward   old log-probs (policy), reference log-probs (unless skipped), values (a separate
            critic: one more forward of the critic).
  optimize  ppo_epochs x (training pass of the policy [+ critic]). With LoRA the frozen weights
            need no weight gradient: 4N per token instead of 6N. Gradient checkpointing adds
            one more forward: +2N.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lampo.speed.shared_prefix import plan_prefixes


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a decoder-only transformer."""

    matmul_params: int
    """Parameters that take part in a matmul per token: the weight of every matmul layer
    (`matmul_layers`), the LM head included even when it is tied to the input embedding, the
    input embedding itself excluded (a look-up, no arithmetic)."""
    num_layers: int
    attn_dim: int
    """num_attention_heads x head_dim: the width of the query/key products."""

    def flops(self, positions: int, pairs: int) -> float:
        """One forward pass's FLOPs: 2 per matmul parameter per computed position, plus 4 x
        attn_dim per layer per attention (query, key) pair (the scores, then the weighted values)."""
        return 2.0 * self.matmul_params * positions + 4.0 * self.num_layers * self.attn_dim * pairs

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShape:
        """Read the shape off a transformers causal LM (a PEFT wrapper or a Lampo ValueModel too)."""
        from lampo.optimize.models import base_causal_lm

        base = base_causal_lm(model)
        cfg = base.config
        embeddings = {id(m.weight) for m in base.modules() if isinstance(m, nn.Embedding)}
        layers = matmul_layers()
        params = 0
        seen: set[int] = set()
        for module in base.modules():
            if isinstance(module, layers) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                # A tied LM head is still a matmul over the vocabulary: count it. Under ZeRO-3 a
                # partitioned weight is empty here; `ds_numel` is DeepSpeed's record of its size.
                params += getattr(module.weight, "ds_numel", module.weight.numel())
        if not seen and embeddings:
            names = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in layers)
            raise ValueError(f"the model has no matmul layers ({names}): ModelShape cannot count its matmuls; "
                             "add the model's matmul layer class to lampo.speed.cost.matmul_layers")
        return cls.from_config(cfg, matmul_params=params)

    @classmethod
    def from_config(cls, cfg, matmul_params: int) -> ModelShape:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(matmul_params=int(matmul_params), num_layers=int(cfg.num_hidden_layers), attn_dim=heads * head_dim)


def matmul_layers() -> tuple[type[nn.Module], ...]:
    """The layer classes whose weight multiplies every token: `nn.Linear` and transformers'
    `Conv1D` (GPT-2's projections: a linear layer with the weight stored transposed, in x out,
    so the same in x out multiply-adds per token). LoRA's A and B are `nn.Linear` too."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def forward_flops(shape: ModelShape, seq_lens: Iterable[int]) -> float:
    """FLOPs of one causal forward pass over sequences of the given (unpadded) lengths.

    2 N T for the matmuls plus 4 L d sum_{t=1..T} t = 2 L d T (T + 1) for attention: position t
    attends to t keys, T (T + 1) / 2 pairs in all.
    """
    return sum(shape.flops(int(T), int(T) * (int(T) + 1) // 2) for T in seq_lens)


def training_flops(shape: ModelShape, seq_lens: Iterable[int], lora: bool = False, recompute: bool = False) -> float:
    """FLOPs of one forward + backward pass over the sequences.

    Full fine-tuning: 3x the forward (6N per token). LoRA: the frozen weights need no weight
    gradient, so 2x the forward (4N; the adapters' own FLOPs are negligible at small rank).
    Gradient checkpointing recomputes the forward once more.
    """
    lens = list(seq_lens)
    factor = (2.0 if lora else 3.0) + (1.0 if recompute else 0.0)
    return factor * forward_flops(shape, lens)


def count_flops(
    shape: ModelShape,
    seq_lens: Iterable[int],
    *,
    ppo_epochs: int = 1,
    old_logprobs: bool = True,
    reference: bool = True,
    critic: ModelShape | None = None,
    lora: bool = False,
    recompute: bool = False,
    shared_prefix_lens: Iterable[int] = (),
    cached_prompt_lens: Iterable[int] = (),
) -> dict[str, float]:
    """FLOPs of each phase of one step over sequences of lengths `seq_lens` (prompt + response).

    Every phase computes a sequence of T tokens at its first T - 1 positions: generation never
    feeds its last sampled token back, and the learner's passes leave it out too (a last token
    is only predicted; `speed.passes.fed_columns`).

    old_logprobs: whether a separate no-grad policy pass computes them (False when the learner
    takes them from the training pass, see `Passes.fuses_old_logprobs`).
    reference: whether the reference log-probs are computed (False when kl_coef is 0 and the
    learner skips them). critic: the shape of a separate value model (None for a value head on
    the policy, whose cost is negligible, or for critic-free estimators).
    shared_prefix_lens: one entry per prompt copy that the learner's policy passes do not compute
    (a group's G answers share one prompt pass, see speed/shared_prefix.py): a prefix of P
    tokens is the first P positions of its sequence, so its cost is exactly `forward_flops([P])`.
    cached_prompt_lens: the same for the rollout: one entry per sample whose first positions the
    engine took from its prefix cache instead of computing them (vLLM shares a prompt's whole
    KV-cache blocks between its samples, see `rollout_cached_prompt_lens`).
    Returns {"rollout", "forward", "optimize"} in FLOPs.
    """
    lens = [max(int(t) - 1, 0) for t in seq_lens]
    if ppo_epochs < 1:
        raise ValueError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
    fwd = forward_flops(shape, lens)
    saved = list(shared_prefix_lens)
    policy_fwd = fwd - forward_flops(shape, saved)
    forward = policy_fwd * (int(old_logprobs) + int(reference))
    optimize = ppo_epochs * (training_flops(shape, lens, lora=lora, recompute=recompute)
                             - training_flops(shape, saved, lora=lora, recompute=recompute))
    if critic is not None:
        forward += forward_flops(critic, lens)
        optimize += ppo_epochs * training_flops(critic, lens, recompute=recompute)
    rollout = fwd - forward_flops(shape, list(cached_prompt_lens))
    return {"rollout": rollout, "forward": forward, "optimize": optimize}


def rollout_cached_prompt_lens(prompt_copies: Iterable[int], block: int) -> list[int]:
    """The prompt positions a block-wise prefix cache (vLLM's) spares each repeated sample.

    A prompt's samples share its whole blocks, all but one position: the engine always computes
    a prompt's last position itself, for the first sampled token (vLLM caps the cache hit at
    P - 1 tokens). So a copy of a P-token prompt skips floor((P - 1) / block) * block positions;
    none with block 0.
    """
    if block <= 0:
        return []
    return [(int(p) - 1) // block * block for p in prompt_copies]


def prompt_copies(batch) -> list[int]:
    """The prompt length of every row that repeats an earlier row's prompt in its group."""
    G = batch.group_size
    if G < 2 or len(batch) % G:
        return []
    saved = []
    for start in range(0, len(batch), G):
        rows = slice(start, start + G)
        plan = plan_prefixes(batch.input_ids[rows], batch.attention_mask[rows], batch.action_mask[rows])
        if plan is None:
            continue
        seen: set[int] = set()
        for row, u in enumerate(plan.row_prefix.tolist()):
            if u in seen:
                saved.append(int(plan.prefix_len[row]))
            seen.add(u)
    return saved
