"""Atomic training checkpoints: `output_dir/checkpoint-<step>/`.

A checkpoint is written under a temporary name (`.tmp-checkpoint-<step>-<pid>`) in `output_dir`,
every file is fsynced, a manifest (`checkpoint.json`, the completeness marker) is written last,
and only then is the directory renamed to `checkpoint-<step>`. A rename within one filesystem is
atomic (POSIX `rename(2)`), so a crash at any moment leaves either the previous checkpoints alone
or the new one whole; `find_latest_checkpoint` also requires the marker, so a directory that was
copied in half by hand is not taken for a checkpoint either.

Layout of one checkpoint::

    checkpoint-<step>/
      checkpoint.json        manifest and completeness marker (written last)
      trainer_state.json     global step, episode, data order and position, policy version ...
      <state>.pt             one torch.save file per entry of `states` (optimizers, schedulers, RNG ...)
      <model>/               one folder per entry of `models`:
                               `save_pretrained` output (transformers: full weights; PEFT: the adapter)
                               or `model.safetensors` with the state_dict of a plain nn.Module
      <shard>/               entries every process wrote (`shards`: DeepSpeed's optimiser partitions)

Only one process may write checkpoints into an `output_dir` (rank 0 in data parallel); gather any
sharded weights (and the other ranks' RNG states, if they differ) before calling `save_checkpoint`.
State that every rank writes itself (DeepSpeed ZeRO's optimiser partitions) goes into the
temporary directory first: rank 0 makes it with `stage_checkpoint` and hands its path to the
other ranks, each writes its part, then rank 0 calls `save_checkpoint(..., staged=tmp, shards=[...])`,
which completes and renames that directory like any other. `shard_path` finds such an entry.

Typical use in a trainer::

    save_checkpoint(cfg.train.output_dir, step,
                    models={"policy": policy, "value_model": value_model},
                    states={"learner": learner.state_dict(), "rng": rng_state()},
                    trainer_state={"global_step": step, "episode": episode, "data_order": order,
                                   "data_position": pos, "policy_version": version},
                    save_total_limit=cfg.train.save_total_limit)

    ckpt = resolve_checkpoint(cfg.train.output_dir, cfg.train.resume_from_checkpoint)
    if ckpt is not None:
        states, trainer_state = load_checkpoint(ckpt)
        policy = AutoModelForCausalLM.from_pretrained(model_path(ckpt, "policy"))   # or PeftModel.from_pretrained
        learner.load_state_dict(states["learner"])
        set_rng_state(states["rng"])
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lampo.files import fsync_dir, fsync_tree, write_text

MANIFEST = "checkpoint.json"
TRAINER_STATE = "trainer_state.json"
MODULE_WEIGHTS = "model.safetensors"
TMP_PREFIX = ".tmp-checkpoint-"
FORMAT_VERSION = 1

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RESERVED = {MANIFEST, TRAINER_STATE, "checkpoint", "trainer_state"}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and what to do."""


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    models: dict[str, Any] | None = None,
    states: dict[str, dict] | None = None,
    trainer_state: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
    staged: Path | None = None,
    shards: list[str] | None = None,
) -> Path:
    """Write `output_dir/checkpoint-<step>/` atomically and return its path.

    models: name -> object with `save_pretrained` (transformers or PEFT model) or a plain nn.Module.
    states: name -> state dict saved with torch.save (optimizer, scheduler, KL controller, `rng_state()`).
    trainer_state: JSON-serialisable dict (global step, episode, data order and position, ...).
    save_total_limit: keep at most this many complete checkpoints; older ones are deleted only
    after the new one is complete.
    staged: the temporary directory `stage_checkpoint` made, already holding `shards` (entries
    other processes wrote); None: a new one is made here.
    """
    models = dict(models or {})
    shards = list(shards or [])
    states = dict(states or {})
    trainer_state = dict(trainer_state or {})
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative int, got {step!r}")
    if save_total_limit is not None and save_total_limit < 1:
        raise CheckpointError(f"save_total_limit must be >= 1 or None, got {save_total_limit!r}")
    _check_names(models, states)
    clash = set(shards) & (set(models) | {f"{name}.pt" for name in states} | _RESERVED)
    if clash:
        raise CheckpointError(f"shard entries {sorted(clash)} clash with a model, a state or a reserved name")
    try:
        trainer_state_text = json.dumps(trainer_state, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"trainer_state must be JSON-serialisable (ints, floats, strings, lists, dicts; no NaN): {exc}; "
            "put tensors and other objects in `states` instead"
        ) from exc

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(staged) if staged is not None else None
    try:
        if tmp is None:
            tmp = stage_checkpoint(output_dir, step)
        for name in shards:
            if not (tmp / name).exists():
                raise CheckpointError(f"shard entry {name!r} is missing from {tmp}: every process must write "
                                      "its part before save_checkpoint")
        kinds: dict[str, str] = {}
        for name, model in models.items():
            kinds[name] = _save_model(model, tmp / name)
        for name, state in states.items():
            torch.save(state, tmp / f"{name}.pt")
        write_text(tmp / TRAINER_STATE, trainer_state_text)
        fsync_tree(tmp)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "models": kinds,
            "states": sorted(states),
            "shards": sorted(shards),
            "complete": True,
        }
        # The marker goes last: a directory without it is never a checkpoint.
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=2), fsync=True)
        fsync_dir(tmp)
        _install(tmp, final)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, CheckpointError)):
            raise
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"no space left to write checkpoint {final} ({exc}); the partial checkpoint was removed "
                f"and the previous checkpoints in {output_dir} are untouched. Free disk space or lower "
                "save_total_limit, then resume with resume_from_checkpoint: auto"
            ) from exc
        raise CheckpointError(
            f"could not write checkpoint {final}: {type(exc).__name__}: {exc}; the partial checkpoint was "
            f"removed and the previous checkpoints in {output_dir} are untouched"
        ) from exc

    if save_total_limit is not None:
        _rotate(output_dir, save_total_limit, keep=final)
    return final


def stage_checkpoint(output_dir: str | Path, step: int) -> Path:
    """Make the empty temporary directory that `save_checkpoint` completes into checkpoint-<step>.

    Earlier saves that crashed left theirs behind: none ever looked like a checkpoint (wrong
    name, no marker), and this process is the only one that stages, so they are removed first.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_dirs(output_dir)
    tmp = output_dir / f"{TMP_PREFIX}{step}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _check_names(models: dict[str, Any], states: dict[str, Any]) -> None:
    for kind, names in (("models", models), ("states", states)):
        for name in names:
            if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
                raise CheckpointError(
                    f"{kind} name {name!r} cannot be a file name in a checkpoint: use letters, digits, "
                    f"'_', '-', '.' (not {sorted(_RESERVED)})"
                )
    both = set(models) & set(states)
    if both:
        raise CheckpointError(f"names {sorted(both)} are used for both a model and a state; rename one")


def _save_model(model: Any, path: Path) -> str:
    """Save one model into `path`; returns how it was saved ("pretrained" or "module")."""
    # DistributedDataParallel wraps the real model; save what users load later.
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "save_pretrained"):
        # transformers writes config + safetensors weights; PEFT writes only the adapter
        # (adapter_config.json + adapter_model.safetensors), which is what resuming LoRA needs.
        model.save_pretrained(str(path))
        return "pretrained"
    if isinstance(model, torch.nn.Module):
        from safetensors.torch import save_file

        path.mkdir()
        save_file(_unshared_state_dict(model), str(path / MODULE_WEIGHTS))
        return "module"
    raise CheckpointError(
        f"cannot save model {path.name!r} of type {type(model).__name__}: pass an object with "
        "save_pretrained (transformers/PEFT) or a torch.nn.Module; put other state in `states`"
    )


def _unshared_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights); copy only the duplicates so
    # a large module is not cloned whole.
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in module.state_dict().items():
        t = tensor.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t.contiguous()
    return out


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete temporary directory to its final name."""
    if final.exists():
        # Saving the same step twice (a run resumed from checkpoint-N and stopped again at N):
        # move the old one out of the way under a temporary name first, since rename(2) cannot
        # replace a non-empty directory. A crash in between leaves the new one under its temp
        # name and the old one under another; older checkpoints stay valid.
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(final.parent)


def _rotate(output_dir: Path, limit: int, keep: Path) -> None:
    complete = list_checkpoints(output_dir)
    old = [p for p in complete if p != keep]
    excess = len(complete) - limit
    for path in old[: max(0, excess)]:
        # Rename first so that a crash halfway through rmtree never leaves a directory named
        # checkpoint-N holding a marker but missing weights.
        doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def clean_temp_dirs(output_dir: str | Path) -> list[Path]:
    """Remove temporary directories left by a save that crashed; returns what was removed."""
    output_dir = Path(output_dir)
    removed = []
    if not output_dir.is_dir():
        return removed
    for path in output_dir.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------------------


def is_complete(path: str | Path) -> bool:
    """True when `path` is a checkpoint directory whose save finished (the marker is present)."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return bool(json.loads(manifest.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CKPT_RE.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None (temporary and unmarked dirs are ignored)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The `resume_from_checkpoint` config value as a path: null -> None, `auto` -> latest or None."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "auto":
        return find_latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not is_complete(path):
        latest = find_latest_checkpoint(output_dir)
        hint = f"; the latest complete one in {output_dir} is {latest}" if latest else ""
        raise CheckpointError(
            f"resume_from_checkpoint '{path}' is not a complete checkpoint (no {MANIFEST} marker){hint}"
        )
    return path


def load_checkpoint(path: str | Path, *, weights_only: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read `(states, trainer_state)` from a complete checkpoint; models load from `model_path`.

    weights_only=True (torch's safe unpickler) reads tensors, numbers, strings and containers,
    which covers optimizer/scheduler state dicts and `rng_state()`. Pass False only for a
    checkpoint you trust that holds other Python objects.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    states: dict[str, Any] = {}
    for name in manifest["states"]:
        file = path / f"{name}.pt"
        try:
            states[name] = torch.load(file, map_location="cpu", weights_only=weights_only)
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint {path} lists state '{name}' but {file} is missing") from exc
        except Exception as exc:
            if weights_only and "weights_only" in str(exc):
                raise CheckpointError(
                    f"state '{name}' in {path} holds objects torch's safe loader refuses ({exc}); if you "
                    "trust this checkpoint, call load_checkpoint(path, weights_only=False)"
                ) from exc
            raise
    trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    return states, trainer_state


def model_path(ckpt: str | Path, name: str) -> Path:
    """Folder of model `name` in a checkpoint, for `from_pretrained` / `PeftModel.from_pretrained`."""
    ckpt = Path(ckpt)
    manifest = _read_manifest(ckpt)
    if name not in manifest["models"]:
        raise CheckpointError(
            f"checkpoint {ckpt} has no model '{name}'; it has {sorted(manifest['models']) or 'none'}"
        )
    return ckpt / name


def shard_path(ckpt: str | Path, name: str) -> Path:
    """Entry `name` that every process wrote into a checkpoint (see `stage_checkpoint`)."""
    ckpt = Path(ckpt)
    manifest = _read_manifest(ckpt)
    if name not in manifest.get("shards", []):
        raise CheckpointError(
            f"checkpoint {ckpt} has no '{name}' entry written by every process: the run that saved it did not "
            "write one ('deepspeed': a run without DeepSpeed). Resume it with the launcher it was saved with"
        )
    return ckpt / name


def load_module_state_dict(ckpt: str | Path, name: str) -> dict[str, torch.Tensor]:
    """State dict of a plain nn.Module saved in a checkpoint, for `module.load_state_dict`."""
    from safetensors.torch import load_file

    folder = model_path(ckpt, name)
    file = folder / MODULE_WEIGHTS
    if not file.is_file():
        raise CheckpointError(
            f"model '{name}' in {ckpt} was saved with save_pretrained; load it with from_pretrained({folder})"
        )
    return load_file(str(file))


def _read_manifest(path: Path) -> dict[str, Any]:
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (missing or unreadable {MANIFEST}); "
            "use find_latest_checkpoint(output_dir) to pick the latest complete one"
        )
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------
# Random number generators
# ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """States of python `random`, numpy's global generator, torch CPU and (when present) CUDA.

    Only tensors, numbers, strings and containers, so `torch.load(weights_only=True)` reads it back.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned, so the next random draws repeat."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": np.asarray(npst["key"], dtype=np.uint32), "pos": int(npst["pos"])},
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise CheckpointError("the checkpoint holds CUDA RNG states but CUDA is not available here")
        torch.cuda.set_rng_state_all(state["cuda"])
