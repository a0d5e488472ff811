"""The reward server: ``python -m lampo.reward_server --model my_reward_model.MyRewardModel --config cfg.yaml``.

Serves a ``RewardModelTemplate`` over HTTP (protocol in ``docs/reward-server.md``):

- ``POST /compute`` ``{"messages": [[str, ...], ...]}`` -> ``200 {"scores": [...]}``, same order and count.
- ``GET /health`` -> ``200 {"status": "ok", "model": "<class name>", "verifiable": false}`` once ``load()``
  finished, 503 before, 500 if the micro-batching task has died.
- Errors are ``{"error": "..."}``: 400 body not JSON, 401 missing/wrong token, 413 body too large
  (checked before parsing), 422 wrong shape (names the first bad element), 500 compute raised or
  returned a wrong count or a non-finite number, 503 still loading or shutting down.

Concurrent requests are merged into one ``compute`` call (micro-batching) up to
``reward_max_batch_size`` conversations, waiting at most ``reward_max_wait_ms`` for company.
SIGINT/SIGTERM stop accepting connections, give requests in flight ``SHUTDOWN_GRACE_S`` to finish
(then answer them 503), call ``unload()`` and exit 0; exit 1 when something had to be cut off,
and in any case within ``SHUTDOWN_BOUND_S`` of the signal.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pydantic
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lampo.config import ConfigError, LampoConfig, RewardConfig, read_yaml
from lampo.reward.client import RETRYABLE_HEADER
from lampo.reward.loading import RewardModelLoadError, build_model, import_model_class, model_config_from
from lampo.reward_model import RewardModelTemplate, check_scores, run_blocking, run_compute

logger = logging.getLogger("lampo.reward_server")

START_HINT = "python -m lampo.reward_server --model my_reward_model.MyRewardModel --config <config.yaml>"


class StartupError(RuntimeError):
    """The server cannot start: bad model path, bad class, load() failed, unsafe bind."""


# ---------------------------------------------------------------------------------------
# Settings: flags > config file > defaults
# ---------------------------------------------------------------------------------------


@dataclass
class ServerSettings:
    """What the server needs, resolved from flags, the YAML config and `RewardConfig` defaults.

    No defaults here: they live in `RewardConfig` (one place for each default).
    """

    host: str
    port: int
    token: str | None
    max_batch_size: int
    max_wait_ms: float
    max_request_bytes: int


def read_raw_config(path: str | None) -> dict[str, Any]:
    """The parsed YAML file as a dict (unknown keys kept: they belong to the user's reward model)."""
    if path is None:
        return {}
    try:
        return read_yaml(path)
    except ConfigError as exc:
        raise StartupError(str(exc)) from exc


def reward_config_from_raw(raw: dict[str, Any]) -> LampoConfig:
    """A config of the `RewardConfig` keys of a raw config (flat or under `reward:`), validated."""
    names = {f.name for f in dataclasses.fields(RewardConfig)}
    picked = {k: v for k, v in raw.items() if k in names}
    section = raw.get("reward")
    if isinstance(section, dict):
        picked.update({k: v for k, v in section.items() if k in names})
    try:
        return LampoConfig(picked)
    except ConfigError as exc:
        raise StartupError(str(exc)) from exc


def resolve_settings(args: argparse.Namespace, raw: dict[str, Any]) -> ServerSettings:
    cfg = reward_config_from_raw(raw)
    rc = cfg.reward
    settings = ServerSettings(
        host=rc.reward_host,
        # one config file serves trainer and server: the port of the URL the trainer calls
        port=cfg.reward_server_port,
        token=rc.token(),
        max_batch_size=rc.reward_max_batch_size,
        max_wait_ms=rc.reward_max_wait_ms,
        max_request_bytes=rc.reward_max_request_bytes,
    )
    for flag in ("host", "port", "token", "max_batch_size", "max_wait_ms", "max_request_bytes"):
        value = getattr(args, flag)
        if value is not None:
            setattr(settings, flag, value)
    if settings.max_batch_size < 1:
        raise StartupError(f"--max-batch-size = {settings.max_batch_size} is invalid: must be >= 1")
    if not (math.isfinite(settings.max_wait_ms) and settings.max_wait_ms >= 0):
        # inf would hold a request alone on the server for ever, waiting for company
        raise StartupError(f"--max-wait-ms = {settings.max_wait_ms} is invalid: must be a finite number >= 0")
    if not 0 < settings.port < 65536:
        raise StartupError(f"--port = {settings.port} is invalid: must be a TCP port (1-65535)")
    if not is_loopback(settings.host) and not settings.token:
        raise StartupError(
            f"refusing to bind {settings.host}: any address other than loopback needs an API token "
            "(--token, `reward_token` in the config, or the LAMPO_REWARD_TOKEN environment variable); "
            "clients then send 'Authorization: Bearer <token>'"
        )
    return settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------
# Micro-batching
# ---------------------------------------------------------------------------------------


Item = tuple[list[list[str]], "asyncio.Future[list[Any]]"]


class ComputeError(Exception):
    """A request was not scored; `status` is the HTTP answer (500: compute failed or the batcher
    is gone; 503: the server is shutting down). `retryable` is False when the same request would
    fail the same way: the model raised or its reply failed the checks."""

    def __init__(self, message: str, status: int = 500, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class Batcher:
    """Merges concurrent requests into one `compute` call (one batch at a time, in arrival order).

    A request is never split: requests are merged while the total stays within `max_batch_size`
    (a single larger request runs alone). Scoring one batch at a time is what a neural model on
    one device wants; the event loop stays free because sync work runs in a worker thread.

    Every failure while scoring a batch is answered to that batch's requests and the loop goes
    on. Should the loop itself end, `failure()` says why, `/health` reports it, and every waiting
    and later request gets the error instead of waiting for ever.
    """

    def __init__(self, model: RewardModelTemplate, max_batch_size: int, max_wait_ms: float) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.calls = 0
        self.held: list[Item] = []
        """Requests taken from the queue and not answered yet (the batch being scored, the next one's first)."""
        self.shutting_down: str | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())
        self.task.add_done_callback(self._ended)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):  # a task that died was reported by _ended
                pass

    def failure(self) -> str | None:
        """Why the batching task ended; None while it runs."""
        if self.task is None or not self.task.done():
            return None
        exc = None if self.task.cancelled() else self.task.exception()
        reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        return f"the micro-batching task stopped{reason}; this server scores nothing more: restart it"

    def abort(self, message: str) -> int:
        """Answer every request being scored or queued with a 503 `message`; refuse later ones too.

        For shutdown: a request still waiting when its grace period ends gets an answer it can act
        on (retry against a restarted server) rather than a dropped connection. Returns how many
        requests were cut off.
        """
        self.shutting_down = message
        return self._fail(self.held + self._drain(), message, 503)

    async def submit(self, messages: list[list[str]]) -> list[Any]:
        if self.shutting_down is not None:
            raise ComputeError(self.shutting_down, 503)
        failure = self.failure()
        if failure is not None:
            raise ComputeError(failure)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((messages, future))
        return await future

    def _ended(self, task: asyncio.Task[None]) -> None:
        message = self.failure() or "the micro-batching task stopped"
        if not task.cancelled():
            logger.error("%s", message)
        self._fail(self.held + self._drain(), message)

    def _drain(self) -> list[Item]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    async def _run(self) -> None:
        pending: Item | None = None
        while True:
            first = pending or await self.queue.get()
            pending = None
            self.held = [first]
            batch = [first]
            total = len(first[0])
            deadline = time.monotonic() + self.max_wait
            while total < self.max_batch_size:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                self.held.append(item)
                if total + len(item[0]) > self.max_batch_size:
                    pending = item  # starts the next batch, keeping arrival order
                    break
                batch.append(item)
                total += len(item[0])
            try:
                await self._score(batch)
            except Exception as exc:  # a bug of ours: answer the batch, keep the loop alive
                logger.error("scoring a batch failed:\n%s", traceback.format_exc())
                self._fail(batch, f"internal error: {type(exc).__name__}: {exc}")
            self.held = [pending] if pending is not None else []

    async def _score(self, batch: list[Item]) -> None:
        merged = [conv for messages, _ in batch for conv in messages]
        self.calls += 1
        name = type(self.model).__name__
        where = "" if len(batch) == 1 else f" (in a micro-batch of {len(batch)} requests)"
        try:
            raw = await run_compute(self.model, merged)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]  # stop(): end the loop
                raise
            self._fail(batch, f"{name}.compute raised CancelledError{where}", retryable=False)
            return
        except Exception as exc:  # the user's code: report it, keep serving
            logger.error("%s.compute raised:\n%s", name, traceback.format_exc())
            self._fail(batch, f"{name}.compute raised {type(exc).__name__}: {exc}{where}", retryable=False)
            return
        try:
            scores = check_scores(raw, merged, source=f"{name}.compute")
        except ValueError as exc:  # names the bad element
            self._fail(batch, f"{exc}{where}", retryable=False)
            return
        except Exception as exc:  # e.g. a tensor whose tolist() raises
            self._fail(batch, f"{name}.compute returned a reply that could not be checked: "
                              f"{type(exc).__name__}: {exc}{where}", retryable=False)
            return
        start = 0
        for messages, future in batch:
            if not future.done():  # the client may have gone away
                future.set_result(scores[start : start + len(messages)])
            start += len(messages)

    @staticmethod
    def _fail(batch: list[Item], message: str, status: int = 500, retryable: bool = True) -> int:
        failed = 0
        for _, future in batch:
            if not future.done():
                future.set_exception(ComputeError(message, status, retryable))
                failed += 1
        return failed


# ---------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------


class ComputeRequest(pydantic.BaseModel):
    """Body of POST /compute."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    messages: list[list[str]]


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           retryable: bool | None = None) -> JSONResponse:
    """The JSON error reply. Errors a retry would repeat carry `Lampo-Retryable: false` so that
    clients stop at once; by default those are the 4xx other than 429."""
    if retryable is None:
        retryable = status == 429 or status >= 500
    if not retryable:
        headers = {**(headers or {}), RETRYABLE_HEADER: "false"}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


EXPECTED_BODY = '{"messages": [["user text", "assistant text", ...], ...]}'


def _describe_validation(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(err["loc"]))
    value = err.get("input")
    more = f" ({len(exc.errors()) - 1} more errors)" if len(exc.errors()) > 1 else ""
    return f"{loc or 'body'}: {err['msg']} (got {_shown(value)}){more}; expected {EXPECTED_BODY}"


def _shown(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, _LongInt):
        return repr(value)
    try:
        return json.dumps(value, default=repr)[:80]
    except (ValueError, RecursionError):  # nested almost as deep as the parser allows
        return f"a {type(value).__name__} too deeply nested to show"


class _LongInt:
    """Stands in for a JSON integer that Python refuses to convert (over `sys.get_int_max_str_digits()`
    digits, 4300 by default), so the request is refused naming where the integer is."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(text: str) -> int | _LongInt:
    try:
        return int(text)
    except ValueError:
        return _LongInt(text)


# One JSON token of interest: a whole string (escapes included) or a structural character.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},:]')


def _too_deep(body: bytes, depth: int = 3) -> str:
    """The path of the first array or object opened `depth` levels down, e.g. `messages[0][0]`.

    Called only after `json.loads` gave up with RecursionError, which names no position. A valid
    request holds nothing but strings at depth 3 (object, messages, conversation), so the first
    container there is where the request went wrong.
    """
    frames: list[list[Any]] = []  # one per open container: [b"[" or b"{", current index or key]
    expect_key = False
    for match in _JSON_TOKEN.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            if len(frames) >= depth:
                break
            frames.append([token, 0 if token == b"[" else "?"])
            expect_key = token == b"{"
        elif token in (b"]", b"}"):
            if frames:
                frames.pop()
            expect_key = False
        elif token == b",":
            if frames and frames[-1][0] == b"[":
                frames[-1][1] += 1
            expect_key = bool(frames) and frames[-1][0] == b"{"
        elif token == b":":
            expect_key = False
        elif expect_key:
            frames[-1][1] = token[1:-1].decode("utf-8", "replace")
            expect_key = False
    path = "".join(f"[{at}]" if kind == b"[" else (f".{at}" if i else str(at)) for i, (kind, at) in enumerate(frames))
    return path if frames and frames[0][0] == b"{" else f"body{path}"


class _State:
    def __init__(self) -> None:
        self.model: RewardModelTemplate | None = None
        self.batcher: Batcher | None = None
        self.load_error: str | None = None
        self.server: uvicorn.Server | None = None
        self.cut_off: list[str] = []
        """What a stop had to abandon (the exit status is then 1)."""


# Shutdown bounds (docs/reward-server.md, "Shutdown"). uvicorn alone waits for requests in flight
# for ever, and a compute stuck in a thread, or blocking the event loop, cannot be cancelled.
SHUTDOWN_GRACE_S = 5.0
"""After SIGINT/SIGTERM, requests being scored get this long to finish; then they are answered 503."""
UNLOAD_TIMEOUT_S = 5.0
"""How long a stop waits for unload() (or for a load() still running)."""
SHUTDOWN_BOUND_S = 15.0
"""The process is gone this long after the signal, whatever the model does (exit status 1)."""


def _watch_shutdown(state: _State, loop: asyncio.AbstractEventLoop) -> None:
    """Daemon thread: ends the grace period on the event loop, then ends the process at the bound.

    A thread rather than a task, because an `async def compute` that blocks (time.sleep instead
    of asyncio.sleep) stops every task on the loop, including one meant to stop it.
    """
    server = state.server
    assert server is not None
    while not server.should_exit:
        time.sleep(0.05)
    time.sleep(SHUTDOWN_GRACE_S)
    try:
        loop.call_soon_threadsafe(_end_grace, state)
    except RuntimeError:  # the loop is closed: the stop went through in time
        return
    time.sleep(SHUTDOWN_BOUND_S - SHUTDOWN_GRACE_S)
    os.write(2, f"lampo.reward_server: error: still running {SHUTDOWN_BOUND_S:g} s after the stop signal "
                "(compute or unload() does not return); exiting with status 1\n".encode())
    os._exit(1)


def _end_grace(state: _State) -> None:
    if state.batcher is None:
        return
    cut = state.batcher.abort(
        f"the reward server is shutting down and this request was not scored within the {SHUTDOWN_GRACE_S:g} s "
        "grace period; send it again once the server is back"
    )
    if cut:
        state.cut_off.append(f"{cut} request(s) still being scored after {SHUTDOWN_GRACE_S:g} s were answered 503")


def create_app(
    model_cls: type[RewardModelTemplate], config: dict[str, Any], settings: ServerSettings
) -> tuple[FastAPI, _State]:
    """The ASGI app; the model is constructed and loaded in a worker thread after start-up."""
    state = _State()

    async def load_in_background() -> None:
        try:
            model = await run_blocking(build_model, model_cls, config)
        except RewardModelLoadError as exc:
            state.load_error = str(exc)
            print(f"lampo.reward_server: error: {exc}", file=sys.stderr, flush=True)
            if state.server is not None:
                state.server.should_exit = True
            return
        state.batcher = Batcher(model, settings.max_batch_size, settings.max_wait_ms)
        state.batcher.start()
        state.model = model
        logger.info("reward model %s loaded; ready", model_cls.__name__)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load_in_background())
        if state.server is not None:
            threading.Thread(target=_watch_shutdown, args=(state, asyncio.get_running_loop()),
                             name="lampo-shutdown-watch", daemon=True).start()
        yield
        # Shutdown runs once the requests in flight are answered (scored, or 503 after the grace period).
        if not loader.done():
            try:
                await asyncio.wait_for(asyncio.shield(loader), UNLOAD_TIMEOUT_S)
            except TimeoutError:
                state.cut_off.append(f"load() was still running {UNLOAD_TIMEOUT_S:g} s into the stop")
                return
        if state.batcher is not None:
            await state.batcher.stop()
        if state.model is not None:
            try:
                await asyncio.wait_for(run_blocking(state.model.unload), UNLOAD_TIMEOUT_S)
                logger.info("reward model %s unloaded", model_cls.__name__)
            except TimeoutError:
                state.cut_off.append(f"unload() did not return within {UNLOAD_TIMEOUT_S:g} s")
            except Exception:
                logger.error("unload() raised:\n%s", traceback.format_exc())

    app = FastAPI(title="Lampo reward server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if settings.token:
            # Starlette decodes header bytes as latin-1 (RFC 9110 5.5 allows any byte from 0x80),
            # so encoding back gives the bytes sent. compare_digest on str refuses non-ASCII text
            # with a TypeError; on bytes it compares anything, and its time does not reveal how
            # much of a guess was right.
            header = request.headers.get("authorization", "").encode("latin-1")
            scheme, _, supplied = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(supplied.strip(), settings.token.encode()):
                return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                              {"WWW-Authenticate": "Bearer"})
        try:
            return await call_next(request)
        except Exception as exc:  # never a bare 500 page: always the JSON error shape
            logger.error("unhandled error:\n%s", traceback.format_exc())
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")
        except asyncio.CancelledError:
            if state.server is not None and state.server.should_exit:  # uvicorn's backstop at shutdown
                state.cut_off.append(f"{request.method} {request.url.path} was cancelled without an answer")
            raise

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.model is None:
            message = state.load_error or f"reward model {model_cls.__name__} is still loading"
            return _error(503, message, {"Retry-After": "1"})
        failure = state.batcher.failure() if state.batcher is not None else None
        if failure is not None:
            return _error(500, failure)
        verifiable = bool(getattr(state.model, "verifiable", False))
        return JSONResponse({"status": "ok", "model": model_cls.__name__, "verifiable": verifiable})

    @app.post("/compute")
    async def compute(request: Request) -> JSONResponse:
        limit = settings.max_request_bytes
        # 1. size, before anything is parsed: the declared length first, then the bytes read.
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(413, f"request body of {declared} bytes is over the limit of {limit} bytes "
                               "(reward_max_request_bytes); send fewer conversations per request")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _error(413, f"request body is over the limit of {limit} bytes "
                                   "(reward_max_request_bytes); send fewer conversations per request")
        # 2. JSON.
        try:
            data = json.loads(body, parse_int=_parse_int)
        except RecursionError:
            return _error(422, f"{_too_deep(bytes(body))}: arrays or objects nested too deeply to parse; "
                               f"expected {EXPECTED_BODY}")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return _error(400, f"body is not valid JSON: {exc}")
        # 3. shape.
        try:
            parsed = ComputeRequest.model_validate(data)
        except pydantic.ValidationError as exc:
            return _error(422, _describe_validation(exc))
        if state.batcher is None:
            message = state.load_error or f"reward model {model_cls.__name__} is still loading"
            return _error(503, message, {"Retry-After": "1"})
        if not parsed.messages:
            return JSONResponse({"scores": []})
        try:
            scores = await state.batcher.submit(parsed.messages)
        except ComputeError as exc:
            return _error(exc.status, str(exc), {"Retry-After": "1"} if exc.status == 503 else None,
                          retryable=exc.retryable)
        return JSONResponse({"scores": scores})

    return app, state


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lampo.reward_server",
        description="Serve a RewardModelTemplate subclass over HTTP (protocol: docs/reward-server.md).",
    )
    parser.add_argument("--model", required=True,
                        help="dotted path of the class, e.g. my_reward_model.MyRewardModel (current folder is importable)")
    parser.add_argument("--config", default=None,
                        help="YAML config (the trainer's file); the whole dict is passed to the model's __init__")
    parser.add_argument("--host", default=None, help="bind address (default: reward_host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: reward_port, or the port of the reward_model URL, 8000)")
    parser.add_argument("--token", default=None,
                        help="API token (default: reward_token or LAMPO_REWARD_TOKEN); required off loopback")
    parser.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=None,
                        help="most conversations merged into one compute call (reward_max_batch_size)")
    parser.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=None,
                        help="how long a request waits for others to join its batch (reward_max_wait_ms)")
    parser.add_argument("--max-request-bytes", dest="max_request_bytes", type=int, default=None,
                        help="largest request body accepted, 413 above (reward_max_request_bytes)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        raw = read_raw_config(args.config)
        settings = resolve_settings(args, raw)
        model_cls = import_model_class(args.model)
    except (StartupError, RewardModelLoadError) as exc:
        print(f"lampo.reward_server: error: {exc}", file=sys.stderr, flush=True)
        return 2
    app, state = create_app(model_cls, model_config_from(raw), settings)
    # uvicorn's own limit on waiting for requests is a backstop: _watch_shutdown answers the ones
    # waiting for compute at SHUTDOWN_GRACE_S.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            access_log=args.log_level == "debug", lifespan="on",
                            timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S) + 2)
    server = uvicorn.Server(config)
    state.server = server
    # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, which would end the process
    # with a signal status; with these no-op handlers in place a clean shutdown exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    print(f"lampo.reward_server: serving {args.model} on http://{settings.host}:{settings.port} "
          f"(micro-batch {settings.max_batch_size} / {settings.max_wait_ms} ms, "
          f"token {'on' if settings.token else 'off'})", file=sys.stderr, flush=True)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits on a bind failure
        return int(exc.code or 1)
    if state.load_error is not None:
        return 1
    if server.force_exit:
        state.cut_off.append("a second SIGINT forced the exit (unload() skipped)")
    if state.cut_off:
        print(f"lampo.reward_server: stopped without finishing everything: {'; '.join(state.cut_off)}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
