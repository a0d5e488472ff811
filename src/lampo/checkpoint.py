"""Atomic training checkpoints: `output_dir/checkpoint-<step>/`.

A checkpoint is written under a temporary name (`.tmp-checkpoint-<step>-<pid>`) in `output_dir`,
every file is fsynced, a manifest (`checkpoint.json`, the completeness marker) is written last,
and only then is the directory renamed to `checkpoint-<step>`. A rename within one filesystem is
atomic (POSIX `rename(2)`), so a crash at any moment leaves either the previous checkpoints alone
or the new one whole; `find_latest_checkpoint` also requires the marker, so a directory that was
copied in half by hand is not taken for a checkpoint either.

The manifest also records the size of every file in the checkpoint. `find_latest_checkpoint`
(and so `resume_from_checkpoint: auto`) checks them, and passes over a checkpoint whose files were
damaged after it was written (truncated, deleted) to the one before it, with a warning that
names the damage. Reading checks that every name the manifest lists is a plain name inside the
checkpoint, and `load_checkpoint` reads states with torch's safe loader only (`weights_only`):
tensors, numbers, strings, lists and dicts, never arbitrary Python objects, so a planted state
file cannot run code. Still, resume only checkpoints you made or trust: a model folder holds
what `from_pretrained` reads (safetensors weights, JSON configs).

Layout of one checkpoint::

    checkpoint-<step>/
      checkpoint.json        manifest, completeness marker (written last) and each file's size
      trainer_state.json     global step, episode, data order and position, policy version ...
      <state>.pt             one torch.save file per entry of `states` (optimizers, schedulers, RNG ...):
                             tensors, numbers, strings, lists, dicts only (what weights_only reads)
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
import logging
import os
import random
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from lampo.files import fsync_dir, fsync_tree, write_text

MANIFEST = "checkpoint.json"
TRAINER_STATE = "trainer_state.json"
MODULE_WEIGHTS = "model.safetensors"
TMP_PREFIX = ".tmp-checkpoint-"
FORMAT_VERSION = 2
"""2: the manifest records every file's size (`files`). Format 1 checkpoints still load, unverified."""

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RESERVED = {MANIFEST, TRAINER_STATE, "checkpoint", "trainer_state"}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and what to do."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint (or the final model) could not be written: the disk is full, a write failed.
    Nothing half-written is left where a loader would take it; the earlier checkpoints are untouched."""


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
    need = estimate_bytes(list(models.values()), list(states.values()))
    try:
        if tmp is None:
            tmp = stage_checkpoint(output_dir, step)
        for name in shards:
            if not (tmp / name).exists():
                raise CheckpointError(f"shard entry {name!r} is missing from {tmp}: every process must write "
                                      "its part before save_checkpoint")
        check_space(output_dir, need, f"checkpoint {final}")
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
            "files": file_sizes(tmp),
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
        untouched = (f"the partial checkpoint was removed and the previous checkpoints in {output_dir} are "
                     "untouched")
        if out_of_space(exc, output_dir, need):
            raise CheckpointWriteError(
                f"{no_space_message(output_dir, need, f'checkpoint {final}', exc)}; {untouched}. Free disk space "
                "or lower save_total_limit, then resume with --resume_from_checkpoint auto"
            ) from exc
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: {type(exc).__name__}: {exc}; {untouched}"
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


def file_sizes(root: Path) -> dict[str, int]:
    """Size in bytes of every file below `root`, by its '/'-separated path relative to `root`."""
    sizes = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath) / name
            sizes[file.relative_to(root).as_posix()] = file.stat().st_size
    return dict(sorted(sizes.items()))


def estimate_bytes(models: list[Any], states: list[Any]) -> int:
    """About how many bytes saving `models` and `states` writes: their tensors' bytes (a PEFT model
    saves its trainable adapter only). Configs, tokenizers and file headers add a little."""
    seen: set[int] = set()

    def tensor_bytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                return 0
            key = obj.untyped_storage().data_ptr()
            if key in seen and key != 0:
                return 0
            seen.add(key)
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    total = 0
    for model in models:
        while isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        if isinstance(model, torch.nn.Module):
            if hasattr(model, "peft_config"):
                total += tensor_bytes([p for p in model.parameters() if p.requires_grad])
            else:
                total += tensor_bytes(list(model.state_dict().values()))
    return total + tensor_bytes(list(states))


def check_space(path: Path, need: int, what: str) -> None:
    """Refuse before writing `what` (about `need` bytes) into `path` when its filesystem has less free."""
    free = _free_bytes(path)
    if free is not None and need > free:
        raise CheckpointWriteError(f"{no_space_message(path, need, what)}; nothing was written")


def out_of_space(exc: BaseException, path: Path, need: int) -> bool:
    """Whether `exc` (from writing about `need` bytes into `path`) means the disk is full.

    torch.save reports a failed write as "enforce fail at inline_container.cc" without the
    errno, so besides ENOSPC/EDQUOT anywhere in the exception's chain, a failure while the
    filesystem has less room than the write needed counts too.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in ("No space left", "os error 28", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    free = _free_bytes(path)
    return free is not None and need > free


def no_space_message(path: Path, need: int, what: str, exc: BaseException | None = None) -> str:
    free = _free_bytes(path)
    cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return (f"no space left on the device of {path} to write {what}: it needs about {_size(need)} and "
            f"{_size(free) if free is not None else 'an unknown amount'} is free{cause}")


def _free_bytes(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


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
    """The complete, undamaged checkpoint with the highest step, or None (temporary and unmarked
    dirs are ignored). A damaged one (`verify_checkpoint`) is passed over with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        log.warning("checkpoint %s is damaged (%s): passing over it to the checkpoint before it", path,
                    "; ".join(problems))
    return None


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with a complete checkpoint's files: each file its manifest lists must be there
    with the size it was written with, and every listed name must be inside the checkpoint.
    Empty: nothing found (format 1 checkpoints recorded no sizes and are not checked)."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    for rel, size in (manifest.get("files") or {}).items():
        try:
            actual = (path / rel).stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        if actual != size:
            problems.append(f"{rel} has {actual} bytes where {size} were written")
    return problems


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The `resume_from_checkpoint` config value as a path: null -> None, `auto` -> the latest
    undamaged one, or None when there is no checkpoint at all."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "auto":
        latest = find_latest_checkpoint(output_dir)
        if latest is None and list_checkpoints(output_dir):
            raise CheckpointError(
                f"every checkpoint in {output_dir} is damaged (the warnings above name the files); resume one "
                "by its path after repairing it, or start afresh in another output_dir"
            )
        return latest
    path = Path(resume_from_checkpoint)
    if not is_complete(path):
        latest = find_latest_checkpoint(output_dir)
        hint = f"; the latest complete one in {output_dir} is {latest}" if latest else ""
        raise CheckpointError(
            f"resume_from_checkpoint '{path}' is not a complete checkpoint (no {MANIFEST} marker){hint}"
        )
    problems = verify_checkpoint(path)
    if problems:
        latest = find_latest_checkpoint(output_dir)
        hint = f"; the latest undamaged one in {output_dir} is {latest}" if latest else ""
        raise CheckpointError(f"resume_from_checkpoint '{path}' is damaged: {'; '.join(problems)}{hint}")
    return path


def load_checkpoint(path: str | Path, *, weights_only: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read `(states, trainer_state)` from a complete checkpoint; models load from `model_path`.

    weights_only=True (torch's safe unpickler) reads tensors, numbers, strings and containers,
    which covers everything Lampo saves: optimiser and scheduler state dicts, `rng_state()`, the
    async batch in flight. weights_only=False unpickles arbitrary objects, which can run any
    code a checkpoint's author chose: pass it only for a checkpoint you wrote yourself with
    other objects in it. Lampo itself never does.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    states: dict[str, Any] = {}
    for name in manifest["states"]:
        states[name] = load_state_file(path / f"{name}.pt", weights_only=weights_only)
    trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    return states, trainer_state


def load_state_file(file: Path, *, weights_only: bool = True) -> Any:
    """One state file of a checkpoint, read with torch's safe loader; errors name the file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint state file {file} is missing") from exc
    except Exception as exc:
        if weights_only and "weights_only" in str(exc):
            raise CheckpointError(
                f"{file} holds Python objects besides tensors, numbers, strings, lists and dicts, which torch's "
                f"safe loader refuses: unpickling them could run code, so it was not loaded ({_refusal(exc)}). "
                "Lampo writes no such file (before checkpoint format 2 an async run's batch in flight was one: "
                "such a checkpoint cannot be resumed safely); this one was made by other code or tampered with"
            ) from exc
        raise CheckpointError(f"checkpoint state file {file} is unreadable: {type(exc).__name__}: {exc}") from exc


def _refusal(exc: Exception) -> str:
    """The line of torch's safe-loader error that names what it refused."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")


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
    """The manifest of a complete checkpoint, every name in it checked to stay inside `path`."""
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (missing or unreadable {MANIFEST}); "
            "use find_latest_checkpoint(output_dir) to pick the latest complete one"
        )
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    # The loaders join these names to the checkpoint's path: a name such as '../x' would read a
    # file outside it. Lampo never writes one (`_check_names`).
    entries = [("models", n) for n in manifest.get("models", {})] + [
        (kind, n) for kind in ("states", "shards") for n in manifest.get(kind, [])]
    for kind, name in entries:
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
            raise CheckpointError(
                f"{path / MANIFEST} lists {kind} entry {name!r}, which is not a plain name inside the checkpoint: "
                "Lampo did not write this manifest. Do not resume a checkpoint you did not make or do not trust"
            )
    for rel in manifest.get("files") or {}:
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ("..",)
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise CheckpointError(
                f"{path / MANIFEST} lists file {rel!r}, which is outside the checkpoint: Lampo did not write "
                "this manifest. Do not resume a checkpoint you did not make or do not trust"
            )
    return manifest


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
