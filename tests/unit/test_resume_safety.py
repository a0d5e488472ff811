"""Resuming reads only tensors and plain values: the async batch in flight round-trips through
torch's safe loader, and a planted state file that would run code is refused, not run."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from lampo import checkpoint as ck
from lampo.rollout.batch import RolloutBatch
from lampo.trainer import RANK_STATES, Produced, Trainer


def _produced() -> Produced:
    batch = RolloutBatch(
        input_ids=torch.tensor([[5, 6, 7, 0], [5, 8, 9, 10]]), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        action_mask=torch.tensor([[False, True, True, False], [False, True, False, True]]),
        engine_logprobs=torch.tensor([[0.0, -0.5, -1.25, 0.0], [0.0, -2.0, 0.0, -0.75]]),
        turn_spans=[[(1, 3)], [(1, 2), (3, 4)]], finish_reasons=[["stop"], ["length", "stop"]],
        messages=[["hi", "yo"], ["a", "b", "c", "d"]], prompt_index=torch.tensor([3, 3]), policy_version=7,
        skipped_rows=1, cut_at_max_prompt_len=2)
    return Produced(batch, [0.5, [1.0, -2.0]], step=4, times={"time/rollout": 0.25},
                    reward_stats={"reward/retries": 1.0}, data_stats={"data/filtered_groups": 0.0})


def test_the_async_batch_in_flight_round_trips_through_the_safe_loader(tmp_path):
    produced = _produced()
    torch.save({"produced": produced.to_state()}, tmp_path / "pending.pt")
    back = Produced.from_state(torch.load(tmp_path / "pending.pt", weights_only=True)["produced"])
    for name in RolloutBatch.TENSORS:
        assert torch.equal(getattr(back.batch, name), getattr(produced.batch, name)), name
    assert back.batch.turn_spans == [[(1, 3)], [(1, 2), (3, 4)]]  # tuples again, as the rollout makes them
    for name in ("finish_reasons", "messages", "policy_version", "skipped_rows", "cut_at_max_prompt_len"):
        assert getattr(back.batch, name) == getattr(produced.batch, name), name
    assert (back.scores, back.step, back.times, back.reward_stats, back.data_stats) == (
        [0.5, [1.0, -2.0]], 4, {"time/rollout": 0.25}, {"reward/retries": 1.0}, {"data/filtered_groups": 0.0})
    with pytest.raises(ValueError, match="field 'turn_spans' is missing or malformed"):
        RolloutBatch.from_state({**produced.batch.to_state(), "turn_spans": [["x"]]})


class _Learner:
    def load_state_dict(self, state):
        self.state = state

    def load_shards(self, path):
        pass


def _trainer(world: int) -> Trainer:
    # only what `_restore` reads: the process layout and a learner to hand the state to
    trainer = Trainer.__new__(Trainer)
    trainer.rank, trainer.world, trainer.learner, trainer.pending = 0, world, _Learner(), None
    return trainer


class _RunsAShellCommand:
    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, file: Path, marker: Path) -> None:
    """Replace a state file with one whose unpickling runs a command, and fix the manifest's sizes
    to match, as whoever forged it would."""
    _RunsAShellCommand.marker = marker
    torch.save({"rng": ck.rng_state(), "pending": {"produced": _RunsAShellCommand()}}, file)
    manifest = json.loads((path / ck.MANIFEST).read_text())
    manifest["files"] = ck.file_sizes(path)
    del manifest["files"][ck.MANIFEST]
    (path / ck.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("world", [1, 2], ids=["pending.pt", "ranks/0.pt"])
def test_resuming_a_checkpoint_with_a_planted_pickle_refuses_it_and_runs_nothing(tmp_path, world):
    out, marker = tmp_path / "run", tmp_path / "the-command-ran"
    staged = ck.stage_checkpoint(out, 2)
    shards = []
    if world > 1:
        (staged / RANK_STATES).mkdir()
        torch.save({"rng": ck.rng_state(), "pending": {"produced": None}}, staged / RANK_STATES / "0.pt")
        shards = [RANK_STATES]
    path = ck.save_checkpoint(out, 2, states={"learner": {}, "rng": ck.rng_state(), "pending": {"produced": None}},
                              trainer_state={"step": 2, "policy_version": 2, "processes": world},
                              staged=staged, shards=shards)
    _plant(path, path / "pending.pt" if world == 1 else path / RANK_STATES / "0.pt", marker)
    assert ck.resolve_checkpoint(out, "auto") == path  # a forged checkpoint that looks whole
    with pytest.raises(ck.CheckpointError, match=r"holds Python objects .* could run code, so it was not loaded"):
        _trainer(world)._restore(path)
    assert not marker.exists()


def test_an_untampered_checkpoint_restores_the_batch_in_flight(tmp_path):
    produced = _produced()
    path = ck.save_checkpoint(tmp_path, 4, states={"learner": {"k": 1}, "rng": ck.rng_state(),
                                                   "pending": {"produced": produced.to_state()}},
                              trainer_state={"step": 4, "policy_version": 3, "processes": 1})
    trainer = _trainer(1)
    trainer._restore(path)
    assert (trainer.start_step, trainer.policy_version, trainer.learner.state) == (4, 3, {"k": 1})
    (pending,) = trainer.pending  # the batches rolled out ahead: here the one of step 5
    assert pending.scores == produced.scores and torch.equal(pending.batch.input_ids, produced.batch.input_ids)


def test_a_batch_of_several_policy_versions_round_trips_with_them():
    """A Ray batch whose rows came from re-synced workers keeps each row's version through a checkpoint."""
    b = _produced().batch
    mixed = RolloutBatch.concat([b, dataclasses.replace(b, policy_version=b.policy_version + 1)], 0)
    assert mixed.versions is not None
    back = RolloutBatch.from_state(mixed.to_state())
    assert torch.equal(back.version_per_row(), mixed.version_per_row()) and back.policy_version == b.policy_version
    assert RolloutBatch.from_state(b.to_state()).versions is None
