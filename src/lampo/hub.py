"""`push_to_hub`: the trained model (and optionally every checkpoint) to the Hugging Face hub.

Following open-instruct's quality-of-life tools: the repository is created when the run starts
(so a missing token or a refused name stops the run before it trains, not after), the final model
is uploaded with a model card that links the tracked run and holds the resolved config, and the
W&B run records the model's URL (`hf_repo_id`, `hf_repo_revision`, `hf_repo_url` in its config).

Uses `huggingface_hub` (a dependency of transformers) with its usual token (`hf auth login` or
HF_TOKEN) and endpoint (HF_ENDPOINT). Lampo's tests run it against a local stand-in for the hub's
HTTP API (lampo.testing.hub_stub), not the hub itself.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

MODEL_FILES_IGNORED = ["checkpoint-*", "checkpoint-*/**", "tensorboard/**", "wandb/**", "*.jsonl", "*.png",
                       "wandb_run_id.txt", ".*", "**/.*"]
"""What output_dir holds besides the model: logs, plots and checkpoints (pushed on their own, if at all)."""


class HubError(RuntimeError):
    """The hub refused or could not be reached; the message says what to do."""


class HubPusher:
    """One run's repository on the hub: created at start, then `push_model` and `push_checkpoint`."""

    def __init__(self, cfg: Any, tracker: Any = None) -> None:
        from huggingface_hub import HfApi, constants

        self.cfg, self.tracker = cfg, tracker
        t = cfg.train
        if constants.is_offline_mode():
            raise HubError("push_to_hub is set but the hub is switched off (HF_HUB_OFFLINE=1); unset it or set "
                           "push_to_hub: false")
        # read HF_ENDPOINT now: huggingface_hub reads it once, when first imported
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        self.revision = t.hub_revision
        try:
            self.repo_id = self._repo_id(t)
            self.api.create_repo(self.repo_id, private=t.hub_private, exist_ok=True)
            if self.revision:
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        except Exception as exc:  # huggingface_hub's HTTP, token and validation errors
            raise HubError(f"push_to_hub: cannot create the repository for hub_model_id "
                           f"{t.hub_model_id!r}: {exc}") from exc
        self.url = f"{self.api.endpoint}/{self.repo_id}" + (f"/tree/{self.revision}" if self.revision else "")

    def _repo_id(self, t: Any) -> str:
        name = t.hub_model_id or t.run_name or Path(t.output_dir).resolve().name
        if "/" in name:
            return name
        return f"{self.api.whoami()['name']}/{name}"  # a bare name goes under the token's user

    def push_model(self, folder: str | Path, step: int) -> str:
        """Upload the final model in `folder` with its model card; the W&B run records the URL."""
        folder = Path(folder)
        (folder / "README.md").write_text(model_card(self.repo_id, self.cfg, self.run_url(), step), encoding="utf-8")
        self.api.upload_folder(repo_id=self.repo_id, folder_path=folder, revision=self.revision,
                               commit_message=f"Lampo: model after {step} steps", ignore_patterns=MODEL_FILES_IGNORED)
        if self.tracker is not None:
            self.tracker.record_config({"hf_repo_id": self.repo_id, "hf_repo_revision": self.revision or "main",
                                        "hf_repo_url": self.url})
        return self.url

    def push_checkpoint(self, path: str | Path, step: int) -> None:
        """Upload a checkpoint folder to `checkpoint-<step>/` in the repository."""
        path = Path(path)
        self.api.upload_folder(repo_id=self.repo_id, folder_path=path, path_in_repo=path.name, revision=self.revision,
                               commit_message=f"Lampo: checkpoint at step {step}")

    def run_url(self) -> str | None:
        return None if self.tracker is None else self.tracker.run_url


def model_card(repo_id: str, cfg: Any, run_url: str | None, step: int) -> str:
    """README.md of the pushed model: metadata, where it came from, the tracked run, the config."""
    base = cfg.model.model_name_or_path
    meta: dict[str, Any] = {"library_name": "peft" if cfg.model.use_peft else "transformers",
                            "tags": ["lampo", "reinforcement-learning", cfg.optim.estimator]}
    if not Path(base).exists():  # a hub id, not a local folder
        meta["base_model"] = base
    if run_url:
        tracked = f"The training run is tracked at [{run_url}]({run_url})."
    else:
        tracked = ("The run was tracked locally (metrics.jsonl and TensorBoard files in its output_dir "
                   f"`{cfg.train.output_dir}`); `report_to: [wandb]` links a W&B run here.")
    config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# {repo_id}\n\n"
            f"Trained with Lampo from `{base}` with the `{cfg.optim.estimator}` estimator, "
            f"{step} steps.\n\n## Tracked run\n\n{tracked}\n\n## Config\n\n```yaml\n{config}```\n")
