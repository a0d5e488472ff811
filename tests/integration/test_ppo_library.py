"""The library API (PPOTrainer.generate/step/save_model) on the offline tiny model."""

from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lampo import PPOConfig, PPOTrainer
from lampo.optimize import maths as M
from lampo.optimize.learner import TrainingDiverged

pytestmark = pytest.mark.slow


@pytest.fixture()
def tok(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture()
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def prompt_ids(tok, text="Say something.") -> torch.Tensor:
    templated = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return torch.tensor(tok(templated).input_ids)


def vowel_count(text: str) -> float:
    """Rule-based reward in [0, 1]: lowercase vowels and spaces counted, 40 or more score 1.

    A count, not a share: a share is maximised by one short vowel-heavy word too, where `gae` on
    the tiny model settled on some seeds (rises of 0.22-0.63 over seeds 0-3); with the count
    every seed of 0-5 rose by 0.57-0.60 (`gae`) and 0.63-0.64 (`grpo`).
    """
    text = text.replace("<|im_end|>", "")
    return min(1.0, sum(c in "aeiou " for c in text) / 40)


def base_config(**kw):
    defaults = dict(batch_size=8, mini_batch_size=8, max_new_tokens=8, non_stop_penalty=False, seed=0,
                    lr_scheduler_type="constant")
    defaults.update(kw)
    return PPOConfig(**defaults)


def test_step_logprobs_equal_generate_scores_at_same_temperature(model, tok):
    cfg = base_config(temperature=0.7)
    trainer = PPOTrainer(cfg, model, tok)
    queries = [prompt_ids(tok, t) for t in ("Hi.", "What is your name?", "Tell me a short story.", "Hi.")]
    responses, gen_logprobs = trainer.generate(queries, return_logprobs=True)
    batch = trainer.make_batch(queries, responses, [0.0] * 4)
    fw = trainer.learner.forward(batch)
    for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
        recomputed = fw.old_logprobs[i, len(q) : len(q) + len(r)]
        assert torch.allclose(recomputed, gen_logprobs[i], atol=1e-5), (recomputed, gen_logprobs[i])
    # A different temperature gives different log-probs: the check above is not vacuous.
    other = M.logprobs_from_logits(torch.randn(3, 8), torch.tensor([0, 1, 2]), 1.0)
    assert not torch.allclose(other, M.logprobs_from_logits(torch.randn(3, 8), torch.tensor([0, 1, 2]), 0.7))


def test_step_trains_at_the_temperature_generate_sampled_at(model, tok):
    # the config says 1.0; generate samples at 0.7: step must compare pi/pi_old at 0.7
    trainer = PPOTrainer(base_config(temperature=1.0), model, tok)
    queries = [prompt_ids(tok, t) for t in ("Hi.", "Tell me a short story.")]
    responses, gen_logprobs = trainer.generate(queries, return_logprobs=True, temperature=0.7)
    fw = trainer.learner.forward(trainer.make_batch(queries, responses, [0.0, 0.0]))
    for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
        assert torch.allclose(fw.old_logprobs[i, len(q) : len(q) + len(r)], gen_logprobs[i], atol=1e-5)


def _grads_of_one_step(model, tok, accumulation: int, estimator: str = "gae"):
    kw = dict(estimator=estimator, gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
    if estimator == "grpo":
        kw.update(batch_size=2, num_generations=4)
    trainer = PPOTrainer(base_config(**kw), copy.deepcopy(model), tok)
    torch.manual_seed(1)
    queries = [prompt_ids(tok, t) for t in ["Hi.", "What time is it?", "Can you help me?", "Why?"] * 2]
    responses = [torch.randint(4, 1000, (n,)) for n in (3, 8, 5, 1, 8, 2, 6, 4)]  # ragged on purpose
    scores = [float(i) / 8 for i in range(8)]
    grads = {}

    def record(*_args, **_kw):
        for name, p in trainer.learner.policy.named_parameters():
            grads[f"policy.{name}"] = p.grad.clone()
        if trainer.learner.value_model is not None:
            for name, p in trainer.learner.value_model.named_parameters():
                grads[f"value.{name}"] = p.grad.clone()

    trainer.learner.optimizer.step = record
    if trainer.learner.critic_optimizer is not None:
        trainer.learner.critic_optimizer.step = lambda *a, **k: None
    trainer.step(queries, responses, scores)
    return grads


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_one_minibatch_of_8_equals_8_accumulated_micro_batches_of_1(model, tok, estimator):
    one = _grads_of_one_step(model, tok, accumulation=1, estimator=estimator)
    eight = _grads_of_one_step(model, tok, accumulation=8, estimator=estimator)
    assert one.keys() == eight.keys() and len(one) > 10
    assert any(g.abs().max() > 1e-4 for g in one.values())  # real gradients, not zeros
    for name in one:
        assert torch.allclose(one[name], eight[name], atol=1e-5, rtol=1e-4), name


def test_lora_reference_is_the_base_model_with_adapter_disabled(model, tok):
    base = copy.deepcopy(model)
    cfg = base_config(use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2)
    trainer = PPOTrainer(cfg, model, tok)
    assert trainer.learner.ref_model is None  # no second copy of the weights
    # Move the adapter away from its zero initialisation so that policy != reference.
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    queries = [prompt_ids(tok, "Hi."), prompt_ids(tok, "Why is the sky blue?")]
    responses = trainer.generate(queries)
    batch = trainer.make_batch(queries, responses, [0.0, 1.0])
    fw = trainer.learner.forward(batch)
    with torch.no_grad():
        logits = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    base_lp = torch.nn.functional.pad(M.logprobs_from_logits(logits[:, :-1], batch.input_ids[:, 1:]), (1, 0))
    mask = batch.action_mask
    assert torch.allclose(fw.ref_logprobs[mask], base_lp[mask], atol=1e-5)
    assert not torch.allclose(fw.old_logprobs[mask], base_lp[mask], atol=1e-3)


@pytest.mark.parametrize(
    "estimator,kw",
    [
        # The score's spread (std ~0.06) is tiny next to an untrained critic's noise (~1): whitening
        # the rewards (lm-human-preferences' reward normalisation) restores the signal.
        ("gae", dict(learning_rate=3e-3, ppo_epochs=4, kl_coef=0.01, whiten_rewards=True)),
        ("grpo", dict(learning_rate=3e-3, ppo_epochs=4, kl_coef=0.01, num_generations=4, batch_size=4)),
    ],
)
def test_learning_rule_reward_rises_by_04_within_80_steps(model, tok, estimator, kw):
    cfg = base_config(estimator=estimator, max_new_tokens=12, **{"batch_size": 16, "mini_batch_size": 16, **kw})
    trainer = PPOTrainer(cfg, model, tok)
    ref_before = {k: v.clone() for k, v in trainer.learner.ref_model.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    queries = [prompt_ids(tok)] * 16
    history = []
    for _ in range(80):
        responses = trainer.generate(queries)
        scores = [vowel_count(tok.decode(r)) for r in responses]
        stats = trainer.step(queries, responses, scores)
        assert all(isinstance(v, float) for v in stats.values())
        history.append(statistics.mean(scores))
    first, last = statistics.mean(history[:10]), statistics.mean(history[-10:])
    assert last >= first + 0.4, (first, last, history)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, policy_before[k])]
    assert len(changed) == len(policy_before)
    for k, v in trainer.learner.ref_model.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference weight {k} changed"


def test_non_finite_loss_skips_the_update_and_stops_after_max_bad_steps(model, tok, monkeypatch):
    trainer = PPOTrainer(base_config(max_bad_steps=2), model, tok)
    queries = [prompt_ids(tok)] * 8
    responses = trainer.generate(queries)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = M.clipped_policy_loss

    def nan_loss(*args, **kwargs):
        loss, clipped, ratio = real(*args, **kwargs)
        return loss * float("nan"), clipped, ratio

    monkeypatch.setattr(M, "clipped_policy_loss", nan_loss)
    stats = trainer.step(queries, responses, [0.5] * 8)
    assert stats["optim/skipped_steps"] == 1.0
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TrainingDiverged, match="2 steps in a row"):
        trainer.step(queries, responses, [0.5] * 8)
    monkeypatch.setattr(M, "clipped_policy_loss", real)


def test_an_update_that_leaves_a_weight_non_finite_is_undone_whole_and_counts_as_a_bad_step(model, tok):
    # two minibatches a step; the second update of a step writes inf into a weight (as an absurd
    # learning rate or an optimiser overflow would, from a finite gradient)
    trainer = PPOTrainer(base_config(max_bad_steps=2, mini_batch_size=4), model, tok)
    queries = [prompt_ids(tok)] * 8
    responses = trainer.generate(queries)
    optimizer, calls = trainer.learner.optimizer, []
    real_step = optimizer.step

    def poisoned_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) % 2 == 0:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")
        return out

    optimizer.step = poisoned_step
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.step(queries, responses, [0.5] * 8)
    assert len(calls) == 2  # the first update went through, the second left an inf
    for k, v in trainer.model.state_dict().items():  # both undone: the weights from before the step
        assert torch.equal(v, before[k]), k
    assert stats["optim/skipped_steps"] == 2.0 and "loss/policy_avg" not in stats
    with pytest.raises(TrainingDiverged, match="2 steps in a row had a non-finite loss, gradient or updated weight"):
        trainer.step(queries, responses, [0.5] * 8)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())  # undone again before stopping


def test_empty_responses_and_all_masked_minibatches_give_finite_stats(model, tok):
    trainer = PPOTrainer(base_config(mini_batch_size=2, batch_size=4), model, tok)
    queries = [prompt_ids(tok)] * 4
    responses = [torch.tensor([], dtype=torch.long), torch.tensor([5, 6, 3]), torch.tensor([], dtype=torch.long),
                 torch.tensor([7])]
    masks = [torch.zeros(0), torch.zeros(3), torch.zeros(0), torch.zeros(1)]
    stats = trainer.step(queries, responses, [1.0, 0.0, 1.0, 0.0], response_masks=masks)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    stats = trainer.step(queries, responses, [1.0, 0.0, 1.0, 0.0])
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats


def test_response_mask_limits_training_to_masked_tokens(model, tok):
    trainer = PPOTrainer(base_config(batch_size=2, mini_batch_size=2), model, tok)
    queries = [prompt_ids(tok)] * 2
    responses = [torch.tensor([5, 6, 7, 3]), torch.tensor([8, 9, 3])]
    masks = [torch.tensor([1, 1, 0, 0]), torch.tensor([0, 1, 1])]
    batch = trainer.make_batch(queries, responses, [1.0, 0.0], response_masks=masks)
    q = len(queries[0])
    assert batch.action_mask[0].nonzero().flatten().tolist() == [q, q + 1]
    assert batch.action_mask[1].nonzero().flatten().tolist() == [q + 1, q + 2]
    # the score sits on the last trained token of each sample
    assert batch.placed_scores[0, q + 1] == 1.0 and batch.placed_scores.sum() == 1.0


def test_nonstop_penalty_applies_to_responses_without_stop_token(model, tok):
    trainer = PPOTrainer(base_config(batch_size=2, mini_batch_size=2, non_stop_penalty=True), model, tok)
    queries = [prompt_ids(tok)] * 2
    stop = tok.eos_token_id
    batch = trainer.make_batch(queries, [torch.tensor([5, stop]), torch.tensor([5, 6])], [0.9, 0.9])
    assert batch.seq_scores.tolist() == pytest.approx([0.9, -10.0])


@pytest.mark.parametrize("use_peft", [False, True])
def test_save_model_loads_with_from_pretrained(model, tok, tmp_path, use_peft):
    cfg = base_config(use_peft=use_peft, lora_r=4, lora_alpha=8)
    trainer = PPOTrainer(cfg, model, tok)
    queries = [prompt_ids(tok)] * 8
    trainer.step(queries, trainer.generate(queries), [1.0] * 8)
    out = trainer.save_model(tmp_path / "model", merged=True)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = queries[0][None]
    with torch.no_grad():
        expected = trainer.learner.policy(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-4)
    if use_peft:
        from peft import AutoPeftModelForCausalLM

        adapter_dir = trainer.save_model(tmp_path / "adapter")
        assert (adapter_dir / "adapter_config.json").exists()
        assert AutoPeftModelForCausalLM.from_pretrained(adapter_dir) is not None


def test_the_separate_critic_trains_fully_under_lora(model, tok):
    trainer = PPOTrainer(base_config(use_peft=True, lora_r=4, lora_alpha=8), model, tok)
    critic = trainer.learner.value_model
    params = list(critic.parameters())
    assert all(p.requires_grad for p in params)
    assert sum(p.numel() for p in params) > 100 * critic.head.weight.numel()  # trunk and head, not the head alone
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    queries = [prompt_ids(tok)] * 8
    trainer.step(queries, trainer.generate(queries), [float(i) / 8 for i in range(8)])
    changed = [k for k, v in critic.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("trunk.layers") for k in changed), changed


@pytest.mark.parametrize("value_model", ["separate", "head"])
def test_policy_and_critic_read_a_row_the_same_whatever_its_padding_side(family_model_path, value_model):
    # Positions come from the attention mask, as generate counts them: a left-padded row gives
    # the same log-probs and values as the same row right-padded (the columns are shifted).
    # GPT-2: with learned absolute positions a shift changes the result (rotary embeddings, as
    # Llama's, are relative and would not show it).
    from lampo.optimize.learner import TrainBatch

    path = family_model_path("gpt2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = PPOTrainer(base_config(batch_size=2, mini_batch_size=2, value_model=value_model), model, tok)
    right = trainer.make_batch([prompt_ids(tok, "Hi."), prompt_ids(tok, "Tell me a short story, please.")],
                               [torch.tensor([5, 6, 7]), torch.tensor([8, 9])], [1.0, 0.0])
    n = right.attention_mask.sum(1)
    T = right.input_ids.shape[1]
    left = TrainBatch(**{k: v for k, v in vars(right).items()})
    for name in ("input_ids", "attention_mask", "action_mask", "placed_scores"):
        t = getattr(right, name)
        setattr(left, name, torch.stack([torch.roll(t[i], int(T - n[i])) for i in range(2)]))
    assert not torch.equal(left.input_ids, right.input_ids)  # the short row really moved
    fr, fl = trainer.learner.forward(right), trainer.learner.forward(left)
    for name in ("old_logprobs", "values"):
        a, b = getattr(fr, name)[right.action_mask], getattr(fl, name)[left.action_mask]
        assert torch.allclose(a, b, atol=1e-5), (name, a, b)


def test_top_k_and_top_p_log_probs_of_generate_equal_the_learners(model, tok):
    # the engine's log-probs are those of the truncated distribution it samples from; the learner
    # computes the same distribution, so on the same weights they agree (no systematic gap)
    trainer = PPOTrainer(base_config(), model, tok)
    queries = [prompt_ids(tok, t) for t in ("Hi.", "Tell me a short story.", "Why?")]
    responses, gen_logprobs = trainer.generate(queries, return_logprobs=True, temperature=0.8, top_k=20, top_p=0.9)
    old = trainer.learner.forward(trainer.make_batch(queries, responses, [0.0] * 3)).old_logprobs
    for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
        assert torch.allclose(old[i, len(q) : len(q) + len(r)], gen_logprobs[i], atol=1e-5)
    # the untruncated distribution gives other numbers: the check above can fail
    plain = M.logprobs_from_logits(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), torch.tensor([0]), 0.8)
    assert plain.item() != pytest.approx(M.logprobs_and_entropy(torch.tensor([[2.0, 1.0, 0.0, -1.0]]),
                                                                torch.tensor([0]), 0.8, False, 2, 0.9)[0].item())


def test_overlong_shaping_penalises_a_stopped_answer_in_the_buffer(model, tok):
    # max_new_tokens 8, buffer 4: an answer of 6 tokens loses (6 - 4) / 4 = 0.5 x factor 2 = 1.0;
    # one of 3 tokens nothing; one that did not stop gets the non-stop penalty instead
    trainer = PPOTrainer(base_config(batch_size=3, mini_batch_size=3, overlong_buffer_len=4, overlong_penalty_factor=2.0,
                                     non_stop_penalty=True, penalty_reward_value=-5.0), model, tok)
    stop = tok.eos_token_id
    batch = trainer.make_batch([prompt_ids(tok)] * 3, [torch.tensor([5, 6, 7, 8, 9, stop]), torch.tensor([5, 6, stop]),
                                                        torch.tensor([5] * 8)], [1.0, 1.0, 1.0])
    assert batch.seq_scores.tolist() == pytest.approx([0.0, 1.0, -5.0])


def test_rollout_correction_masks_the_loss_of_tokens_the_engine_saw_differently(model, tok):
    # With the engine's log-probs far below the learner's (ratio e^5 > rollout_correction_high),
    # mis masks every token: the policy loss is 0 and, without KL, the weights stay as they were.
    def one_step(mode):
        trainer = PPOTrainer(base_config(estimator="grpo", num_generations=2, batch_size=4, mini_batch_size=8,
                                         kl_coef=0.0, rollout_correction=mode), copy.deepcopy(model), tok)
        queries = [prompt_ids(tok, t) for t in ("Hi.", "Hi.", "Why?", "Why?", "Go.", "Go.", "No.", "No.")]
        torch.manual_seed(0)
        batch = trainer.make_batch(queries, trainer.generate(queries), [0.0, 1.0, 0.2, 0.9, 0.5, 0.1, 0.7, 0.3])
        batch.engine_logprobs = trainer.learner.logprobs(batch) - 5.0
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        stats = trainer.learner.train(batch)
        moved = any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
        return stats, moved

    stats, moved = one_step("mis")
    assert not moved and stats["loss/policy_avg"] == 0.0 and stats["rollout/ratio_corrected_frac"] == 1.0
    assert stats["rollout/ratio_min"] == pytest.approx(math.exp(5.0), rel=1e-4)
    stats, moved = one_step("none")
    assert moved and stats["rollout/kl"] > 1.0  # the gap is measured, not corrected


def test_ptx_task_config_mixes_its_files_by_weight_in_every_row_format(tok, tmp_path):
    # PaddleNLP's task file for PPO-ptx: two files, src/tgt rows and prompt/response rows, weights 1
    # and 2: the second file's share is 2/3 (its rows repeated), every row of the first kept.
    from lampo.config import LampoConfig
    from lampo.optimize.ptx import ptx_batch

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"src": ["Hi", "And?"], "tgt": ["Hello there", "Bye now"]}, {"src": "Name?", "tgt": "Ada"}]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "Sky?", "response": "Blue"}) + "\n")
    task = tmp_path / "task_sft.json"
    task.write_text(json.dumps([{"task_name": "a", "filepath": str(tmp_path / "a.jsonl"), "prob": 1.0},
                                {"task_name": "b", "filepath": "b.jsonl", "prob": 2.0}]))  # found beside the task file
    batch = ptx_batch(LampoConfig(ptx_task_config=str(task), max_new_tokens=16), tok)
    trained = [tok.decode(ids[mask]) for ids, mask in zip(batch.input_ids, batch.action_mask, strict=True)]
    assert trained == ["Hello there<|im_end|>Bye now<|im_end|>", "Ada<|im_end|>"] + ["Blue<|im_end|>"] * 4
    assert ptx_batch(LampoConfig(), tok) is None  # no ptx data, no batch
    with pytest.raises(Exception, match=r"config key 'ptx_task_config' = '.*missing.json': no such file"):
        ptx_batch(LampoConfig(ptx_task_config=str(tmp_path / "missing.json")), tok)


def test_ppo_ptx_lowers_the_supervised_loss_while_the_reward_rises(model, tok, tmp_path):
    # InstructGPT's PPO-ptx: the language-modelling loss on the supervised data falls while the
    # RL objective (the vowel count) still rises
    rows = [{"prompt": q, "response": "Thank you, that is a very good question."} for q in ("Hi.", "Why?", "Go on.", "Tell me.")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base_config(estimator="grpo", num_generations=8, batch_size=2, mini_batch_size=8, ppo_epochs=4,
                      learning_rate=1e-3, kl_coef=0.01, max_new_tokens=8, ptx_dataset=str(tmp_path), ptx_coef=0.5)
    trainer = PPOTrainer(cfg, model, tok)
    queries = [prompt_ids(tok, "Say something.")] * 8 + [prompt_ids(tok, "Tell me a story.")] * 8
    scores, ptx = [], []
    for _ in range(30):
        responses = trainer.generate(queries)
        step_scores = [vowel_count(tok.decode(r)) for r in responses]
        stats = trainer.step(queries, responses, step_scores)
        scores.append(statistics.mean(step_scores))
        ptx.append(stats["loss/ptx"])
    assert statistics.mean(ptx[-5:]) < 0.7 * statistics.mean(ptx[:5]), ptx
    assert statistics.mean(scores[-5:]) > statistics.mean(scores[:5]) + 0.05, scores
