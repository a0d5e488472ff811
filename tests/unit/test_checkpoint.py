"""Atomic checkpoints: round trip, crash safety, rotation, RNG restore."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lampo import checkpoint as ck
from lampo.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_module_state_dict,
    model_path,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[2]


def _value_head_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=10)
    head(torch.randn(3, 4)).sum().backward()
    opt.step()  # AdamW now has exp_avg / exp_avg_sq / step state worth restoring
    sched.step()
    return head, opt, sched


def _save(out: Path, step: int, **kw) -> Path:
    head, opt, sched = _value_head_and_optimizer(step)
    return save_checkpoint(
        out,
        step,
        models={"value_head": head},
        states={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        trainer_state={"global_step": step},
        **kw,
    )


def test_round_trip_module_optimizer_scheduler_and_trainer_state(tmp_path):
    head, opt, sched = _value_head_and_optimizer()
    kl_state = {"value": torch.tensor(0.05), "target": 6.0}
    trainer_state = {"global_step": 7, "episode": 112, "data_order": [3, 0, 2, 1], "data_position": 2,
                     "policy_version": 7}
    path = save_checkpoint(
        tmp_path,
        7,
        models={"value_head": head},
        states={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "kl_ctl": kl_state,
                "rng": rng_state()},
        trainer_state=trainer_state,
    )
    assert path == tmp_path / "checkpoint-7"
    assert sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json", "kl_ctl.pt", "optimizer.pt", "rng.pt", "scheduler.pt", "trainer_state.json",
        "value_head",
    ]
    states, loaded_trainer_state = load_checkpoint(path)
    assert loaded_trainer_state == trainer_state

    head2, opt2, sched2 = _value_head_and_optimizer(seed=123)  # different weights and moments
    head2.load_state_dict(load_module_state_dict(path, "value_head"))
    opt2.load_state_dict(states["optimizer"])
    sched2.load_state_dict(states["scheduler"])
    for a, b in zip(head.parameters(), head2.parameters(), strict=True):
        assert torch.equal(a, b)
    for p1, p2 in zip(head.parameters(), head2.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p1][key], opt2.state[p2][key])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert states["kl_ctl"]["target"] == 6.0 and torch.equal(states["kl_ctl"]["value"], torch.tensor(0.05))
    assert find_latest_checkpoint(tmp_path) == path


def test_tied_weights_module_is_saved(tmp_path):
    # safetensors refuses shared tensors; the writer copies the duplicate so tied modules still save.
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

    m = Tied()
    path = save_checkpoint(tmp_path, 1, models={"tied": m})
    m2 = Tied()
    m2.load_state_dict(load_module_state_dict(path, "tied"))
    assert torch.equal(m2.a.weight, m.a.weight) and m2.b.weight is m2.a.weight


def test_crash_mid_save_leaves_no_checkpoint_and_previous_untouched(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}

    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer state was written, the scheduler's fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="no space left.*previous checkpoints.*untouched"):
        _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # temp dir removed
    assert find_latest_checkpoint(tmp_path) == first
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before


def test_non_io_error_mid_save_is_wrapped_and_cleaned(tmp_path):
    class Broken:
        def save_pretrained(self, path):
            Path(path).mkdir()
            (Path(path) / "half.bin").write_bytes(b"x")
            raise RuntimeError("serialiser exploded")

    with pytest.raises(CheckpointError, match="could not write checkpoint.*serialiser exploded"):
        save_checkpoint(tmp_path, 5, models={"policy": Broken()})
    assert list(tmp_path.iterdir()) == []
    assert find_latest_checkpoint(tmp_path) is None


@pytest.mark.slow
def test_sigkill_during_write_leaves_no_checkpoint_that_looks_whole(tmp_path):
    """A real process killed with SIGKILL while writing checkpoint 2: only checkpoint 1 counts."""
    script = textwrap.dedent(
        """
        import sys, time, torch
        from lampo import checkpoint as ck
        out = sys.argv[1]
        ck.save_checkpoint(out, 1, states={"s": {"x": torch.ones(3)}}, trainer_state={"global_step": 1})
        real_save = torch.save
        def slow_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)   # first state file is on disk in the temp dir ...
            print("WRITING", flush=True)
            time.sleep(60)               # ... and the process dies here
        ck.torch.save = slow_save
        ck.save_checkpoint(out, 2, states={"s": {"x": torch.zeros(3)}, "t": {}}, trainer_state={"global_step": 2})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(ck.TMP_PREFIX)]
    assert len(leftovers) == 1  # the half-written save is still there ...
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"  # ... but never found
    states, trainer_state = load_checkpoint(find_latest_checkpoint(tmp_path))
    assert trainer_state == {"global_step": 1} and torch.equal(states["s"]["x"], torch.ones(3))
    # The next save cleans the leftover.
    save_checkpoint(tmp_path, 3, trainer_state={"global_step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_save_total_limit_deletes_oldest_only_after_new_is_complete(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        _save(tmp_path, step, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

    # A failing save must not rotate: checkpoint-2 stays although the limit is 2.
    monkeypatch.setattr(ck, "_install", lambda tmp, final: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointError, match="I/O error"):
        _save(tmp_path, 4, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.undo()

    # Step numbers sort numerically (10 > 9), and an unmarked checkpoint-99 is neither counted nor deleted.
    (tmp_path / "checkpoint-99").mkdir()
    _save(tmp_path, 9, save_total_limit=2)
    _save(tmp_path, 10, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert (tmp_path / "checkpoint-99").is_dir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"


def test_find_latest_ignores_temp_and_unmarked_dirs(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    _save(tmp_path, 2)
    (tmp_path / f"{ck.TMP_PREFIX}5-123").mkdir()
    half = tmp_path / "checkpoint-4"
    half.mkdir()
    (half / "trainer_state.json").write_text("{}")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(half)
    assert resolve_checkpoint(tmp_path, "auto") == tmp_path / "checkpoint-2"
    assert resolve_checkpoint(tmp_path, None) is None
    assert resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-2")) == tmp_path / "checkpoint-2"
    with pytest.raises(CheckpointError, match="latest complete one.*checkpoint-2"):
        resolve_checkpoint(tmp_path, str(half))


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, trainer_state={"v": 1})
    save_checkpoint(tmp_path, 3, trainer_state={"v": 2})
    assert load_checkpoint(tmp_path / "checkpoint-3")[1] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_bad_input_is_rejected_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, trainer_state={"t": torch.ones(1)})
    with pytest.raises(CheckpointError, match="name 'a/b'"):
        save_checkpoint(tmp_path, 1, states={"a/b": {}})
    with pytest.raises(CheckpointError, match="both a model and a state"):
        save_checkpoint(tmp_path, 1, models={"x": torch.nn.Linear(1, 1)}, states={"x": {}})
    with pytest.raises(CheckpointError, match="cannot save model 'm'"):
        save_checkpoint(tmp_path, 1, models={"m": object()})
    assert find_latest_checkpoint(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(ck.TMP_PREFIX)] == []
    with pytest.raises(CheckpointError, match="has no model 'policy'"):
        model_path(save_checkpoint(tmp_path, 2), "policy")


def _draws():
    return (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist())


def test_rng_round_trip_reproduces_draws_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state, which must be restored too
    path = save_checkpoint(tmp_path, 1, states={"rng": rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    states, _ = load_checkpoint(path)  # weights_only=True: the RNG state holds only safe types
    set_rng_state(states["rng"])
    assert _draws() == expected


@pytest.mark.slow
def test_transformers_and_peft_models_round_trip(tmp_path, tiny_model_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # non-zero adapter, so a lost adapter would show
        next(policy.parameters()).add_(1.0)
    path = save_checkpoint(tmp_path, 4, models={"policy": policy, "lora": lora})

    assert (model_path(path, "policy") / "config.json").is_file()
    adapter_files = {p.name for p in model_path(path, "lora").iterdir()}
    assert "adapter_model.safetensors" in adapter_files and "model.safetensors" not in adapter_files

    policy2 = AutoModelForCausalLM.from_pretrained(model_path(path, "policy"), dtype=torch.float32)
    for (n1, a), (_, b) in zip(policy.state_dict().items(), policy2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n1
    base2 = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    lora2 = PeftModel.from_pretrained(base2, model_path(path, "lora"))
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(lora(ids).logits, lora2(ids).logits, atol=1e-6)
    assert json.loads((path / "checkpoint.json").read_text())["models"] == {"policy": "pretrained",
                                                                              "lora": "pretrained"}


def test_manifest_written_last_marks_completeness(tmp_path, monkeypatch):
    # If the manifest write itself fails, nothing is installed.
    real = ck.write_text

    def fail_on_manifest(path, text, fsync=False):
        if path.name == ck.MANIFEST:
            raise OSError(errno.EIO, "I/O error")
        return real(path, text, fsync)

    monkeypatch.setattr(ck, "write_text", fail_on_manifest)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 1, trainer_state={"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_entries_every_process_wrote_are_completed_with_the_checkpoint(tmp_path):
    # ZeRO's way: rank 0 stages, each rank writes its own file, rank 0 completes and renames
    staged = ck.stage_checkpoint(tmp_path, 4)
    assert not is_checkpoint_dir(staged)
    (staged / "deepspeed").mkdir()
    for rank in (0, 1):
        torch.save({"rank": rank}, staged / "deepspeed" / f"rank{rank}.pt")
    path = _save(tmp_path, 4, staged=staged, shards=["deepspeed"])
    assert path == tmp_path / "checkpoint-4" and not staged.exists()
    assert json.loads((path / "checkpoint.json").read_text())["shards"] == ["deepspeed"]
    shards = ck.shard_path(path, "deepspeed")
    assert [torch.load(shards / f"rank{r}.pt")["rank"] for r in (0, 1)] == [0, 1]
    with pytest.raises(CheckpointError, match="without DeepSpeed.*launcher it was saved with"):
        ck.shard_path(_save(tmp_path, 5), "deepspeed")


def test_a_missing_shard_entry_fails_the_save_and_leaves_nothing(tmp_path):
    staged = ck.stage_checkpoint(tmp_path, 1)
    with pytest.raises(CheckpointError, match="'deepspeed' is missing"):
        _save(tmp_path, 1, staged=staged, shards=["deepspeed"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="clash"):
        _save(tmp_path, 1, shards=["value_head"])


def is_checkpoint_dir(path: Path) -> bool:
    return path in list_checkpoints(path.parent)


def _forge_manifest(path: Path, **entries) -> None:
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest.update(entries)
    (path / "checkpoint.json").write_text(json.dumps(manifest))


def test_names_in_a_manifest_that_leave_the_checkpoint_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "run", 1, states={"s": {"x": torch.ones(1)}})
    torch.save({"secret": torch.zeros(1)}, tmp_path / "run" / "outside.pt")
    _forge_manifest(path, states=["s", "../outside"])
    with pytest.raises(CheckpointError, match=r"lists states entry '../outside', which is not a plain name inside"):
        load_checkpoint(path)
    _forge_manifest(path, states=["s"], models={"../../elsewhere": "pretrained"})
    with pytest.raises(CheckpointError, match=r"lists models entry '../../elsewhere'"):
        model_path(path, "../../elsewhere")
    _forge_manifest(path, models={}, shards=["/etc"])
    with pytest.raises(CheckpointError, match=r"lists shards entry '/etc'"):
        ck.shard_path(path, "/etc")


def test_a_checkpoint_with_its_marker_but_damaged_files_is_passed_over_with_a_warning(tmp_path, caplog):
    first, second = _save(tmp_path, 1), _save(tmp_path, 2)
    manifest = json.loads((second / "checkpoint.json").read_text())
    assert manifest["files"]["optimizer.pt"] == (second / "optimizer.pt").stat().st_size > 0
    assert "checkpoint.json" not in manifest["files"] and "value_head/model.safetensors" in manifest["files"]
    with open(second / "optimizer.pt", "r+b") as f:  # a disk or a copy that lost the file's end
        f.truncate(10)
    with caplog.at_level("WARNING"):
        assert find_latest_checkpoint(tmp_path) == first
        assert resolve_checkpoint(tmp_path, "auto") == first
    assert f"checkpoint {second} is damaged (optimizer.pt has 10 bytes where" in caplog.text
    with pytest.raises(CheckpointError, match=r"checkpoint-2' is damaged: optimizer.pt has 10 bytes.*undamaged one "
                                              r".* is .*checkpoint-1"):
        resolve_checkpoint(tmp_path, str(second))
    (first / "value_head" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        resolve_checkpoint(tmp_path, "auto")
    assert "value_head/model.safetensors is missing" in caplog.text


def _free_space(monkeypatch, *free_bytes):
    """shutil.disk_usage reporting `free_bytes` in turn (the last one from then on)."""
    import shutil

    real, answers = shutil.disk_usage, list(free_bytes)

    def disk_usage(path):
        usage = real(path)
        return type(usage)(usage.total, usage.used, answers.pop(0) if len(answers) > 1 else answers[0])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_a_full_disk_while_writing_says_so_with_the_path_and_the_size_needed(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)

    def save_on_a_full_disk(obj, f, *a, **k):
        # what torch.save does when write(2) fails with ENOSPC: half a file, and an error without the errno
        Path(f).write_bytes(b"PK" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ck.torch, "save", save_on_a_full_disk)
    _free_space(monkeypatch, 10**9, 100)  # room at the start; then the writes filled the disk
    with pytest.raises(CheckpointError, match=rf"no space left on the device of {tmp_path} to write checkpoint "
                                              rf"{tmp_path}/checkpoint-2: it needs about 390.6 KiB and 100 bytes "
                                              r"is free .*enforce fail at inline_container.*untouched") as err:
        save_checkpoint(tmp_path, 2, states={"big": {"x": torch.zeros(100_000)}})  # 400,000 bytes
    assert isinstance(err.value, ck.CheckpointWriteError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"] and find_latest_checkpoint(tmp_path) == first

    # an OSError from a write names the size too
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    _free_space(monkeypatch, 10**9)
    with pytest.raises(CheckpointError, match=r"no space left .* it needs about 390.6 KiB"):
        save_checkpoint(tmp_path, 2, states={"big": {"x": torch.zeros(100_000)}})


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    _free_space(monkeypatch, 1000)
    head = torch.nn.Linear(100, 100)  # 40,400 bytes of weights
    with pytest.raises(ck.CheckpointWriteError, match=r"it needs about 39.5 KiB and 1000 bytes is free; nothing "
                                                      r"was written"):
        save_checkpoint(tmp_path, 1, models={"head": head})
    assert list(tmp_path.iterdir()) == []


def test_a_state_file_that_would_run_code_when_unpickled_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, states={"pending": {"produced": None}})
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"produced": Payload()}, path / "pending.pt")
    with pytest.raises(CheckpointError, match=r"pending.pt holds Python objects .* it was not loaded"):
        load_checkpoint(path)
    assert not marker.exists()
