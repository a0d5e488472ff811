"""The class users subclass to write a reward model (module path fixed: ``lampo.reward_model``).

```python
from lampo.reward_model import RewardModelTemplate

class MyRewardModel(RewardModelTemplate):
    def __init__(self, config):           # the parsed YAML config given to the server (a dict)
        super().__init__(config)
        self.load()
    async def compute(self, messages):    # [[user_1, assistant_1, user_2, assistant_2, ...], ...]
        return [float(len(conversation[-1])) for conversation in messages]
```

``compute`` returns one score per conversation: a float (placed on the last token of the last
assistant turn), or a list with one float per assistant turn (each placed on the last token of
its turn). See ``docs/reward-server.md``.

The same object runs behind the reward server (``python -m lampo.reward_server``) or in-process
in the trainer (``reward_model: my_reward_model.MyRewardModel``); the helpers at the bottom of this
module (``run_compute``, ``check_scores``) are what both use, so both check replies identically.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
import threading
from collections.abc import Callable
from typing import Any

Score = float | list[float]


class RewardModelTemplate:
    """Base class of every reward model. Override ``compute``; ``load``/``unload`` when needed.

    ``compute`` may be ``async def`` (the usual form) or a plain ``def``. A plain ``def`` is run
    in a worker thread by the server and the in-process runner, so a heavy synchronous model
    never blocks the event loop (``/health`` keeps answering while a batch is scored). Inside an
    ``async def compute``, wrap heavy synchronous work with ``await self.run_sync(fn, *args)``.
    """

    verifiable: bool = False
    """True when scores are checked answers in {0, 1} (the trainer logs objective/verifiable_correct_rate)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        # The whole parsed YAML file: reward models read their own keys from it.
        self.config: dict[str, Any] = dict(config or {})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Record whether load() ran, so the server and the in-process runner call it exactly
        # once whether or not the user's __init__ already did (the design docs say "usually").
        if "load" in cls.__dict__:
            cls.load = _tracking(cls.__dict__["load"], True)  # type: ignore[method-assign]
        if "unload" in cls.__dict__:
            cls.unload = _tracking(cls.__dict__["unload"], False)  # type: ignore[method-assign]

    async def compute(self, messages: list[list[str]]) -> list[Score]:
        """Score each conversation; ``messages[i]`` is ``[user_1, assistant_1, ...]`` as plain text."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(self, messages)")

    def load(self) -> None:
        """Load weights or other resources (called once before the first compute)."""

    def unload(self) -> None:
        """Free resources (called once at shutdown)."""

    @property
    def is_loaded(self) -> bool:
        """Whether ``load()`` has completed (and ``unload()`` has not run since)."""
        return bool(getattr(self, "_lampo_loaded", False))

    async def run_sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking function in a worker thread and await its result."""
        return await run_blocking(fn, *args, **kwargs)


def _tracking(method: Callable[..., Any], loaded: bool) -> Callable[..., Any]:
    if getattr(method, "_lampo_tracking", False):
        return method

    @functools.wraps(method)
    def wrapper(self: RewardModelTemplate, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        self._lampo_loaded = loaded
        return result

    wrapper._lampo_tracking = True  # type: ignore[attr-defined]
    return wrapper


RewardModelTemplate.load = _tracking(RewardModelTemplate.load, True)  # type: ignore[method-assign]
RewardModelTemplate.unload = _tracking(RewardModelTemplate.unload, False)  # type: ignore[method-assign]


def ensure_loaded(model: RewardModelTemplate) -> None:
    """Call ``load()`` unless the model's ``__init__`` already did."""
    if not model.is_loaded:
        model.load()


async def run_compute(model: RewardModelTemplate, messages: list[list[str]]) -> Any:
    """Call ``model.compute``: awaited when async, in a worker thread when a plain function."""
    fn = model.compute
    if inspect.iscoroutinefunction(fn):
        result = await fn(messages)
    else:
        result = await run_blocking(fn, messages)
    if inspect.isawaitable(result):  # a plain def that returns a coroutine
        result = await result
    return result


async def run_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` in a new daemon thread and await its result.

    Not ``asyncio.to_thread``: its pool threads are joined when the event loop closes and again
    when the interpreter exits, so one call that never returns would keep the reward server
    from exiting on SIGTERM and the trainer from exiting at all. A daemon thread is left behind
    instead; cancelling the await stops waiting for it, never the thread itself.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def deliver(outcome: Callable[[], None]) -> None:
        if not future.done():  # the caller may have stopped waiting
            outcome()

    def target() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:
            outcome = functools.partial(future.set_exception, exc)
        else:
            outcome = functools.partial(future.set_result, result)
        try:
            loop.call_soon_threadsafe(deliver, outcome)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    name = f"lampo-{getattr(fn, '__qualname__', 'call')}"
    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


def check_scores(scores: Any, messages: list[list[str]], source: str = "compute") -> list[Score]:
    """Validate a reply: one finite score (or one per assistant turn) per conversation.

    Raises ``ValueError`` naming the first bad element; the caller turns it into a 500 (server)
    or a ``RewardError`` (client). A failed score is never replaced by 0.
    """
    if hasattr(scores, "tolist"):  # numpy arrays and torch tensors
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"{source} returned {type(scores).__name__}, expected a list of {len(messages)} scores")
    if len(scores) != len(messages):
        raise ValueError(f"{source} returned {len(scores)} scores for {len(messages)} conversations")
    out: list[Score] = []
    for i, (score, conversation) in enumerate(zip(scores, messages, strict=True)):
        if hasattr(score, "tolist"):
            score = score.tolist()
        if isinstance(score, (list, tuple)):
            turns = len(conversation) // 2
            if len(score) != turns:
                raise ValueError(
                    f"{source} returned {len(score)} per-turn scores for conversation {i}, which has "
                    f"{turns} assistant turns ({len(conversation)} texts)"
                )
            out.append([_finite(s, f"{source} score [{i}][{j}]") for j, s in enumerate(score)])
        else:
            out.append(_finite(score, f"{source} score [{i}]"))
    return out


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {_show(value)} ({type(value).__name__}), expected a number")
    try:
        value = float(value)
    except OverflowError:  # a Python int beyond float range (JSON allows integers of any length)
        raise ValueError(f"{what} is an integer of {_digits(value)} digits, too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value} (not finite)")
    return value


def _digits(value: int) -> str:
    try:
        return str(len(str(abs(value))))
    except ValueError:  # over sys.get_int_max_str_digits(): str() refuses, the logarithm does not
        return f"about {int(math.log10(abs(value))) + 1}"


def _show(value: Any, limit: int = 80) -> str:
    """A short repr for error messages (a huge or deeply nested value must not make a second error)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."
