"""Launchers and gradient wiring beside the single-process path.

- `strategy.py`: the one seam the learner calls for backward, accumulation, clipping, the
  optimiser step, optimiser state and whole weights; `Strategy` itself is the single-process path.
- `ddp.py`: data parallel through accelerate (DDP).
- `launch.py`: picks one of them from the environment `accelerate launch` or `torchrun` sets.

Nothing here is imported by a single-process run except `strategy.py` and `launch.py`, which
need only torch: accelerate is imported by `launch.py` when a run has more than one process.
"""
