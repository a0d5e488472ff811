"""The speed wing: what changes how long a step takes, never what it computes.

- `passes`: the learner's one seam (plain, shared-prefix and packed passes; the fused old
  log-probs; the minibatch order that keeps groups together);
- `shared_prefix`: each group's prompt once, every answer on its KV cache;
- `onednn_linear`: fp32 linear layers on oneDNN's CPU kernels;
- `cost`: the cost model (FLOPs per phase), which `lampo.perf` turns into MFU;
- `machine`: the matmul peak and the allocator setting;
- `vllm_cpu`: vLLM-on-CPU adjustments, applied at engine start.

Every switch is in the `speed` config section and is machine-specific; each is tested for
equality with the plain path (tests/unit/test_perf_learner.py, test_onednn_linear.py).
"""

from __future__ import annotations

from typing import Any


def apply_machine_settings(speed_cfg: Any) -> None:
    """The application's process-wide settings, once, before the models load (`Trainer`)."""
    if speed_cfg.keep_freed_memory:
        from lampo.speed.machine import keep_freed_memory

        keep_freed_memory()  # before the models: every later allocation is kept for re-use
