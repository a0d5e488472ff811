"""Offline tiny models, model construction details (value head, dropout) and the vocabulary check."""


import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from lampo.config import ModelConfig
from lampo.optimize.models import ValueModel, check_same_vocab, init_value_head, load_policy
from lampo.testing import build_tiny_model
from lampo.testing.tiny import num_parameters

pytestmark = pytest.mark.slow


def test_tiny_model_is_deterministic_small_and_loads(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=7)
    b = build_tiny_model(tmp_path / "b", seed=7)
    c = build_tiny_model(tmp_path / "c", seed=8)
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert num_parameters(a) < 1_000_000
    model = AutoModelForCausalLM.from_pretrained(a)
    assert model.config.head_dim == 64  # vLLM's CPU attention rejects 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.padding_side == "left"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi."}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"


def test_a_build_waits_for_one_under_way_and_keeps_its_copy(tmp_path):
    """Two test processes (pytest-xdist's workers) may build one tiny model at once: the second
    waits for the first and keeps its copy, which the first may already be reading."""
    import fcntl
    import threading

    from lampo.testing.tiny import MARKER

    out = build_tiny_model(tmp_path / "m", seed=3)  # the first builder's copy, all but its marker
    weights = out / "model.safetensors"
    first = weights.stat().st_ino
    (out / MARKER).rename(tmp_path / "marker")
    built: list = []
    with open(tmp_path / ".m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first builder is still at work
        second = threading.Thread(target=lambda: built.append(build_tiny_model(out, seed=3)))
        second.start()
        second.join(timeout=1)
        assert second.is_alive() and not built  # waiting, not building beside it
        (tmp_path / "marker").rename(out / MARKER)  # the first builder is done
    second.join(timeout=60)
    assert built == [out]
    assert weights.stat().st_ino == first  # the copy in place was never replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]  # no build of its own left over


def test_value_head_init_and_dropout_disabled(tiny_model_path):
    torch.manual_seed(0)
    head = init_value_head(1023)  # std = 1/(1023 + 1) = 0.0009765625: the critic starts near 0
    assert head.weight.std().item() == pytest.approx(1 / 1024, rel=0.05)
    assert torch.all(head.bias == 0)
    policy = load_policy(ModelConfig(model_name_or_path=str(tiny_model_path)))
    policy.config.attention_dropout = 0.5
    from lampo.optimize.models import disable_dropout

    disable_dropout(policy)
    assert policy.config.attention_dropout == 0.0
    value = ValueModel.from_policy(policy)
    ids = torch.tensor([[2, 10, 11, 12]])
    assert value(ids, torch.ones_like(ids)).shape == (1, 4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_disable_dropout_makes_training_mode_deterministic(attn):
    """Built with dropout, then disabled: two training-mode passes give the same logits.

    Reading the config is not enough: the attention modules copied `attention_dropout` when they
    were built and use their copy (the control pass below shows the dropout is real).
    """
    from lampo.optimize.models import disable_dropout

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=1, head_dim=64, attention_dropout=0.5)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train()
    ids = torch.randint(0, 128, (2, 12))
    assert not torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
    disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_in_process_reward_model_with_another_vocabulary_is_a_value_error(tiny_model_path):
    policy = load_policy(ModelConfig(model_name_or_path=str(tiny_model_path)))
    other = LlamaForSequenceClassification(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=1, num_labels=1))
    with pytest.raises(ValueError, match=r"policy vocab_size \(1024\) differs from the reward model's \(512\)"):
        check_same_vocab(policy, other)
    same = LlamaForSequenceClassification(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=1, num_labels=1))
    check_same_vocab(policy, same)


def test_attn_implementation_reaches_the_trained_models(tiny_model_path):
    default = load_policy(ModelConfig(model_name_or_path=str(tiny_model_path)))
    eager = load_policy(ModelConfig(model_name_or_path=str(tiny_model_path), attn_implementation="eager"))
    assert default.config._attn_implementation == "sdpa"  # transformers' own default is kept
    assert eager.config._attn_implementation == "eager"
    value = ValueModel.from_pretrained(tiny_model_path, attn_implementation="eager")
    assert value.trunk.config._attn_implementation == "eager"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # same maths, other kernels
        assert torch.allclose(default(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5)


def test_a_model_that_soft_caps_attention_loads_with_eager_kernels(tmp_path):
    # transformers' default sdpa kernel cannot soft-cap: the learner would compute another
    # function than vLLM samples from. An explicit attn_implementation still wins.
    from lampo.testing import build_tiny_model

    path = build_tiny_model(tmp_path / "gemma2", arch="gemma2")
    assert load_policy(ModelConfig(model_name_or_path=str(path))).config._attn_implementation == "eager"
    explicit = ModelConfig(model_name_or_path=str(path), attn_implementation="sdpa")
    assert load_policy(explicit).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("value_model", ["separate", "head"])
def test_an_untrained_critic_starts_close_to_a_constant(tiny_model_path, value_model):
    # Head weights of std 1/(H + 1) on a final hidden state of about unit scale per dimension give
    # values of spread about 1/sqrt(H): the critic adds little noise to GAE before it has learnt.
    # (A reward model's std 1/sqrt(H + 1) gives a spread near 1, many times a typical score's.)
    from transformers import AutoTokenizer

    from lampo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    torch.manual_seed(0)
    trainer = PPOTrainer(PPOConfig(value_model=value_model, batch_size=4, mini_batch_size=4), policy, tok)
    queries = [torch.randint(4, 1000, (12,)) for _ in range(4)]
    responses = [torch.randint(4, 1000, (20,)) for _ in range(4)]
    fw = trainer.learner.forward(trainer.make_batch(queries, responses, [0.0] * 4))
    H = policy.config.hidden_size
    values = fw.values[fw.values != 0]
    assert values.numel() > 50 and values.std().item() < 2 / H**0.5, values.std()
