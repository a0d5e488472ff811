"""The 2026 algorithms through the application (issue 17): dynamic sampling and its exact resume,
the engine/learner mismatch measured apart from the policy's change, top-k/top-p consistency,
and the start-up check of the engine's log-probs."""

from __future__ import annotations

import json
import logging
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "multistep"
# a reward with ties: 1.0 when the answer holds an "e", else 0.0 (a random tiny model: about half)
TIED_REWARD = dict(reward_model="lampo.reward.rules.FormatReward", reward_model_config={"format_pattern": "e"})


def config(tmp_path: Path, model: Path, **kw):
    from lampo.config import LampoConfig

    values = dict(model_name_or_path=str(model), query_dataset=str(DATA), output_dir=str(tmp_path / "run"), engine="hf",
                  estimator="grpo", num_generations=2, batch_size=4, mini_batch_size=8, max_new_tokens=6,
                  non_stop_penalty=False, learning_rate=1e-2, lr_scheduler_type="constant", async_mode=False,
                  seed=5, progress=False, report_to=[], log_samples_steps=0, keep_freed_memory=False,
                  peak_flops=2e11, **TIED_REWARD)
    values.update(kw)
    return LampoConfig(values)


def trainer_of(cfg):
    from lampo.trainer import Trainer

    return Trainer(cfg)


def train(cfg) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = trainer_of(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        for s, h in handlers.items():  # the Trainer installs its own; give pytest its own back
            signal.signal(s, h)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_dynamic_sampling_trains_full_batches_of_groups_with_a_signal(tmp_path, tiny_model_path):
    trainer = trainer_of(config(tmp_path, tiny_model_path, dynamic_sampling=True, dynamic_sampling_max_rounds=6))
    try:
        plain = trainer._rollout_and_score(0, trainer.sampler.rows_for(0))
        produced = trainer.produce(0)
    finally:
        trainer.close()
    tied = [s for s in torch.tensor(plain.scores).view(-1, 2).tolist() if s[0] == s[1]]
    assert tied, "the task must have groups without a signal for the test to mean anything"
    groups = torch.tensor(produced.scores).view(-1, 2)
    assert len(groups) == 4 and bool((groups[:, 0] != groups[:, 1]).all())  # a full batch, every group informative
    assert produced.data_stats["data/filtered_groups"] >= len(tied)
    assert produced.data_stats["data/resample_rounds"] >= 1
    assert list(produced.batch.prompt_index.view(-1, 2)[:, 0]) == list(produced.batch.prompt_index.view(-1, 2)[:, 1])


def test_dynamic_sampling_past_its_rounds_trains_what_it_has_and_says_so(tmp_path, tiny_model_path, caplog):
    trainer = trainer_of(config(tmp_path, tiny_model_path, dynamic_sampling=True, dynamic_sampling_max_rounds=0))
    try:
        with caplog.at_level(logging.WARNING):
            produced = trainer.produce(0)
    finally:
        trainer.close()
    assert len(produced.batch) < 8 and produced.data_stats["data/resample_rounds"] == 0
    assert "groups with a learning signal after 0 extra rounds" in caplog.text


def test_dynamic_sampling_learns_and_resumes_exactly(tmp_path, tiny_model_path):
    common = dict(dynamic_sampling=True, dynamic_sampling_max_rounds=3, save_step=1, overlong_buffer_len=2)
    a, b = tmp_path / "a", tmp_path / "b"
    train(config(a, tiny_model_path, max_steps=12, **common))
    train(config(b, tiny_model_path, max_steps=12, early_stop={"episode": 16.0}, **common))  # stops after step 2
    train(config(b, tiny_model_path, max_steps=12, resume_from_checkpoint="auto", **common))
    wa, wb = load_file(str(a / "run" / "model.safetensors")), load_file(str(b / "run" / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    ra, rb = metrics(a / "run"), metrics(b / "run")
    assert [r["data/filtered_groups"] for r in ra] == [r["data/filtered_groups"] for r in rb]
    # the share of answers with an "e" rises (the reward, after the overlong shaping's small cost)
    scores = [r["objective/scores"] for r in ra]
    assert statistics.mean(scores[-3:]) > statistics.mean(scores[:3]), scores


def test_the_start_up_check_warns_when_the_engine_holds_other_weights(tmp_path, tiny_model_path, caplog):
    trainer = trainer_of(config(tmp_path, tiny_model_path, engine_logprob_tolerance=0.05))
    try:
        batch = trainer.to_train_batch(trainer.produce(0))
        with caplog.at_level(logging.WARNING):
            assert trainer.check_engine_agreement(batch) < 1e-4  # fp32, same weights: no gap
        assert "differ by" not in caplog.text
        with torch.no_grad():  # the engine's copy drifts from the learner's, as after a lost sync
            for p in trainer.engine.model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        batch = trainer.to_train_batch(trainer.produce(1))
        with caplog.at_level(logging.WARNING):
            assert trainer.check_engine_agreement(batch) > 0.05
    finally:
        trainer.close()
    assert "a weight sync that did not reach the engine" in caplog.text


def run_app(tmp_path: Path, model: Path, **overrides) -> list[dict]:
    cfg = {"model_name_or_path": str(model), "query_dataset": str(DATA), "output_dir": str(tmp_path / "run"),
           "engine": "hf", "batch_size": 4, "mini_batch_size": 4, "max_new_tokens": 6, "max_steps": 3,
           "non_stop_penalty": False, "learning_rate": 1e-2, "progress": False, "seed": 3, "peak_flops": 2e11,
           "reward_model": "lampo.reward.rules.VowelReward", **overrides}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "lampo.ppo_vllm", "--config", str(path)], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return [r for r in metrics(tmp_path / "run") if "objective/scores" in r]


def test_async_runs_measure_the_engine_gap_on_the_sampling_weights_apart_from_the_policy_change(
        tmp_path, tiny_model_path):
    # The hf engine in fp32 computes what the learner computes: on the weights that sampled a batch
    # the gap is numerical noise, while the policy's one update since is a real change. Sampling with
    # top-k and top-p too: the learner computes their truncated distribution (no systematic gap).
    rows = run_app(tmp_path, tiny_model_path, async_mode=True, top_k=20, top_p=0.9, temperature=0.9)
    assert [r["policy/version_lag"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["val/engine_logprob_diff"] < 1e-4 for r in rows), [r["val/engine_logprob_diff"] for r in rows]
    assert rows[0]["val/policy_change_logprob_diff"] == 0.0 and rows[0]["rollout/kl_staleness"] == 0.0
    assert all(r["val/policy_change_logprob_diff"] > 1e-3 and r["rollout/kl_staleness"] > 0 for r in rows[1:])
    assert all(r["rollout/kl"] >= r["rollout/kl_numerical"] for r in rows[1:])
    # the ratios split the same way: numerical ratios stay at 1 (fp32 on both sides), staleness
    # ratios are exactly 1 before the first update and move after it
    assert all(abs(r[f"rollout/ratio_numerical_{s}"] - 1) < 1e-3 for r in rows for s in ("min", "max"))
    assert rows[0]["rollout/ratio_staleness_min"] == rows[0]["rollout/ratio_staleness_max"] == 1.0
    assert all(r["rollout/ratio_staleness_max"] - r["rollout/ratio_staleness_min"] > 1e-3 for r in rows[1:])
