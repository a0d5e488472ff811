"""The trainer's one entry point to rewards: `make_scorer(reward_cfg, model_config)`.

`reward_model` in the config is either a URL (the reward server; scored with the async HTTP
client) or a dotted class path (`my_reward_model.MyRewardModel`; the same template run in this
process, no server). Both give a synchronous `score()` callable from any thread: each scorer owns
an event loop in a daemon thread and runs its coroutines there.

`cancel()` may be called from any thread or a signal handler: a `score()` in flight and every
later one raise `RewardCancelled` within `POLL_S`, so a stop request never waits out the
retries of `reward_deadline`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import httpx

from lampo.config import RewardConfig
from lampo.reward.client import (
    RewardCancelled,
    RewardClient,
    RewardError,
    RewardUnavailable,
    describe_health,
    start_hint,
)
from lampo.reward.loading import RewardModelLoadError, build_model, import_model_class, model_config_from
from lampo.reward_model import RewardModelTemplate, Score, check_scores, run_compute

logger = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.05
"""How often a waiting score() checks for cancel(): a stop request ends it within this."""
LOOP_GRACE_S = 1.0
"""In-process: how long past its timeout a compute may take before its event loop counts as blocked
(the timeout on the loop reports first whenever the loop runs)."""


class Scorer(Protocol):
    """What the trainer calls; both scorers below implement it."""

    verifiable: bool

    def score(self, messages: list[list[str]]) -> list[Score]: ...
    def cancel(self, reason: str) -> None: ...
    def check_available(self) -> None: ...
    def stats(self) -> dict[str, float]: ...
    def close(self) -> None: ...


def make_scorer(reward_cfg: RewardConfig, model_config: dict[str, Any] | None = None) -> Scorer:
    """An HTTP scorer when `reward_model` is a URL, else the named template run in-process.

    `model_config` (e.g. the flat config dict) is given to an in-process template's `__init__`, with
    `reward_model_config` merged on top; the server gives its model the YAML file it was started with.
    """
    target = reward_cfg.reward_model.strip()
    if "://" in target:
        return HTTPScorer(reward_cfg)
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", target):
        raise RewardError(
            f"config key 'reward_model' = {target!r} is neither a URL (http://host:port) nor a dotted class "
            "path (my_reward_model.MyRewardModel)"
        )
    raw = dict(model_config or {})
    if reward_cfg.reward_model_config:
        raw["reward_model_config"] = dict(reward_cfg.reward_model_config)
    return InProcessScorer(target, model_config_from(raw), timeout=reward_cfg.reward_timeout,
                           deadline=reward_cfg.reward_deadline)


class _LoopThread:
    """An event loop in a daemon thread; `run(coro)` blocks the calling thread until it is done."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], cancelled: Callable[[], str | None] = lambda: None,
            timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for it.

        Raises RewardCancelled as soon as `cancelled()` returns a reason, and _LoopTimeout after
        `timeout` seconds; either way the coroutine is cancelled and not waited for.
        """
        if threading.current_thread() is self.thread:
            raise RuntimeError("score() was called from inside the scorer's own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            reason = cancelled()
            if reason is not None:
                future.cancel()
                raise RewardCancelled(f"reward scoring cancelled: {reason}")
            wait = POLL_S if end is None else min(POLL_S, end - time.monotonic())
            done, _ = concurrent.futures.wait([future], timeout=max(wait, 0.0))
            if done:
                return future.result()
            if end is not None and time.monotonic() >= end:
                future.cancel()
                raise _LoopTimeout

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class HTTPScorer:
    """Scores through the reward server at `reward_model` (see lampo.reward.client)."""

    verifiable = False
    """Set from the server's /health reply by check_available()."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.url = cfg.reward_model.rstrip("/")
        self._loop = _LoopThread("lampo-reward-client")
        token = cfg.token()

        async def build() -> RewardClient:  # the httpx client belongs to the loop thread
            return RewardClient(
                url=self.url, token=token, batch_size=cfg.reward_batch_size, timeout=cfg.reward_timeout,
                deadline=cfg.reward_deadline, max_retries=cfg.reward_max_retries,
            )

        self.client = self._loop.run(build())
        self._cancelled: str | None = None

    def score(self, messages: list[list[str]]) -> list[Score]:
        return self._loop.run(self.client.score(messages), cancelled=lambda: self._cancelled)

    def cancel(self, reason: str) -> None:
        """Make the score() in flight, and every later one, raise RewardCancelled (any thread, signal-safe)."""
        self._cancelled = reason  # one attribute store: safe from a signal handler, unlike a lock

    def check_available(self, timeout: float = 3.0) -> None:
        """Raise RewardUnavailable (with the start command) unless the server answers /health."""
        try:
            response = self._loop.run(self.client.health(timeout=timeout))
        except httpx.HTTPError as exc:
            raise RewardUnavailable(
                f"no reward server answers at {self.url}/health ({type(exc).__name__}: {exc or 'no answer'}); "
                f"{start_hint(self.url)}"
            ) from None
        if response.status_code == 200:
            self.verifiable = bool(describe_health(response).get("verifiable", False))
            return
        info = describe_health(response)
        if response.status_code == 503:
            # It answers and is loading its model: score() retries 503 until reward_deadline.
            logger.warning("reward server at %s is still loading: %s", self.url, info.get("error"))
            return
        if response.status_code == 401:
            raise RewardUnavailable(
                f"reward server at {self.url} refused the token (401: {info.get('error')}); set reward_token "
                "in the config or LAMPO_REWARD_TOKEN to the token the server was started with"
            )
        raise RewardUnavailable(
            f"reward server at {self.url}/health answered HTTP {response.status_code}: {info.get('error', info)}; "
            f"is this a Lampo reward server? {start_hint(self.url)}"
        )

    def stats(self) -> dict[str, float]:
        s = self.client.stats
        out = {"reward/retries": s.retries, "reward/failed_requests": s.failed_requests}
        s.retries = s.failed_requests = 0
        return out

    def close(self) -> None:
        if not self._loop.loop.is_closed():
            try:
                self._loop.run(self.client.aclose())
            finally:
                self._loop.close()


class _LoopTimeout(Exception):
    """_LoopThread.run waited its whole timeout."""


class _ComputeTimeout(Exception):
    """compute did not return within its bound (raised on the scorer's event loop)."""


class InProcessScorer:
    """Runs a RewardModelTemplate in this process (no server), with the server's reply checks.

    One compute call per score(), bounded by `min(timeout, deadline)` (`reward_timeout`, and
    `reward_deadline` for the whole call). A compute past its bound cannot always be stopped: an
    `async def` is cancelled, a plain `def` keeps running in its daemon thread, and an `async def`
    that blocks the event loop keeps that loop; later calls then get a new loop and never wait
    behind it.
    """

    def __init__(self, dotted: str, model_config: dict[str, Any], timeout: float, deadline: float) -> None:
        self.dotted = dotted
        self.timeout = timeout
        self.deadline = deadline
        try:
            cls = import_model_class(dotted)
            self.model: RewardModelTemplate = build_model(cls, model_config)
        except RewardModelLoadError as exc:
            raise RewardError(f"config key 'reward_model' = {dotted!r}: {exc}") from None
        self.verifiable = bool(getattr(self.model, "verifiable", False))
        self._loop = _LoopThread("lampo-reward-inprocess")
        self._loop_lock = threading.Lock()
        self._failed = 0
        self._cancelled: str | None = None

    def score(self, messages: list[list[str]]) -> list[Score]:
        if not messages:
            return []
        name = type(self.model).__name__
        key, bound = ("reward_timeout", self.timeout) if self.timeout <= self.deadline else \
            ("reward_deadline", self.deadline)
        loop = self._loop
        try:
            raw = loop.run(self._compute(messages, bound), cancelled=lambda: self._cancelled,
                           timeout=bound + LOOP_GRACE_S)
            return check_scores(raw, messages, source=f"{name}.compute")
        except RewardCancelled:
            raise
        except (_ComputeTimeout, _LoopTimeout) as exc:
            self._failed += 1
            if isinstance(exc, _LoopTimeout):
                self._replace_loop(loop)
                left = ("it blocks its event loop (blocking work inside `async def compute`: use a plain def or "
                        "`await self.run_sync(...)`), so it cannot be stopped: it is left running and later calls "
                        "use a new event loop")
            elif inspect.iscoroutinefunction(self.model.compute):
                left = "it was cancelled"
            else:
                left = ("a plain `def compute` runs in a thread that cannot be stopped: it is left running, and "
                        "later calls do not wait for it")
            raise RewardError(
                f"in-process reward model {self.dotted}: {name}.compute did not return within {key} = {bound:g} s "
                f"for {len(messages)} conversations; {left}"
            ) from None
        except Exception as exc:
            self._failed += 1
            raise RewardError(
                f"in-process reward model {self.dotted} failed on {len(messages)} conversations: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def _compute(self, messages: list[list[str]], bound: float) -> Any:
        limit = asyncio.timeout(bound)
        try:
            async with limit:
                return await run_compute(self.model, messages)
        except TimeoutError:
            if limit.expired():  # not a TimeoutError raised by compute itself
                raise _ComputeTimeout from None
            raise

    def _replace_loop(self, blocked: _LoopThread) -> None:
        with self._loop_lock:  # concurrent score() calls that all timed out replace it once
            if self._loop is blocked:
                self._loop = _LoopThread("lampo-reward-inprocess")

    def cancel(self, reason: str) -> None:
        """Make the score() in flight, and every later one, raise RewardCancelled (any thread, signal-safe)."""
        self._cancelled = reason

    def check_available(self) -> None:
        """Always available: the model was loaded when the scorer was built."""

    def stats(self) -> dict[str, float]:
        out = {"reward/retries": 0, "reward/failed_requests": self._failed}
        self._failed = 0
        return out

    def close(self) -> None:
        if self.model.is_loaded:
            self.model.unload()
        self._loop.close()
