"""RewardModelTemplate, reply checks, and loading a class from its dotted path."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest

from lampo.reward.loading import RewardModelLoadError, build_model, import_model_class, model_config_from
from lampo.reward_model import RewardModelTemplate, check_scores, ensure_loaded, run_compute


class Counting(RewardModelTemplate):
    def __init__(self, config, call_load=True):
        super().__init__(config)
        self.loads = 0
        if call_load:
            self.load()

    def load(self):
        self.loads += 1

    async def compute(self, messages):
        return [0.4 for _ in messages]


def test_load_runs_once_whether_or_not_init_calls_it():
    model = Counting({}, call_load=True)
    ensure_loaded(model)
    assert model.loads == 1 and model.is_loaded
    lazy = Counting({}, call_load=False)
    assert not lazy.is_loaded
    ensure_loaded(lazy)
    assert lazy.loads == 1 and lazy.is_loaded
    lazy.unload()
    assert not lazy.is_loaded


def test_design_doc_example_score():
    # messages = [["Hi", "Hello"]] -> [0.4], the score of the response "Hello".
    assert asyncio.run(run_compute(Counting({}), [["Hi", "Hello"]])) == [0.4]


def test_sync_compute_runs_in_a_worker_thread():
    class Sync(RewardModelTemplate):
        def compute(self, messages):  # a plain def: must not run on the event loop's thread
            return [float(threading.get_ident() != main) for _ in messages]

    main = threading.get_ident()
    assert asyncio.run(run_compute(Sync({}), [["a", "b"]])) == [1.0]


def test_run_sync_helper_offloads():
    class Heavy(RewardModelTemplate):
        async def compute(self, messages):
            return await self.run_sync(lambda: [float(threading.get_ident() != main)] * len(messages))

    main = threading.get_ident()
    assert asyncio.run(run_compute(Heavy({}), [["a", "b"], ["c", "d"]])) == [1.0, 1.0]


def test_base_compute_says_what_to_implement():
    with pytest.raises(NotImplementedError, match="must implement compute"):
        asyncio.run(RewardModelTemplate({}).compute([["a", "b"]]))


def test_check_scores_accepts_floats_ints_and_per_turn_lists():
    msgs = [["u", "a"], ["u1", "a1", "u2", "a2"]]
    assert check_scores([1, [0.5, 2]], msgs) == [1.0, [0.5, 2.0]]


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([1.0], "returned 1 scores for 2 conversations"),
        ([1.0, 2.0, 3.0], "returned 3 scores for 2 conversations"),
        ([1.0, math.nan], r"score \[1\] is nan \(not finite\)"),
        ([math.inf, 1.0], r"score \[0\] is inf"),
        ([1.0, "x"], r"score \[1\] is 'x'"),
        ([1.0, None], r"score \[1\] is None"),
        ([1.0, True], r"score \[1\] is True"),
        ([1.0, [1.0]], "1 per-turn scores for conversation 1, which has 2 assistant turns"),
        ([1.0, [1.0, math.nan]], r"score \[1\]\[1\] is nan"),
        ({"a": 1}, "returned dict"),
    ],
)
def test_check_scores_rejects_bad_replies(scores, message):
    with pytest.raises(ValueError, match=message):
        check_scores(scores, [["u", "a"], ["u1", "a1", "u2", "a2"]])


def test_import_model_class_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_rm_mod.py").write_text(
        "from lampo.reward_model import RewardModelTemplate\n"
        "class Good(RewardModelTemplate):\n    async def compute(self, messages):\n        return [1.0]\n"
        "class NotTemplate:\n    pass\n"
        "class Broken(RewardModelTemplate):\n    def load(self):\n        raise OSError('weights missing')\n"
    )
    monkeypatch.chdir(tmp_path)
    assert import_model_class("my_rm_mod.Good").__name__ == "Good"
    with pytest.raises(RewardModelLoadError, match=r"my_rm_mod\.py has no class 'Nope'; reward models found there: "):
        import_model_class("my_rm_mod.Nope")
    with pytest.raises(RewardModelLoadError, match=r"'NotTemplate' in .*my_rm_mod\.py is not a subclass"):
        import_model_class("my_rm_mod.NotTemplate")
    with pytest.raises(RewardModelLoadError, match=r"cannot find module 'no_such_mod' \(looked for .*no_such_mod\.py"):
        import_model_class("no_such_mod.X")
    with pytest.raises(RewardModelLoadError, match="must be a dotted path"):
        import_model_class("JustAName")
    with pytest.raises(RewardModelLoadError, match=r"Broken from .*my_rm_mod\.py failed to load: OSError: weights missing"):
        build_model(import_model_class("my_rm_mod.Broken"), {})


def test_model_config_merges_reward_model_config_on_top():
    raw = {"learning_rate": 1e-5, "keywords": ["a"], "reward_model_config": {"keywords": ["b"], "x": 1}}
    merged = model_config_from(raw)
    assert merged["keywords"] == ["b"] and merged["x"] == 1 and merged["learning_rate"] == 1e-5


@pytest.mark.parametrize("score", [10**400, -(10**400), [1.0, 10**400]], ids=["huge", "negative", "per-turn"])
def test_check_scores_rejects_an_integer_too_large_for_a_float(score):
    # float(10**400) raises OverflowError; it must be the same ValueError as every other bad score.
    with pytest.raises(ValueError, match=r"score \[1\](\[1\])? is an integer of 401 digits, too large for a float"):
        check_scores([1.0, score], [["u", "a"], ["u1", "a1", "u2", "a2"]])


def test_a_sync_compute_that_does_not_return_holds_up_neither_the_loop_nor_its_close():
    # asyncio.run joins the default executor's threads on exit: with compute in that pool, a
    # stuck compute would keep a reward server from exiting after SIGTERM.
    class Stuck(RewardModelTemplate):
        def compute(self, messages):
            time.sleep(3)  # "forever" for this test, short enough not to outlive the test run
            return [1.0]

    async def give_up():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(run_compute(Stuck({}), [["a", "b"]]), 0.2)

    runner = threading.Thread(target=asyncio.run, args=(give_up(),), daemon=True)
    start = time.monotonic()
    runner.start()
    runner.join(timeout=2)
    assert not runner.is_alive(), "asyncio.run waited for the stuck compute's thread"
    assert time.monotonic() - start < 2
