"""PaddleNLP argument files (lampo.compat.paddlenlp): every key the PPO/GRPO page lists is honoured."""

from __future__ import annotations

import json

import pytest

from lampo.compat.paddlenlp import HF_CLASSIFIER, NO_MEANING, load_argument_file
from lampo.config import ConfigError

# Every key of design document 002's argument list, with values as PaddleNLP writes them (0/1 booleans).
DOCUMENT_FILE = {
    "train_task_config": "config/task_ppo.json",
    "eval_task_config": "config/task_eval.json",
    "ptx_task_config": "",
    "actor_model_name_or_path": "models/actor",
    "reward_model_name_or_path": "models/reward",
    "use_fusemt": 1,
    "use_flash_attention": 0,
    "output_dir": "checkpoints/ppo",
    "max_seq_len": 4096,
    "max_dec_len": 1024,
    "min_dec_len": 1,
    "top_p": 0.8,
    "temperature": 0.7,
    "repetition_penalty": 1.05,
    "num_return_sequences": 1,
    "min_learning_rate": 2e-7,
    "critic_learning_rate": 2e-6,
    "recompute": 1,
    "critic_recompute": 1,
    "recompute_granularity": "full",
    "critic_recompute_granularity": "full",
    "warmup_ratio": 0.03,
    "critic_warmup_ratio": 0.05,
    "lr_scheduler_type": "cosine",
    "critic_lr_scheduler_type": "linear",
    "weight_decay": 0.01,
    "critic_weight_decay": 0.02,
    "max_prompt_len": 512,
    "per_device_prompt_batch_size": 4,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 8,
    "max_steps": 17,
    "eval_steps": 5,
    "max_evaluate_steps": 3,
    "logging_steps": 2,
    "save_steps": 10,
    "do_train": 1,
    "do_eval": 1,
    "fp16": 0,
    "bf16": 1,
    "fp16_opt_level": "O2",
    "learning_rate": 2e-6,
    "gradient_accumulation_steps": 2,
}
NO_EFFECT = ("use_fusemt", "use_flash_attention", "critic_recompute", "recompute_granularity",
             "critic_recompute_granularity", "fp16_opt_level")


def load(tmp_path, values, overrides=None):
    path = tmp_path / "ppo_argument.json"
    path.write_text(json.dumps(values))
    lines = []
    return load_argument_file(path, overrides, echo=lines.append), lines


def test_every_key_of_the_document_is_honoured(tmp_path):
    cfg, lines = load(tmp_path, DOCUMENT_FILE)
    d = cfg.to_dict()
    expected = {
        "train_task_config": "config/task_ppo.json", "eval_task_config": "config/task_eval.json",
        "model_name_or_path": "models/actor", "output_dir": "checkpoints/ppo",
        # the reward model scores in-process, and the critic starts from it
        "reward_model": HF_CLASSIFIER, "reward_model_config": {"hf_reward_model": "models/reward"},
        "value_model_name_or_path": "models/reward",
        "max_new_tokens": 1024, "min_new_tokens": 1, "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.05,
        "num_generations": 1, "min_learning_rate": 2e-7, "critic_learning_rate": 2e-6, "learning_rate": 2e-6,
        "gradient_checkpointing": True, "warmup_ratio": 0.03, "critic_warmup_ratio": 0.05,
        "lr_scheduler_type": "cosine", "critic_lr_scheduler_type": "linear", "weight_decay": 0.01,
        "critic_weight_decay": 0.02, "max_prompt_len": 512, "batch_size": 4,
        # PaddleNLP's training minibatch: per_device_train_batch_size x gradient_accumulation_steps
        "mini_batch_size": 4, "gradient_accumulation_steps": 2,
        "eval_batch_size": 8, "max_steps": 17, "eval_steps": 5, "eval_batches": 3, "logging_steps": 2,
        "save_step": 10, "do_train": True, "fp16": False, "bf16": True,
    }
    assert {k: d[k] for k in expected} == expected
    # the keys without meaning here are accepted, each with one line that says so
    assert len(lines) == len(NO_EFFECT)
    for key, line in zip(NO_EFFECT, lines, strict=True):
        assert line.startswith(f"lampo: PaddleNLP key '{key}'") and NO_MEANING[key] in line


def test_do_eval_and_strategies_switch_evaluation_and_saving(tmp_path):
    cfg, _ = load(tmp_path, {**DOCUMENT_FILE, "do_eval": 0})
    assert cfg.train.eval_steps == 0
    cfg, _ = load(tmp_path, {**DOCUMENT_FILE, "evaluation_strategy": "no", "save_strategy": "no"})
    assert cfg.train.eval_steps == 0 and cfg.train.save_step == 0
    cfg, _ = load(tmp_path, {**DOCUMENT_FILE, "do_train": 0})
    assert cfg.train.do_train is False


def test_the_grpo_files_own_keys(tmp_path):
    grpo = {"rl_algorithm": "grpo", "num_return_sequences": 8, "per_device_prompt_batch_size": 4,
            "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4, "kl_loss_coeff": 0.001,
            "clip_range_ratio": 0.2, "clip_range_value": 5.0, "normalize_advantage": 1, "normalize_reward": 0,
            "update_iters": 2, "use_rm_server": True, "reward_server": "http://127.0.0.1:8731",
            "reward_model_name_or_path": "", "disable_tqdm": 1, "tensor_parallel_degree": 4, "adam_beta2": 0.95,
            "ptx_coeff": 16.0, "max_length": 4608, "max_prompt_len": 512, "max_dec_len": 4096}
    cfg, lines = load(tmp_path, grpo)
    assert (cfg.optim.estimator, cfg.generation.num_generations, cfg.optim.mini_batch_size) == ("grpo", 8, 32)
    assert (cfg.optim.kl_coef, cfg.optim.cliprange, cfg.optim.cliprange_value, cfg.optim.ppo_epochs) == (0.001, 0.2, 5.0, 2)
    assert cfg.optim.whiten_advantages is True and cfg.optim.whiten_rewards is False
    assert cfg.reward.reward_model == "http://127.0.0.1:8731" and cfg.train.progress is False
    assert cfg.model.value_model_name_or_path is None  # no reward model path: the critic starts from the policy
    assert cfg.optim.ptx_coef == 16.0  # PPO-ptx's weight; without ptx data it weighs nothing, as in PaddleNLP
    said = " ".join(lines)
    for key in ("tensor_parallel_degree", "adam_beta2"):
        assert f"'{key}'" in said


def test_lengths_are_checked_against_max_seq_len(tmp_path):
    with pytest.raises(ConfigError, match=r"'max_seq_len' = 1000 is invalid: max_prompt_len \(512\) \+ max_dec_len "
                                          r"\(1024\) = 1536"):
        load(tmp_path, {**DOCUMENT_FILE, "max_seq_len": 1000})
    # the command line's --max_dec_len applies after the file, and the check sees it
    cfg, _ = load(tmp_path, {**DOCUMENT_FILE, "max_seq_len": 1000}, {"max_dec_len": 400})
    assert cfg.generation.max_new_tokens == 400
    cfg, _ = load(tmp_path, DOCUMENT_FILE, {"max_new_tokens": 9})  # an override in Lampo's name wins too
    assert cfg.generation.max_new_tokens == 9


def test_ptx_task_config_names_ptx_data_and_unknown_keys_are_errors_that_say_what_to_do(tmp_path):
    cfg, _ = load(tmp_path, {**DOCUMENT_FILE, "ptx_task_config": "config/task_sft.json"})
    assert (cfg.data.ptx_task_config, cfg.data.ptx_dataset) == ("config/task_sft.json", None)
    assert load(tmp_path, DOCUMENT_FILE)[0].data.ptx_task_config is None  # "" in the document: no ptx data
    with pytest.raises(ConfigError, match=r"'ptx_datasets' = 'sft.jsonl': name PPO-ptx's data in a task file with "
                                          r"'ptx_task_config'"):
        load(tmp_path, {"ptx_datasets": "sft.jsonl"})
    with pytest.raises(ConfigError, match=r"'ptx_task_config' = 't.json' is invalid: names PPO-ptx's data, and so "
                                          r"does ptx_dataset = 'sft.jsonl': keep one of the two"):
        load(tmp_path, {"ptx_task_config": "t.json", "ptx_dataset": "sft.jsonl"})
    with pytest.raises(ConfigError, match=r"unknown key 'max_dec_length'.*did you mean 'max_dec_len' \(Lampo's 'max_new_tokens'\)"):
        load(tmp_path, {"max_dec_length": 5})
    with pytest.raises(ConfigError, match=r"'clip_range_ration'.*did you mean 'clip_range_ratio' \(Lampo's 'cliprange'\)"):
        load(tmp_path, {"clip_range_ration": 0.2})
    with pytest.raises(ConfigError, match=r"'train_datasets'.*train_task_config"):
        load(tmp_path, {"train_datasets": "ppo-kk/train.jsonl"})
    with pytest.raises(ConfigError, match=r"'recompute' \(Lampo's 'gradient_checkpointing'\) = 2 has the wrong type"):
        load(tmp_path, {"recompute": 2})


def test_docs_compat_md_names_every_key_the_reader_knows():
    from pathlib import Path

    from lampo.compat.paddlenlp import CHECKED, FILE_NAMES, HANDLED

    doc = (Path(__file__).resolve().parents[2] / "docs" / "compat.md").read_text()
    missing = [k for k in [*NO_MEANING, *FILE_NAMES, *HANDLED, *CHECKED, *DOCUMENT_FILE] if f"`{k}`" not in doc]
    assert missing == [], f"docs/compat.md does not mention {missing}"
