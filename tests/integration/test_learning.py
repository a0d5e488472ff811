"""Every estimator learns, through the library API, on two rule rewards over three seeds.

The task (issue 16): 2 prompts x 8 samples, 8 new tokens, minibatches of 8, 4 PPO epochs, learning
rate 1e-3, kl_coef 0.01. The rewarded tokens are a fixed random tenth of the vocabulary, so a
random policy scores about 0.1:
- share: the share of the response's tokens that are rewarded (a short answer can score 1);
- count: the number of rewarded tokens over max_new_tokens (only long answers score 1).
The two pull response length opposite ways; both must rise for every estimator, the separate
critic and the value head alike.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lampo import PPOConfig, PPOTrainer

pytestmark = pytest.mark.slow

NEW_TOKENS, STEPS, SEEDS = 8, 80, (0, 1, 2)
RISE = 0.3
"""The mean reward of the last 10 steps must beat the first 10 steps' by this much (from ~0.1)."""
MAX_WORKERS = 4
"""Processes the runs share at most: each holds its own torch and transformers in memory."""

ESTIMATORS = {
    "gae": dict(estimator="gae"),
    "gae-head": dict(estimator="gae", value_model="head"),
    "reinforce_pp": dict(estimator="reinforce_pp"),
    "grpo": dict(estimator="grpo", num_generations=8, batch_size=2),
    "rloo": dict(estimator="rloo", num_generations=8, batch_size=2),
    "dr_grpo": dict(estimator="dr_grpo", num_generations=8, batch_size=2),
    "reinforce_pp_baseline": dict(estimator="reinforce_pp_baseline", num_generations=8, batch_size=2),
    # the 2026 losses on GRPO's advantages (docs/algorithms.md)
    "grpo-clip_higher": dict(estimator="grpo", num_generations=8, batch_size=2, cliprange_high=0.28),
    "grpo-gspo": dict(estimator="grpo", num_generations=8, batch_size=2, policy_loss="gspo"),
    "grpo-cispo": dict(estimator="grpo", num_generations=8, batch_size=2, policy_loss="cispo"),
}


def rewarded_tokens(vocab_size: int) -> set[int]:
    return set(random.Random(1234).sample(range(vocab_size), vocab_size // 10))


def reward(kind: str, response: torch.Tensor, good: set[int]) -> float:
    hits = sum(t in good for t in response.tolist())
    if kind == "share":
        return hits / max(len(response), 1)
    return hits / NEW_TOKENS


def learn(path, estimator: str, kind: str, seed: int) -> list[float]:
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = PPOConfig(**{**dict(batch_size=16, mini_batch_size=8, ppo_epochs=4, learning_rate=1e-3, kl_coef=0.01,
                              max_new_tokens=NEW_TOKENS, non_stop_penalty=False, seed=seed,
                              lr_scheduler_type="constant"), **ESTIMATORS[estimator]})
    trainer = PPOTrainer(cfg, model, tok)
    good = rewarded_tokens(len(tok))
    texts = ("Say something.", "Tell me a story.")
    prompts = [torch.tensor(tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                        add_generation_prompt=True)).input_ids) for t in texts]
    G = cfg.generation.num_generations
    queries = [p for p in prompts for _ in range(G)] * (16 // (2 * G))  # groups contiguous
    history = []
    for _ in range(STEPS):
        responses = trainer.generate(queries)
        scores = [reward(kind, r, good) for r in responses]
        trainer.step(queries, responses, scores)
        history.append(statistics.mean(scores))
    return history


def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs(request, tiny_model_path):
    """(estimator, kind, seed) -> the future history of that run, for every selected case of this
    module, all submitted at once to one single-threaded process per core. On the tiny model a
    step is mostly Python and dispatch, not arithmetic: one thread runs it as fast as several, so
    the runs finish up to cores times sooner side by side than one after another."""
    cases = [(item.callspec.params["estimator"], item.callspec.params["kind"]) for item in request.session.items
             if item.module is request.module and item.originalname == "test_reward_rises"]
    workers = min(len(os.sched_getaffinity(0)), MAX_WORKERS, len(cases) * len(SEEDS)) or 1
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=one_thread) as pool:
        yield {(e, k, seed): pool.submit(learn, tiny_model_path, e, k, seed) for e, k in cases for seed in SEEDS}


@pytest.mark.parametrize("kind", ["share", "count"])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_reward_rises(runs, estimator, kind):
    rises = {}
    for seed in SEEDS:
        h = runs[estimator, kind, seed].result()
        rises[seed] = statistics.mean(h[-10:]) - statistics.mean(h[:10])
    assert all(r >= RISE for r in rises.values()), rises
