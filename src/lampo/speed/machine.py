"""Machine settings: this machine's matmul peak (what MFU is measured against) and the process's
allocator. Both are process-wide and machine-specific; the application applies them once at
start (`lampo.speed.apply_machine_settings`), switched by the `speed` config section.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time

import torch

from lampo.speed import onednn_linear


def onednn_linear_available() -> bool:
    """Whether torch has oneDNN's prepacked linear (the kernels torch.compile's CPU backend uses)."""
    return onednn_linear.available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def measure_peak(dtype: torch.dtype = torch.float32, kind: str = "matmul", n: int = 2048, repeats: int = 5,
                 device: torch.device | str = "cpu") -> float:
    """Measured matmul rate in FLOP/s on `device`: the median of `repeats` timed n x n x n products.

    kind: "matmul" (torch.matmul, the default kernels), "onednn" (oneDNN's linear with a
    prepacked weight, CPU only), or "best" (the larger of the available ones).
    Each product costs 2 n^3 FLOPs. One untimed warm-up run precedes the timed ones. On a GPU
    the device is synchronised around each product, so the time is the kernel's, not its launch's.
    """
    device = torch.device(device)
    if kind == "best":
        rates = [measure_peak(dtype, "matmul", n, repeats, device)]
        if device.type == "cpu" and onednn_linear_available():
            rates.append(measure_peak(dtype, "onednn", n, repeats, device))
        return max(rates)
    if kind not in ("matmul", "onednn"):
        raise ValueError(f"kind must be 'matmul', 'onednn' or 'best', got {kind!r}")
    if kind == "onednn" and device.type != "cpu":
        raise ValueError(f"kind 'onednn' runs on the CPU only, not on {device}; use kind='matmul'")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


_PEAK_CACHE: dict[tuple, float] = {}


def machine_peak(dtype: torch.dtype = torch.float32, kind: str = "best", device: torch.device | str = "cpu") -> float:
    """`measure_peak` on `device` (the one that holds the model), measured once per process and cached.

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
    device = torch.device(device)
    key = (dtype, kind, torch.get_num_threads(), str(device))
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = measure_peak(dtype, kind, repeats=3, device=device)
    return _PEAK_CACHE[key]


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap, not a fresh mmap: glibc's largest allowed value (32 MiB)."""
TRIM_THRESHOLD = 1 << 30
"""The heap's free top is returned to the system only above this (1 GiB): one step's activations stay."""


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Make glibc's malloc keep freed memory in the process; returns whether it applied.

    By default glibc serves large blocks with mmap and unmaps them on free (the threshold adapts,
    up to 32 MiB) and trims the heap's free top, so every training step touches its activations'
    pages afresh: each 4 KiB page costs a fault and a zeroing. With these thresholds a step
    re-uses the previous step's pages (docs/performance-log.md). tcmalloc or jemalloc preloaded with
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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, under taskset or a container's cpuset), not
    the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share_cores(sharing: int) -> None:
    """Give torch this process's (or thread's: torch's intra-op thread count belongs to the calling
    thread) share of the cores it may run on, when `sharing` processes or threads compute on them
    at once. A Ray actor starts with one thread per CPU it reserved (Ray sets
    OMP_NUM_THREADS): a rollout worker or learner that runs while the other waits would leave the
    rest of the machine idle. More threads than cores, across processes that compute together,
    is far worse: OpenMP's threads spin while they wait for each other."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, usable_cpus() // max(1, sharing)))


def coordinate_only() -> None:
    """One torch thread for a process that only coordinates others (the Ray driver) and does little
    tensor work of its own. With a pool of OpenMP threads, libgomp's workers spin on for a while
    after every parallel op (their wait policy): on the cores of the process that computes next."""
    torch.set_num_threads(1)
