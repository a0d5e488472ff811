"""The reward client against an in-memory transport: chunking, retries, reply checks."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from lampo.reward.client import RewardClient, RewardError, _retry_after


def make_client(handler, **kwargs) -> RewardClient:
    defaults = dict(url="http://rm.test", batch_size=64, timeout=5, deadline=30, max_retries=3,
                    backoff_base=0.01, backoff_max=0.05)
    defaults.update(kwargs)
    return RewardClient(transport=httpx.MockTransport(handler), **defaults)


def score(handler, messages, **kwargs):
    async def go():
        async with make_client(handler, **kwargs) as client:
            try:
                return await client.score(messages), client.stats
            except RewardError as exc:
                exc.stats = client.stats  # type: ignore[attr-defined]
                raise

    return asyncio.run(go())


def echo(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json={"scores": [float(c[1]) for c in body["messages"]]})


def test_chunks_are_sent_concurrently_and_reassembled_in_order():
    sizes = []

    async def handler(request):
        body = json.loads(request.content)
        sizes.append(len(body["messages"]))
        # Later chunks answer first: order must still come from the chunk index.
        await asyncio.sleep(0.05 * (10 - int(body["messages"][0][1])) / 10)
        return echo(request)

    messages = [["q", str(i)] for i in range(10)]
    scores, stats = score(handler, messages, batch_size=3)
    assert scores == [float(i) for i in range(10)]
    assert sorted(sizes) == [1, 3, 3, 3]
    assert stats.retries == 0 and stats.failed_requests == 0


def test_4xx_is_not_retried_and_its_message_is_raised():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(422, json={"error": "messages[0][1]: Input should be a valid string"})

    with pytest.raises(RewardError, match=r"HTTP 422: messages\[0\]\[1\]: Input should be a valid string") as info:
        score(handler, [["q", "a"]])
    assert len(calls) == 1
    assert info.value.stats.retries == 0 and info.value.stats.failed_requests == 1


def test_429_retry_after_is_honoured():
    times = []

    def handler(request):
        times.append(time.monotonic())
        if len(times) == 1:
            return httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "0.3"})
        return echo(request)

    # backoff_max 0.05 s: a wait of >= 0.3 s can only come from Retry-After.
    scores, stats = score(handler, [["q", "7"]])
    assert scores == [7.0]
    assert times[1] - times[0] >= 0.3
    assert stats.retries == 1 and stats.failed_requests == 1


def test_retry_after_past_the_deadline_fails_at_once_saying_so():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(503, json={"error": "model is loading"}, headers={"Retry-After": "900"})

    start = time.monotonic()
    with pytest.raises(RewardError, match=r"asked to wait 900 s before retrying chunk 0 \(Retry-After\), more than "
                                          r"the \d+\.\d s left of reward_deadline = 3 s; last answer: HTTP 503: "
                                          r"model is loading") as info:
        score(handler, [["q", "1"]], deadline=3)
    assert time.monotonic() - start < 1  # not the deadline spent waiting for an attempt that cannot come
    assert len(calls) == 1 and info.value.stats.failed_requests == 1


def test_5xx_and_connection_errors_are_retried_until_success():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused")
        if len(calls) == 2:
            return httpx.Response(500, json={"error": "MyModel.compute raised RuntimeError: boom"})
        return echo(request)

    scores, stats = score(handler, [["q", "1"], ["q", "2"]])
    assert scores == [1.0, 2.0]
    assert stats.retries == 2 and stats.failed_requests == 2


def test_an_error_the_server_marks_not_retryable_is_raised_at_once():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(500, json={"error": "MyModel.compute raised RuntimeError: boom"},
                              headers={"Lampo-Retryable": "false"})

    with pytest.raises(RewardError, match=r"HTTP 500: MyModel.compute raised RuntimeError: boom; not retried: "
                                          r"the server answered Lampo-Retryable: false") as info:
        score(handler, [["q", "1"]], max_retries=5)
    assert len(calls) == 1
    assert info.value.stats.retries == 0 and info.value.stats.failed_requests == 1


def test_final_failure_says_what_the_server_answered_and_how_to_start_it():
    def handler(request):
        return httpx.Response(500, json={"error": "MyModel.compute raised RuntimeError: boom"})

    with pytest.raises(RewardError) as info:
        score(handler, [["q", "1"]], max_retries=2)
    text = str(info.value)
    assert "failed after 3 attempts" in text
    assert "HTTP 500: MyModel.compute raised RuntimeError: boom" in text
    assert "python -m lampo.reward_server --model" in text
    assert info.value.stats.retries == 2 and info.value.stats.failed_requests == 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ('{"scores": [1.0]}', "returned 1 scores for 2 conversations"),
        ('{"scores": [1.0, NaN]}', r"score \[1\] is nan"),
        ('{"scores": [1.0, Infinity]}', r"score \[1\] is inf"),
        ('{"scores": [1.0, "high"]}', r"score \[1\] is 'high'"),
        ('{"score": [1.0, 2.0]}', "invalid reply"),
        ("not json", "invalid reply"),
    ],
)
def test_bad_replies_raise_and_are_not_retried(reply, message):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(200, content=reply.encode(), headers={"content-type": "application/json"})

    with pytest.raises(RewardError, match=message):
        score(handler, [["q", "1"], ["q", "2"]])
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ('{"scores": [1.0, 1' + "0" * 400 + "]}", r"score \[1\] is an integer of 401 digits, too large for a float"),
        ('{"scores": ' + "[" * 100_000 + "]" * 100_000 + "}", "maximum recursion depth exceeded"),
    ],
    ids=["400-digit integer", "nested 100000 deep"],
)
def test_replies_python_cannot_convert_are_reward_errors(reply, message):
    # Neither may escape as OverflowError or RecursionError: the trainer only turns a RewardError
    # into a checkpoint and exit code 3.
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(200, content=reply.encode(), headers={"content-type": "application/json"})

    with pytest.raises(RewardError, match=r"invalid reply for chunk 0 \(2 conversations\): .*" + message):
        score(handler, [["q", "1"], ["q", "2"]])
    assert len(calls) == 1


def test_timeout_is_retried_then_reported_clearly():
    def handler(request):
        raise httpx.ReadTimeout("timed out")

    with pytest.raises(RewardError, match=r"no answer within reward_timeout = 5 s \(ReadTimeout\)"):
        score(handler, [["q", "1"]], max_retries=1)


def test_overall_deadline():
    async def handler(request):
        await asyncio.sleep(2)
        return echo(request)

    start = time.monotonic()
    with pytest.raises(RewardError, match=r"exceeded reward_deadline = 0.3 s for 1 conversations"):
        score(handler, [["q", "1"]], deadline=0.3)
    assert time.monotonic() - start < 1.5


def test_token_is_sent_as_bearer():
    seen = []

    def handler(request):
        seen.append(request.headers.get("authorization"))
        return echo(request)

    score(handler, [["q", "1"]], token="s3cret")
    assert seen == ["Bearer s3cret"]


def test_retry_after_header_forms():
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "2"})) == 2.0
    assert _retry_after(httpx.Response(429)) is None
    later = datetime.now(UTC) + timedelta(seconds=30)
    wait = _retry_after(httpx.Response(429, headers={"Retry-After": format_datetime(later, usegmt=True)}))
    assert 25 < wait <= 30


def test_wait_until_healthy_fails_fast_when_the_server_process_exits(tmp_path):
    import socket
    import subprocess
    import sys

    from lampo.reward.client import wait_until_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"  # nothing listens here
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(30)
    with pytest.raises(RuntimeError, match=r"exited with code 3; see .*server\.log"):
        wait_until_healthy(url, proc, timeout=30, log_path=tmp_path / "server.log")
    with pytest.raises(TimeoutError, match="did not answer /health"):
        wait_until_healthy(url, timeout=0.3, poll=0.05)
