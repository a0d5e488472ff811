"""Performance accounting: a step's FLOPs (the cost model, `lampo.speed.cost`) over its phases'
times, against the machine's peak (`lampo.speed.machine`): MFU, as nanoGPT's `estimate_mfu`.

MFU = counted FLOPs / (seconds x peak FLOP/s), with the peak measured on the device that holds
the model (`lampo.speed.machine.measure_peak`) rather than taken from a data sheet.

    flops = learner_step_flops(learner, train_batch, engine.prompt_cache_block)
    metrics = step_mfu({"time/rollout": 1.2, "time/forward": 0.3, "time/optimize": 0.9}, flops, peak)
"""

from __future__ import annotations

from lampo.speed.cost import ModelShape, count_flops, prompt_copies, rollout_cached_prompt_lens

_SHAPES: dict[tuple[int, int], tuple] = {}


def learner_step_flops(learner, batch, cache_block: int = 0) -> dict[str, float]:
    """`count_flops` for one `Learner.train(batch)` plus the rollout that produced `batch`.

    Reads everything off the learner (policy shape, LoRA, gradient checkpointing, whether the
    reference and the old-log-prob passes run, a separate critic) and the TrainBatch (real
    lengths from its attention mask). The models' shapes are read once per model. cache_block:
    the rollout engine's prefix-cache block in tokens (`engine.prompt_cache_block`; 0 when each
    sample computes its whole prompt).
    """
    from lampo.optimize.models import is_peft_model

    policy, critic = learner.unwrapped(learner.policy), learner.unwrapped(learner.value_model)
    key = (id(policy), id(critic))
    if key not in _SHAPES:
        _SHAPES[key] = (ModelShape.from_model(policy),
                        ModelShape.from_model(critic.trunk) if critic is not None else None, is_peft_model(policy))
    policy_shape, critic_shape, lora = _SHAPES[key]
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
        cached_prompt_lens=rollout_cached_prompt_lens(prompt_copies(batch), cache_block),
    )


def _shared_prefix_lens(learner, batch) -> list[int]:
    """Prompt copies the learner will not compute: all but the first row of each group's prompt.

    Counted per group (whole groups share a micro-batch when its size is a multiple of the group
    size; otherwise this counts none). The LM head still counted on each distinct prompt's every
    position, where the learner runs it on the last only, is 2 V H (P - 1) FLOPs per prompt per
    pass: 1-2% of a step for small vocabularies, so MFU reads that much high.
    """
    G = batch.group_size
    if not learner.passes.shares_prefix(G, learner.value_head is not None) or learner.micro_batch_size % G:
        return []
    return prompt_copies(batch)


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


__all__ = ["learner_step_flops", "step_mfu"]
