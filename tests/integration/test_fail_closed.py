"""Issue 21, "fail closed": each fatal error outside the reward path ends with a message, its own
exit code and, where the weights are good, a checkpoint; it is found as early as it can be.

In-process Trainer runs where they suffice; one real `python -m lampo.ppo_vllm` run per exit code."""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_a_fresh_run_in_a_used_output_dir_is_refused_or_overwritten_and_auto_says_it_starts_afresh(
        tmp_path, tiny_model_path, capsys):
    from lampo.config import ConfigError
    from lampo.trainer import Trainer

    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "objective/scores": 0.5}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"output_dir '.*run' holds another run \(metrics.jsonl, checkpoint-5\): a "
                                          r"fresh run there would mix .* --resume_from_checkpoint auto.* "
                                          r"overwrite_output_dir: true"):
        Trainer(config(tmp_path, tiny_model_path))
    train(config(tmp_path, tiny_model_path, overwrite_output_dir=True, max_steps=1))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1] and lines[0]["objective/scores"] != 0.5  # only the new run's
    assert not (run / "checkpoint-5").exists() and (run / "notes.txt").read_text() == "mine"

    # killed before its first checkpoint: `auto` starts from scratch, says so, and starts the files afresh
    for path in run.iterdir():
        if path.name != "metrics.jsonl":
            path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    trainer = Trainer(config(tmp_path, tiny_model_path, resume_from_checkpoint="auto"))
    trainer.close()
    out = capsys.readouterr().out
    assert f"resume_from_checkpoint: auto found no checkpoint in {run}: starting from scratch (the run there " \
           "left no checkpoint; its metrics.jsonl were deleted)" in out
    assert not (run / "metrics.jsonl").exists()


def test_a_checkpoint_of_non_finite_weights_is_never_written(tmp_path, tiny_model_path, capsys):
    from lampo.trainer import Trainer

    trainer = Trainer(config(tmp_path, tiny_model_path))
    try:
        assert trainer.save_checkpoint(1, None) is not None  # good weights: written
        with torch.no_grad():
            next(trainer.learner.policy.parameters()).view(-1)[3] = float("nan")
        assert trainer.save_checkpoint(2, None) is None
    finally:
        trainer.close()
    from lampo.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]
    assert (f"checkpoint-2 not written: weight policy.model.embed_tokens.weight is not finite. The last good weights "
            f"are those of the last checkpoint, {tmp_path / 'run' / 'checkpoint-1'}") in capsys.readouterr().out


def test_a_crash_in_the_final_save_leaves_no_config_json_without_its_weights(tmp_path, tiny_model_path):
    from lampo.checkpoint import CheckpointWriteError
    from lampo.trainer import Trainer

    trainer = Trainer(config(tmp_path, tiny_model_path, max_steps=1))
    policy = trainer.learner.unwrapped_policy()

    def save_then_fill_the_disk(path, **kw):  # transformers writes config.json first, then the weights
        policy.config.save_pretrained(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    policy.save_pretrained = save_then_fill_the_disk
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(CheckpointWriteError, match=r"no space left on the device of .*run to write the final "
                                                       r"model into .*run: it needs about .*previous final model"):
            trainer.train()
    finally:
        trainer.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    run = tmp_path / "run"
    assert not (run / "config.json").exists() and not list(run.glob(".tmp-final-*"))
    assert (run / "metrics.jsonl").exists()


def test_a_batch_whose_rows_are_all_skipped_is_not_trained_and_a_whole_pass_of_them_stops_the_run(
        tmp_path, tiny_model_path, capsys):
    from lampo.trainer import NothingToTrain

    rows = [{"text": "a long question " * 20} for _ in range(8)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = config(tmp_path, tiny_model_path, query_dataset=str(data), test_split_ratio=0.0, max_prompt_len=32,
                 truncation="skip", max_steps=5)
    with pytest.raises(NothingToTrain, match=r"2 steps in a row, a whole pass over query_dataset \(8 rows\), gave no "
                                             r"conversation to train on"):
        train(cfg)
    assert "step 1: no conversation to train on (4 rows skipped by truncation: skip" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["data/skipped_rows"], r["optim/skipped_steps"]) for r in logged] == [(1, 4.0, 1.0)]


# ---------------------------------------------------------------------------------------
# Exit codes of the real command (README: 0 done, 1 a bug, 2 configuration and start-up, 3 the
# reward, 4 diverged, 5 data, 6 a checkpoint write, 130 a second SIGINT; 3 and 130 are shown by
# tests/integration/test_app_e2e.py)
# ---------------------------------------------------------------------------------------


def run_app(tmp_path: Path, model: Path, *extra: str, script: str | None = None, **overrides):
    import os

    import yaml

    cfg = dict(model_name_or_path=str(model), query_dataset=str(DATA), output_dir=str(tmp_path / "run"), engine="hf",
               batch_size=4, mini_batch_size=4, max_new_tokens=4, max_steps=2, non_stop_penalty=False,
               learning_rate=1e-3, progress=False, report_to=[], log_samples_steps=0, seed=3, peak_flops=2e11,
               async_mode=False, reward_model="lampo.reward.rules.VowelReward")
    cfg.update(overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, *(["-c", script] if script else ["-m", "lampo.ppo_vllm"]), "--config", str(path), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_exit_2_for_configuration_and_start_up_errors(tmp_path, tiny_model_path):
    out = run_app(tmp_path, tiny_model_path, "--learning_rate", ".inf")
    assert out.returncode == 2 and "'learning_rate' = inf is invalid: must be a finite number" in out.stderr, out.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    out = run_app(tmp_path, tiny_model_path)
    assert out.returncode == 2 and "holds another run (metrics.jsonl)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_exit_4_when_training_diverges_without_a_checkpoint_of_the_bad_weights(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM

    critic = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        for p in critic.parameters():
            p.fill_(float("nan"))
    critic.save_pretrained(tmp_path / "nan-critic")
    # the critic's values are NaN: every minibatch's loss is, and the critic's weights are not finite
    out = run_app(tmp_path, tiny_model_path, value_model_name_or_path=str(tmp_path / "nan-critic"), max_steps=3,
                  save_step=1, max_bad_steps=2)
    assert out.returncode == 4, out.stderr[-3000:]
    assert "training diverged at step 2: 2 steps in a row had a non-finite loss" in out.stderr
    assert "This run wrote no checkpoint: the last good weights are the ones it started from" in out.stderr
    assert "checkpoint-1 not written: weight value_model." in out.stdout + out.stderr
    assert "Traceback" not in out.stderr and not list((tmp_path / "run").glob("checkpoint-*"))


def test_exit_5_for_a_prompt_too_long_found_before_the_models_load(tmp_path, tiny_model_path):
    out = run_app(tmp_path, tiny_model_path, max_prompt_len=8)
    assert out.returncode == 5, out.stderr[-3000:]
    assert re.search(r"multistep/train.jsonl, line \d+ \(train split\): the step-0 prompt has \d+ tokens, more than "
                     r"max_prompt_len = 8 \(truncation: error\); \d+ more rows", out.stderr), out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


FULL_DISK = """
import errno, sys
import torch
real = torch.save
def save(obj, f, *a, **k):
    if ".tmp-checkpoint-" in str(f):  # every checkpoint state write meets a full disk
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(obj, f, *a, **k)
torch.save = save
from lampo.ppo_vllm import main
sys.exit(main(sys.argv[1:]))
"""


def test_exit_6_when_a_checkpoint_cannot_be_written(tmp_path, tiny_model_path):
    out = run_app(tmp_path, tiny_model_path, script=FULL_DISK, save_step=1)
    assert out.returncode == 6, out.stderr[-3000:]
    assert re.search(r"no space left on the device of \S+run to write checkpoint \S+checkpoint-1: it needs about "
                     r"[\d.]+ [KM]iB and .* is free", out.stderr), out.stderr
    assert "Traceback" not in out.stderr and not list((tmp_path / "run").glob("*checkpoint-*"))
