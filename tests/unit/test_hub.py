"""push_to_hub (lampo.hub) with the real huggingface_hub client against a local stand-in for the
hub's HTTP API (lampo.testing.hub_stub): what the stand-in answers is all these tests can show."""

from __future__ import annotations

import types

import pytest
import yaml

from lampo.config import LampoConfig
from lampo.hub import HubError, HubPusher, model_card
from lampo.testing.hub_stub import USER, HubStub


@pytest.fixture()
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    with HubStub() as stub:
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest switches the hub off for the rest
        yield stub


class FakeTracker:
    """What HubPusher reads from lampo.tracking.Tracker: the W&B run's URL; what it writes: its config."""

    def __init__(self, url):
        self.run_url = url
        self.config: dict = {}

    def record_config(self, values):
        self.config.update(values)


def model_dir(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "tensorboard").mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "tensorboard" / "events.out.tfevents.1").write_bytes(b"tb")
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    return out


def test_push_model_with_card_revision_and_wandb_link(hub, tmp_path):
    out = model_dir(tmp_path)
    cfg = LampoConfig(push_to_hub=True, hub_model_id="tiny-ppo", hub_revision="run-1", output_dir=str(out),
                      model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    tracker = FakeTracker("https://wandb.ai/me/lampo/runs/abc123")
    pusher = HubPusher(cfg, tracker)
    assert pusher.repo_id == f"{USER}/tiny-ppo"  # a bare name goes under the token's user (whoami)
    repo = hub.repos[f"{USER}/tiny-ppo"]
    assert repo.private is True and "run-1" in repo.files  # created at start, private by default
    url = pusher.push_model(out, step=3)
    assert url == f"{hub.url}/{USER}/tiny-ppo/tree/run-1"
    files = repo.files["run-1"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]  # logs and checkpoints stay home
    assert files["model.safetensors"] == b"weights" and repo.files["main"] == {}
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and "lampo" in meta["tags"]
    assert "[https://wandb.ai/me/lampo/runs/abc123](https://wandb.ai/me/lampo/runs/abc123)" in card
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config == cfg.to_dict()
    assert tracker.config == {"hf_repo_id": f"{USER}/tiny-ppo", "hf_repo_revision": "run-1", "hf_repo_url": url}
    assert all(t == "Bearer hf_test_token" for t in hub.tokens)


def test_push_checkpoint_and_an_existing_repository(hub, tmp_path):
    out = model_dir(tmp_path)
    cfg = LampoConfig(push_to_hub=True, hub_model_id="team/model", hub_private=False, output_dir=str(out))
    HubPusher(cfg)
    pusher = HubPusher(cfg)  # a second run: the repository exists already, which is fine
    pusher.push_checkpoint(out / "checkpoint-2", step=2)
    repo = hub.repos["team/model"]
    assert repo.private is False and repo.files["main"] == {"checkpoint-2/trainer_state.json": b'{"step": 2}'}
    assert repo.commits[-1]["summary"] == "Lampo: checkpoint at step 2"
    assert ("GET", "/api/whoami-v2") not in hub.requests  # owner/name needs no lookup


def test_the_card_without_wandb_points_at_the_local_logs(tmp_path):
    cfg = LampoConfig(output_dir=str(tmp_path), model_name_or_path=str(tmp_path))
    card = model_card("me/m", cfg, None, 5)
    assert "base_model" not in card  # a local folder is not a hub model
    assert f"`{tmp_path}`" in card and "report_to: [wandb]" in card


def test_offline_or_refused_pushes_fail_before_training(hub, monkeypatch):
    import huggingface_hub.constants as constants

    cfg = LampoConfig(push_to_hub=True, hub_model_id="a/b")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        HubPusher(cfg)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "answer", lambda *a: (403, {"error": "You don't have the rights"}))
    with pytest.raises(HubError, match="cannot create the repository"):
        HubPusher(cfg)


def test_the_tracker_records_the_url_in_the_wandb_run(tmp_path, monkeypatch):
    import lampo.tracking as tracking

    run = types.SimpleNamespace(url="https://wandb.ai/x", config=types.SimpleNamespace(updates=[]), log=lambda *a, **k: None,
                                finish=lambda: None)
    run.config.update = lambda values, allow_val_change: run.config.updates.append(values)
    monkeypatch.setattr(tracking, "_init_wandb", lambda *a, **k: run)
    cfg = LampoConfig(output_dir=str(tmp_path), report_to=["wandb"], progress=False)
    with tracking.Tracker(cfg, cfg.to_dict(), total_steps=1) as tracker:
        assert tracker.run_url == "https://wandb.ai/x"
        tracker.record_config({"hf_repo_url": "u"})
    assert run.config.updates == [{"hf_repo_url": "u"}]
