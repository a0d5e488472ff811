"""Launchers and gradient wiring beside the single-process path.

- `strategy.py`: the one seam the learner calls for backward, accumulation, clipping, the
  optimiser step, optimiser state and whole weights; `Strategy` itself is the single-process path.
- `ddp.py`: data parallel through accelerate (DDP); `deepspeed_zero.py`: DeepSpeed ZeRO stages 1-3.
- `launch.py`: picks one of them from the environment `accelerate launch` or `torchrun` sets.

Nothing here is imported by a single-process run except `strategy.py` and `launch.py`, which
need only torch: accelerate and DeepSpeed are imported by `launch.py` when a run has more than
one process.
"""
