"""Finding and building a reward model class from its dotted path (used by the server and the trainer)."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from lampo.reward_model import RewardModelTemplate, ensure_loaded


class RewardModelLoadError(RuntimeError):
    """The reward model cannot be used: bad dotted path, not a RewardModelTemplate, or load() raised."""


def import_model_class(dotted: str) -> type[RewardModelTemplate]:
    """Import `module.Class` with the current directory on the import path; errors name the file."""
    module_name, _, class_name = dotted.rpartition(".")
    if not module_name or not class_name:
        raise RewardModelLoadError(
            f"reward model '{dotted}' must be a dotted path 'module.ClassName', e.g. my_reward_model.MyRewardModel "
            "for a class MyRewardModel in ./my_reward_model.py"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # the user's my_reward_model.py sits where they run the command
    expected = Path(cwd, *module_name.split(".")).with_suffix(".py")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise RewardModelLoadError(
                f"reward model '{dotted}': cannot find module '{module_name}' (looked for {expected} and on "
                f"the Python path); run the server from the folder that holds the file"
            ) from exc
        raise RewardModelLoadError(
            f"reward model '{dotted}': importing {expected.name} failed: {exc}\n{traceback.format_exc()}"
        ) from exc
    except Exception as exc:
        raise RewardModelLoadError(
            f"reward model '{dotted}': importing {expected.name} failed with {type(exc).__name__}: {exc}\n"
            f"{traceback.format_exc()}"
        ) from exc
    where = getattr(module, "__file__", None) or str(expected)
    cls = getattr(module, class_name, None)
    if cls is None:
        available = sorted(
            n for n, v in vars(module).items()
            if isinstance(v, type) and issubclass(v, RewardModelTemplate) and v is not RewardModelTemplate
        )
        raise RewardModelLoadError(
            f"reward model '{dotted}': {where} has no class '{class_name}'"
            + (f"; reward models found there: {', '.join(available)}" if available else "")
        )
    if not (isinstance(cls, type) and issubclass(cls, RewardModelTemplate)):
        raise RewardModelLoadError(
            f"reward model '{dotted}': '{class_name}' in {where} is not a subclass of "
            "lampo.reward_model.RewardModelTemplate; write `class "
            f"{class_name}(RewardModelTemplate)` with `from lampo.reward_model import RewardModelTemplate`"
        )
    return cls


def build_model(cls: type[RewardModelTemplate], config: dict[str, Any]) -> RewardModelTemplate:
    """Construct and load the model; a failure becomes a RewardModelLoadError naming the file."""
    where = getattr(sys.modules.get(cls.__module__), "__file__", cls.__module__)
    try:
        model = cls(config)
        ensure_loaded(model)
    except Exception as exc:
        raise RewardModelLoadError(
            f"reward model {cls.__name__} from {where} failed to load: {type(exc).__name__}: {exc}\n"
            f"{traceback.format_exc()}"
        ) from exc
    return model


def model_config_from(raw: dict[str, Any]) -> dict[str, Any]:
    """The dict a reward model's `__init__` receives: the file's keys, with `reward_model_config` merged on top.

    Keeping model settings under `reward_model_config` lets one YAML file serve the trainer (which
    rejects unknown keys) and the server; top-level keys still reach the model as the design docs say.
    """
    merged = dict(raw)
    section = raw.get("reward")
    if isinstance(section, dict) and isinstance(section.get("reward_model_config"), dict):
        merged.update(section["reward_model_config"])
    if isinstance(raw.get("reward_model_config"), dict):
        merged.update(raw["reward_model_config"])
    return merged
