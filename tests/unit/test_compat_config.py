"""Other libraries' config names (lampo.compat.aliases), the keys they brought, and their schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lampo import PPOConfig
from lampo.compat.aliases import ALIASES
from lampo.config import _FIELD_TYPES, ConfigError, LampoConfig
from lampo.data.task_config import mixture_counts, read_task_file
from lampo.optimize.optimizers import critic_group, lr_schedule, make_optimizer, make_scheduler, policy_group

TRL_CLASSIC = dict(model_name="gpt2", forward_batch_size=4, init_kl_coef=0.3, adap_kl_ctrl=True, target=5.0,
                   horizon=200, vf_coef=0.2, cliprange=0.15, cliprange_value=0.3, gamma=0.99, lam=0.9)


def test_trl_classic_names_map_onto_lampo_keys_and_read_back_flat():
    cfg = PPOConfig(learning_rate=1.41e-5, **TRL_CLASSIC)
    assert cfg.model.model_name_or_path == "gpt2" and cfg.model_name == "gpt2"  # TRL reads config.model_name
    assert (cfg.optim.kl_coef, cfg.optim.adaptive_kl, cfg.optim.kl_target, cfg.optim.kl_horizon) == (0.3, True, 5.0, 200)
    assert cfg.optim.forward_batch_size == 4 and cfg.forward_batch_size == 4
    assert (cfg.vf_coef, cfg.cliprange, cfg.cliprange_value, cfg.gamma, cfg.lam) == (0.2, 0.15, 0.3, 0.99, 0.9)
    assert cfg.batch_size == cfg.optim.batch_size  # flat reads of any key, as TRL's flat PPOConfig
    assert "init_kl_coef" not in cfg.to_dict() and cfg.to_dict()["kl_coef"] == 0.3  # one tree, Lampo's keys
    assert PPOConfig(log_with="wandb").train.report_to == ["wandb"]


def test_every_alias_names_a_real_key_of_a_matching_type():
    for name, alias in ALIASES.items():
        assert alias.key in _FIELD_TYPES, name
        assert name not in _FIELD_TYPES, f"{name} is already a Lampo key"


def test_alias_errors_name_the_key_as_written():
    with pytest.raises(ConfigError, match=r"config key 'init_kl_coef' \(Lampo's 'kl_coef'\) = -1.0 is invalid"):
        PPOConfig(init_kl_coef=-1)
    with pytest.raises(ConfigError, match=r"'recompute' \(Lampo's 'gradient_checkpointing'\) = 'yes'.*expected bool"):
        PPOConfig(recompute="yes")
    with pytest.raises(ConfigError, match=r"'init_kl_coef' and 'kl_coef' both set 'kl_coef'"):
        PPOConfig(init_kl_coef=0.1, kl_coef=0.2)
    with pytest.raises(ConfigError, match=r"'max_dec_len' and 'max_new_tokens' both set"):
        LampoConfig({"max_dec_len": 8, "generation": {"max_new_tokens": 9}})


def test_nearest_key_hints_search_aliases_too():
    # before the aliases, difflib on Lampo's names sent max_dec_len to vllm_max_model_len and
    # recompute to max_prompt_len
    assert LampoConfig(max_dec_len=7, recompute=True).generation.max_new_tokens == 7
    with pytest.raises(ConfigError, match=r"'max_dec_length'.*did you mean 'max_new_tokens' \(PaddleNLP's 'max_dec_len'\)"):
        LampoConfig(max_dec_length=7)
    with pytest.raises(ConfigError, match=r"'recomputes'.*did you mean 'gradient_checkpointing' \(PaddleNLP's 'recompute'\)"):
        LampoConfig(recomputes=True)
    with pytest.raises(ConfigError, match=r"'init_kl_coeff'.*did you mean 'kl_coef' \(TRL-classic's 'init_kl_coef'\)"):
        LampoConfig(init_kl_coeff=0.1)


def test_argument_file_names_outside_an_argument_file_say_where_they_belong():
    with pytest.raises(ConfigError, match=r"'rl_algorithm'.*PaddleNLP's name for 'estimator', read in PaddleNLP "
                                          r"argument files \(.json\) only"):
        LampoConfig(rl_algorithm="grpo")
    with pytest.raises(ConfigError, match=r"'use_fusemt'.*a PaddleNLP setting with no effect in Lampo"):
        LampoConfig(use_fusemt=1)
    with pytest.raises(ConfigError, match=r"'clip_range_rati'.*did you mean 'cliprange' \(PaddleNLP's 'clip_range_ratio'\)"):
        LampoConfig(clip_range_rati=0.2)


def test_flat_assignment_is_refused_and_replace_keeps_explicit_keys():
    cfg = PPOConfig(batch_size=8, mini_batch_size=8)
    with pytest.raises(AttributeError, match=r"config.replace\(batch_size=...\)"):
        cfg.batch_size = 4
    with pytest.raises(AttributeError, match=r"config.replace\(kl_coef=...\)"):
        cfg.init_kl_coef = 0.1
    copy = cfg.replace(init_kl_coef=0.3)
    assert copy.explicit_keys == {"batch_size", "mini_batch_size", "kl_coef"} and copy.optim.kl_coef == 0.3
    with pytest.raises(AttributeError, match="no attribute or config key 'nonsense'"):
        _ = cfg.nonsense


def test_new_keys_are_validated_by_name():
    for kw, pattern in [
        (dict(min_learning_rate=2e-5, learning_rate=1e-5), r"'min_learning_rate' = 2e-05 .*learning_rate = 1e-05"),
        (dict(critic_warmup_ratio=1.0), r"'critic_warmup_ratio' = 1.0 is invalid"),
        (dict(critic_weight_decay=-0.1), r"'critic_weight_decay' = -0.1 is invalid"),
        (dict(critic_lr_scheduler_type="step"), r"'critic_lr_scheduler_type' = 'step'.*one of 'constant'"),
        (dict(forward_batch_size=0), r"'forward_batch_size' = 0 is invalid"),
        (dict(per_device_eval_batch_size=0), r"'per_device_eval_batch_size' \(Lampo's 'eval_batch_size'\) = 0"),
        (dict(critic_min_learning_rate=1.0), r"'critic_min_learning_rate' = 1.0 is invalid"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            LampoConfig(**kw)


def test_schedule_floor_by_hand():
    # 10 steps, no warm-up, floor 0.1: linear at step 5 is 0.1 + 0.9 * (1 - 5/10) = 0.55; both end at 0.1
    linear, cosine = lr_schedule("linear", 0.0, 10, 0.1), lr_schedule("cosine", 0.0, 10, 0.1)
    assert linear(0) == 1.0 and linear(5) == pytest.approx(0.55) and linear(10) == pytest.approx(0.1)
    assert cosine(5) == pytest.approx(0.1 + 0.9 * 0.5) and cosine(10) == pytest.approx(0.1)
    # warm-up over 2 of 10 steps: 1/2, then 2/2; the floor does not touch it
    warm = lr_schedule("linear", 0.2, 10, 0.5)
    assert (warm(0), warm(1), warm(2)) == (0.5, 1.0, 1.0) and warm(10) == pytest.approx(0.5)
    assert lr_schedule("constant", 0.0, 10, 0.5)(9) == 1.0


def test_critic_group_has_its_own_settings_and_falls_back_to_the_policys():
    cfg = LampoConfig(learning_rate=1e-4, min_learning_rate=2e-5, weight_decay=0.01, lr_scheduler_type="cosine",
                      warmup_ratio=0.1, critic_learning_rate=1e-3)
    p, c = policy_group(cfg, []), critic_group(cfg, [])
    # a group's schedule is (kind, warm-up ratio, floor as a share of the group's learning rate)
    assert (p["lr"], p["weight_decay"]) == (1e-4, 0.01) and p["schedule"] == ("cosine", 0.1, pytest.approx(0.2))
    # unset critic keys: the policy's settings, and the same floor share (0.2 of 1e-3)
    assert (c["lr"], c["weight_decay"]) == (1e-3, 0.01) and c["schedule"] == ("cosine", 0.1, pytest.approx(0.2))
    cfg = cfg.replace(critic_weight_decay=0.0, critic_lr_scheduler_type="constant", critic_warmup_ratio=0.0,
                      critic_min_learning_rate=5e-4)
    c = critic_group(cfg, [])
    assert c["weight_decay"] == 0.0 and c["schedule"] == ("constant", 0.0, pytest.approx(0.5))


def test_one_optimizer_schedules_each_group_on_its_own():
    # a value head shares the policy's optimiser: each group keeps its own schedule and decay
    # (learning rates of at most 1: the config refuses larger ones)
    cfg = LampoConfig(learning_rate=0.1, min_learning_rate=0.05, lr_scheduler_type="linear",
                      critic_learning_rate=0.2, critic_lr_scheduler_type="constant", critic_weight_decay=0.0,
                      weight_decay=0.1)
    w1, w2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = make_optimizer([policy_group(cfg, [w1]), critic_group(cfg, [w2])], 0.1, 0.1, 1e-8)
    sched = make_scheduler(opt, "linear", 0.0, 4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    lrs = []
    for _ in range(4):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # policy: 0.1 -> 0.05 linearly over 4 steps (0.05 + 0.05 * (1 - s/4)); critic: constant 0.2
    assert [pytest.approx(a) for a, _ in lrs] == [0.1, 0.0875, 0.075, 0.0625] and all(b == 0.2 for _, b in lrs)
    # a group without its own schedule follows the arguments (no floor)
    plain = make_optimizer([{"params": [torch.nn.Parameter(torch.ones(1))]}], 1.0, 0.0, 1e-8)
    assert make_scheduler(plain, "linear", 0.0, 4).lr_lambdas[0](2) == 0.5


def test_task_file_reads_files_and_weights(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"src": ["hi"], "tgt": []}\n')
    (tmp_path / "b.jsonl").write_text('{"src": ["yo"], "tgt": []}\n')
    task = tmp_path / "task.json"
    task.write_text(json.dumps([{"task_name": "a", "filepath": "a.jsonl", "prob": 1},
                                {"task_name": "b", "file": str(tmp_path / "b.jsonl")}]))
    assert read_task_file(task, "train_task_config") == [(tmp_path / "a.jsonl", 1.0), (tmp_path / "b.jsonl", 1.0)]
    task.write_text(json.dumps({"task_name": "a", "name": "a.jsonl"}))
    with pytest.raises(Exception, match=r"'eval_task_config': task 0 .* must name its data file with one of filepath"):
        read_task_file(task, "eval_task_config")
    task.write_text(json.dumps([{"filepath": "missing.jsonl"}]))
    with pytest.raises(Exception, match=r"data file 'missing.jsonl' not found"):
        read_task_file(task, "train_task_config")


def test_task_files_give_the_splits(tmp_path):
    from lampo.data.loading import load_prompt_dataset

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"src": [f"a{i}"], "tgt": []}) + "\n" for i in range(3)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "b0"}) + "\n")
    (tmp_path / "train.json").write_text(json.dumps([{"filepath": str(tmp_path / "a.jsonl"), "prob": 1},
                                                     {"filepath": str(tmp_path / "b.jsonl"), "prob": 1}]))
    (tmp_path / "eval.json").write_text(json.dumps([{"filepath": str(tmp_path / "b.jsonl")}]))
    cfg = LampoConfig(train_task_config=str(tmp_path / "train.json"), eval_task_config=str(tmp_path / "eval.json"))
    splits = load_prompt_dataset(cfg.data)
    assert [r.steps[0] for r in splits["train"]] == ["a0", "a1", "a2", "b0"]  # both formats, rows re-indexed
    assert [r.index for r in splits["train"]] == [0, 1, 2, 3] and [r.steps[0] for r in splits["test"]] == ["b0"]
    # without eval_task_config, the test split is carved from the task rows (test_split_ratio)
    carved = load_prompt_dataset(cfg.replace(eval_task_config=None, test_split_ratio=0.25).data)
    assert len(carved["train"]) == 3 and len(carved["test"]) == 1


def test_mixture_counts_keep_every_row_and_follow_the_weights():
    assert mixture_counts([([0] * 3, 1.0), ([0] * 5, 1.0)]) == [3, 5]  # equal weights: concatenated
    # weights 3:1 with 6 and 4 rows: 4 rows at a quarter need a split of 16, 12 of them from the first
    counts = mixture_counts([([0] * 6, 3.0), ([0] * 4, 1.0)])
    assert counts == [12, 4] and math.isclose(counts[0] / sum(counts), 0.75)
