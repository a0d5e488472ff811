"""The rollout phase on the real tiny model with the transformers engine."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from lampo.config import DataConfig, GenerationConfig
from lampo.data import load_prompt_dataset
from lampo.rollout.engines import HFEngine, SamplingSettings, make_engine
from lampo.rollout.multistep import rollout
from lampo.rollout.weight_sync import engine_weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "multistep"


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def test_example_dataset_rolls_out_three_steps(tiny_model_path, tok):
    data_cfg = DataConfig(query_dataset=str(ROOT / "examples/data/multistep"), system_prompt="Be brief.")
    rows = load_prompt_dataset(data_cfg, seed=0)["train"][:6]
    # `end`: a turn cut at max_new_tokens ends its conversation (the default `continue` would go on).
    gen_cfg = GenerationConfig(
        engine="hf", temperature=1.0, max_new_tokens=8, num_generations=2, stop_token=" ", truncated_turn="end"
    )
    engine = make_engine(gen_cfg, tiny_model_path, tok)
    assert isinstance(engine, HFEngine)
    batch = rollout(engine, tok, rows, gen_cfg, data_cfg, policy_version=0, seed=1)
    assert len(batch) == 12 and batch.prompt_index.tolist() == [r.index for r in rows for _ in range(2)]
    for i in range(len(batch)):
        spans, reasons, msgs = batch.turn_spans[i], batch.finish_reasons[i], batch.messages[i]
        assert len(spans) == len(reasons) and len(msgs) == 2 * len(spans)
        # Under `end`, a conversation goes on only after a stopped turn.
        assert all(r == "stop" for r in reasons[:-1])
        covered = torch.zeros_like(batch.action_mask[i])
        for start, end in spans:
            covered[start:end] = True
        assert torch.equal(covered, batch.action_mask[i])  # the mask is exactly the turns
        assert msgs[0] == rows[i // 2].steps[0]
    assert any(len(s) == 3 for s in batch.turn_spans)
    assert int(batch.action_mask.sum()) == batch.num_generated_tokens > 0


def test_engine_logprobs_match_a_forward_pass_at_the_temperature(model, tok):
    # Learner-side recomputation: log softmax(logits / T) at each action token, from one forward
    # pass over the whole conversation (what the optimisation phase does).
    gen_cfg = GenerationConfig(temperature=0.7, max_new_tokens=10, stop_token=" ")
    data_cfg = DataConfig()
    from lampo.data import PromptRow

    rows = [PromptRow(0, ("Hi.", "Why?")), PromptRow(1, ("Tell me about bees.", "And ants?"))]
    batch = rollout(HFEngine(model, tok), tok, rows, gen_cfg, data_cfg, policy_version=0, seed=3)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1] / 0.7, -1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    mask = batch.action_mask[:, 1:]
    diff = (lp[mask] - batch.engine_logprobs[:, 1:][mask]).abs()
    assert diff.max() < 1e-4  # val/engine_logprob_diff near 0 when weights and temperature agree


@pytest.mark.parametrize("onednn_linear", [False, True])
def test_hf_engine_keeps_its_own_copy_until_update(model, tok, onednn_linear):
    import copy

    policy = copy.deepcopy(model)
    engine = HFEngine(policy, tok, onednn_linear=onednn_linear)
    prompt = [tok("Hello there")["input_ids"]]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=12, stop_token_ids=[3])
    before = engine.generate(prompt, greedy)[0][0].token_ids
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert engine.generate(prompt, greedy)[0][0].token_ids == before  # the trainer's edits are not seen
    engine.update_weights(engine_weights(policy))
    expected = HFEngine(policy, tok).generate(prompt, greedy)[0][0].token_ids
    assert engine.generate(prompt, greedy)[0][0].token_ids == expected != before
    with pytest.raises(KeyError, match="not in the engine's model"):
        engine.update_weights([("nope.weight", torch.zeros(1))])


def test_hf_engine_on_onednn_samples_like_the_default(model, tok, monkeypatch):
    from lampo.speed import onednn_linear as D

    if not D.available():
        pytest.skip("this torch build has no oneDNN linear kernel")
    monkeypatch.setattr(D, "MIN_MACS", 1)  # the tiny model's products would stay on MKL
    fast = HFEngine(model, tok, onednn_linear=True)
    assert any(isinstance(m, D.OneDNNLinear) for m in fast.model.modules())
    assert not any(isinstance(m, D.OneDNNLinear) for m in model.modules())  # the engine's own copy only
    prompts = [tok("a b c")["input_ids"], tok("the moon is")["input_ids"]]
    s = SamplingSettings(temperature=1.0, max_new_tokens=8, stop_token_ids=[3], n=2, seed=11)
    plain, dnn = HFEngine(model, tok).generate(prompts, s), fast.generate(prompts, s)
    for a, b in zip((g for r in plain for g in r), (g for r in dnn for g in r), strict=True):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_hf_engine_seeded_sampling_and_thread_safety(model, tok):
    engine = HFEngine(model, tok)
    prompts = [tok("a b c")["input_ids"], tok("the moon")["input_ids"]]
    s = SamplingSettings(temperature=1.0, max_new_tokens=6, stop_token_ids=[3], n=3, seed=7)
    a = engine.generate(prompts, s)
    results = []
    thread = threading.Thread(target=lambda: results.append(engine.generate(prompts, s)))
    thread.start()
    engine.update_weights(engine_weights(model))  # waits for the running generate (same weights)
    thread.join()
    assert [[g.token_ids for g in r] for r in results[0]] == [[g.token_ids for g in r] for r in a]
    assert [len(r) for r in a] == [3, 3]
    assert len({tuple(g.token_ids) for g in a[0]}) > 1


def test_make_engine_auto_reports_its_choice(tiny_model_path, tok, caplog, monkeypatch):
    import lampo.rollout.engines as engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with caplog.at_level("INFO", logger="lampo.rollout.engines"):
        engine = make_engine(GenerationConfig(engine="auto"), tiny_model_path, tok)
    assert isinstance(engine, HFEngine)
    assert "engine: auto picked hf" in caplog.text
    with pytest.raises(ImportError, match="engine: vllm was requested but vllm is not installed"):
        make_engine(GenerationConfig(engine="vllm"), tiny_model_path, tok)


@pytest.mark.parametrize("async_mode", [False, True], ids=["sync", "async"])
def test_async_rollout_and_training_threads_each_take_half_the_cores(tmp_path, tiny_model_path, async_mode,
                                                                    monkeypatch):
    """In-process async with the hf engine: the rollout thread and the training thread compute at
    once, each on half the cores (their OpenMP threads would otherwise spin against each other);
    synchronous runs keep every core for each phase; the run gives the threads back."""
    import os
    import signal

    from lampo.config import LampoConfig
    from lampo.trainer import Trainer

    cfg = LampoConfig(model_name_or_path=str(tiny_model_path), query_dataset=str(DATA), output_dir=str(tmp_path / "run"),
                      engine="hf", batch_size=2, mini_batch_size=2, max_new_tokens=4, max_steps=3, async_mode=async_mode,
                      non_stop_penalty=False, reward_model="lampo.reward.rules.VowelReward", report_to=[],
                      progress=False, log_samples_steps=0, save_step=0, peak_flops=2e11)
    # An in-process vLLM that an earlier test started replaces torch.set_num_threads with a no-op for
    # the rest of the process (vllm/v1/worker/cpu_worker.py); a run with the hf engine never starts one.
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    before = torch.get_num_threads()
    trainer = Trainer(cfg)
    seen: dict[str, list] = {"rollout": [], "train": []}
    generate, train = trainer.engine.generate, trainer.learner.train

    def recording_generate(*args, **kwargs):
        seen["rollout"].append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return generate(*args, **kwargs)

    def recording_train(*args, **kwargs):
        seen["train"].append(torch.get_num_threads())
        return train(*args, **kwargs)

    trainer.engine.generate, trainer.learner.train = recording_generate, recording_train
    try:
        trainer.train()
    finally:
        trainer.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    ahead = [threads for in_main, threads in seen["rollout"] if not in_main]
    if async_mode:
        assert ahead and set(ahead) == {half} and set(seen["train"]) == {half}
    else:
        assert not ahead and {t for _, t in seen["rollout"]} == {before} and set(seen["train"]) == {before}
    assert torch.get_num_threads() == before


def test_a_batch_rolled_out_in_parts_samples_what_one_call_samples(model, tok):
    """As on vLLM (test_engines_vllm.py): a Ray rollout worker's part of a batch (`first_row`) draws
    every conversation from the seeds it has in the whole batch, turn after turn, on the hf engine too."""
    from lampo.data import PromptRow
    from lampo.rollout.batch import RolloutBatch

    gen_cfg = GenerationConfig(temperature=1.0, max_new_tokens=8, num_generations=2, stop_token=" ")
    rows = [PromptRow(i, (f"Tell me about {word}.", "Why?", "And then?"))
            for i, word in enumerate(["rivers", "glass", "ants", "salt", "clouds"])]
    engine = HFEngine(model, tok)
    whole = rollout(engine, tok, rows, gen_cfg, DataConfig(), policy_version=0, seed=11)
    parts = [rollout(engine, tok, rows[a:b], gen_cfg, DataConfig(), policy_version=0, seed=11, first_row=a)
             for a, b in ((0, 2), (2, 3), (3, 5))]
    assert max(len(s) for s in whole.turn_spans) > 1  # later turns were sampled too
    assert RolloutBatch.concat(parts, tok.pad_token_id).messages == whole.messages
    assert rollout(engine, tok, rows, gen_cfg, DataConfig(), policy_version=0, seed=12).messages != whole.messages
