"""Lampo's one configuration tree.

Every setting lives in exactly one dataclass field below, with its default and a one-line
docstring (the string under the field). YAML files and command-line overrides use the
flat key names users know from the design documents (``learning_rate: 1e-5``); a YAML file
may also group keys under a section name (``optim: {kl_coef: 0.05}``). ``docs/config.md`` is
generated from this file: ``python -m lampo.config --docs > docs/config.md``.

Command-line overrides: ``--learning_rate 1e-5``, ``--learning_rate=1e-5`` or
``learning_rate=1e-5``. Values are parsed as YAML scalars (``true``, ``null``, ``[a, b]``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml

from lampo.compat.aliases import ALIASES, FILE_NAMES, NO_MEANING

REWARD_TOKEN_ENV = "LAMPO_REWARD_TOKEN"
"""The environment variable that holds the reward server's token when the config does not."""


GSPO_CLIP = (3e-4, 4e-4)
"""GSPO's clip range of its sequence ratio (Zheng et al. 2025, section 5.1): a length-normalised
ratio moves far less than a token's, so the range is tiny."""


MAX_LEARNING_RATE = 1.0
"""Largest accepted learning rate (AdamW; see `LampoConfig.validate`)."""

MIN_TEMPERATURE = 1e-3
"""Smallest accepted sampling temperature (the logits are divided by it)."""


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and what to do."""


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The policy, value and reference models."""

    model_name_or_path: str = "build/tiny-model"
    """Policy: a Hugging Face hub id or a local directory with a causal LM (`lampo tiny-model` builds one)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to load; null uses `model_name_or_path`."""
    value_model: Literal["separate", "head"] = "separate"
    """Critic: a separate model with a scalar head (as OpenRLHF/open-instruct) or a value head on the policy trunk."""
    value_model_name_or_path: str | None = None
    """Where the separate value model's trunk comes from; null initialises it from the policy."""
    use_peft: bool = False
    """Train LoRA adapters (PEFT) instead of all weights; the reference is then the base with the adapter disabled."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout inside LoRA layers (0 keeps PPO's ratio exact: Ziegler et al. 2019 disable dropout)."""
    lora_target_modules: list[str] | None = None
    """Module names LoRA adapts; null means all linear projections of attention and MLP."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    bf16: bool = False
    """Mixed precision with bfloat16 autocast (fp32 master weights)."""
    fp16: bool = False
    """Mixed precision with float16 autocast and a loss scaler (GPU only; on a CPU use bf16)."""
    trust_remote_code: bool = False
    """Pass trust_remote_code to transformers when loading models."""
    attn_implementation: str | None = None
    """Attention kernels of the trained models (transformers' `attn_implementation`: sdpa, eager, ...); null: its default."""


@dataclass
class DataConfig:
    """Prompt datasets and how prompts are built."""

    query_dataset: str = "examples/data/multistep"
    """Prompts: a hub id, a `save_to_disk` directory, a directory of data files, or one jsonl/json/csv/parquet file."""
    dataset_train_split: str = "train"
    """Split used for training."""
    dataset_test_split: str = "test"
    """Split used for evaluation."""
    test_split_ratio: float = 0.1
    """Share of train rows carved out (with `seed`) as the test split when the dataset has none."""
    system_prompt: str | None = None
    """System message added when Lampo applies the chat template to plain-text cells."""
    max_prompt_len: int = 512
    """Longest prompt (tokens) given to the engine at any step."""
    train_task_config: str | None = None
    """A PaddleNLP task file (JSON list of data files, optional mixing weights) for the train split; replaces query_dataset's."""
    eval_task_config: str | None = None
    """A PaddleNLP task file for the test split (evaluation); replaces query_dataset's test split."""
    ptx_dataset: str | None = None
    """PPO-ptx's supervised data (prompt/response pairs, `messages` ending with the assistant, or PaddleNLP src/tgt), loaded like query_dataset; null: no ptx loss."""
    ptx_task_config: str | None = None
    """A PaddleNLP task file naming PPO-ptx's data files and mixing weights, instead of ptx_dataset."""
    truncation: Literal["error", "left", "skip"] = "error"
    """What to do with a prompt longer than `max_prompt_len`: stop with an error, cut from the left, or skip the row."""


@dataclass
class GenerationConfig:
    """Sampling and the inference engine (the rollout phase)."""

    engine: Literal["auto", "hf", "vllm"] = "auto"
    """Inference engine: vLLM when importable (`auto`), or force transformers (`hf`) or vLLM (`vllm`)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs for training use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables it)."""
    top_k: int = 0
    """Top-k sampling (0 disables it)."""
    repetition_penalty: float = 1.0
    """Repetition penalty (1.0 disables it)."""
    engine_logprobs: bool = True
    """Ask the engine for each sampled token's log-prob (logged as val/engine_logprob_diff, a weight-sync check)."""
    engine_logprob_tolerance: float = 0.1
    """Before the first step, warn when the engine's and the learner's log-probs of the first batch differ by more than this on average (a dtype, sampling-settings or weight-sync mismatch)."""
    max_new_tokens: int = 32
    """Most tokens generated per assistant turn."""
    min_new_tokens: int = 0
    """Fewest tokens generated per assistant turn before the stop token is allowed."""
    truncated_turn: Literal["continue", "end"] = "continue"
    """A turn cut at max_new_tokens: `continue` the conversation (the turn is closed with the end-of-turn token; the non-stop penalty still applies) or `end` it there."""
    stop_token: str | None = None
    """Stop string; null uses the tokenizer's end-of-turn token (`<|im_end|>` for ChatML, else eos)."""
    num_generations: int = 1
    """Samples per prompt (the group size of grpo/rloo/dr_grpo; 1 for PPO with a critic)."""
    vllm_kv_cache_gb: float = 1.0
    """vLLM KV cache size on CPU, in GiB (sets VLLM_CPU_KVCACHE_SPACE)."""
    vllm_gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (GPU only)."""
    vllm_max_model_len: int | None = None
    """vLLM context length; null uses max_prompt_len + max_new_tokens (every step's prompt, earlier turns included, fits max_prompt_len)."""
    vllm_enforce_eager: bool = False
    """Run vLLM's model eagerly; false (vLLM's default) compiles it at start: 10-25 s once, then a faster rollout."""


@dataclass
class RewardConfig:
    """The reward phase: where scores come from and how the client behaves."""

    reward_model: str = "http://localhost:8000"
    """Reward server URL, or a dotted class path (`my_reward_model.MyRewardModel`) run in-process."""
    reward_token: str | None = None
    """Bearer token for the reward server (also read from LAMPO_REWARD_TOKEN)."""
    reward_batch_size: int = 64
    """Conversations per HTTP request; chunks are sent concurrently and reassembled in order."""
    reward_timeout: float = 60.0
    """Seconds one reward request may take."""
    reward_deadline: float = 600.0
    """Seconds the whole reward phase of one step may take, retries included."""
    reward_max_retries: int = 8
    """Retries per request on connection errors, 5xx and 429, with exponential backoff and jitter."""
    reward_host: str = "127.0.0.1"
    """Address the reward server binds (anything but loopback needs a token)."""
    reward_port: int | None = None
    """Port the reward server listens on; null: the port of the `reward_model` URL (8000 when it names none)."""
    reward_max_batch_size: int = 64
    """Server: most conversations merged into one `compute` call by micro-batching."""
    reward_max_wait_ms: float = 5.0
    """Server: how long a request waits for others to join its micro-batch."""
    reward_max_request_bytes: int = 16 * 1024 * 1024
    """Server: largest request body accepted (413 above it)."""
    reward_model_config: dict[str, object] | None = None
    """Settings for the reward model's `__init__` (e.g. `keywords`); merged over the file's top-level keys."""

    def token(self) -> str | None:
        """The bearer token, for the server and its clients alike: `reward_token`, else LAMPO_REWARD_TOKEN."""
        return self.reward_token or os.environ.get(REWARD_TOKEN_ENV) or None


@dataclass
class OptimConfig:
    """The optimisation phase: estimator, losses, KL, optimiser."""

    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "dr_grpo"] = "gae"
    """Advantage estimator: `gae` (PPO with a critic), `grpo`, `rloo`, `reinforce_pp` (REINFORCE++), `reinforce_pp_baseline` (REINFORCE++ with a group baseline), `dr_grpo` (docs/algorithms.md)."""
    batch_size: int = 16
    """Prompts (dataset rows) per step and per process; each process trains on batch_size * num_generations conversations."""
    mini_batch_size: int = 16
    """Conversations per optimiser step (must divide batch_size * num_generations)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (must divide mini_batch_size)."""
    ppo_epochs: int = 1
    """Passes over the batch per step."""
    learning_rate: float = 1e-5
    """Policy learning rate."""
    critic_learning_rate: float | None = None
    """Value model learning rate; null uses `learning_rate`."""
    min_learning_rate: float = 0.0
    """Floor of the policy's schedule: linear and cosine decay end at this learning rate instead of 0."""
    critic_min_learning_rate: float | None = None
    """Floor of the critic's schedule; null: the same share of its learning rate as min_learning_rate is of learning_rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    critic_weight_decay: float | None = None
    """The critic's AdamW weight decay (value head or value model); null uses `weight_decay`."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate schedule over the run (after warm-up)."""
    critic_lr_scheduler_type: Literal["constant", "linear", "cosine"] | None = None
    """The critic's learning-rate schedule; null uses `lr_scheduler_type`."""
    warmup_ratio: float = 0.0
    """Share of the run's steps spent warming the learning rate up from 0."""
    critic_warmup_ratio: float | None = None
    """Share of the run's steps spent warming the critic's learning rate up from 0; null uses `warmup_ratio`."""
    forward_batch_size: int | None = None
    """Conversations per micro-batch of the no-grad forward phase (old and reference log-probs, values); null: the training micro-batch."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    kl_coef: float = 0.05
    """Beta: weight of the KL penalty to the reference model (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator (Schulman's k1, k2, k3) per token."""
    kl_in_reward: bool | None = None
    """Put the KL penalty in the reward (PPO) or in the loss (GRPO); null: reward for gae/reinforce_pp, loss otherwise."""
    adaptive_kl: bool = False
    """Adapt beta towards `kl_target` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL (summed over a response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    """The policy loss: PPO's clipped token ratio, GSPO's clipped sequence ratio (Zheng et al. 2025) or CISPO's clipped, stopped weight times log-prob (MiniMax-M1)."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon."""
    cliprange_low: float | None = None
    """Lower clip epsilon (ratio floor 1 - eps); null: `cliprange`, 3e-4 for gspo, and no floor for cispo (MiniMax-M1 sets none)."""
    cliprange_high: float | None = None
    """Upper clip epsilon (ratio ceiling 1 + eps; DAPO's clip-higher sets it above the lower one, e.g. 0.28); null: `cliprange`, or 4e-4 for gspo."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (Ye et al. 2020); null disables it."""
    cliprange_value: float = 0.2
    """Value clip around the old values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch before GAE."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch (PPO default)."""
    grpo_scale_std: bool = True
    """GRPO: divide group-centred scores by the group std (Dr. GRPO sets this off)."""
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = None
    """How token losses are averaged; null: token-mean, or seq-mean-token-sum-norm for dr_grpo."""
    non_stop_penalty: bool = True
    """Replace the score of a conversation that never produced the stop token by `penalty_reward_value`."""
    penalty_reward_value: float = -10.0
    """Score given to a conversation whose response never produced the stop token (non-stop penalty)."""
    overlong_buffer_len: int = 0
    """DAPO's overlong shaping: the last this many tokens before max_new_tokens cost a linearly growing penalty (0: off)."""
    overlong_penalty_factor: float = 1.0
    """The overlong penalty at max_new_tokens (it grows from 0 at the buffer's start)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose scores are all equal (no signal) and refill the batch from more prompts."""
    dynamic_sampling_max_rounds: int = 3
    """Extra rollout rounds a step may spend refilling; past them it trains the groups it has and says so."""
    rollout_correction: Literal["none", "tis", "mis", "seq_tis", "seq_mis"] = "none"
    """Correct the policy loss for the engine/learner probability gap: truncated (tis) or masked (mis) importance weights, per token or per sequence (docs/algorithms.md)."""
    rollout_correction_low: float = 0.5
    """Lower bound of pi_old / pi_engine for the masking corrections (mis, seq_mis)."""
    rollout_correction_high: float = 2.0
    """Upper bound of pi_old / pi_engine: the truncation of tis and seq_tis, the mask of mis and seq_mis."""
    ptx_coef: float = 0.05
    """PPO-ptx (InstructGPT): weight of the language-modelling loss on `ptx_dataset` added to every minibatch's loss."""
    ptx_batch_size: int | None = None
    """Supervised examples mixed into each minibatch; null: mini_batch_size."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient (skipped), or an update that left a weight non-finite (undone), before training stops with an error (exit code 4)."""


@dataclass
class TrainConfig:
    """The training loop: length, pipeline, logging, checkpoints."""

    output_dir: str = "runs/lampo"
    """Where checkpoints, metrics.jsonl, rollouts.jsonl, TensorBoard files and the final model go."""
    seed: int = 42
    """Seed for data order, sampling and initialisation."""
    total_episodes: int | None = None
    """Conversations (prompts x samples) to train on; null uses max_steps."""
    max_steps: int = 100
    """Training steps when total_episodes is null."""
    async_mode: bool = True
    """Generate batch k+1 with the pre-update weights while batch k is optimised (one step off-policy)."""
    logging_steps: int = 1
    """Write metrics every this many steps."""
    eval_steps: int = 0
    """Evaluate on the test split every this many steps (0: never)."""
    eval_batches: int = 1
    """Batches of the test split per evaluation."""
    eval_batch_size: int | None = None
    """Prompts per evaluation batch; null uses `batch_size`."""
    do_train: bool = True
    """Train; false evaluates the starting policy once (eval_batches batches of the test split) and exits."""
    log_samples_steps: int = 10
    """Write a few whole conversations to rollouts.jsonl every this many steps (0: never)."""
    save_step: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted once a new one is complete)."""
    resume_from_checkpoint: str | None = None
    """`auto` (the latest undamaged checkpoint in output_dir; with none, start from scratch, deleting the metrics and samples of the run that left none), a checkpoint path, or null."""
    overwrite_output_dir: bool = False
    """Let a fresh run (resume_from_checkpoint: null) start in an output_dir that holds another run: that run's metrics, samples, TensorBoard and W&B files, checkpoints and final model are deleted first. False: such a run is refused."""
    save_merged: bool = False
    """With use_peft, also save the merged full model at the end."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Trackers besides metrics.jsonl: any of tensorboard, wandb."""
    run_name: str | None = None
    """Name of the run in trackers; null derives one from output_dir."""
    early_stop: dict[str, float] | None = None
    """Stop when a logged metric reaches a threshold (value >= threshold), e.g. {"objective/scores": 0.9}."""
    progress: bool = True
    """Show the live progress bar."""
    push_to_hub: bool = False
    """Upload the final model to the Hugging Face hub (huggingface_hub; token from `hf auth login` or HF_TOKEN)."""
    hub_model_id: str | None = None
    """Hub repository `owner/name` (a bare `name` goes under the token's user); null: the run name."""
    hub_private: bool = True
    """Create the hub repository private (an existing repository keeps its visibility)."""
    hub_revision: str | None = None
    """Branch of the hub repository to push to (created from main when missing); null: main."""
    hub_push_checkpoints: bool = False
    """With push_to_hub, also upload every checkpoint, to `checkpoint-<step>/` in the repository."""


@dataclass
class SpeedConfig:
    """The speed wing (`lampo.speed`): what changes how long a step takes, never its result. The best
    settings depend on the machine; each is tested for equality with the plain path."""

    share_prefix: bool = True
    """With num_generations > 1: run each prompt once per group in the learner's passes (minibatches hold whole groups)."""
    onednn_linear: bool = True
    """On CPU, run the fp32 linear layers of the learner and the hf engine on oneDNN's kernels instead of MKL's (same products; faster on some CPUs)."""
    keep_freed_memory: bool = True
    """Keep freed memory in the process (glibc mallopt) so each step re-uses the last step's pages instead of faulting in fresh ones; process-wide, CPU."""
    vllm_block_size: int = 16
    """Tokens per vLLM KV-cache block (a multiple of 16); a prompt's samples share its KV in whole blocks only, so 16 shares more than vLLM's CPU default 128."""
    peak_flops: float | None = None
    """FLOP/s that perf/mfu is measured against (e.g. a GPU's data-sheet figure); null measures the matmul peak of the model's device once at start (LAMPO_PEAK_FLOPS also sets it)."""


@dataclass
class RayConfig:
    """`python -m lampo.ppo_ray`: rollout workers and a learner group as Ray actors (docs/ray.md); other entry points ignore it."""

    address: str | None = None
    """Ray cluster to join (`auto`: the one `ray start` made on this node); null starts a local cluster bound to loopback."""
    num_engines: int = 1
    """Rollout workers, each a Ray actor holding one vLLM (or hf) engine."""
    engine_tensor_parallel_size: int = 1
    """GPUs of each rollout worker's engine (vLLM tensor parallel); 1 on CPU."""
    num_learners: int = 1
    """Learner actors, one torch.distributed group (gloo on CPU, NCCL on GPU); each trains batch_size prompts a step."""
    learner_backend: Literal["ddp", "deepspeed"] = "ddp"
    """How the learner group shares the work: data parallel, or DeepSpeed ZeRO (deepspeed_config)."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON for learner_backend: deepspeed (null: ZeRO stage 2 with Lampo's optimiser settings)."""
    colocate: bool = False
    """Engine i runs in learner i's process, on its device, and loads its weights from memory (on GPU vLLM sleeps while it trains); needs max_staleness 0."""
    max_staleness: int = 1
    """Policy updates a batch may lag behind the update that trains it: 0 is on-policy, 1 rolls out the next batch while one trains."""
    chunks_per_engine: int = 2
    """Parts each engine's share of a batch goes out in; each part's conversations go to the reward model as soon as it is done."""
    weight_sync: Literal["auto", "object_store", "broadcast"] = "auto"
    """How new weights reach the rollout workers: broadcast from learner rank 0 (NCCL on GPUs, gloo on CPUs; needs max_staleness 0), Ray's object store, or auto: broadcast on GPUs where it applies, else the object store."""
    weight_sync_timeout: float = 600.0
    """Seconds an engine may take to load new weights before the run stops with an error naming it."""
    engine_max_restarts: int = 3
    """Times Ray restarts a rollout worker that died (it is then re-synced and its prompts re-queued)."""
    dashboard: bool = False
    """Start Ray's dashboard with a local cluster (off: it serves an unauthenticated API, see docs/ray.md)."""
    local_num_cpus: int | None = None
    """CPUs a local cluster declares (null: those this process may run on, and at least one per actor)."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "generation": GenerationConfig,
    "reward": RewardConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "speed": SpeedConfig,
    "ray": RayConfig,
}


@dataclass(init=False)
class LampoConfig:
    """The whole configuration: one section per phase. Read keys as `cfg.section.key`.

    Build it from flat keys, as in TRL (`LampoConfig(learning_rate=1e-5, batch_size=8)`), from a
    dict (`LampoConfig({"optim": {"kl_coef": 0.1}})`), or from YAML with `load_config`.
    Construction validates; errors name the key.
    """

    model: ModelConfig
    data: DataConfig
    generation: GenerationConfig
    reward: RewardConfig
    optim: OptimConfig
    train: TrainConfig
    speed: SpeedConfig
    ray: RayConfig

    def __init__(self, values: dict[str, Any] | None = None, **flat: Any) -> None:
        merged: dict[str, Any] = dict(values or {})
        merged.update(flat)
        given_as: dict[str, str] = {}  # Lampo key -> the alias it was written as (for error messages)
        merged = _resolve_aliases(merged, given_as)
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in merged.items():
            if key in SECTIONS:
                if isinstance(value, SECTIONS[key]):
                    value = dataclasses.asdict(value)
                if not isinstance(value, dict):
                    raise ConfigError(f"section '{key}' must be a mapping of keys, got {value!r}")
                for sub_key, sub_value in _resolve_aliases(value, given_as).items():
                    if _KEY_TO_SECTION.get(sub_key) != key:
                        _raise_unknown(sub_key, sub_value, section=key)
                    if sub_key in sections[key]:
                        _raise_twice(sub_key, given_as)
                    sections[key][sub_key] = sub_value
                continue
            owner = _KEY_TO_SECTION.get(key)
            if owner is None:
                _raise_unknown(key, value)
            if key in sections[owner]:
                _raise_twice(key, given_as)
            sections[owner][key] = value
        try:
            for name, section_cls in SECTIONS.items():
                kwargs = {k: _coerce(k, v, _FIELD_TYPES[k]) for k, v in sections[name].items()}
                setattr(self, name, section_cls(**kwargs))
            self.validate()
        except ConfigError as exc:
            raise _as_written(exc, given_as) from None
        self.explicit_keys: frozenset[str] = frozenset(k for keys in sections.values() for k in keys)
        """The keys set by the caller rather than left at their defaults (a copy by `replace` keeps them)."""

    # --- flat access, as TRL's PPOConfig (`config.model_name`, `config.batch_size`) -------------
    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: sections and derived values come first.
        key = ALIASES[name].key if name in ALIASES else name
        section = _KEY_TO_SECTION.get(key)
        if name.startswith("__") or section is None or section not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute or config key '{name}'")
        return getattr(self.__dict__[section], key)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in SECTIONS and (name in _KEY_TO_SECTION or name in ALIASES):
            # Setting a flat key here would bypass validation (and an alias would set nothing).
            key = ALIASES[name].key if name in ALIASES else name
            raise AttributeError(f"config key '{name}' cannot be assigned on the config: build a validated copy "
                                 f"with config.replace({key}=...)")
        super().__setattr__(name, value)

    # --- derived values (computed once, never set by users) --------------------------------
    @property
    def kl_in_reward(self) -> bool:
        """Derived: PPO puts KL in the reward; GRPO-family estimators put it in the loss (DeepSeekMath)."""
        if self.optim.kl_in_reward is not None:
            return self.optim.kl_in_reward
        return self.optim.estimator in ("gae", "reinforce_pp", "reinforce_pp_baseline")

    @property
    def loss_aggregation(self) -> str:
        """Derived: Dr. GRPO (Liu et al. 2025) uses a constant sum-norm, GSPO a mean over sequences; else token-mean."""
        if self.optim.loss_aggregation is not None:
            return self.optim.loss_aggregation
        if self.optim.estimator == "dr_grpo":
            return "seq-mean-token-sum-norm"
        return "seq-mean-token-mean" if self.optim.policy_loss == "gspo" else "token-mean"

    @property
    def clip_low(self) -> float | None:
        """Derived: the lower clip epsilon of the policy loss (None: no floor, CISPO's default)."""
        p = self.optim
        if p.cliprange_low is not None:
            return p.cliprange_low
        return {"ppo": p.cliprange, "gspo": GSPO_CLIP[0], "cispo": None}[p.policy_loss]

    @property
    def clip_high(self) -> float:
        """Derived: the upper clip epsilon of the policy loss (DAPO's clip-higher when above the lower one)."""
        p = self.optim
        if p.cliprange_high is not None:
            return p.cliprange_high
        return GSPO_CLIP[1] if p.policy_loss == "gspo" else p.cliprange

    @property
    def rollout_batch_size(self) -> int:
        """Derived: conversations per step = batch_size * num_generations."""
        return self.optim.batch_size * self.generation.num_generations

    @property
    def critic_learning_rate(self) -> float:
        """Derived: the critic's learning rate (defaults to the policy's)."""
        lr = self.optim.critic_learning_rate
        return self.optim.learning_rate if lr is None else lr

    @property
    def reward_server_port(self) -> int:
        """Derived: the reward server's port: `reward_port`, else the port of the `reward_model` URL, else 8000."""
        if self.reward.reward_port is not None:
            return self.reward.reward_port
        return _url_port(self.reward.reward_model) or 8000

    @property
    def uses_critic(self) -> bool:
        """Derived: only GAE needs a value model."""
        return self.optim.estimator == "gae"

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None, **flat: Any) -> LampoConfig:
        """Build from flat keys (`learning_rate`) and/or section dicts (`optim: {...}`), validated."""
        return cls(values, **flat)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every key (the form YAML files and checkpoints use)."""
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    def replace(self, **flat: Any) -> LampoConfig:
        """A validated copy with some flat keys changed (aliases accepted)."""
        values = self.to_dict()
        changed = _resolve_aliases(flat, {})
        values.update(changed)
        copy = LampoConfig.from_dict(values)
        copy.explicit_keys = self.explicit_keys | set(changed)
        return copy

    # --- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Range and consistency checks; every error names the key and the value."""
        m, d, g, r, p, t = self.model, self.data, self.generation, self.reward, self.optim, self.train
        self._check_finite()
        # AdamW moves each weight by about the learning rate per step whatever the gradient's scale
        # (the update is m / sqrt(v)): above 1 the first update wrecks a model's weights.
        _check(0 < p.learning_rate <= MAX_LEARNING_RATE, "learning_rate", p.learning_rate,
               f"must be > 0 and at most {MAX_LEARNING_RATE:g}: AdamW moves every weight by about the learning rate each "
               "step, so a larger one wrecks the model at the first update (typical: 1e-6 to 1e-3)")
        _check(p.critic_learning_rate is None or 0 < p.critic_learning_rate <= MAX_LEARNING_RATE,
               "critic_learning_rate", p.critic_learning_rate,
               f"must be > 0 and at most {MAX_LEARNING_RATE:g}, or null (AdamW: see learning_rate)")
        _check(0 < p.adam_eps <= 1, "adam_eps", p.adam_eps,
               "must be in (0, 1]: AdamW divides by sqrt(v) + adam_eps (typical: 1e-8)")
        for key in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            _check(getattr(p, key) >= 1, key, getattr(p, key), "must be >= 1")
        _check(g.num_generations >= 1, "num_generations", g.num_generations, "must be >= 1")
        rollout = self.rollout_batch_size
        _check(rollout % p.mini_batch_size == 0, "mini_batch_size", p.mini_batch_size,
               f"must divide batch_size * num_generations = {rollout}")
        _check(p.mini_batch_size % p.gradient_accumulation_steps == 0, "gradient_accumulation_steps",
               p.gradient_accumulation_steps, f"must divide mini_batch_size = {p.mini_batch_size}")
        if p.estimator in ("grpo", "rloo", "dr_grpo", "reinforce_pp_baseline"):
            _check(g.num_generations >= 2, "num_generations", g.num_generations,
                   f"must be >= 2 for estimator '{p.estimator}' (it compares samples of one prompt)")
        _check(p.kl_coef >= 0, "kl_coef", p.kl_coef, "must be >= 0")
        _check(p.kl_target > 0, "kl_target", p.kl_target, "must be > 0")
        _check(p.kl_horizon > 0, "kl_horizon", p.kl_horizon, "must be > 0")
        _check(0 < p.cliprange < 1, "cliprange", p.cliprange, "must be in (0, 1)")
        _check(p.cliprange_value > 0, "cliprange_value", p.cliprange_value, "must be > 0")
        _check(p.dual_clip is None or p.dual_clip > 1, "dual_clip", p.dual_clip, "must be > 1 or null")
        _check(p.cliprange_low is None or 0 < p.cliprange_low < 1, "cliprange_low", p.cliprange_low,
               "must be in (0, 1) or null")
        _check(p.cliprange_high is None or p.cliprange_high > 0, "cliprange_high", p.cliprange_high,
               "must be > 0 or null")
        _check(p.overlong_buffer_len >= 0, "overlong_buffer_len", p.overlong_buffer_len, "must be >= 0 (0: off)")
        _check(p.overlong_buffer_len <= g.max_new_tokens, "overlong_buffer_len", p.overlong_buffer_len,
               f"must be <= max_new_tokens = {g.max_new_tokens}")
        _check(p.overlong_penalty_factor >= 0, "overlong_penalty_factor", p.overlong_penalty_factor, "must be >= 0")
        _check(p.dynamic_sampling_max_rounds >= 0, "dynamic_sampling_max_rounds", p.dynamic_sampling_max_rounds,
               "must be >= 0")
        _check(not p.dynamic_sampling or g.num_generations >= 2, "dynamic_sampling", p.dynamic_sampling,
               "needs num_generations >= 2 (it drops groups whose samples all score the same)")
        _check(0 < p.rollout_correction_low < 1, "rollout_correction_low", p.rollout_correction_low,
               "must be in (0, 1)")
        _check(p.rollout_correction_high > 1, "rollout_correction_high", p.rollout_correction_high, "must be > 1")
        _check(p.rollout_correction == "none" or g.engine_logprobs, "rollout_correction", p.rollout_correction,
               "needs the engine's log-probs: set engine_logprobs: true")
        _check(p.ptx_coef >= 0, "ptx_coef", p.ptx_coef, "must be >= 0")
        _check(p.ptx_batch_size is None or p.ptx_batch_size >= 1, "ptx_batch_size", p.ptx_batch_size,
               "must be >= 1 or null")
        _check(p.vf_coef >= 0, "vf_coef", p.vf_coef, "must be >= 0")
        _check(0 <= p.gamma <= 1, "gamma", p.gamma, "must be in [0, 1]")
        _check(0 <= p.lam <= 1, "lam", p.lam, "must be in [0, 1]")
        _check(0 <= p.warmup_ratio < 1, "warmup_ratio", p.warmup_ratio, "must be in [0, 1)")
        _check(p.weight_decay >= 0, "weight_decay", p.weight_decay, "must be >= 0")
        _check(0 <= p.min_learning_rate <= p.learning_rate, "min_learning_rate", p.min_learning_rate,
               f"must be in [0, learning_rate = {p.learning_rate}]")
        _check(p.critic_min_learning_rate is None or 0 <= p.critic_min_learning_rate <= self.critic_learning_rate,
               "critic_min_learning_rate", p.critic_min_learning_rate,
               f"must be in [0, critic learning rate = {self.critic_learning_rate}] or null")
        _check(p.critic_warmup_ratio is None or 0 <= p.critic_warmup_ratio < 1, "critic_warmup_ratio",
               p.critic_warmup_ratio, "must be in [0, 1) or null")
        _check(p.critic_weight_decay is None or p.critic_weight_decay >= 0, "critic_weight_decay",
               p.critic_weight_decay, "must be >= 0 or null")
        _check(p.forward_batch_size is None or p.forward_batch_size >= 1, "forward_batch_size",
               p.forward_batch_size, "must be >= 1 or null")
        for key, lr in (("learning_rate", p.learning_rate), ("critic_learning_rate", self.critic_learning_rate)):
            # AdamW's decoupled decay multiplies each weight by 1 - lr * weight_decay every step
            _check(lr * p.weight_decay < 1, "weight_decay", p.weight_decay,
                   f"times {key} = {lr:g} must be < 1: AdamW multiplies every weight by 1 - lr * weight_decay "
                   "each step, which would zero or flip them")
        _check(p.max_grad_norm >= 0, "max_grad_norm", p.max_grad_norm, "must be >= 0 (0 disables)")
        _check(p.max_bad_steps >= 1, "max_bad_steps", p.max_bad_steps, "must be >= 1")
        _check(math.isfinite(p.penalty_reward_value), "penalty_reward_value", p.penalty_reward_value,
               "must be a finite number")
        _check(g.temperature >= MIN_TEMPERATURE, "temperature", g.temperature,
               f"must be >= {MIN_TEMPERATURE:g}: the logits are divided by it, and a smaller value overflows them "
               "(use 0.01 for near-greedy sampling)")
        _check(0 < g.top_p <= 1, "top_p", g.top_p, "must be in (0, 1]")
        _check(g.top_k >= 0, "top_k", g.top_k, "must be >= 0 (0 disables)")
        _check(g.repetition_penalty > 0, "repetition_penalty", g.repetition_penalty, "must be > 0")
        _check(g.max_new_tokens >= 1, "max_new_tokens", g.max_new_tokens, "must be >= 1")
        _check(g.engine_logprob_tolerance > 0, "engine_logprob_tolerance", g.engine_logprob_tolerance, "must be > 0")
        _check(0 <= g.min_new_tokens <= g.max_new_tokens, "min_new_tokens", g.min_new_tokens,
               f"must be in [0, max_new_tokens = {g.max_new_tokens}]")
        _check(g.vllm_kv_cache_gb > 0, "vllm_kv_cache_gb", g.vllm_kv_cache_gb, "must be > 0")
        _check(0 < g.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
               g.vllm_gpu_memory_utilization, "must be in (0, 1]")
        _check(self.speed.vllm_block_size >= 16 and self.speed.vllm_block_size % 16 == 0, "vllm_block_size",
               self.speed.vllm_block_size,
               "must be a positive multiple of 16 (vLLM's attention kernels work in blocks of 16)")
        _check(self.speed.peak_flops is None or self.speed.peak_flops > 0, "peak_flops", self.speed.peak_flops,
               "must be > 0 (FLOP/s) or null")
        _check(d.max_prompt_len >= 1, "max_prompt_len", d.max_prompt_len, "must be >= 1")
        _check(0 <= d.test_split_ratio < 1, "test_split_ratio", d.test_split_ratio, "must be in [0, 1)")
        _check(not (d.ptx_dataset and d.ptx_task_config), "ptx_task_config", d.ptx_task_config,
               f"names PPO-ptx's data, and so does ptx_dataset = {d.ptx_dataset!r}: keep one of the two")
        _check(m.lora_r >= 1, "lora_r", m.lora_r, "must be >= 1")
        _check(m.lora_alpha > 0, "lora_alpha", m.lora_alpha, "must be > 0")
        _check(0 <= m.lora_dropout < 1, "lora_dropout", m.lora_dropout, "must be in [0, 1)")
        _check(not (m.bf16 and m.fp16), "fp16", m.fp16, "bf16 and fp16 cannot both be true")
        _check(r.reward_batch_size >= 1, "reward_batch_size", r.reward_batch_size, "must be >= 1")
        _check(r.reward_timeout > 0, "reward_timeout", r.reward_timeout, "must be > 0")
        _check(r.reward_deadline >= r.reward_timeout, "reward_deadline", r.reward_deadline,
               f"must be >= reward_timeout = {r.reward_timeout}")
        _check(r.reward_max_retries >= 0, "reward_max_retries", r.reward_max_retries, "must be >= 0")
        _check(r.reward_port is None or 0 < r.reward_port < 65536, "reward_port", r.reward_port,
               "must be a TCP port (1-65535) or null")
        url_port = _url_port(r.reward_model)
        if r.reward_port is not None and url_port is not None and r.reward_port != url_port:
            # One config file serves the trainer (which calls reward_model) and the server (which
            # listens on reward_port): two different ports would never meet.
            raise ConfigError(
                f"config keys 'reward_port' = {r.reward_port} and 'reward_model' = {r.reward_model!r} disagree: "
                f"the server would listen on {r.reward_port} and the trainer call port {url_port}. Set the port "
                "in reward_model only (reward_port: null), or make the two equal"
            )
        _check(r.reward_max_batch_size >= 1, "reward_max_batch_size", r.reward_max_batch_size, "must be >= 1")
        _check(0 <= r.reward_max_wait_ms < r.reward_timeout * 1000, "reward_max_wait_ms", r.reward_max_wait_ms,
               f"must be >= 0 and below reward_timeout = {r.reward_timeout:g} s: a request alone on the server "
               "waits this long for company before it is scored, so a longer wait times every such request out")
        _check(r.reward_max_request_bytes >= 1024, "reward_max_request_bytes", r.reward_max_request_bytes,
               "must be >= 1024")
        _check(t.total_episodes is None or t.total_episodes >= 1, "total_episodes", t.total_episodes,
               "must be >= 1 or null")
        _check(t.max_steps >= 1, "max_steps", t.max_steps, "must be >= 1")
        for key in ("logging_steps",):
            _check(getattr(t, key) >= 1, key, getattr(t, key), "must be >= 1")
        for key in ("eval_steps", "log_samples_steps", "save_step"):
            _check(getattr(t, key) >= 0, key, getattr(t, key), "must be >= 0 (0 disables)")
        _check(t.eval_batches >= 1, "eval_batches", t.eval_batches, "must be >= 1")
        _check(t.eval_batch_size is None or t.eval_batch_size >= 1, "eval_batch_size", t.eval_batch_size,
               "must be >= 1 or null")
        _check(not (t.hub_model_id is not None and t.hub_model_id.count("/") > 1), "hub_model_id", t.hub_model_id,
               "must be `owner/name` or `name`")
        _check(t.save_total_limit is None or t.save_total_limit >= 1, "save_total_limit", t.save_total_limit,
               "must be >= 1 or null")
        self._validate_ray()
        self._check_early_stop()
        _check(not (t.overwrite_output_dir and t.resume_from_checkpoint), "overwrite_output_dir",
               t.overwrite_output_dir, f"deletes the checkpoints resume_from_checkpoint = {t.resume_from_checkpoint!r} "
               "would resume from; set only one of them")
        for tracker in t.report_to:
            _check(tracker in ("tensorboard", "wandb"), "report_to", t.report_to,
                   "may only contain 'tensorboard' and 'wandb'")

    def _check_finite(self) -> None:
        """Every float key is a finite number: `.inf` and `.nan` parse as YAML floats, and pass most
        range checks (inf > 0) while breaking what they feed (a NaN weight, a wait without end)."""
        for name in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                if isinstance(value, float):
                    _check(math.isfinite(value), key, value, "must be a finite number")
        for metric, threshold in (self.train.early_stop or {}).items():
            _check(math.isfinite(threshold), "early_stop", self.train.early_stop,
                   f"the threshold of '{metric}' must be a finite number")

    def _check_early_stop(self) -> None:
        """early_stop names metrics the trainer logs: a misspelt one would never stop the run."""
        from lampo.tracking import EVAL_PREFIX, METRIC_NAMES, is_known_metric

        for metric in self.train.early_stop or {}:
            if not is_known_metric(metric):
                close = difflib.get_close_matches(str(metric), METRIC_NAMES, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"config key 'early_stop' names metric '{metric}', which the trainer never logs{hint}; "
                    f"use a name from docs/metrics.md or one under '{EVAL_PREFIX}'"
                )

    @property
    def num_steps(self) -> int:
        """Derived: training steps of the run (from total_episodes when set, else max_steps), one process."""
        return self.steps_for(world=1)

    def _validate_ray(self) -> None:
        y = self.ray
        for key in ("num_engines", "engine_tensor_parallel_size", "num_learners", "chunks_per_engine"):
            _check(getattr(y, key) >= 1, key, getattr(y, key), "must be >= 1")
        _check(y.max_staleness >= 0, "max_staleness", y.max_staleness, "must be >= 0 (0: on-policy)")
        _check(y.weight_sync_timeout > 0, "weight_sync_timeout", y.weight_sync_timeout, "must be > 0 (seconds)")
        _check(y.engine_max_restarts >= 0, "engine_max_restarts", y.engine_max_restarts, "must be >= 0")
        _check(y.local_num_cpus is None or y.local_num_cpus >= 1, "local_num_cpus", y.local_num_cpus,
               "must be >= 1 or null")
        _check(y.deepspeed_config is None or y.learner_backend == "deepspeed", "deepspeed_config",
               y.deepspeed_config, "is read only with learner_backend: deepspeed")
        if y.weight_sync == "broadcast":
            _check(y.max_staleness == 0, "weight_sync", y.weight_sync, "sends each update while no rollout runs: set "
                   f"max_staleness: 0 (now {y.max_staleness}), or weight_sync: object_store for batches in flight")
        if y.colocate:
            _check(y.max_staleness == 0, "colocate", y.colocate, "shares the devices between rollout and training, "
                   "so they cannot overlap: set max_staleness: 0, or colocate: false")
            _check(y.num_engines == y.num_learners and y.engine_tensor_parallel_size == 1, "colocate", y.colocate,
                   f"places engine i with learner i: needs num_engines = num_learners (now {y.num_engines} and "
                   f"{y.num_learners}) and engine_tensor_parallel_size 1")
            _check(y.weight_sync == "auto", "weight_sync", y.weight_sync, "does not apply with colocate: true, where "
                   "engine i runs in learner i's process and loads its weights from memory: set weight_sync: auto, "
                   "or colocate: false")

    def steps_for(self, world: int) -> int:
        """Training steps with `world` data-parallel processes: total_episodes counts conversations
        over all of them, each rolling out its own batch."""
        if self.train.total_episodes is not None:
            return max(1, self.train.total_episodes // (self.rollout_batch_size * world))
        return self.train.max_steps


# Library-API name, in the style of the design documents (`from lampo import PPOConfig`):
# the whole tree, which also configures the GRPO-family estimators.
PPOConfig = LampoConfig


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML file gives one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the
    last value silently, so an edit lower in a long file would quietly override one above it."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys given here override it
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(
                            f"key '{key}' is given twice, on line {seen[key]} and on line {line}; keep one of them"
                        )
                    seen[key] = line
                except TypeError:  # an unhashable key: construct_mapping's own error says so
                    break
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a raw dict (keys not yet checked); errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except DuplicateKeyError as exc:
        raise ConfigError(f"config file '{path}': {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of keys to values")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LampoConfig:
    """Read a YAML file (optional) and apply command-line overrides; validated."""
    values: dict[str, Any] = read_yaml(path) if path is not None else {}
    values.update(parse_overrides(overrides or []))
    return LampoConfig.from_dict(values)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value` and `key=value` into a dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"override '{arg}' has no value; write '{arg} VALUE' or '{arg}=VALUE'")
                key, raw = body, args[i + 1]
                i += 1
            key = key.replace("-", "_")  # --use-peft == --use_peft; the value is kept as written
        elif "=" in arg:
            key, raw = arg.split("=", 1)
        else:
            raise ConfigError(f"cannot read override '{arg}': write --key value, --key=value or key=value")
        out[key] = _parse_scalar(raw)
        i += 1
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------------------------------
# Type checking and helpful errors
# ---------------------------------------------------------------------------------------


def _field_types() -> tuple[dict[str, str], dict[str, Any]]:
    owner: dict[str, str] = {}
    types_: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise RuntimeError(f"config key '{f.name}' defined in two sections")
            owner[f.name] = name
            types_[f.name] = hints[f.name]
    return owner, types_


_KEY_TO_SECTION, _FIELD_TYPES = _field_types()


def _raise_unknown(key: str, value: Any, section: str | None = None) -> typing.NoReturn:
    where = f" in section '{section}'" if section else ""
    if key in FILE_NAMES:  # a PaddleNLP argument file's name, outside an argument file
        raise ConfigError(f"unknown config key '{key}' (value {value!r}){where}: it is PaddleNLP's name for "
                          f"'{FILE_NAMES[key][0]}', read in PaddleNLP argument files (.json) only; write "
                          f"'{FILE_NAMES[key][0]}'")
    if key in NO_MEANING:
        raise ConfigError(f"unknown config key '{key}' (value {value!r}){where}: a PaddleNLP setting with no "
                          f"effect in Lampo ({NO_MEANING[key]}); remove it")
    # Other libraries' names are searched too, so a misspelt `max_dec_len` points at max_new_tokens.
    candidates = list(_KEY_TO_SECTION) + list(SECTIONS) + list(ALIASES) + list(FILE_NAMES)
    close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.5)
    if close and close[0] in FILE_NAMES:
        hint = f"; did you mean '{FILE_NAMES[close[0]][0]}' (PaddleNLP's '{close[0]}')?"
    elif close and close[0] in ALIASES:
        alias = ALIASES[close[0]]
        hint = f"; did you mean '{alias.key}' ({alias.source.split(',')[0]}'s '{close[0]}')?"
    elif close:
        hint = f"; did you mean '{close[0]}'?"
    else:
        hint = "; see docs/config.md for every key"
    raise ConfigError(f"unknown config key '{key}' (value {value!r}){where}{hint}")


def _raise_twice(key: str, given_as: dict[str, str]) -> typing.NoReturn:
    """A key given both flat and in its section (one of them perhaps under another library's name)."""
    alias = given_as.get(key)
    if alias:
        raise ConfigError(f"config keys '{alias}' and '{key}' both set '{key}' (one flat, one in its section); keep one")
    raise ConfigError(f"config key '{key}' is set twice (flat and in its section); keep one")


def _resolve_aliases(values: dict[str, Any], given_as: dict[str, str]) -> dict[str, Any]:
    """`values` with other libraries' key names (lampo.compat.aliases) replaced by Lampo's;
    `given_as` records which Lampo key came from which alias."""
    out: dict[str, Any] = {}
    written: dict[str, str] = {}  # Lampo key -> the name it was written as here
    for name, value in values.items():
        alias = ALIASES.get(name)
        key = alias.key if alias else name
        if key in out:
            raise ConfigError(f"config keys '{written[key]}' and '{name}' both set '{key}'; keep one")
        out[key] = alias.convert(value) if alias and alias.convert else value
        written[key] = name
        if alias:
            given_as[key] = name
    return out


def _as_written(exc: ConfigError, given_as: dict[str, str]) -> ConfigError:
    """The error naming keys as the user wrote them: `'init_kl_coef' (Lampo's 'kl_coef')`."""
    message = str(exc)
    for key, alias in given_as.items():
        message = message.replace(f"config key '{key}'", f"config key '{alias}' (Lampo's '{key}')")
    return ConfigError(message)


def _url_port(url: str) -> int | None:
    """The port a `reward_model` URL names (None for a class path or a URL without a port)."""
    if "://" not in url:
        return None
    try:
        return urlparse(url).port
    except ValueError:  # a port out of range: reported by the check of the URL's user, the client
        return None


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {rule}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, '1e-5' strings too."""
    ok, converted = _match(value, tp)
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected {_type_name(tp)}")
    return converted


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _match(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp,) = typing.get_args(tp)
        items = [_match(v, item_tp) for v in value]
        return all(ok for ok, _ in items), [conv for _, conv in items]
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        k_tp, v_tp = typing.get_args(tp)
        pairs = [(_match(k, k_tp), _match(v, v_tp)) for k, v in value.items()]
        ok = all(a[0] and b[0] for a, b in pairs)
        return ok, {a[1]: b[1] for a, b in pairs}
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return tp.__name__


# ---------------------------------------------------------------------------------------
# Documentation generated from the docstrings
# ---------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from the source with ast)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def render_docs() -> str:
    """Markdown reference of every key, generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m lampo.config --docs > docs/config.md`; do not edit by hand. -->",
        "",
        "Keys are flat in YAML files and on the command line (`--learning_rate 1e-5`, "
        "`--learning_rate=1e-5` or `learning_rate=1e-5`). They may also be grouped under their "
        "section name (`optim: {kl_coef: 0.05}`). An unknown key, a wrong type or an out-of-range "
        "value stops the run with an error that names the key.",
        "",
    ]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        defaults = cls()
        lines += [f"## `{name}`: {inspect.getdoc(cls)}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            tp = _type_name(_FIELD_TYPES[f.name]).replace("|", "\\|")
            lines.append(f"| `{f.name}` | {tp} | `{default!r}` | {docs.get(f.name, '')} |")
        lines.append("")
    lines += ["## Other libraries' names", "",
              "Accepted wherever a key is (Python, YAML, command line) and mapped onto Lampo's key at "
              "construction; errors name the key as written. PaddleNLP argument files accept more "
              "(docs/compat.md).", "", "| name | Lampo key | from | note |", "|---|---|---|---|"]
    for name, alias in ALIASES.items():
        lines.append(f"| `{name}` | `{alias.key}` | {alias.source} | {alias.meaning} |")
    lines.append("")
    lines += ["## Derived values", "", "Computed once from the keys above; not settable.", ""]
    for attr, value in vars(LampoConfig).items():
        if isinstance(value, property) and value.__doc__:
            lines.append(f"- `{attr}`: {value.__doc__.removeprefix('Derived: ')}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--docs"]:
        sys.stdout.write(render_docs())
        return 0
    if argv[:1] == ["--config"] and len(argv) >= 2:
        cfg = load_config(argv[1], argv[2:])
    else:
        cfg = load_config(None, argv)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
