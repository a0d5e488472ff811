"""`python -m lampo.ppo_vllm --config grpo_argument.json`: a PaddleNLP argument file runs the application,
with its task files, its in-process reward model, evaluation, the dataset's token-length histograms,
and push_to_hub against a local stand-in for the hub's HTTP API (lampo.testing.hub_stub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lampo.testing.hub_stub import USER, HubStub
from lampo.tracking import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PADDLE_DATA = ROOT / "examples" / "data" / "paddlenlp" / "train.jsonl"


def grpo_argument_file(tmp_path: Path, actor: Path, reward: Path) -> Path:
    """A GRPO argument file as PaddleNLP writes them (llm/config/qwen/grpo_argument.json), scaled to the tiny models,
    naming its data through task files as the PPO/GRPO page describes."""
    (tmp_path / "task_ppo.json").write_text(json.dumps([{"task_name": "src-tgt", "filepath": str(PADDLE_DATA),
                                                         "prob": 1.0}]))
    args = {
        "logging_steps": 1, "logging_dir": "vdl_log",
        "train_task_config": str(tmp_path / "task_ppo.json"), "eval_task_config": str(tmp_path / "task_ppo.json"),
        "ptx_task_config": "", "actor_model_name_or_path": str(actor), "reward_model_name_or_path": str(reward),
        "use_rm_server": 0, "rl_algorithm": "grpo", "bf16": 0, "fp16": 0, "fp16_opt_level": "O2",
        "do_train": 1, "do_eval": 1, "evaluation_strategy": "steps", "eval_steps": 2, "max_evaluate_steps": 1,
        "per_device_eval_batch_size": 3, "adam_beta1": 0.9, "adam_beta2": 0.95, "dataloader_drop_last": 0,
        "gradient_accumulation_steps": 2, "ignore_save_lr_and_optim": 1, "kl_loss_coeff": 0.001,
        "learning_rate": 1e-3, "min_learning_rate": 1e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0,
        "max_grad_norm": 1.0, "max_seq_len": 262, "max_steps": 2, "num_train_epochs": 1,
        "output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 2, "save_steps": 1,
        "save_strategy": "steps", "save_total_limit": 5, "update_iters": 1, "weight_decay": 0.01,
        "max_dec_len": 6, "max_prompt_len": 256, "min_dec_len": 1, "normalize_advantage": 1, "normalize_reward": 0,
        "num_return_sequences": 2, "per_device_prompt_batch_size": 2, "repetition_penalty": 1.0,
        "temperature": 1.0, "top_p": 1.0, "recompute": 0, "recompute_granularity": "full",
        "use_flash_attention": 0, "use_fusemt": 1, "clip_range_ratio": 0.2, "clip_range_score": 10.0,
        "ptx_coeff": 16.0, "disable_tqdm": 1, "sharding_parallel_degree": 1, "tensor_parallel_degree": 1,
        "pipeline_parallel_degree": 1, "sequence_parallel": 0, "seed": 23,
    }
    path = tmp_path / "grpo_argument.json"
    path.write_text(json.dumps(args, indent=4))
    return path


def test_grpo_argument_file_trains_evaluates_and_pushes(tmp_path, tiny_model_path, tiny_classifier_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = grpo_argument_file(tmp_path, tiny_model_path, tiny_classifier_path)
    with HubStub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HUB_OFFLINE": "0",
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "LAMPO_PEAK_FLOPS": "2e11"}
        out = subprocess.run(
            [sys.executable, "-m", "lampo.ppo_vllm", "--config", str(config), "--engine", "hf",
             "--push_to_hub", "true", "--hub_model_id", "tiny-grpo", "--hub_push_checkpoints", "true"],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    for key in ("use_fusemt", "use_flash_attention", "fp16_opt_level", "recompute_granularity", "adam_beta2",
                "clip_range_score", "logging_dir", "tensor_parallel_degree"):
        assert f"lampo: PaddleNLP key '{key}'" in out.stdout, key
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records if "objective/scores" in r] == [1, 2]
    (evaluation,) = [r for r in records if "eval/scores" in r]
    assert evaluation["step"] == 2
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert (resolved["estimator"], resolved["reward_model"], resolved["value_model_name_or_path"]) == (
        "grpo", "lampo.reward.hf_classifier.HFSequenceClassifierReward", str(tiny_classifier_path))
    assert (resolved["mini_batch_size"], resolved["eval_batch_size"], resolved["min_learning_rate"]) == (4, 3, 1e-4)
    # the dataset's token lengths: the PNG in output_dir, histograms in TensorBoard
    assert (run / "token_lengths.png").stat().st_size > 1000
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert "data/prompt_tokens" in events.Tags()["histograms"]
    # the hub: the final model with its card on main, and each checkpoint
    repo = hub.repos[f"{USER}/tiny-grpo"]
    files = repo.files["main"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(files)
    assert {"checkpoint-1", "checkpoint-2"} <= {p.split("/")[0] for p in files}
    assert not any(p.endswith(".jsonl") or p.startswith("tensorboard/") for p in files)
    assert "rl_algorithm" not in files["README.md"].decode() and "estimator: grpo" in files["README.md"].decode()
    assert f"final model pushed to {hub.url}/{USER}/tiny-grpo" in out.stdout


def test_do_train_0_evaluates_the_starting_policy_and_exits(tmp_path, tiny_model_path, tiny_classifier_path):
    config = grpo_argument_file(tmp_path, tiny_model_path, tiny_classifier_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # PaddleNLP's run_ppo.py takes the argument file first and unnamed; so does lampo.ppo_vllm
    out = subprocess.run([sys.executable, "-m", "lampo.ppo_vllm", str(config), "--engine", "hf", "--do_train", "0",
                          "--rl_algorithm", "ppo"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    records = read_metrics(tmp_path / "run")
    assert len(records) == 1 and records[0]["step"] == 0 and "eval/scores" in records[0]
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "model.safetensors").exists()
