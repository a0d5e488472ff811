"""Issue 21, "fail closed": each fatal error outside the reward path ends with a message, its own
exit code and, where the weights are good, a checkpoint; it is found as early as it can be.

In-process Trainer runs where they suffice; one real `python -m lampo.ppo_vllm` run per exit code."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "multistep"


def config(tmp_path: Path, model: Path, **kw):
    from lampo.config import LampoConfig

    values = dict(model_name_or_path=str(model), query_dataset=str(DATA), output_dir=str(tmp_path / "run"), engine="hf",
                  batch_size=4, mini_batch_size=4, max_new_tokens=4, non_stop_penalty=False, learning_rate=1e-3,
                  async_mode=False, seed=3, progress=False, report_to=[], log_samples_steps=0,
                  keep_freed_memory=False, peak_flops=2e11, reward_model="lampo.reward.rules.VowelReward")
    values.update(kw)
    return LampoConfig(values)


def train(cfg) -> None:
    from lampo.trainer import Trainer

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        for s, h in handlers.items():  # the Trainer installs its own; give pytest its own back
            signal.signal(s, h)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_prompt_too_long_stops_the_run_at_load_before_any_model_loads(tmp_path, tiny_model_path, monkeypatch):
    import lampo.trainer as T
    from lampo.rollout.multistep import PromptTooLongError

    monkeypatch.setattr(T, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    rows = [{"text": f"question {i}"} for i in range(10)]
    rows[4] = {"text": "a long question " * 20}  # line 5
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    for ratio in (0.0, 0.5):  # in the train or the test split
        with pytest.raises(PromptTooLongError, match=r"p.jsonl, line 5 \((train|test) split\): the step-0 prompt has "
                                                     r"\d+ tokens, more than max_prompt_len = 32"):
            T.Trainer(config(tmp_path, tiny_model_path, query_dataset=str(data), max_prompt_len=32,
                             test_split_ratio=ratio))
