"""Durable writes: the final model moves into a shared folder without ever leaving a config.json
beside weights that are not its own."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lampo import files


def _model(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(tag)
    (folder / "model.safetensors").write_text(f"weights {tag}")
    (folder / "tokenizer.json").write_text(f"tokenizer {tag}")
    (folder / "merged").mkdir(exist_ok=True)
    (folder / "merged" / "config.json").write_text(f"merged {tag}")
    return folder


def _consistent(out: Path) -> str:
    """'old', 'new', or 'none' (no config.json: nothing a loader takes for a model); else it fails."""
    if not (out / "config.json").exists():
        return "none"
    tag = (out / "config.json").read_text()
    assert (out / "model.safetensors").read_text() == f"weights {tag}"  # the config's own weights
    assert (out / "tokenizer.json").read_text() == f"tokenizer {tag}"
    return tag


def test_a_crash_at_any_rename_leaves_the_old_model_none_or_the_new_one_whole(tmp_path, monkeypatch):
    real_replace = os.replace
    outcomes = set()
    for crash_at in range(8):
        out = _model(tmp_path / f"run{crash_at}", "old")
        (out / "metrics.jsonl").write_text("{}\n")  # the run's other files stay
        staged = _model(out / ".tmp-final-1", "new")
        calls = []

        def replace(src, dst, crash_at=crash_at, calls=calls):
            calls.append(dst)
            if len(calls) > crash_at:
                raise OSError(errno.EIO, "simulated crash")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            files.install_folder(staged, out, last=["config.json"])
            crashed = False
        except OSError:
            crashed = True
        monkeypatch.setattr(os, "replace", real_replace)
        outcomes.add(_consistent(out))
        assert (out / "metrics.jsonl").read_text() == "{}\n"
        if not crashed:
            assert _consistent(out) == "new" and not staged.exists()
            assert (out / "merged" / "config.json").read_text() == "merged new"
    assert outcomes == {"none", "new"}  # the old config.json goes first: every crash after it leaves none


def test_stale_files_of_the_old_model_are_removed(tmp_path):
    out = _model(tmp_path / "run", "old")
    (out / "adapter_config.json").write_text("{}")  # a LoRA run's adapter, which a full model must not keep
    files.install_folder(_model(out / ".tmp", "new"), out, last=["config.json"], stale=["adapter_config.json"])
    assert _consistent(out) == "new" and not (out / "adapter_config.json").exists()


def test_a_missing_folder_is_an_error_before_anything_moves(tmp_path):
    out = _model(tmp_path / "run", "old")
    with pytest.raises(FileNotFoundError):
        files.install_folder(tmp_path / "nothing", out, last=["config.json"])
    assert _consistent(out) == "old"
