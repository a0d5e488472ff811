"""Reward server settings: flags over the config file over RewardConfig defaults."""

from __future__ import annotations

import pytest

from lampo.reward_server import StartupError, parse_args, read_raw_config, resolve_settings


def settings(argv, raw, monkeypatch, token_env=None):
    if token_env is None:
        monkeypatch.delenv("LAMPO_REWARD_TOKEN", raising=False)
    else:
        monkeypatch.setenv("LAMPO_REWARD_TOKEN", token_env)
    return resolve_settings(parse_args(["--model", "m.M", *argv]), raw)


def test_defaults_and_port_from_the_reward_model_url(monkeypatch):
    s = settings([], {}, monkeypatch)
    assert (s.host, s.port, s.token, s.max_batch_size, s.max_wait_ms) == ("127.0.0.1", 8000, None, 64, 5.0)
    # The trainer's URL decides the port when reward_port is not given ...
    assert settings([], {"reward_model": "http://localhost:8123"}, monkeypatch).port == 8123
    # ... the same port in both is fine, and a flag wins.
    raw = {"reward_model": "http://localhost:8123", "reward_port": 8123}
    assert settings([], raw, monkeypatch).port == 8123
    assert settings(["--port", "9100"], raw, monkeypatch).port == 9100


def test_reward_port_and_a_url_on_another_port_are_an_error_naming_both(monkeypatch):
    # The trainer would call 8123 while the server listened on 9000: refused at load, not at step 1.
    raw = {"reward_model": "http://localhost:8123", "reward_port": 9000}
    with pytest.raises(StartupError, match="'reward_port' = 9000 and 'reward_model' = 'http://localhost:8123' disagree"):
        settings([], raw, monkeypatch)
    from lampo.config import ConfigError, LampoConfig

    with pytest.raises(ConfigError, match="'reward_port' = 9000 and 'reward_model'"):
        LampoConfig(raw)
    # reward_port alone disagrees with the default URL the trainer calls (port 8000)
    with pytest.raises(StartupError, match="'reward_port' = 9000 and 'reward_model' = 'http://localhost:8000'"):
        settings([], {"reward_port": 9000}, monkeypatch)


def test_unknown_keys_belong_to_the_model_and_sections_work(monkeypatch):
    raw = {"learning_rate": 1e-5, "my_model_threshold": 0.3, "reward": {"reward_max_batch_size": 8}}
    s = settings(["--max-wait-ms", "0"], raw, monkeypatch)
    assert (s.max_batch_size, s.max_wait_ms) == (8, 0.0)


def test_invalid_reward_keys_are_named(monkeypatch):
    with pytest.raises(StartupError, match="config key 'reward_max_batch_size' = 0 is invalid"):
        settings([], {"reward_max_batch_size": 0}, monkeypatch)


def test_non_loopback_needs_a_token(monkeypatch):
    with pytest.raises(StartupError, match="refusing to bind 0.0.0.0"):
        settings(["--host", "0.0.0.0"], {}, monkeypatch)
    assert settings(["--host", "0.0.0.0"], {"reward_token": "t"}, monkeypatch).token == "t"
    assert settings(["--host", "0.0.0.0"], {}, monkeypatch, token_env="e").token == "e"
    assert settings(["--host", "::1"], {}, monkeypatch).token is None  # IPv6 loopback is fine


def test_config_file_errors(tmp_path):
    with pytest.raises(StartupError, match="does not exist"):
        read_raw_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(StartupError, match="must be a mapping"):
        read_raw_config(str(tmp_path / "list.yaml"))
