"""The Strategy seam without a process group: the single-process path with fp16 loss scaling,
the DeepSpeed config Lampo builds, the fp16-on-CPU error, and what a single process imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lampo.config import ConfigError, LampoConfig
from lampo.distributed.deepspeed_zero import engine_config
from lampo.distributed.strategy import StepOutcome, Strategy, TrainedModels

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


# ---------------------------------------------------------------------------------------
# fp16: torch.amp.GradScaler in the plain path (built on CPU here; the same calls on a GPU)
# ---------------------------------------------------------------------------------------


def _scaled_strategy(max_grad_norm: float = 1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    strategy = Strategy()
    strategy.prepare(TrainedModels(model, None, None, None, opt, None),
                     LampoConfig.from_dict(fp16=True, max_grad_norm=max_grad_norm))
    return strategy, model, opt


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def test_fp16_scaler_overflow_is_the_scalers_skip_and_halves_the_scale():
    strategy, model, opt = _scaled_strategy()
    scale = strategy.loss_scale()
    assert scale == 2.0**16  # torch's initial scale
    loss = model(torch.ones(2, 3)).sum() * 1e35  # finite, but times the scale it overflows fp32
    assert torch.isfinite(loss)
    before = _snapshot(model, opt)
    strategy.zero_grad()
    strategy.backward(loss, True)
    assert strategy.step(True) is StepOutcome.LOSS_SCALE
    assert strategy.loss_scale() == scale / 2  # backed off: the next step tries a smaller scale
    after = _snapshot(model, opt)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and after[1] == {}  # no Adam state


def test_fp16_scaler_applies_the_unscaled_clipped_gradient():
    strategy, model, opt = _scaled_strategy(max_grad_norm=0.5)
    ref = torch.nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1, fused=True)
    x = torch.tensor([[1.0, -2.0, 3.0]])
    strategy.zero_grad()
    strategy.backward(model(x).sum(), True)
    assert model.weight.grad.abs().max() > 1000  # the backward saw the scaled loss
    assert strategy.step(True) is StepOutcome.APPLIED
    ref(x).sum().backward()
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
    ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_fp16_non_finite_loss_is_a_bad_step_without_backward_or_scale_change():
    strategy, model, opt = _scaled_strategy()
    loss = model(torch.ones(1, 3)).sum() * float("nan")
    strategy.zero_grad()
    strategy.backward(loss, False)
    assert model.weight.grad is None
    assert strategy.step(False) is StepOutcome.NON_FINITE
    assert strategy.loss_scale() == 2.0**16
    assert "grad_scaler" in strategy.state_dict()


def test_fp16_in_the_learner_an_overflow_is_not_a_bad_step(tiny_model_path, monkeypatch):
    # fp16 autocast on CPU only to reach the scaler wiring here; a real run stops (next test).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lampo.optimize.learner as learner_mod
    from lampo import PPOConfig, PPOTrainer
    from lampo.optimize import maths as M

    monkeypatch.setattr(learner_mod, "check_fp16_device", lambda *a: None)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, max_new_tokens=4, fp16=True, max_bad_steps=1, estimator="grpo",
                    num_generations=2, kl_coef=0.0)
    trainer = PPOTrainer(cfg, model, tok)
    real = M.clipped_policy_loss
    monkeypatch.setattr(M, "clipped_policy_loss", lambda *a, **k: (real(*a, **k)[0] * 1e35, *real(*a, **k)[1:]))
    queries = [torch.tensor(tok("Hi.").input_ids)] * 4
    responses = [torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10]), torch.tensor([11, 12])]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(2):  # twice with max_bad_steps 1: a scaler skip never counts towards it
        stats = trainer.step(queries, responses, [1.0, 0.0, 0.5, 0.2])
        assert stats["optim/scaler_skipped_steps"] == 1.0 and stats["optim/skipped_steps"] == 0.0
    assert stats["optim/loss_scale"] == 2.0**14 and trainer.learner.consecutive_bad_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_fp16_on_cpu_stops_at_start_naming_the_key(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lampo import PPOConfig, PPOTrainer
    from lampo.trainer import Trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"'fp16' = true.*cpu.*bf16: true"):
        PPOTrainer(PPOConfig(fp16=True), model, AutoTokenizer.from_pretrained(tiny_model_path))
    # the application: before it contacts the reward server (nothing listens on port 9 here)
    cfg = LampoConfig.from_dict(model_name_or_path=str(tiny_model_path), fp16=True, reward_model="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"'fp16' = true.*bf16: true"):
        Trainer(cfg)


# ---------------------------------------------------------------------------------------
# Where the models train: this process's GPU when there is one (CPU here; the GPU cases by
# pretending torch sees GPUs, and the "meta" device standing for a device other than the CPU)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gpus", "local_rank", "current", "expected"), [
    (0, "1", 0, "cpu"),
    (2, "1", 0, "cuda:1"),   # a launcher's local rank numbers the node's GPUs
    (1, "3", 0, "cuda:0"),   # a process shown one GPU (Ray's CUDA_VISIBLE_DEVICES) uses it
    (2, None, 1, "cuda:1"),  # no launcher: the current GPU
])
def test_the_local_device_is_the_launchers_gpu_the_only_one_seen_or_the_cpu(monkeypatch, gpus, local_rank, current,
                                                                            expected):
    from lampo.distributed import strategy as S

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert S.local_device() == torch.device(expected)
    assert Strategy().training_device(torch.nn.Linear(2, 2)) == torch.device(expected)


def test_a_policy_the_user_placed_on_an_accelerator_trains_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Strategy().training_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")


def test_prepare_moves_every_model_to_the_training_device_keeping_the_optimisers_parameters(monkeypatch):
    monkeypatch.setattr(Strategy, "training_device", lambda self, policy=None: torch.device("meta"))
    policy, critic, head, ref = (torch.nn.Linear(3, 3) for _ in range(4))
    opt = torch.optim.AdamW(policy.parameters())
    critic_opt = torch.optim.AdamW([*critic.parameters(), *head.parameters()])
    params = [*policy.parameters(), *critic.parameters(), *head.parameters()]
    Strategy().prepare(TrainedModels(policy, critic, head, ref, opt, critic_opt), LampoConfig.from_dict())
    for model in (policy, critic, head, ref):
        assert {p.device.type for p in model.parameters()} == {"meta"}
    held = [p for o in (opt, critic_opt) for g in o.param_groups for p in g["params"]]
    assert all(a is b for a, b in zip(held, params, strict=True))


def test_a_train_batch_moves_whole_and_stays_itself_where_it_is():
    from lampo.optimize.batch import build_train_batch

    ids = torch.tensor([[5, 6, 7, 0]])
    batch = build_train_batch(ids, (ids > 0).long(), torch.tensor([[False, True, True, False]]), [1.0], [[2]],
                              torch.tensor([True]), engine_logprobs=torch.zeros(1, 4), group_size=1)
    assert batch.to("cpu") is batch
    moved = batch.to("meta")
    tensors = ("input_ids", "attention_mask", "action_mask", "placed_scores", "seq_scores", "stopped", "engine_logprobs")
    assert {getattr(moved, name).device.type for name in tensors} == {"meta"}
    assert moved.group_size == batch.group_size and moved.sampling == batch.sampling


# ---------------------------------------------------------------------------------------
# The DeepSpeed config: "auto" filled from Lampo's keys, disagreements named
# ---------------------------------------------------------------------------------------


def _cfg(**kw) -> LampoConfig:
    return LampoConfig.from_dict({"batch_size": 8, "mini_batch_size": 8, "gradient_accumulation_steps": 2,
                                  "max_grad_norm": 0.7, **kw})


def test_the_shipped_zero2_json_gets_lampos_batch_sizes_clipping_and_precision():
    user = json.loads((CONFIGS / "ds_z2_offload_config.json").read_text())
    ds = engine_config(user, _cfg(bf16=True), world=4, hidden_size=64, source="z2.json")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 32)
    assert ds["gradient_clipping"] == 0.7 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["zero_allow_untested_optimizer"] is True and ds["zero_force_ds_cpu_optimizer"] is False
    assert user["train_batch_size"] == "auto"  # the caller's dict is left alone


def test_the_shipped_zero3_json_takes_its_precision_from_lampo():
    user = json.loads((CONFIGS / "ds_z3_config.json").read_text())
    for bf16 in (False, True):
        ds = engine_config(user, _cfg(bf16=bf16), world=2, hidden_size=64, source="z3.json")
        assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is bf16
        assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640


@pytest.mark.parametrize("user,match", [
    ({"bf16": {"enabled": True}}, r"z\.json: bf16\.enabled = true but Lampo's config gives false \(from 'bf16'\)"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps = 4 .* gives 2"),
    ({"gradient_clipping": 1.0}, r"gradient_clipping = 1\.0 .*'max_grad_norm'"),
    ({"optimizer": {"type": "AdamW"}}, r"remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 0}}, r"stage = 0; .* 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}},
     r"cannot fill zero_optimization\.allgather_bucket_size"),
])
def test_a_deepspeed_json_that_disagrees_with_lampo_is_an_error_naming_both(user, match):
    user = {"zero_optimization": {"stage": 2}, **user}
    with pytest.raises(ConfigError, match=match):
        engine_config(user, _cfg(), world=2, hidden_size=64, source="z.json")


# ---------------------------------------------------------------------------------------
# A single process never walks into the distributed code
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_single_process_step_imports_no_deepspeed_and_builds_no_accelerator(tiny_model_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from lampo import PPOConfig, PPOTrainer
        import accelerate
        accelerate.Accelerator.__init__ = lambda *a, **k: sys.exit("an Accelerator was built")
        tok = AutoTokenizer.from_pretrained({str(tiny_model_path)!r})
        model = AutoModelForCausalLM.from_pretrained({str(tiny_model_path)!r})
        trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, max_new_tokens=4), model, tok)
        q = [torch.tensor(tok("Hi.").input_ids)] * 2
        trainer.step(q, trainer.generate(q), [1.0, 0.0])
        from lampo.distributed.launch import strategy_from_environment
        assert type(strategy_from_environment()).__name__ == "Strategy"
        loaded = sorted(m for m in sys.modules if m == "deepspeed" or m.startswith(("deepspeed.",
                        "lampo.distributed.ddp", "lampo.distributed.deepspeed_zero")))
        print("LOADED", loaded)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout
