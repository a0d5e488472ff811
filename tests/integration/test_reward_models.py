"""Shipped neural reward models on offline models, and a shipped rule model behind the real server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lampo.config import LampoConfig
from lampo.reward import make_scorer
from lampo.reward.client import wait_until_healthy

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    ["Hi", "Hello"],
    ["Tell me about cats.", "Cats are small animals that like to sleep in the sun.", "And dogs?", "Dogs bark."],
    ["What is 2+2?", "4"],
]


def test_hf_classifier_matches_a_plain_forward_pass(tiny_classifier_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = LampoConfig(reward_model="lampo.reward.hf_classifier.HFSequenceClassifierReward",
                      reward_model_config={"hf_reward_model": str(tiny_classifier_path),
                                           "hf_reward_batch_size": 8}).reward
    scorer = make_scorer(cfg, {})
    try:
        # The chat template is applied with alternating user/assistant roles.
        assert scorer.model.render(["Hi", "Hello"]) == (
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        )
        batched = scorer.score(CONVERSATIONS)  # left-padded batch of different lengths
    finally:
        scorer.close()

    tok = AutoTokenizer.from_pretrained(tiny_classifier_path)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_path, dtype=torch.float32).eval()
    expected = []
    for conversation in CONVERSATIONS:  # one at a time, no padding at all
        chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(conversation)]
        ids = tok(tok.apply_chat_template(chat, tokenize=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected.append(model(**ids).logits[0, 0].item())
    assert batched == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) == 3  # a real signal, not a constant


def test_hf_classifier_needs_its_path():
    from lampo.reward.hf_classifier import HFSequenceClassifierReward

    with pytest.raises(ValueError, match="needs setting 'hf_reward_model'"):
        HFSequenceClassifierReward({})


def test_embedding_similarity_on_the_offline_minilm():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lampo.reward.embedding import EmbeddingSimilarityReward

    cfg = LampoConfig(reward_model="lampo.reward.embedding.EmbeddingSimilarityReward",
                      reward_model_config={"embedding_reference": "The cat sat on the mat.",
                                           "embedding_references": {"Weather?": "It is sunny and warm today."}}).reward
    scorer = make_scorer(cfg, {})
    try:
        assert isinstance(scorer.model, EmbeddingSimilarityReward)
        same, close, far, weather = scorer.score([
            ["q", "The cat sat on the mat."],
            ["q", "A cat is sitting on a mat."],
            ["q", "Quarterly revenue grew by ten percent."],
            ["Weather?", "Sunny and warm."],
        ])
    finally:
        scorer.close()
    assert same == pytest.approx(1.0, abs=1e-5)  # cosine of a text with itself
    assert close > 0.7 > 0.2 > far  # paraphrase vs. unrelated (MiniLM: about 0.94 and 0.0)
    assert weather > 0.6  # scored against its own reference, not the cat sentence


def test_vowel_reward_behind_the_real_server(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "cfg.yaml"
    # The trainer's keys and the model's keys in one file; the server takes its port from the URL.
    config.write_text(f"reward_model: http://127.0.0.1:{port}\nlearning_rate: 1.0e-5\n"
                      "reward_model_config:\n  vowel_per_turn: true\n")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lampo.reward_server", "--model", "lampo.reward.rules.VowelReward",
                             "--config", str(config)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        cfg = LampoConfig(reward_model=f"http://127.0.0.1:{port}").reward
        scorer = make_scorer(cfg)
        try:
            wait_until_healthy(f"http://127.0.0.1:{port}", proc, timeout=30, log_path=tmp_path / "server.log",
                               poll=0.05)
            scorer.check_available()
            # per-turn: "aa" -> 1.0, "bab" -> 1/3
            assert scorer.score([["u", "aa", "u", "bab"]]) == [[1.0, pytest.approx(1 / 3)]]
            assert scorer.stats() == {"reward/retries": 0, "reward/failed_requests": 0}
        finally:
            scorer.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
        log.close()
