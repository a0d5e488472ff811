"""make_scorer: the in-process runner, and the server's micro-batcher without HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time

import pytest

from lampo.config import LampoConfig
from lampo.reward import InProcessScorer, RewardCancelled, RewardError, RewardUnavailable, make_scorer
from lampo.reward_model import RewardModelTemplate
from lampo.reward_server import Batcher


def test_in_process_scorer_from_a_non_main_thread():
    cfg = LampoConfig(reward_model="lampo.reward.rules.VowelReward").reward
    scorer = make_scorer(cfg, {})
    try:
        assert isinstance(scorer, InProcessScorer) and scorer.verifiable is False
        scorer.check_available()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # "banana" 3/6 = 0.5; "xyz" 0/3 = 0.0
            futures = [pool.submit(scorer.score, [["q", "banana"], ["q", "xyz"]]) for _ in range(4)]
            assert [f.result() for f in futures] == [[0.5, 0.0]] * 4
        assert scorer.stats() == {"reward/retries": 0, "reward/failed_requests": 0}
    finally:
        scorer.close()
    assert not scorer.model.is_loaded  # close() called unload()


def test_in_process_reward_model_config_reaches_the_model():
    cfg = LampoConfig(reward_model="lampo.reward.rules.VowelReward",
                      reward_model_config={"vowel_per_turn": True}).reward
    scorer = make_scorer(cfg)
    try:
        assert scorer.score([["u", "aa", "u", "bb"]]) == [[1.0, 0.0]]
    finally:
        scorer.close()


def test_in_process_errors_are_reward_errors_never_zero():
    cfg = LampoConfig(reward_model="lampo.reward.rules.ExactAnswerReward").reward
    scorer = make_scorer(cfg, {})
    try:
        assert scorer.verifiable is True
        with pytest.raises(RewardError, match="conversation 0 has no expected answer"):
            scorer.score([["What is 2+2?", "4"]])
        assert scorer.stats()["reward/failed_requests"] == 1
    finally:
        scorer.close()


def test_bad_class_path_names_the_config_key():
    cfg = LampoConfig(reward_model="no_such_module_xyz.Model").reward
    with pytest.raises(RewardError, match=r"config key 'reward_model' = 'no_such_module_xyz.Model'.*cannot find"):
        make_scorer(cfg, {})


def test_http_scorer_check_available_names_the_start_command():
    # Port 9 (discard) on loopback: nothing listens there on these machines.
    cfg = LampoConfig(reward_model="http://127.0.0.1:9").reward
    scorer = make_scorer(cfg)
    try:
        with pytest.raises(RewardUnavailable, match=r"no reward server answers at http://127.0.0.1:9/health.*"
                           r"python -m lampo.reward_server --model .* --port 9"):
            scorer.check_available(timeout=1.0)
    finally:
        scorer.close()


class Recording(RewardModelTemplate):
    def __init__(self, config):
        super().__init__(config)
        self.batches: list[int] = []

    async def compute(self, messages):
        self.batches.append(len(messages))
        return [float(c[1]) for c in messages]


def test_batcher_merges_concurrent_requests_and_splits_replies():
    model = Recording({})

    async def go():
        batcher = Batcher(model, max_batch_size=8, max_wait_ms=50)
        batcher.start()
        try:
            # 10 requests of 2 conversations each, all at once: at most 8 conversations per compute call.
            requests = [[["q", str(10 * i)], ["q", str(10 * i + 1)]] for i in range(10)]
            return await asyncio.gather(*(batcher.submit(r) for r in requests))
        finally:
            await batcher.stop()

    replies = asyncio.run(go())
    assert replies == [[10.0 * i, 10.0 * i + 1] for i in range(10)]
    assert model.batches == [8, 8, 4]  # 20 conversations in 3 calls instead of 10


def test_batcher_errors_reach_every_request_of_the_batch():
    class Bad(RewardModelTemplate):
        async def compute(self, messages):
            return [1.0]  # one score whatever the count

    async def go():
        batcher = Batcher(Bad({}), max_batch_size=8, max_wait_ms=20)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit([["q", "a"]]) for _ in range(2)), return_exceptions=True)
        finally:
            await batcher.stop()

    errors = asyncio.run(go())
    assert all("Bad.compute returned 1 scores for 2 conversations (in a micro-batch of 2 requests)" in str(e)
               for e in errors)


def test_batcher_answers_any_failure_of_a_batch_and_serves_the_next():
    class Unreadable:
        def tolist(self):  # check_scores converts arrays with tolist(); this one raises
            raise RuntimeError("device lost")

    class Flaky(RewardModelTemplate):
        calls = 0

        async def compute(self, messages):
            self.calls += 1
            return Unreadable() if self.calls == 1 else [2.0] * len(messages)

    async def go():
        batcher = Batcher(Flaky({}), max_batch_size=8, max_wait_ms=1)
        batcher.start()
        try:
            first = await asyncio.wait_for(asyncio.gather(batcher.submit([["q", "a"]]), return_exceptions=True), 5)
            second = await asyncio.wait_for(batcher.submit([["q", "b"]]), 5)
            return first[0], second
        finally:
            await batcher.stop()

    error, scores = asyncio.run(go())
    assert str(error) == "Flaky.compute returned a reply that could not be checked: RuntimeError: device lost"
    assert scores == [2.0]


@pytest.mark.parametrize("value", ["localhost:8000", "my reward model", "Model"])
def test_reward_model_that_is_neither_url_nor_class_path(value):
    with pytest.raises(RewardError, match="neither a URL"):
        make_scorer(LampoConfig(reward_model=value).reward)


# Models that never return in time, in a module of the current folder (as users write them). The
# sleeps are long for the tests and finite, so a thread left behind ends on its own.
STUCK_MODELS = """
import asyncio, time
from lampo.reward_model import RewardModelTemplate


class AsyncForever(RewardModelTemplate):
    async def compute(self, messages):
        if messages[0][-1] != "ok":
            await asyncio.sleep(20)
        return [1.0] * len(messages)


class SyncForever(RewardModelTemplate):
    def compute(self, messages):
        if messages[0][-1] != "ok":
            time.sleep(20)
        return [1.0] * len(messages)


class BlocksItsLoop(RewardModelTemplate):
    async def compute(self, messages):
        if messages[0][-1] != "ok":
            time.sleep(20)  # blocking work inside async def: the event loop stops with it
        return [1.0] * len(messages)
"""


@pytest.fixture
def stuck_models(tmp_path, monkeypatch):
    (tmp_path / "stuck_models.py").write_text(STUCK_MODELS)
    monkeypatch.chdir(tmp_path)


def within(seconds: float, fn, *args):
    """fn(*args) in a daemon thread: its result, or AssertionError if it takes longer (never a hung test)."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} took longer than {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.parametrize(("model", "left"), [
    ("AsyncForever", "it was cancelled"),
    ("SyncForever", "a plain `def compute` runs in a thread that cannot be stopped: it is left running"),
    ("BlocksItsLoop", "it blocks its event loop"),
])
def test_in_process_compute_is_bounded_by_reward_timeout(stuck_models, model, left):
    cfg = LampoConfig(reward_model=f"stuck_models.{model}", reward_timeout=0.3, reward_deadline=600).reward
    scorer = make_scorer(cfg, {})
    try:
        with pytest.raises(RewardError) as info:
            within(3, scorer.score, [["q", "stuck"]])
        assert str(info.value).startswith(
            f"in-process reward model stuck_models.{model}: {model}.compute did not return within "
            f"reward_timeout = 0.3 s for 1 conversations; {left}"
        )
        assert scorer.stats()["reward/failed_requests"] == 1
        # The next call is not held up behind the stuck one.
        assert within(1, scorer.score, [["q", "ok"]]) == [1.0]
    finally:
        scorer.close()


def test_in_process_compute_is_bounded_by_reward_deadline_when_that_is_shorter(stuck_models):
    scorer = InProcessScorer("stuck_models.AsyncForever", {}, timeout=5, deadline=0.3)
    try:
        with pytest.raises(RewardError, match=r"AsyncForever.compute did not return within reward_deadline = 0.3 s"):
            within(3, scorer.score, [["q", "stuck"]])
    finally:
        scorer.close()


def test_cancel_ends_an_in_process_score_in_flight_and_every_later_one(stuck_models):
    scorer = make_scorer(LampoConfig(reward_model="stuck_models.AsyncForever", reward_timeout=600).reward, {})
    try:
        threading.Timer(0.3, scorer.cancel, args=("SIGTERM received",)).start()
        start = time.monotonic()
        with pytest.raises(RewardCancelled, match="reward scoring cancelled: SIGTERM received"):
            within(3, scorer.score, [["q", "stuck"]])
        assert time.monotonic() - start < 1
        with pytest.raises(RewardCancelled):
            within(1, scorer.score, [["q", "ok"]])
    finally:
        scorer.close()


def test_cancel_ends_the_retries_of_a_dead_reward_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here: every attempt is a connection error
    cfg = LampoConfig(reward_model=f"http://127.0.0.1:{port}", reward_deadline=600, reward_max_retries=1000).reward
    scorer = make_scorer(cfg)
    try:
        threading.Timer(1.0, scorer.cancel, args=("SIGTERM received",)).start()
        start = time.monotonic()
        with pytest.raises(RewardCancelled, match="reward scoring cancelled: SIGTERM received"):
            within(5, scorer.score, [["q", "a"]])
        assert time.monotonic() - start < 2
        assert isinstance(RewardCancelled("x"), RewardError)  # the trainer's handling of reward errors applies
        with pytest.raises(RewardCancelled):
            within(1, scorer.score, [["q", "a"]])
    finally:
        scorer.close()
