"""The transformers engine's sampler (inverse-CDF draw + log-probs) and stop truncation."""

from __future__ import annotations

import math

import torch

from lampo.rollout.engines import SamplingSettings, _Sampler, _truncate_at_stop


def draw(settings: SamplingSettings, logits: list[float], rows: int = 20000):
    sampler = _Sampler(settings, torch.device("cpu"))
    scores = torch.tensor([logits] * rows)
    out = sampler(torch.zeros((rows, 1), dtype=torch.long), scores.clone())
    choice = out.argmax(dim=-1)  # what generate's greedy step will pick
    return choice, sampler.logprobs(1)[:, 0], out


def test_sample_frequencies_and_logprobs_follow_softmax_over_temperature():
    # logits [2, 1, 0] at T = 1: p = e^[2,1,0] / (e^2 + e + 1) = [0.665, 0.245, 0.090].
    choice, lp, out = draw(SamplingSettings(temperature=1.0, seed=0), [2.0, 1.0, 0.0])
    freq = torch.bincount(choice, minlength=3).float() / len(choice)
    assert torch.allclose(freq, torch.tensor([0.665, 0.245, 0.090]), atol=0.015)
    # The recorded log-prob is log p of the drawn token.
    z = math.log(math.exp(2) + math.exp(1) + 1)
    expected = torch.tensor([2 - z, 1 - z, 0 - z])[choice]
    assert torch.allclose(lp, expected, atol=1e-6)
    assert ((out == 1).sum(dim=1) == 1).all()  # a one-hot per row


def test_temperature_and_top_k_renormalise():
    # T = 0.5 doubles the logits: [4, 2, 0, -2]; top_k = 2 keeps tokens 0 and 1:
    # p = e^[4, 2] / (e^4 + e^2) = [0.881, 0.119]; tokens 2 and 3 are never drawn.
    choice, lp, _ = draw(SamplingSettings(temperature=0.5, top_k=2, seed=1), [2.0, 1.0, 0.0, -1.0])
    freq = torch.bincount(choice, minlength=4).float() / len(choice)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.881) < 0.015
    assert torch.allclose(lp[choice == 0], torch.tensor(math.log(0.8808)), atol=1e-3)


def test_top_p_keeps_the_nucleus():
    # p = [0.665, 0.245, 0.090]; top_p = 0.8 keeps the two first tokens (0.665 < 0.8 <= 0.91).
    choice, _, _ = draw(SamplingSettings(temperature=1.0, top_p=0.8, seed=2), [2.0, 1.0, 0.0])
    assert set(choice.tolist()) == {0, 1}


def test_greedy_leaves_scores_and_reports_log_softmax_at_t1():
    choice, lp, out = draw(SamplingSettings(temperature=0.0), [0.0, 3.0, 1.0], rows=2)
    assert choice.tolist() == [1, 1]
    assert torch.equal(out, torch.tensor([[0.0, 3.0, 1.0]] * 2))
    z = math.log(1 + math.exp(3) + math.exp(1))
    assert torch.allclose(lp, torch.tensor([3 - z] * 2), atol=1e-6)


def test_seed_reproduces_the_draws():
    a, _, _ = draw(SamplingSettings(temperature=1.0, seed=5), [0.0] * 8, rows=100)
    b, _, _ = draw(SamplingSettings(temperature=1.0, seed=5), [0.0] * 8, rows=100)
    c, _, _ = draw(SamplingSettings(temperature=1.0, seed=6), [0.0] * 8, rows=100)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_truncate_at_stop_keeps_the_stop_token():
    assert _truncate_at_stop([5, 6, 3, 0, 0], {3}) == (3, True)
    assert _truncate_at_stop([5, 6, 7], {3}) == (3, False)
    assert _truncate_at_stop([3], {3, 9}) == (1, True)


def test_vllm_update_weights_sends_the_engines_dtype():
    # fp32 master weights into a bf16 engine arrive as bf16 (vLLM would cast too, but warn for
    # every tensor on every reload); integer buffers and an "auto" engine pass through as they are.
    import threading

    from lampo.rollout.engines import VLLMEngine

    class FakeLLM:
        def __init__(self):
            self.calls = []

        def collective_rpc(self, method, kwargs):
            self.calls.append((method, kwargs["weights_iterator"]))

        def reset_prefix_cache(self):
            self.calls.append(("reset_prefix_cache", None))

    weights = [("w", torch.ones(2, 2)), ("ids", torch.arange(3))]
    for dtype, want in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        engine = VLLMEngine.__new__(VLLMEngine)  # no vLLM start: only the payload is under test
        engine.llm, engine._lock, engine.weight_dtype = FakeLLM(), threading.Lock(), dtype
        engine.update_weights(weights)
        (method, sent), reset = engine.llm.calls
        assert method == "reload_weights" and reset[0] == "reset_prefix_cache"
        assert [n for n, _ in sent] == ["w", "ids"]
        assert sent[0][1].dtype == want and torch.equal(sent[0][1].float(), torch.ones(2, 2))
        assert sent[1][1].dtype == torch.int64


def test_only_vllms_rotary_table_notice_is_dropped_on_reload():
    # vLLM warns "<layer>: Failed to load weights" on every reload for the rotary layer, whose
    # cos/sin table no checkpoint holds; the same warning for a real layer must still show.
    import logging

    from lampo.rollout.engines import _rotary_table_notice

    def record(msg, *args):
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, msg, args, None)

    assert not _rotary_table_notice(record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not _rotary_table_notice(record("%s: Failed to load weights", "Llama3RotaryEmbedding"))
    assert _rotary_table_notice(record("%s: Failed to load weights", "QKVParallelLinear"))
    assert _rotary_table_notice(record("%s: Delayed processing", "RotaryEmbedding"))
    assert _rotary_table_notice(record("Reloading took %.2f seconds", 0.1))


def test_per_prompt_seeds_make_a_rows_draws_independent_of_its_batch():
    # Sample k of prompt i draws from its own stream, seeded seeds[i] + k: the same prompt gives the
    # same tokens alone or beside others, in any position; a single batch seed would not.
    logits = [0.0] * 50

    def tokens(seeds, n=2, steps=6):
        sampler = _Sampler(SamplingSettings(temperature=1.0, n=n, seeds=seeds, max_new_tokens=steps),
                           torch.device("cpu"))
        rows = len(seeds) * n
        drawn = [sampler(torch.zeros((rows, 1), dtype=torch.long), torch.tensor([logits] * rows)).argmax(-1)
                 for _ in range(steps)]
        return torch.stack(drawn, dim=1)

    whole = tokens([100, 200, 300])
    assert torch.equal(tokens([200]), whole[2:4])  # prompt 1's two samples, alone
    assert torch.equal(tokens([300, 100]), torch.cat([whole[4:6], whole[0:2]]))  # reordered
    assert not torch.equal(whole[0], whole[1])  # a prompt's samples differ from each other
    assert torch.equal(tokens([101], n=1)[0], whole[1])  # sample 1 of seed 100 is seed 101's stream
