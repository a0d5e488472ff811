"""vLLM-on-CPU adjustments, applied once in the process, at engine start (`VLLMEngine`)."""

from __future__ import annotations

from typing import Any


def allow_kv_blocks_of_16() -> None:
    """Let vLLM's CPU attention backend accept KV-cache blocks of 16 tokens.

    A prompt's n samples share its cached KV in whole blocks only (vLLM's prefix caching), so with
    CPU vLLM's default of 128 tokens a shorter prompt is prefilled once per sample, with 16 once
    (`vllm_block_size`). vLLM 0.32's CPU backend has a kernel for blocks of 16 (`_get_attn_isa`
    picks "vec16" when the block size is not a multiple of 32), but its declared kernel sizes list
    only multiples of 32, so `block_size=16` is refused at start ("No common block size"). This
    adds 16 to that list for this process. Parity with transformers at block 16 is tested in
    tests/integration/test_engines_vllm.py. A vLLM without that module is left as it is: it
    accepts 16 or says so at start, and `vllm_block_size: 128` is its CPU default.
    """
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return

    declared = CPUAttentionBackend.get_supported_kernel_block_sizes
    if 16 in declared():  # already added, or a vLLM that declares it
        return

    def with_16(kv_cache_spec: Any = None) -> list:
        return [*declared(kv_cache_spec), 16]

    CPUAttentionBackend.get_supported_kernel_block_sizes = staticmethod(with_16)  # type: ignore[method-assign]
