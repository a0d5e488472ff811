"""Config: flat keys, sections, CLI overrides, errors that name the key, generated docs."""

from pathlib import Path

import pytest

from lampo.config import ConfigError, LampoConfig, load_config, parse_overrides, render_docs

ROOT = Path(__file__).resolve().parents[2]

DESIGN_DOC_KEYS = (
    "model_name_or_path use_peft lora_alpha lora_r lora_dropout output_dir reward_model query_dataset ppo_epochs "
    "mini_batch_size batch_size gradient_accumulation_steps gradient_checkpointing learning_rate save_step"
).split()


def test_every_design_document_key_exists():
    flat = LampoConfig().to_dict()
    for key in DESIGN_DOC_KEYS:
        assert key in flat, key


def test_yaml_flat_and_sectioned_keys_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 1e-5\nbatch_size: 8\nmini_batch_size: 4\noptim:\n  kl_coef: 0.2\n")
    cfg = load_config(path, ["--learning_rate", "3e-6", "--max_new_tokens=7", "estimator=grpo", "num_generations=2"])
    assert cfg.optim.learning_rate == 3e-6  # YAML reads "1e-5" as a string; it is coerced to float
    assert cfg.optim.batch_size == 8 and cfg.optim.kl_coef == 0.2
    assert cfg.generation.max_new_tokens == 7 and cfg.optim.estimator == "grpo"
    assert cfg.rollout_batch_size == 16
    assert cfg.loss_aggregation == "token-mean" and cfg.kl_in_reward is False


def test_unknown_key_names_it_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        LampoConfig(learning_rat=1e-5)
    with pytest.raises(ConfigError, match=r"'kl_coeff'.*section 'optim'.*'kl_coef'"):
        LampoConfig({"optim": {"kl_coeff": 0.1}})


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError, match=r"'batch_size' = 'eight' has the wrong type: expected int"):
        LampoConfig(batch_size="eight")
    with pytest.raises(ConfigError, match=r"'use_peft' = 'yes please'.*expected bool"):
        LampoConfig(use_peft="yes please")
    with pytest.raises(ConfigError, match=r"'estimator' = 'ppo2'.*one of 'gae'"):
        LampoConfig(estimator="ppo2")


def test_out_of_range_values():
    with pytest.raises(ConfigError, match=r"'learning_rate' = -1e-05 is invalid: must be > 0"):
        LampoConfig(learning_rate=-1e-5)
    with pytest.raises(ConfigError, match=r"'mini_batch_size' = 3 is invalid: must divide batch_size \* num_generations = 8"):
        LampoConfig(batch_size=8, mini_batch_size=3)
    with pytest.raises(ConfigError, match=r"'num_generations' = 1 .*must be >= 2 for estimator 'grpo'"):
        LampoConfig(estimator="grpo", batch_size=4, mini_batch_size=4)
    with pytest.raises(ConfigError, match=r"'gradient_accumulation_steps' = 3"):
        LampoConfig(batch_size=8, mini_batch_size=8, gradient_accumulation_steps=3)
    for bad in (0, 24):
        with pytest.raises(ConfigError, match=rf"'vllm_block_size' = {bad} is invalid: must be a positive multiple of 16"):
            LampoConfig(vllm_block_size=bad)
    assert LampoConfig(vllm_block_size=128).speed.vllm_block_size == 128


def test_the_2026_algorithm_keys_are_validated_naming_the_key():
    group = dict(estimator="grpo", num_generations=2, batch_size=2, mini_batch_size=4)
    cases = [
        (dict(cliprange_low=1.5), r"'cliprange_low' = 1.5 is invalid: must be in \(0, 1\)"),
        (dict(cliprange_high=0.0), r"'cliprange_high' = 0.0 is invalid: must be > 0"),
        (dict(policy_loss="gpso"), r"'policy_loss' = 'gpso' has the wrong type: expected one of 'ppo', 'gspo'"),
        (dict(overlong_buffer_len=64, max_new_tokens=32), r"'overlong_buffer_len' = 64 .*<= max_new_tokens = 32"),
        (dict(overlong_penalty_factor=-1.0), r"'overlong_penalty_factor' = -1.0 .*>= 0"),
        (dict(dynamic_sampling=True), r"'dynamic_sampling' = True .*num_generations >= 2"),
        (dict(dynamic_sampling_max_rounds=-1, **group), r"'dynamic_sampling_max_rounds' = -1"),
        (dict(rollout_correction="tis", engine_logprobs=False), r"'rollout_correction' = 'tis' .*engine_logprobs"),
        (dict(rollout_correction_high=0.9), r"'rollout_correction_high' = 0.9 .*> 1"),
        (dict(rollout_correction_low=1.2), r"'rollout_correction_low' = 1.2 .*\(0, 1\)"),
        (dict(ptx_coef=-0.1), r"'ptx_coef' = -0.1 .*>= 0"),
        (dict(estimator="reinforce_pp_baseline"), r"'num_generations' = 1 .*'reinforce_pp_baseline'"),
    ]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            LampoConfig(**kw)
    # the derived clip range of each loss, and clip-higher on top of PPO's
    assert (LampoConfig().clip_low, LampoConfig().clip_high) == (0.2, 0.2)
    assert (LampoConfig(cliprange_high=0.28).clip_low, LampoConfig(cliprange_high=0.28).clip_high) == (0.2, 0.28)
    assert (LampoConfig(policy_loss="gspo").clip_low, LampoConfig(policy_loss="gspo").clip_high) == (3e-4, 4e-4)
    assert LampoConfig(policy_loss="gspo").loss_aggregation == "seq-mean-token-mean"
    assert (LampoConfig(policy_loss="cispo").clip_low, LampoConfig(policy_loss="cispo").clip_high) == (None, 0.2)


def test_override_parsing_errors_and_values():
    assert parse_overrides(["--use-peft", "true", "report_to=[tensorboard, wandb]"]) == {
        "use_peft": True,
        "report_to": ["tensorboard", "wandb"],
    }
    # dashes in a value are kept (only the key's dashes become underscores)
    assert parse_overrides(["--output-dir=runs/my-run", "--run_name", "a-b"]) == {
        "output_dir": "runs/my-run",
        "run_name": "a-b",
    }
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--learning_rate"])
    with pytest.raises(ConfigError, match="cannot read override 'oops'"):
        parse_overrides(["oops"])


def test_bad_yaml_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="bad.yaml' must be a mapping"):
        load_config(bad)


def test_round_trip_through_flat_dict():
    cfg = LampoConfig(learning_rate=2e-5, use_peft=True, early_stop={"objective/scores": 0.9})
    assert LampoConfig(cfg.to_dict()) == cfg
    assert cfg.replace(lora_r=4).model.lora_r == 4


def test_config_reference_page_is_generated_from_the_docstrings():
    docs = render_docs()
    for key in LampoConfig().to_dict():
        assert f"| `{key}` |" in docs, key
    assert "Beta: weight of the KL penalty" in docs  # a docstring, not a hand-written line
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == docs, "docs/config.md is stale: run `make docs` (python -m lampo.config --docs)"


def _float_keys() -> list[str]:
    from lampo.config import _FIELD_TYPES

    return [key for key, tp in _FIELD_TYPES.items() if "float" in str(tp) and key != "early_stop"]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_every_float_key_refuses_a_non_finite_value_naming_the_key(bad):
    keys = _float_keys()
    assert {"learning_rate", "reward_max_wait_ms", "adam_eps", "temperature", "peak_flops", "kl_coef"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=rf"config key '{key}' = .* is invalid"):
            LampoConfig(**{key: bad})
    # as YAML writes them (`.inf`), from a file and from the command line
    with pytest.raises(ConfigError, match=r"'learning_rate' = inf is invalid: must be a finite number"):
        load_config(None, ["--learning_rate", ".inf"])
    with pytest.raises(ConfigError, match=r"'early_stop' .* the threshold of 'objective/scores' must be a finite"):
        LampoConfig(early_stop={"objective/scores": bad})


def test_absurd_learning_rates_and_optimiser_settings_are_refused_with_the_reason():
    for key in ("learning_rate", "critic_learning_rate"):
        with pytest.raises(ConfigError, match=rf"'{key}' = 1e\+30 is invalid: must be > 0 and at most 1"):
            LampoConfig(**{key: 1e30})
        with pytest.raises(ConfigError, match=rf"'{key}' = 0.0 is invalid"):
            LampoConfig(**{key: 0.0})
    assert LampoConfig(learning_rate=1.0).optim.learning_rate == 1.0  # the bound itself is allowed
    with pytest.raises(ConfigError, match=r"'adam_eps' = 0.0 is invalid: must be in \(0, 1\]"):
        LampoConfig(adam_eps=0.0)
    with pytest.raises(ConfigError, match=r"'weight_decay' = 2.0 .* times learning_rate = 0.9 must be < 1"):
        LampoConfig(learning_rate=0.9, weight_decay=2.0)
    with pytest.raises(ConfigError, match=r"'temperature' = 1e-09 is invalid: must be >= 0.001"):
        LampoConfig(temperature=1e-9)
    # a lone request waits reward_max_wait_ms for company: never as long as its timeout
    with pytest.raises(ConfigError, match=r"'reward_max_wait_ms' = 60000.0 .* below reward_timeout = 60 s"):
        LampoConfig(reward_max_wait_ms=60000.0)


def test_a_key_given_twice_in_a_yaml_file_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 1e-5\nbatch_size: 8\noptim:\n  kl_coef: 0.1\n  kl_coef: 0.2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml': key 'kl_coef' is given twice, on line 4 and on line 5"):
        load_config(path)
    path.write_text("learning_rate: 1e-5\nbatch_size: 8\nlearning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"key 'learning_rate' is given twice, on line 1 and on line 3"):
        load_config(path)
    # YAML's merge key is not a duplicate: keys given beside it override the merged ones
    path.write_text("base: &b {kl_coef: 0.1}\noptim:\n  <<: *b\n  kl_coef: 0.2\n")
    from lampo.config import read_yaml

    assert read_yaml(path)["optim"] == {"kl_coef": 0.2}


def test_early_stop_must_name_a_logged_metric_with_the_nearest_as_a_hint():
    with pytest.raises(ConfigError, match=r"'early_stop' names metric 'objective/score', which the trainer never "
                                          r"logs \(did you mean 'objective/scores'\?\)"):
        LampoConfig(early_stop={"objective/score": 0.9})
    assert LampoConfig(early_stop={"eval/scores": 0.5, "episode": 100.0}).train.early_stop["eval/scores"] == 0.5


def test_the_reward_server_refuses_an_endless_micro_batch_wait(monkeypatch):
    from lampo.reward_server import StartupError, parse_args, resolve_settings

    monkeypatch.delenv("LAMPO_REWARD_TOKEN", raising=False)
    with pytest.raises(StartupError, match=r"--max-wait-ms = inf is invalid: must be a finite number"):
        resolve_settings(parse_args(["--model", "m.M", "--max-wait-ms", "inf"]), {})
