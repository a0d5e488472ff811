"""The reward server as a real process on a free 127.0.0.1 port, and the client against it.

Every server is started by `ServerProcess` (log to a file, always stopped in `finally`). The model
under test, `Probe`, is written to a temporary folder that becomes the server's working
directory, so these tests also check that `--model probe_models.Probe` is found there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lampo.config import LampoConfig
from lampo.reward import RewardError, make_scorer
from lampo.reward.client import RewardClient, wait_until_healthy

pytestmark = pytest.mark.slow

PROBE_MODELS = '''
import asyncio, math, time
from lampo.reward_model import RewardModelTemplate


class Probe(RewardModelTemplate):
    """Scores each conversation by its last text read as a number (else its length); misbehaves on cue."""

    def __init__(self, config):
        super().__init__(config)
        self.load()

    def load(self):
        time.sleep(float(self.config.get("probe_load_seconds", 0)))

    def unload(self):
        marker = self.config.get("probe_unload_marker")
        if marker:
            with open(marker, "w") as f:
                f.write("unloaded")

    async def compute(self, messages):
        cue = messages[0][-1]
        if cue == "raise":
            raise RuntimeError("probe exploded")
        if cue == "wrong count":
            return [1.0] * (len(messages) + 1)
        if cue == "nan":
            return [math.nan] * len(messages)
        if cue == "huge":
            return [10**400] * len(messages)  # float() of it raises OverflowError
        if cue.startswith("sleep "):
            await asyncio.sleep(float(cue.split()[1]))
        if cue.startswith("block "):  # the mistake of blocking inside async def: the event loop stops
            time.sleep(float(cue.split()[1]))
        await asyncio.sleep(float(self.config.get("probe_delay", 0)))
        out = []
        for conversation in messages:
            try:
                out.append(float(conversation[-1]))
            except ValueError:
                out.append(float(len(conversation[-1])))
        return out


class SyncProbe(RewardModelTemplate):
    """A heavy synchronous model: a plain `def compute` that blocks; per-turn scores."""

    def compute(self, messages):
        time.sleep(float(messages[0][-1]))
        return [[float(len(turn)) for turn in conversation[1::2]] for conversation in messages]


class NotATemplate:
    pass


class BadLoad(RewardModelTemplate):
    def load(self):
        raise FileNotFoundError("weights.bin not found")

    async def compute(self, messages):
        return []
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lampo.reward_server` in `folder`; `stop()` always ends it."""

    def __init__(self, folder: Path, model: str = "probe_models.Probe", config: dict | None = None,
                 args: tuple[str, ...] = (), port: int | None = None, env: dict | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lampo.reward_server", "--model", model, "--port", str(self.port),
               "--log-level", "warning", *args]
        if config is not None:
            path = folder / f"config-{self.port}.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            cmd += ["--config", str(path)]
        self.log_path = folder / f"server-{self.port}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=folder, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def wait_healthy(self, timeout: float = 30.0, headers: dict | None = None) -> None:
        try:
            wait_until_healthy(self.url, self.proc, timeout=timeout, headers=headers, poll=0.05)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{self.output()}") from exc

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "probe_models.py").write_text(PROBE_MODELS)
    return tmp_path


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    (folder / "probe_models.py").write_text(PROBE_MODELS)
    server = ServerProcess(folder, args=("--max-batch-size", "32", "--max-wait-ms", "5"))
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def post(url: str, **kwargs) -> httpx.Response:
    kwargs.setdefault("timeout", 10)
    return httpx.post(f"{url}/compute", **kwargs)


# ---------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------


def test_every_status_code_and_still_healthy_after(folder):
    server = ServerProcess(folder, config={"probe_load_seconds": 2.0, "some_user_key": [1, 2]},
                           args=("--max-request-bytes", "2048"))
    try:
        # 503 while load() runs (the server listens before the model is ready).
        end = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"{server.url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < end and server.proc.poll() is None, server.output()
                time.sleep(0.05)
        assert health.status_code == 503, health.text
        assert health.json() == {"error": "reward model Probe is still loading"}
        assert health.headers["retry-after"] == "1"
        early = post(server.url, json={"messages": [["q", "1"]]})
        assert early.status_code == 503 and "still loading" in early.json()["error"]

        server.wait_healthy()
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "model": "Probe", "verifiable": False}

        ok = post(server.url, json={"messages": [["Hi", "0.4"], ["a", "b", "c", "dd"]]})
        assert ok.status_code == 200 and ok.json() == {"scores": [0.4, 2.0]}  # "dd" -> length 2

        bad_json = post(server.url, content=b'{"messages": [["a"', headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]

        for body, where in [
            ({"messages": [["a", "b"], ["c", 5]]}, "messages[1][1]: Input should be a valid string"),
            ({"messages": "a b"}, "messages: Input should be a valid list"),
            ({"msgs": []}, "messages: Field required"),
            ([1, 2], "body: Input should be"),
        ]:
            r = post(server.url, json=body)
            assert r.status_code == 422, r.text
            assert r.json()["error"].startswith(where), r.json()

        big = {"messages": [["q", "x" * 3000]]}
        r = post(server.url, json=big)
        assert r.status_code == 413 and "over the limit of 2048 bytes" in r.json()["error"]
        # Without Content-Length (chunked upload) the limit holds while reading.
        chunks = [json.dumps(big).encode()[i : i + 500] for i in range(0, 3100, 500)]
        r = post(server.url, content=iter(chunks))
        assert r.status_code == 413

        for cue, message in [
            ("raise", "Probe.compute raised RuntimeError: probe exploded"),
            ("wrong count", "Probe.compute returned 2 scores for 1 conversations"),
            ("nan", "Probe.compute score [0] is nan (not finite)"),
        ]:
            r = post(server.url, json={"messages": [["q", cue]]})
            assert r.status_code == 500 and r.json() == {"error": message}

        assert httpx.get(f"{server.url}/nope").status_code == 404
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert post(server.url, json={"messages": [["q", "3"]]}).json() == {"scores": [3.0]}
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_200_concurrent_requests_each_get_their_own_scores(shared_server):
    async def go():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
            async def one(i: int):
                # request i carries 1-3 conversations scored 1000*i + j
                body = {"messages": [["q", str(1000 * i + j)] for j in range(1 + i % 3)]}
                r = await client.post(f"{shared_server.url}/compute", json=body)
                return r.status_code, r.json()

            return await asyncio.gather(*(one(i) for i in range(200)))

    replies = asyncio.run(go())
    for i, (status, body) in enumerate(replies):
        assert status == 200
        assert body == {"scores": [float(1000 * i + j) for j in range(1 + i % 3)]}


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "status", "where"),
    [
        (b'{"messages": [' + DEEP + b"]}", 422, "messages[0][0]: arrays or objects nested too deeply to parse"),
        (b'{"messages": [["q", "a"]], "extra": {"x": [' + DEEP + b"]}}", 422,
         "extra.x[0]: arrays or objects nested too deeply to parse"),
        (DEEP, 422, "body[0][0][0]: arrays or objects nested too deeply to parse"),
        # brackets and an escaped quote inside strings are text, not structure
        (b'{"messages": [["[[[\\"{{", "a"], ' + DEEP + b"]}", 422,
         "messages[1][0]: arrays or objects nested too deeply to parse"),
        (b'{"messages": [["q", 1' + b"0" * 4999 + b"]]}", 422,
         "messages[0][1]: Input should be a valid string (got an integer of 5000 digits)"),
    ],
    ids=["nested 100000 deep", "deep under another key", "deep top-level array", "brackets in strings",
         "5000-digit integer"],
)
def test_requests_python_cannot_convert_are_refused_naming_the_element(shared_server, body, status, where):
    r = post(shared_server.url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(where), r.json()
    assert post(shared_server.url, json={"messages": [["q", "2"]]}).json() == {"scores": [2.0]}


def test_token_protected_server(folder):
    server = ServerProcess(folder, env={"LAMPO_REWARD_TOKEN": "s3cret"})
    try:
        good = {"Authorization": "Bearer s3cret"}
        server.wait_healthy(headers=good)
        assert httpx.get(f"{server.url}/health").status_code == 401
        assert httpx.get(f"{server.url}/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        refused = post(server.url, json={"messages": [["q", "1"]]})
        assert refused.status_code == 401 and "Authorization: Bearer <token>" in refused.json()["error"]
        assert post(server.url, json={"messages": [["q", "1"]]}, headers=good).json() == {"scores": [1.0]}

        # The trainer's scorer sends the token from the config and refuses clearly without it.
        cfg = LampoConfig(reward_model=server.url, reward_token="s3cret").reward
        scorer = make_scorer(cfg)
        try:
            scorer.check_available()
            assert scorer.score([["q", "5"], ["q", "6"]]) == [5.0, 6.0]
        finally:
            scorer.close()
        no_token = make_scorer(LampoConfig(reward_model=server.url).reward)
        try:
            with pytest.raises(RewardError, match="refused the token"):
                no_token.check_available()
            with pytest.raises(RewardError, match="HTTP 401"):
                no_token.score([["q", "1"]])
        finally:
            no_token.close()
    finally:
        server.stop()


def test_authorization_header_that_is_not_ascii_is_a_401(folder):
    import http.client

    server = ServerProcess(folder, env={"LAMPO_REWARD_TOKEN": "s3cret"})
    try:
        server.wait_healthy(headers={"Authorization": "Bearer s3cret"})
        for path, method in (("/health", "GET"), ("/compute", "POST")):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            try:
                conn.putrequest(method, path)
                conn.putheader("Authorization", b"Bearer \xff\xfe")  # raw latin-1 bytes on the wire
                conn.putheader("Content-Length", "0")
                conn.endheaders()
                reply = conn.getresponse()
                body = reply.read()
            finally:
                conn.close()
            assert reply.status == 401, body
            assert reply.getheader("content-type") == "application/json"
            assert "Authorization: Bearer <token>" in json.loads(body)["error"]
        assert server.proc.poll() is None
    finally:
        server.stop()


def test_non_loopback_bind_without_token_refuses_to_start(folder):
    server = ServerProcess(folder, args=("--host", "0.0.0.0"), env={"LAMPO_REWARD_TOKEN": ""})
    try:
        assert server.wait_exit(timeout=30) == 2
        assert "refusing to bind 0.0.0.0: any address other than loopback needs an API token" in server.output()
    finally:
        server.stop()


def test_sigterm_finishes_in_flight_requests_then_unloads(folder):
    marker = folder / "unloaded.txt"
    server = ServerProcess(folder, config={"probe_unload_marker": str(marker)})
    try:
        server.wait_healthy()
        result: dict = {}

        def slow_request():
            result["reply"] = post(server.url, json={"messages": [["q", "sleep 1.5"]]})

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=20)
        assert result["reply"].status_code == 200 and result["reply"].json() == {"scores": [9.0]}  # len("sleep 1.5")
        assert server.wait_exit(timeout=20) == 0, server.output()
        assert marker.read_text() == "unloaded"
    finally:
        server.stop()


def test_a_score_too_large_for_a_float_is_answered_and_the_server_keeps_serving(shared_server):
    r = post(shared_server.url, json={"messages": [["q", "huge"]]})
    assert r.status_code == 500, r.text
    assert r.json()["error"] == "Probe.compute score [0] is an integer of 401 digits, too large for a float"
    assert post(shared_server.url, json={"messages": [["q", "4"]]}).json() == {"scores": [4.0]}
    assert httpx.get(f"{shared_server.url}/health").status_code == 200


@pytest.mark.parametrize(("model", "text"), [("probe_models.Probe", "sleep 1e6"), ("probe_models.SyncProbe", "1e6")],
                         ids=["async compute", "sync compute"])
def test_sigterm_ends_the_server_within_the_bound_when_compute_never_returns(folder, model, text):
    from lampo.reward_server import SHUTDOWN_BOUND_S, SHUTDOWN_GRACE_S

    server = ServerProcess(folder, model=model)
    try:
        server.wait_healthy()
        result: dict = {}

        def stuck_request():
            result["reply"] = post(server.url, json={"messages": [["u", text]]}, timeout=60)

        thread = threading.Thread(target=stuck_request)
        thread.start()
        time.sleep(0.5)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.wait_exit(timeout=SHUTDOWN_BOUND_S + 10)
        took = time.monotonic() - start
        thread.join(timeout=10)
        assert took < SHUTDOWN_BOUND_S, f"exit took {took:.1f} s:\n{server.output()}"
        assert took >= SHUTDOWN_GRACE_S  # the request had its grace period
        assert code == 1, server.output()  # work was cut off: not a clean stop
        # The stuck request got an answer it can act on (retry against a restarted server).
        assert result["reply"].status_code == 503, result["reply"].text
        assert "shutting down" in result["reply"].json()["error"]
    finally:
        server.stop()


def test_sigterm_ends_the_server_at_the_bound_when_compute_blocks_the_event_loop(folder):
    from lampo.reward_server import SHUTDOWN_BOUND_S

    server = ServerProcess(folder)
    try:
        server.wait_healthy()
        def blocking_request():
            with pytest.raises(httpx.HTTPError):  # the process ends with the request unanswered
                post(server.url, json={"messages": [["u", "block 1e6"]]}, timeout=60)

        thread = threading.Thread(target=blocking_request, daemon=True)
        thread.start()
        time.sleep(0.5)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.wait_exit(timeout=SHUTDOWN_BOUND_S + 10)
        took = time.monotonic() - start
        assert took < SHUTDOWN_BOUND_S + 2, f"exit took {took:.1f} s:\n{server.output()}"
        assert code == 1
        assert f"still running {SHUTDOWN_BOUND_S:g} s after the stop signal" in server.output()
    finally:
        server.stop()


def test_health_answers_while_a_sync_model_scores(folder):
    server = ServerProcess(folder, model="probe_models.SyncProbe")
    try:
        server.wait_healthy()
        result: dict = {}

        def slow_request():
            result["reply"] = post(server.url, json={"messages": [["u", "abc", "u", "1.5"]]})

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.3)
        start = time.monotonic()
        health = httpx.get(f"{server.url}/health", timeout=5)
        answered_in = time.monotonic() - start
        assert health.status_code == 200
        assert answered_in < 0.8, f"/health took {answered_in:.2f} s while compute blocked its thread"
        thread.join(timeout=20)
        assert not result["reply"].is_error and "scores" in result["reply"].json()
        # per-turn scores: one per assistant turn, "abc" -> 3, "1.5" -> 3
        assert result["reply"].json() == {"scores": [[3.0, 3.0]]}
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        ("nope_mod.Model", 2, "cannot find module 'nope_mod' (looked for {folder}/nope_mod.py"),
        ("probe_models.Missing", 2, "{folder}/probe_models.py has no class 'Missing'; reward models found there: "),
        ("probe_models.NotATemplate", 2,
         "'NotATemplate' in {folder}/probe_models.py is not a subclass of lampo.reward_model.RewardModelTemplate"),
        ("probe_models.BadLoad", 1,
         "BadLoad from {folder}/probe_models.py failed to load: FileNotFoundError: weights.bin not found"),
    ],
)
def test_bad_model_stops_start_up_naming_file_and_problem(folder, model, code, message):
    server = ServerProcess(folder, model=model)
    try:
        assert server.wait_exit(timeout=30) == code
        assert message.format(folder=folder) in server.output()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# Client against a live server
# ---------------------------------------------------------------------------------------


def client_for(url: str, **kwargs) -> RewardClient:
    defaults = dict(url=url, batch_size=4, timeout=10, deadline=60, max_retries=40,
                    backoff_base=0.05, backoff_max=0.2)
    defaults.update(kwargs)
    return RewardClient(**defaults)


def test_server_down_at_first_then_up(folder):
    port = free_port()
    messages = [["q", str(i)] for i in range(10)]
    result: dict = {}

    def run():
        async def go():
            async with client_for(f"http://127.0.0.1:{port}") as client:
                result["scores"] = await client.score(messages)
                result["retries"] = client.stats.retries

        asyncio.run(go())

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)  # the client is retrying connection errors by now
    server = ServerProcess(folder, port=port)
    try:
        thread.join(timeout=60)
        assert result["scores"] == [float(i) for i in range(10)]
        assert result["retries"] > 0
    finally:
        server.stop()


def test_server_killed_and_restarted_during_a_run(folder):
    port = free_port()
    config = {"probe_delay": 0.1}
    server = ServerProcess(folder, port=port, config=config)
    server.wait_healthy()
    batches = [[["q", str(100 * k + i)] for i in range(8)] for k in range(12)]
    result: dict = {"done": 0}

    def run():
        async def go():
            async with client_for(server.url, batch_size=2) as client:
                out = []
                for batch in batches:
                    out.append(await client.score(batch))
                    result["done"] += 1
                result["scores"] = out
                result["retries"] = client.stats.retries

        asyncio.run(go())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        while result["done"] < 2:
            time.sleep(0.02)
        server.proc.kill()  # SIGKILL mid-run: requests in flight are cut off
        server.stop()
        server = ServerProcess(folder, port=port, config=config)
        thread.join(timeout=60)
        assert not thread.is_alive()
        # Every batch complete, in order, nothing lost or duplicated.
        assert result["scores"] == [[float(100 * k + i) for i in range(8)] for k in range(12)]
        assert result["retries"] > 0
    finally:
        server.stop()


def test_server_sleeping_past_the_timeout(shared_server):
    async def go():
        async with client_for(shared_server.url, timeout=0.5, max_retries=0) as client:
            await client.score([["q", "sleep 2"]])

    start = time.monotonic()
    with pytest.raises(RewardError, match=r"no answer within reward_timeout = 0.5 s \(ReadTimeout\)"):
        asyncio.run(go())
    assert time.monotonic() - start < 2
    assert httpx.get(f"{shared_server.url}/health").status_code == 200


@pytest.mark.parametrize(("cue", "message"), [
    ("wrong count", "returned 2 scores for 1 conversations"),
    ("nan", "score [0] is nan"),
])
def test_wrong_count_and_nan_replies_raise(shared_server, cue, message):
    async def go():
        async with client_for(shared_server.url, max_retries=1) as client:
            await client.score([["q", cue]])

    with pytest.raises(RewardError) as info:
        asyncio.run(go())
    assert message in str(info.value) and "HTTP 500" in str(info.value)


@pytest.mark.parametrize(("cue", "message"), [
    ("raise", "Probe.compute raised RuntimeError: probe exploded"),
    ("wrong count", "returned 2 scores for 1 conversations"),
    ("huge", "score [0] is an integer of 401 digits"),
])
def test_errors_a_retry_would_repeat_are_marked_and_not_retried(shared_server, cue, message):
    r = post(shared_server.url, json={"messages": [["q", cue]]})
    assert r.status_code == 500 and r.headers["lampo-retryable"] == "false"

    async def go():
        async with client_for(shared_server.url, max_retries=40) as client:
            try:
                await client.score([["q", cue]])
            finally:
                result["stats"] = client.stats

    result: dict = {}
    start = time.monotonic()
    with pytest.raises(RewardError) as info:
        asyncio.run(go())
    assert message in str(info.value) and "not retried" in str(info.value)
    assert result["stats"].retries == 0 and result["stats"].failed_requests == 1
    assert time.monotonic() - start < 2
