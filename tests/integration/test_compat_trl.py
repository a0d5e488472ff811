"""TRL-classic's and lm_ppo's library API over Lampo's learner (lampo.compat, docs/compat.md)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lampo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from lampo.compat.lm_ppo import GPT2HeadWithValueModel, respond_to_batch
from lampo.compat.lm_ppo import PPOTrainer as LmPPOTrainer

pytestmark = pytest.mark.slow

QUERIES = ["Explain the moon landing.", "Why aren't birds real?", "What happens to a pumpkin?", "How can I help?",
           "Why eat socks?", "Tell me a story.", "Say something."]


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny models' products are far too small to share out: on a loaded 2-core machine a second
    # thread's synchronisation costs more than the product itself.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def gpt2(family_model_path):
    return family_model_path("gpt2")


@pytest.fixture()
def tok(gpt2):
    tokenizer = AutoTokenizer.from_pretrained(gpt2)
    tokenizer.pad_token = tokenizer.eos_token  # as the TRL study note does
    return tokenizer


def ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok.encode(text))


def config(**kw) -> PPOConfig:
    return PPOConfig(**{"batch_size": 4, "mini_batch_size": 4, "max_new_tokens": 6, "seed": 0, **kw})


def test_value_head_model_forward_save_and_load_round_trip(gpt2, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2)
    x = torch.tensor([[5, 6, 7, 8]])
    logits, loss, value = model(x)
    assert logits.shape[:2] == (1, 4) and loss is None and value.shape == (1, 4)
    assert model(x, labels=x)[1].ndim == 0  # TRL's forward: (lm_logits, loss, value)
    with torch.no_grad():
        model.v_head.weight.normal_()
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "m")
    assert torch.equal(again.v_head.weight, model.v_head.weight) and torch.equal(again.v_head.bias, model.v_head.bias)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # the head's file does not disturb transformers
    with torch.no_grad():
        assert torch.allclose(plain(x).logits, logits, atol=1e-6)
        assert torch.allclose(again(x)[2], model(x)[2], atol=1e-6)
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_keyword_construction_dataloader_and_the_head_as_critic(gpt2, tok):
    import datasets

    dataset = datasets.Dataset.from_dict({"query": QUERIES, "meta": list(range(len(QUERIES)))})
    dataset = dataset.map(lambda s: {"input_ids": tok.encode(s["query"])})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2)
    trainer = PPOTrainer(model=model, config=config(), train_dataset=dataset, tokenizer=tok)
    # the model's head is the critic, and step trains on the rewards given (no non-stop penalty)
    assert trainer.config.model.value_model == "head" and trainer.config.optim.non_stop_penalty is False
    assert trainer.learner.value_head is model.v_head and trainer.learner.value_model is None
    batches = list(trainer.dataloader)
    assert [len(b["query"]) for b in batches] == [4, 3]  # batch_size rows; the last batch is kept
    assert set(batches[0]) == {"query", "meta", "input_ids"}
    assert sorted(q for b in batches for q in b["query"]) == sorted(QUERIES)
    for b in batches:
        for q, t in zip(b["query"], b["input_ids"], strict=True):
            assert t.dtype == torch.long and t.dim() == 1 and t.tolist() == tok.encode(q)
    # a key the config sets itself is kept
    kept = PPOTrainer(model=AutoModelForCausalLMWithValueHead.from_pretrained(gpt2), tokenizer=tok,
                      config=config(non_stop_penalty=True), dataset=dataset)
    assert kept.config.optim.non_stop_penalty is True and kept.dataloader is not None


def test_positional_forms_lampos_and_trls(gpt2, tok):
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    lampo_style = PPOTrainer(config(), model, tok)
    assert lampo_style.learner.value_model is not None and lampo_style.dataloader is None
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2)
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2)
    trl_style = PPOTrainer(config(), policy, ref, tok)  # TRL-classic: (config, model, ref_model, tokenizer)
    assert trl_style.tokenizer is tok and trl_style.learner.ref_model is ref.pretrained_model


def test_generate_takes_trl_keywords_and_step_trains_at_their_temperature(gpt2, tok):
    trainer = PPOTrainer(model=AutoModelForCausalLMWithValueHead.from_pretrained(gpt2), config=config(), tokenizer=tok)
    queries = [ids(tok, q) for q in QUERIES[:4]]
    generation_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                         "pad_token_id": tok.eos_token_id, "temperature": 0.7, "max_new_tokens": 6}
    responses, logprobs = trainer.generate(queries, return_logprobs=True, **generation_kwargs)
    assert trainer.sampling.temperature == 0.7 and all(1 <= len(r) <= 6 for r in responses)
    fw = trainer.learner.forward(trainer.make_batch(queries, responses, [0.0] * 4))
    for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
        assert torch.allclose(fw.old_logprobs[i, len(q) : len(q) + len(r)], logprobs[i], atol=1e-5)
    with_prompt = trainer.generate(queries, return_prompt=True, batch_size=3, **generation_kwargs)
    assert len(with_prompt) == 4 and all(torch.equal(w[: len(q)], q) for w, q in zip(with_prompt, queries, strict=True))
    single = trainer.generate(queries[0], max_new_tokens=3)  # TRL's single-query form: one [1, length] tensor
    assert single.dim() == 2 and single.shape[0] == 1 and single.shape[1] <= 3
    # top-k and top-p truncate the sampling distribution: step recomputes its log-probs under them too
    responses, logprobs = trainer.generate(queries, return_logprobs=True, top_k=5, top_p=0.9, temperature=0.8)
    assert (trainer.sampling.temperature, trainer.sampling.top_k, trainer.sampling.top_p) == (0.8, 5, 0.9)
    fw = trainer.learner.forward(trainer.make_batch(queries, responses, [0.0] * 4))
    for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
        assert torch.allclose(fw.old_logprobs[i, len(q) : len(q) + len(r)], logprobs[i], atol=1e-5)
    with pytest.raises(ValueError, match="not_a_keyword"):
        trainer.generate(queries, not_a_keyword=1)


def test_step_takes_tensor_rewards_log_stats_writes_every_tracker(gpt2, tok, tmp_path, monkeypatch):
    import lampo.tracking as tracking

    logged = []

    class FakeRun:  # stands in for a W&B run; wandb.Table is the real one
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            pass

    monkeypatch.setattr(tracking, "_init_wandb", lambda *a, **k: FakeRun())
    cfg = config(output_dir=str(tmp_path / "run"), report_to=["tensorboard", "wandb"])
    trainer = PPOTrainer(model=AutoModelForCausalLMWithValueHead.from_pretrained(gpt2), config=cfg, tokenizer=tok)
    queries = [ids(tok, q) for q in QUERIES[:4]]
    responses = trainer.generate(queries)
    rewards = [torch.tensor(0.25 * i) for i in range(4)]  # 0-d tensors, as TRL's examples build them
    stats = trainer.step(queries, responses, rewards)
    assert stats["objective/scores"] == pytest.approx(0.375)
    batch = {"query": QUERIES[:4], "response": [tok.decode(r) for r in responses]}
    trainer.log_stats(stats, batch, rewards)
    trainer.tracker.close()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and metrics[0]["objective/scores"] == pytest.approx(0.375)
    table = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["query"], r["response"], r["reward"]) for r in table] == [
        (q, r, 0.25 * i) for i, (q, r) in enumerate(zip(batch["query"], batch["response"], strict=True))]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    wandb_table = next(v["samples"] for _, v in logged if "samples" in v)
    assert wandb_table.columns == ["step", "query", "response", "reward"] and len(wandb_table.data) == 4
    assert any("objective/scores" in v for _, v in logged)


def test_save_model_keeps_the_trained_head(gpt2, tok, tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(gpt2)
    trainer = PPOTrainer(model=model, config=config(learning_rate=1e-2), tokenizer=tok)
    head_before = model.v_head.weight.detach().clone()
    queries = [ids(tok, q) for q in QUERIES[:4]]
    trainer.step(queries, trainer.generate(queries), [1.0, 0.0, 1.0, 0.0])
    assert not torch.equal(model.v_head.weight, head_before)  # the learner trained the model's own head
    out = trainer.save_model(tmp_path / "saved")
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(out)
    assert torch.equal(loaded.v_head.weight, model.v_head.weight)
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_forward_batch_size_changes_no_number(gpt2, tok):
    queries = [ids(tok, q) for q in QUERIES[:4]]
    responses = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10]), torch.tensor([11, 12, 13, 14])]
    out = []
    for fbs in (None, 1, 3):
        trainer = PPOTrainer(config(forward_batch_size=fbs), AutoModelForCausalLM.from_pretrained(gpt2), tok)
        batch = trainer.make_batch(queries, responses, [0.0] * 4)
        out.append(trainer.learner.forward(batch))
    real = batch.attention_mask.bool()  # padding columns are never read (a one-row micro-batch has none)
    for other in out[1:]:
        for name in ("old_logprobs", "ref_logprobs", "values"):
            assert torch.allclose(getattr(other, name)[real], getattr(out[0], name)[real], atol=1e-5), name


def test_critic_settings_reach_both_kinds_of_critic(gpt2, tok):
    kw = dict(weight_decay=0.1, critic_weight_decay=0.0, critic_learning_rate=1e-3, learning_rate=1e-4)
    head = PPOTrainer(config(value_model="head", **kw), AutoModelForCausalLM.from_pretrained(gpt2), tok)
    groups = head.learner.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-4, 0.1), (1e-3, 0.0)]
    separate = PPOTrainer(config(**kw), AutoModelForCausalLM.from_pretrained(gpt2), tok)
    (group,) = separate.learner.critic_optimizer.param_groups
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.0)


def test_lm_ppo_names(gpt2):
    model = GPT2HeadWithValueModel.from_pretrained(gpt2)
    x = torch.tensor([[5, 6, 7, 8]])
    logits, past, value = model(x)  # lm_ppo's forward: (lm_logits, presents, value)
    assert logits.shape[:2] == (1, 4) and past is not None and value.shape == (1, 4)
    torch.manual_seed(0)
    response = respond_to_batch(model, x.repeat(3, 1), txt_len=5)
    assert response.shape == (3, 5)  # a fixed length: no stop at eos, as lm_ppo
    # a left-padded query with pad_token_id samples as the same query unpadded (positions from the mask)
    torch.manual_seed(1)
    plain = respond_to_batch(model, x, txt_len=4)
    torch.manual_seed(1)
    padded = respond_to_batch(model, torch.tensor([[0, 0, 5, 6, 7, 8]]), txt_len=4, pad_token_id=0)
    assert torch.equal(plain, padded)

    trainer = LmPPOTrainer(model, GPT2HeadWithValueModel.from_pretrained(gpt2), batch_size=2, forward_batch_size=1)
    opt = trainer.config.optim
    # lm_ppo's defaults: adaptive KL from 0.2 towards 6 over 10000, lr 1.41e-5, one sample per optimiser step
    assert (opt.adaptive_kl, opt.kl_coef, opt.kl_target, opt.kl_horizon) == (True, 0.2, 6.0, 10000)
    assert (opt.learning_rate, opt.mini_batch_size, opt.forward_batch_size, opt.ppo_epochs) == (1.41e-5, 1, 1, 4)
    assert trainer.config.model.value_model == "head" and trainer.trainer.learner.value_head is model.v_head
    stats = trainer.step(x.repeat(2, 1), response[:2], torch.tensor([1.0, 0.0]))
    assert stats["objective/scores"] == pytest.approx(0.5) and stats["objective/kl_coef"] == pytest.approx(0.2)
    with pytest.raises(TypeError, match="value head"):
        LmPPOTrainer(AutoModelForCausalLM.from_pretrained(gpt2), None)
