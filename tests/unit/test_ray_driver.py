"""The Ray driver's order of remote calls (lampo.distributed.ray.driver), with the learner group and
the rollout workers replaced by recorders: no cluster started."""

from __future__ import annotations

import pytest

from lampo.config import LampoConfig
from lampo.distributed.ray.driver import RayTrainer
from lampo.distributed.ray.rollout import Job


class Recorder:
    """A learner group and a pool of rollout workers that write down the calls they are sent."""

    def __init__(self, colocated: bool):
        self.colocated, self.broadcasting, self.prompt_cache_block = colocated, False, 0
        self.events: list = []

    def learn(self, batch, cache_block, summed, publish_as=None, meanwhile=None):
        self.events.append(("learn sent", publish_as))
        if meanwhile is not None:
            meanwhile()
        self.events.append("learn returned")
        return {"loss": 1.0}

    def dispatch(self, rows, seed):
        self.events.append(("rollout sent", rows))
        return Job(seed, [], started=0.0)


class Rows:
    def rows_for(self, step):
        return [f"prompt of step {step}"]


class Executor:
    def submit(self, fn, *args):
        return (fn.__name__, args)


def driver(colocated: bool, num_steps: int = 3) -> RayTrainer:
    trainer = RayTrainer.__new__(RayTrainer)  # the phases alone, without a cluster
    trainer.cfg, trainer.rank, trainer.num_steps, trainer.policy_version = LampoConfig(), 0, num_steps, 0
    trainer.pool = trainer.group = Recorder(colocated)
    trainer.sampler, trainer._dispatched = Rows(), {}
    return trainer


def test_colocated_the_next_batch_is_sent_behind_the_learn_calls_before_they_return():
    trainer = driver(colocated=True)
    trainer.learn("batch", step=0)
    assert trainer.pool.events == [("learn sent", 1), ("rollout sent", ["prompt of step 1"]), "learn returned"]
    assert trainer._dispatched[(1, 0)].started > 0.0  # time/rollout counts from the update's end
    trainer.submit_produce(1, Executor())  # the loop's own dispatch finds the parts sent
    assert len(trainer.pool.events) == 3


def test_colocated_nothing_is_sent_past_the_last_step():
    trainer = driver(colocated=True, num_steps=1)
    trainer.learn("batch", step=0)
    assert trainer.pool.events == [("learn sent", 1), "learn returned"]


@pytest.mark.parametrize("broadcasting", [False, True])
def test_separate_workers_get_the_next_batch_only_after_the_weights(broadcasting):
    """Their weights come in a call of their own, after `learn` returns (`sync`): a batch sent
    during the update would be rolled out with the old weights."""
    trainer = driver(colocated=False)
    trainer.pool.broadcasting = broadcasting
    trainer.learn("batch", step=0)
    assert trainer.pool.events == [("learn sent", None if broadcasting else 1), "learn returned"]
    trainer.submit_produce(1, Executor())
    assert trainer.pool.events[-1] == ("rollout sent", ["prompt of step 1"])
