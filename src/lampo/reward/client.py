"""Async HTTP client of the reward server (protocol: docs/reward-server.md).

1. Split the batch into chunks of `reward_batch_size` conversations, sent concurrently.
2. Each chunk: per-request timeout; retry with exponential backoff and full jitter on connection
   errors, timeouts, 5xx and 429 (honouring `Retry-After`, unless it reaches past the deadline:
   then the call fails at once, saying so); any other 4xx, and any error the
   server marks `Lampo-Retryable: false`, is raised at once.
3. Check every reply (count, finite numbers, per-turn lengths) and reassemble in order.
4. The whole call has a deadline. A final failure raises `RewardError`, never a score of 0.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

from lampo.reward_model import Score, check_scores

RETRYABLE_HEADER = "Lampo-Retryable"
"""Response header of the reward protocol: `false` marks an error that the same request would get again."""


class RewardError(RuntimeError):
    """Scores could not be obtained; the message says what the server answered and how to start it."""


class RewardCancelled(RewardError):
    """The scorer's cancel() was called (the run is stopping): scores were not obtained."""


class RewardUnavailable(RewardError):
    """No reward server answers at the configured URL."""


def wait_until_healthy(url: str, proc=None, timeout: float = 60.0, headers: dict | None = None,
                       log_path=None, poll: float = 0.1) -> None:
    """Block until the reward server at `url` answers /health with 200.

    For code that starts a server itself (the demo, benchmarks, tests): `proc` is its
    `subprocess.Popen`, whose early exit raises at once; `log_path` is named in the errors.
    Raises RuntimeError (the process exited) or TimeoutError (no 200 within `timeout` seconds).
    """
    see = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the reward server exited with code {proc.returncode}{see}")
        try:
            if httpx.get(f"{url}/health", timeout=1, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    raise TimeoutError(f"the reward server at {url} did not answer /health with 200 within {timeout:g} s{see}")


def start_hint(url: str) -> str:
    port = urlparse(url).port or 8000
    return (
        "start the reward server with: python -m lampo.reward_server --model my_reward_model.MyRewardModel "
        f"--config <config.yaml> --port {port}   (see docs/reward-server.md)"
    )


MAX_CONNECTIONS = 64
"""Concurrent connections to the reward server: a step's chunks (`reward_batch_size` conversations
each) go in parallel up to this many; more queue in the client rather than open more sockets."""


@dataclass
class ClientStats:
    """Counters since the last reset: retried attempts, and attempts that failed (any reason)."""

    retries: int = 0
    failed_requests: int = 0


@dataclass
class RewardClient:
    """Scores conversations through a reward server. Use inside one event loop (`async with`)."""

    # No defaults here: the trainer's come from RewardConfig (one place for each default).
    url: str
    batch_size: int
    timeout: float
    deadline: float
    max_retries: int
    token: str | None = None
    backoff_base: float = 0.5
    """First retry waits up to this many seconds (full jitter); doubles each retry."""
    backoff_max: float = 10.0
    """Cap of one backoff wait."""
    stats: ClientStats = field(default_factory=ClientStats)
    transport: httpx.AsyncBaseTransport | None = None
    """Optional httpx transport (tests use httpx.MockTransport)."""

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
        self._http = httpx.AsyncClient(headers=headers, timeout=self.timeout, limits=limits, transport=self.transport)

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self, timeout: float = 3.0) -> httpx.Response:
        return await self._http.get(f"{self.url}/health", timeout=timeout)

    async def score(self, messages: list[list[str]]) -> list[Score]:
        """Scores in the order of `messages`; raises RewardError on final failure."""
        if not messages:
            return []
        chunks = [messages[i : i + self.batch_size] for i in range(0, len(messages), self.batch_size)]
        deadline_at = asyncio.get_running_loop().time() + self.deadline
        try:
            async with asyncio.timeout_at(deadline_at):
                results = await self._gather(chunks, deadline_at)
        except TimeoutError:
            self.stats.failed_requests += 1
            raise RewardError(
                f"reward phase exceeded reward_deadline = {self.deadline:g} s for {len(messages)} conversations "
                f"at {self.url}/compute; the server is too slow or unreachable; {start_hint(self.url)}"
            ) from None
        return [s for chunk_scores in results for s in chunk_scores]

    async def _gather(self, chunks: list[list[list[str]]], deadline_at: float) -> list[list[Score]]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._score_chunk(c, i, deadline_at)) for i, c in enumerate(chunks)]
        except BaseExceptionGroup as group_error:
            # One chunk failed for good and the others were cancelled: report the first reason.
            first = next((e for e in group_error.exceptions if isinstance(e, RewardError)), None)
            if first is None:
                raise
            raise first from None
        return [task.result() for task in tasks]

    async def _score_chunk(self, chunk: list[list[str]], index: int, deadline_at: float) -> list[Score]:
        body = {"messages": chunk}
        attempt = 0
        while True:
            try:
                response = await self._http.post(f"{self.url}/compute", json=body)
            except httpx.TimeoutException as exc:
                problem = f"no answer within reward_timeout = {self.timeout:g} s ({type(exc).__name__})"
                wait = None
            except httpx.TransportError as exc:
                problem = f"cannot connect ({type(exc).__name__}: {exc or 'connection failed'})"
                wait = None
            else:
                if response.status_code == 200:
                    return self._check(response, chunk, index)
                answer = _error_text(response)
                problem = f"HTTP {response.status_code}: {answer}"
                if response.status_code != 429 and response.status_code < 500:
                    self.stats.failed_requests += 1
                    # Not retried: the same request would get the same answer.
                    raise RewardError(
                        f"reward server at {self.url}/compute refused chunk {index} "
                        f"({len(chunk)} conversations): {problem}"
                    )
                if response.headers.get(RETRYABLE_HEADER, "").strip().lower() == "false":
                    self.stats.failed_requests += 1
                    raise RewardError(
                        f"reward server at {self.url}/compute could not score chunk {index} ({len(chunk)} "
                        f"conversations): {problem}; not retried: the server answered {RETRYABLE_HEADER}: false "
                        "(the same request would fail the same way)"
                    )
                wait = _retry_after(response)
            self.stats.failed_requests += 1
            if attempt >= self.max_retries:
                raise RewardError(
                    f"reward request for chunk {index} ({len(chunk)} conversations) to {self.url}/compute "
                    f"failed after {attempt + 1} attempts (reward_max_retries = {self.max_retries}); last "
                    f"answer: {problem}; {start_hint(self.url)}"
                )
            left = deadline_at - asyncio.get_running_loop().time()
            if wait is not None and wait >= left:
                # Waiting as asked could not lead to another attempt before the deadline.
                raise RewardError(
                    f"reward server at {self.url}/compute asked to wait {wait:g} s before retrying chunk {index} "
                    f"(Retry-After), more than the {max(left, 0):.1f} s left of reward_deadline = "
                    f"{self.deadline:g} s; last answer: {problem}. Raise reward_deadline if the server needs that long"
                )
            if wait is None:
                # Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
                # And Jitter"): spreads the retries of concurrent chunks apart.
                wait = random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(wait)

    def _check(self, response: httpx.Response, chunk: list[list[str]], index: int) -> list[Score]:
        try:
            scores = response.json()["scores"]
            return check_scores(scores, chunk, source=f"reward server at {self.url}")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
            self.stats.failed_requests += 1
            raise RewardError(
                f"reward server at {self.url}/compute sent an invalid reply for chunk {index} "
                f"({len(chunk)} conversations): {exc}; reply began {response.text[:200]!r}"
            ) from None


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        if isinstance(data, dict) and "error" in data:
            return str(data["error"])
    except (json.JSONDecodeError, ValueError):
        pass
    return response.text[:500] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP date, RFC 9110 10.2.3)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def describe_health(response: httpx.Response) -> dict[str, Any]:
    try:
        return response.json()
    except ValueError:
        return {"error": response.text[:200]}
