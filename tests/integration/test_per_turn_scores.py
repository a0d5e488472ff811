"""Per-turn scores when the dataset gives earlier assistant turns (PaddleNLP `tgt`, `messages`).

The contract (docs/reward-server.md): a per-turn reply has one score per assistant turn of the
conversation the reward model read, given turns included; the trainer rewards the generated
turns, the last ones, and drops the scores of the given turns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dataset", ["paddlenlp", "messages"])
def test_per_turn_scores_of_given_turns_are_read_and_only_the_generated_turn_is_rewarded(
        tmp_path, tiny_model_path, dataset):
    from lampo.config import LampoConfig
    from lampo.trainer import Trainer

    cfg = LampoConfig(model_name_or_path=str(tiny_model_path), query_dataset=str(ROOT / "examples" / "data" / dataset),
                      engine="hf", reward_model="lampo.reward.rules.VowelReward",
                      reward_model_config={"vowel_per_turn": True}, batch_size=4, mini_batch_size=4,
                      max_new_tokens=6, non_stop_penalty=False, output_dir=str(tmp_path / "run"), progress=False,
                      report_to=[], max_steps=1, async_mode=False, seed=0)
    trainer = Trainer(cfg)
    try:
        produced = trainer.produce(0)
        # VowelReward scores every assistant turn it reads by its share of vowels: the given English
        # turn and the tiny model's random answer score differently, so the test tells them apart.
        assert all(len(s) == 2 for s in produced.scores), produced.scores
        assert any(s[0] != s[1] for s in produced.scores)
        tb = trainer.to_train_batch(produced)
        for i, ends in enumerate(produced.batch.turn_ends):
            assert len(ends) == 1  # one generated turn
            assert float(tb.placed_scores[i, ends[0]]) == pytest.approx(produced.scores[i][1])
            assert float(tb.placed_scores[i].sum()) == pytest.approx(produced.scores[i][1])
            assert float(tb.seq_scores[i]) == pytest.approx(produced.scores[i][1])
        stats = trainer.train()  # the whole step runs on it
        assert stats["objective/scores"] == pytest.approx(float(tb.seq_scores.mean()))
    finally:
        trainer.close()
