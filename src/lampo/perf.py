"""Performance accounting: the FLOPs of each phase of a step, this machine's matmul peak, and MFU;
and the one process-wide performance setting the application makes (`keep_freed_memory`).

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

MFU = counted FLOPs / (seconds x peak FLOP/s), with the peak measured on this machine by
`measure_peak` (a 2048 x 2048 matmul) rather than taken from a data sheet.

    shape = ModelShape.from_model(policy)
    flops = count_flops(shape, seq_lens=[40, 52, ...], ppo_epochs=1)
    peak = measure_peak(torch.float32, "best")
    metrics = step_mfu({"time/rollout": 1.2, "time/forward": 0.3, "time/optimize": 0.9}, flops, peak)
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

PHASES = ("rollout", "forward", "optimize")
"""The phases that run the model; their times are logged as time/<phase>."""


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a decoder-only transformer."""

    matmul_params: int
    """Parameters that take part in a matmul per token: the weight of every matmul layer
    (`MATMUL_LAYERS`), the LM head included even when it is tied to the input embedding, the
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
                             "add the model's matmul layer class to lampo.perf.matmul_layers")
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
    is only predicted; `learner.fed_columns`).

    old_logprobs: whether a separate no-grad policy pass computes them (False when the learner
    takes them from the training pass, see `Learner.fuses_old_logprobs`).
    reference: whether the reference log-probs are computed (False when kl_coef is 0 and the
    learner skips them). critic: the shape of a separate value model (None for a value head on
    the policy, whose cost is negligible, or for critic-free estimators).
    shared_prefix_lens: one entry per prompt copy that the learner's policy passes do not compute
    (a group's G answers share one prompt pass, see optimize/shared_prefix.py): a prefix of P
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


def learner_step_flops(learner, batch, cache_block: int = 0) -> dict[str, float]:
    """`count_flops` for one `Learner.train(batch)` plus the rollout that produced `batch`.

    Reads everything off the learner (policy shape, LoRA, gradient checkpointing, whether the
    reference and the old-log-prob passes run, a separate critic) and the TrainBatch (real
    lengths from its attention mask). The model shapes are cached on the learner. cache_block:
    the rollout engine's prefix-cache block in tokens (`engine.prompt_cache_block`; 0 when each
    sample computes its whole prompt).
    """
    from lampo.optimize.models import is_peft_model

    shapes = getattr(learner, "_flop_shapes", None)
    if shapes is None:
        policy = learner.unwrapped_policy()
        critic = learner.unwrapped_value_model()
        shapes = (ModelShape.from_model(policy), ModelShape.from_model(critic.trunk) if critic is not None else None,
                  is_peft_model(policy))
        learner._flop_shapes = shapes
    policy_shape, critic_shape, lora = shapes
    return count_flops(
        policy_shape,
        batch.attention_mask.sum(1).tolist(),
        ppo_epochs=learner.opt_cfg.ppo_epochs,
        old_logprobs=not learner.fuses_old_logprobs(batch),
        reference=learner.uses_reference,
        critic=critic_shape,
        lora=lora,
        recompute=learner.cfg.model.gradient_checkpointing,
        shared_prefix_lens=_shared_prefix_lens(learner, batch),
        cached_prompt_lens=rollout_cached_prompt_lens(_prompt_copies(batch), cache_block),
    )


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


def _shared_prefix_lens(learner, batch) -> list[int]:
    """Prompt copies the learner will not compute: all but the first row of each group's prompt.

    Counted per group (whole groups share a micro-batch when its size is a multiple of the group
    size; otherwise this counts none). The LM head still counted on each distinct prompt's every
    position, where the learner runs it on the last only, is 2 V H (P - 1) FLOPs per prompt per
    pass: 1-2% of a step for small vocabularies, so MFU reads that much high.
    """
    G = batch.group_size
    if not learner._shares_prefix(G) or learner.micro_batch_size % G:
        return []
    return _prompt_copies(batch)


def _prompt_copies(batch) -> list[int]:
    """The prompt length of every row that repeats an earlier row's prompt in its group."""
    from lampo.optimize.shared_prefix import plan_prefixes

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


def step_mfu(phase_times: dict[str, float], flops: dict[str, float], peak_flops: float) -> dict[str, float]:
    """Model FLOPs utilisation per phase and for the step.

    phase_times: seconds per phase as logged, `time/<phase>` (e.g. time/rollout, time/forward,
    time/optimize); `time/training`, when present, is the whole step's wall time, otherwise the
    sum of the phases' times is used. flops: from `count_flops`. peak_flops: FLOP/s.
    Returns perf/mfu, perf/mfu_<phase> for each timed phase, and perf/flops_per_second.
    A phase without a time (or with time 0) gets no entry rather than a made-up number.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    out: dict[str, float] = {}
    timed_total = 0.0
    for phase, f in flops.items():
        seconds = phase_times.get(f"time/{phase}")
        if seconds is None or seconds <= 0:
            continue
        timed_total += seconds
        out[f"perf/mfu_{phase}"] = f / seconds / peak_flops
    wall = phase_times.get("time/training", timed_total)
    if wall > 0:
        total = sum(flops.values())
        out["perf/flops_per_second"] = total / wall
        out["perf/mfu"] = total / wall / peak_flops
    return out


# ---------------------------------------------------------------------------------------
# Machine peak
# ---------------------------------------------------------------------------------------


def onednn_linear_available() -> bool:
    """Whether torch has oneDNN's prepacked linear (the kernels torch.compile's CPU backend uses)."""
    from lampo.optimize import onednn_linear

    return onednn_linear.available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def measure_peak(dtype: torch.dtype = torch.float32, kind: str = "matmul", n: int = 2048, repeats: int = 5) -> float:
    """Measured matmul rate in FLOP/s: the median of `repeats` timed n x n x n products.

    kind: "matmul" (torch.matmul, the default kernels), "onednn" (oneDNN's linear with a
    prepacked weight), or "best" (the larger of the available ones).
    Each product costs 2 n^3 FLOPs. One untimed warm-up run precedes the timed ones.
    """
    if kind == "best":
        rates = [measure_peak(dtype, "matmul", n, repeats)]
        if onednn_linear_available():
            rates.append(measure_peak(dtype, "onednn", n, repeats))
        return max(rates)
    if kind not in ("matmul", "onednn"):
        raise ValueError(f"kind must be 'matmul', 'onednn' or 'best', got {kind!r}")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    w = torch.randn(n, n, generator=gen).to(dtype)
    if kind == "matmul":
        def run():
            return torch.matmul(a, w)
    else:
        if not onednn_linear_available():
            raise RuntimeError("this torch build has no oneDNN prepacked linear; use kind='matmul'")
        packed = torch.ops.mkldnn._reorder_linear_weight(w, n)

        def run():
            return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    times = []
    with torch.no_grad():
        run()
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


_PEAK_CACHE: dict[tuple, float] = {}


def machine_peak(dtype: torch.dtype = torch.float32, kind: str = "best") -> float:
    """`measure_peak`, measured once per process and cached (a few seconds on a busy CPU).

    The environment variable LAMPO_PEAK_FLOPS (FLOP/s, e.g. `4.5e11`) skips the measurement:
    for GPUs' data-sheet figures, or for test runs that should not spend the seconds.
    """
    fixed = os.environ.get("LAMPO_PEAK_FLOPS")
    if fixed:
        try:
            value = float(fixed)
        except ValueError:
            raise ValueError(f"LAMPO_PEAK_FLOPS must be a number of FLOP/s such as 4.5e11, got {fixed!r}") from None
        if value <= 0:
            raise ValueError(f"LAMPO_PEAK_FLOPS must be positive, got {fixed!r}")
        return value
    key = (dtype, kind, torch.get_num_threads())
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = measure_peak(dtype, kind, repeats=3)
    return _PEAK_CACHE[key]


# ---------------------------------------------------------------------------------------
# The process's allocator
# ---------------------------------------------------------------------------------------

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory in the process; returns whether it applied.

    By default glibc serves large blocks with mmap and unmaps them on free (the threshold adapts,
    up to 32 MB) and trims the heap's free top, so every training step touches its activations'
    pages afresh: each 4 KB page costs a fault and a zeroing (about 3 us here; 25,000-65,000
    faults per step of the benchmark setup). Blocks up to `mmap_threshold` (glibc's maximum, 32
    MB) then come from the heap, which is trimmed only above `trim_threshold`: a step re-uses the
    previous step's pages (docs/performance.md, change 13). tcmalloc or jemalloc preloaded with
    LD_PRELOAD do the same, as vLLM's and PyTorch's CPU guides recommend; this needs no launcher.
    Process-wide: anything else in the process gets it too, and its resident memory stays at its
    peak rather than shrinking between steps. A no-op (False) without glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


__all__ = [
    "PHASES",
    "ModelShape",
    "count_flops",
    "forward_flops",
    "keep_freed_memory",
    "learner_step_flops",
    "machine_peak",
    "matmul_layers",
    "measure_peak",
    "onednn_linear_available",
    "rollout_cached_prompt_lens",
    "step_mfu",
    "training_flops",
]
