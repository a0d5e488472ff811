"""Reward server throughput and latency: conversations/s and p50/p99 latency per request.

For each reward model (a trivial rule model and the MiniLM embedding model) and each server
mode (micro-batching on: max_batch_size 64, max_wait_ms 5; off: max_batch_size 1), start a real
`python -m lampo.reward_server` process, then run 1, 16 and 64 concurrent clients for a fixed
time. Each client sends one conversation per request through Lampo's own `RewardClient`, the
case micro-batching is for (many small concurrent requests).

    .venv/bin/python -m benchmarks.reward_server            # about 2 minutes
    .venv/bin/python -m benchmarks.reward_server --duration 2 --models trivial

Writes benchmarks/results/reward_server.json. Clients and server share the machine's
cores, so absolute numbers understate a server on its own host; compare rows with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import free_port, publish, table
from lampo.reward.client import RewardClient, wait_until_healthy

MODELS = {
    "trivial": ("lampo.reward.rules.VowelReward", {}),
    "embedding": ("lampo.reward.embedding.EmbeddingSimilarityReward",
                  {"embedding_reference": "A short, friendly answer that explains the idea clearly."}),
}
MODES = {"batched": (64, 5.0), "unbatched": (1, 0.0)}
TOPICS = ["cats", "rivers", "prime numbers", "bread", "the moon", "chess", "rain", "music"]


def conversation(i: int) -> list[str]:
    topic = TOPICS[i % len(TOPICS)]
    return [f"Tell me something about {topic} (#{i}).",
            f"Here is fact number {i} about {topic}: it is more interesting than it first looks, "
            "and people have written about it for a very long time."]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to show who was busy."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model: str, model_cfg: dict, max_batch: int, max_wait: float, folder: Path):
    port = free_port()
    cfg = folder / f"cfg-{port}.yaml"
    cfg.write_text(json.dumps({"reward_model_config": model_cfg}))
    log = open(folder / f"server-{port}.log", "w")
    # One torch thread: the load-generating clients share the same cores, and oversubscribed
    # OpenMP threads slow the embedding model several times over (docs/reward-server.md).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lampo.reward_server", "--model", model, "--config", str(cfg), "--port", str(port),
         "--max-batch-size", str(max_batch), "--max-wait-ms", str(max_wait), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout=120, log_path=folder / f"server-{port}.log")
    except TimeoutError:
        proc.kill()
        raise
    return proc, url, log


async def load(url: str, clients: int, duration: float, warmup: float) -> dict:
    latencies: list[float] = []
    counter = iter(range(10**9))
    # Each client has its own connection, as separate trainer processes or tools would; clients
    # are built before the clock starts (an httpx client costs milliseconds to create).
    pool = [RewardClient(url=url, batch_size=1, timeout=60, deadline=120, max_retries=0) for _ in range(clients)]
    stop_at = time.monotonic() + warmup + duration
    measure_from = time.monotonic() + warmup

    async def one_client(client: RewardClient) -> None:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            await client.score([conversation(next(counter))])
            t1 = time.monotonic()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    try:
        await asyncio.gather(*(one_client(c) for c in pool))
    finally:
        for c in pool:
            await c.aclose()
    latencies.sort()
    n = len(latencies)
    return {
        "conversations_per_s": n / duration,
        "p50_ms": 1000 * statistics.median(latencies) if n else float("nan"),
        "p99_ms": 1000 * latencies[min(n - 1, int(0.99 * n))] if n else float("nan"),
        "requests": n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64])
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            model, model_cfg = MODELS[model_name]
            for mode, (max_batch, max_wait) in MODES.items():
                proc, url, log = start_server(model, model_cfg, max_batch, max_wait, Path(tmp))
                try:
                    for clients in args.clients:
                        server_cpu, client_cpu = cpu_seconds(proc.pid), time.process_time()
                        result = asyncio.run(load(url, clients, args.duration, args.warmup))
                        result["server_cpu_s"] = round(cpu_seconds(proc.pid) - server_cpu, 2)
                        result["client_cpu_s"] = round(time.process_time() - client_cpu, 2)
                        row = {"model": model_name, "micro_batching": mode, "clients": clients, **result}
                        rows.append(row)
                        print(f"{model_name:10s} {mode:10s} clients={clients:3d}  "
                              f"{result['conversations_per_s']:8.1f} conv/s  p50 {result['p50_ms']:8.1f} ms  "
                              f"p99 {result['p99_ms']:8.1f} ms  cpu server {result['server_cpu_s']:.1f} s "
                              f"client {result['client_cpu_s']:.1f} s", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
                    log.close()

    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "note": "clients and server share the same cores (server with OMP_NUM_THREADS=1); one conversation "
                "per request; other jobs were running on the machine",
        "load_average": os.getloadavg()[0],
        "duration_s": args.duration,
        "server_modes": {k: {"max_batch_size": v[0], "max_wait_ms": v[1]} for k, v in MODES.items()},
    }
    return publish("reward_server", {"meta": meta, "rows": rows}, render)


def render(data: dict) -> str:
    meta = data["meta"]
    rows = [[r["model"], r["micro_batching"], r["clients"], f"{r['conversations_per_s']:.1f}", f"{r['p50_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['server_cpu_s']:.1f}", f"{r['client_cpu_s']:.1f}"] for r in data["rows"]]
    return "\n".join([
        f"`benchmarks/reward_server.py`, {meta['date']}, {meta['machine']}. {meta['note']}; "
        f"{meta['duration_s']:g} s measured per row. Micro-batching on: max_batch_size 64, max_wait_ms 5; "
        f"off: max_batch_size 1. Load average (1 min) at the end: {meta['load_average']:.1f}.",
        "",
        "Server and client CPU are the seconds each process spent busy during the measured row plus "
        "warm-up: where the client side (httpx) burns more than the server, the load generator, not the "
        "server, is the limit.",
        "",
        table(["model", "micro-batching", "clients", "conversations/s", "p50 latency (ms)", "p99 latency (ms)",
               "server CPU (s)", "client CPU (s)"], rows),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
