"""oneDNN linear layers: the same products as nn.Linear, only other kernels (docs/performance-log.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lampo.speed import onednn_linear as D

pytestmark = pytest.mark.skipif(not D.available(), reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def every_product_on_onednn(monkeypatch):
    """The products here are small: send them all to oneDNN, so the tests exercise its path."""
    monkeypatch.setattr(D, "MIN_MACS", 1)


def _pair(in_f: int, out_f: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(in_f, out_f, bias=bias)
    dnn = copy.deepcopy(plain)
    assert D.use_onednn_linear(dnn) == 1
    assert isinstance(dnn, D.OneDNNLinear)
    return plain, dnn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 3, 4, 48)])
def test_forward_and_gradients_match_nn_linear(shape, bias):
    plain, dnn = _pair(48, 40, bias)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_plain, y_dnn = plain(x), dnn(x2)
    assert y_dnn.shape == y_plain.shape
    torch.testing.assert_close(y_dnn, y_plain, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_plain)
    y_plain.backward(g)
    y_dnn.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dnn.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(dnn.bias.grad, plain.bias.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_without_a_graph_the_output_matches_and_records_none(mode, monkeypatch):
    plain, dnn = _pair(48, 40, True)
    x = torch.randn(3, 5, 48)
    calls = []
    monkeypatch.setattr(D._OneDNNLinearFn, "apply", lambda *a: calls.append(a))
    if mode == "frozen":
        dnn.requires_grad_(False)
        out = dnn(x)  # grad mode on, but nothing to differentiate
    else:
        with getattr(torch, mode)():
            out = dnn(x)
    assert calls == [] and out.grad_fn is None  # the direct kernel call, no autograd function
    torch.testing.assert_close(out, plain(x).detach(), atol=1e-5, rtol=1e-5)


def test_frozen_weight_gets_no_gradient_but_the_input_does():
    _, dnn = _pair(16, 8, True)
    dnn.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    dnn(x).sum().backward()
    assert dnn.weight.grad is None and x.grad is not None and x.grad.abs().sum() > 0


def test_non_contiguous_input_and_empty_batch():
    plain, dnn = _pair(16, 8, True)
    x = torch.randn(16, 6).t()  # [6, 16], not contiguous
    torch.testing.assert_close(dnn(x), plain(x), atol=1e-5, rtol=1e-5)
    assert dnn(torch.randn(0, 16)).shape == (0, 8)


def test_only_products_of_min_macs_or_more_go_to_onednn(monkeypatch):
    monkeypatch.setattr(D, "MIN_MACS", 4 * 16 * 8)
    _, dnn = _pair(16, 8, True)
    calls = []
    real = D._dnn_linear
    monkeypatch.setattr(D, "_dnn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        dnn(torch.randn(3, 16))  # 3 x 16 x 8 multiply-adds: below, nn.Linear's kernel
        dnn(torch.randn(4, 16))  # 4 x 16 x 8: at the threshold, oneDNN
    assert calls == [(4, 16)]


def test_autocast_and_bf16_take_the_usual_path():
    plain, dnn = _pair(16, 8, True)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dnn(x)
    assert out.dtype == torch.bfloat16  # autocast's own cast, as nn.Linear under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(out, plain(x))
    half = copy.deepcopy(dnn).to(torch.bfloat16)
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_conversion_keeps_parameters_and_skips_subclasses():
    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Custom(4, 4), nn.Sequential(nn.Linear(4, 2)))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert D.use_onednn_linear(model) == 2
    assert type(model[2]) is Custom and isinstance(model[0], D.OneDNNLinear)
    assert [id(p) for p in model.parameters()] == params  # the optimiser's tensors are the same
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    clone = copy.deepcopy(model)  # the hf engine copies the policy
    assert isinstance(clone[0], D.OneDNNLinear)


@pytest.mark.slow
def test_a_training_step_gives_the_same_weights(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lampo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    runs = {}
    for on in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        cfg = PPOConfig(estimator="grpo", num_generations=2, batch_size=2, mini_batch_size=4, max_new_tokens=5,
                        non_stop_penalty=False, seed=0, learning_rate=1e-3, adam_eps=1e-3, kl_coef=0.05,
                        onednn_linear=on)
        trainer = PPOTrainer(cfg, model, tok)
        n_dnn = sum(isinstance(m, D.OneDNNLinear) for m in trainer.model.modules())
        assert (n_dnn > 0) == on
        q = [torch.tensor(tok(t).input_ids) for t in ("Hi there.", "Hi there.", "Say a word.", "Say a word.")]
        r = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12, 13]), torch.tensor([14])]
        stats = trainer.step(q, r, [0.1, 0.9, 0.3, 0.6])
        runs[on] = (stats, [p.detach().clone() for p in trainer.model.parameters()])
    for key in ("loss/policy_avg", "objective/kl", "val/ratio"):
        assert runs[True][0][key] == pytest.approx(runs[False][0][key], abs=1e-5), key
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
