"""DeepSpeed ZeRO-2 and ZeRO-3 for real, on this CPU: two gloo ranks against one plain process.

The learner-level checks run tests/integration/deepspeed_worker.py once per stage under
`torchrun --nproc_per_node 2` (one launch covers every scenario: it is the launch that costs) and
once as one process on the plain path, on the same global batch. The application check runs the
documented command, `accelerate launch --config_file <ZeRO-2 config> -m lampo.ppo_vllm`, and
resumes it from a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_app_e2e import ROOT, assert_loads, check_run, env, free_port, metrics, run_app, write_config

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

WORKER = Path(__file__).with_name("deepspeed_worker.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _worker(out: Path, model: Path, stage: int) -> dict:
    cmd = [sys.executable, str(WORKER), str(model), str(out)]
    if stage:
        cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), str(model),
               str(out), "--stage", str(stage)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env(), "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def plain(tiny_model_path, tmp_path_factory):
    return _worker(tmp_path_factory.mktemp("plain") / "out.pt", tiny_model_path, 0)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(request, tiny_model_path, tmp_path_factory):
    stage = request.param
    return stage, _worker(tmp_path_factory.mktemp(f"zero{stage}") / "out.pt", tiny_model_path, stage)


def _assert_same(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=atol, rtol=0), (k, (got[k] - want[k]).abs().max().item())


def _moved(after: dict, before: dict, part: str) -> float:
    """The largest change of a weight whose name contains `part`."""
    return max((after[k] - before[k]).abs().max().item() for k in after if part in k)


def test_two_ranks_train_policy_and_critic_as_one_process_on_both_halves(zero, plain):
    # Same global batch: each rank holds half the rows; the token-mean losses divide by the mean
    # token count over the ranks; clipping at 0.5 is active; a linear schedule over two learning
    # rates (policy, critic) runs through one DeepSpeed optimiser.
    _stage, ds = zero
    for scenario in ("critic", "head"):
        _assert_same(ds[scenario]["weights"], plain[scenario]["weights"])
    w, w0 = plain["critic"]["weights"], plain["critic"]["initial"]
    assert _moved(w, w0, "policy.") > 1e-3 and _moved(w, w0, "value.") > 1e-3  # both trained, not a no-op
    head, head0 = plain["head"]["weights"], plain["head"]["initial"]
    assert _moved(head, head0, "head.") > 1e-3 and _moved(head, head0, "policy.") > 1e-3
    assert ds["critic"]["lr"] == plain["critic"]["lr"]


def test_a_nan_minibatch_is_skipped_on_every_rank_and_counted(zero, plain):
    # Step 2 has a NaN score in rank 1's half only: both ranks skip both of its minibatches
    # (ppo_epochs 2), count them, and keep their weights; then max_bad_steps (1) stops both.
    _stage, ds = zero
    assert plain["critic"]["skipped"] == [[0.0, 2.0, 0.0]]
    assert ds["critic"]["skipped"] == [[0.0, 2.0, 0.0]] * 2
    assert ds["critic"]["step_2_change"] == [0.0, 0.0] and plain["critic"]["step_2_change"] == [0.0]
    assert ds["critic"]["diverged"] == [True, True] and plain["critic"]["diverged"] == [True]


def test_checkpoint_and_exact_resume_in_a_new_engine(zero):
    _stage, ds = zero
    r = ds["resume"]
    _assert_same(r["resumed"], r["uninterrupted"], atol=1e-7)
    # without the optimiser state the same step lands elsewhere: the shards were really restored
    assert max((r["fresh_optimiser"][k] - r["uninterrupted"][k]).abs().max().item() for k in r["resumed"]) > 1e-3
    # each rank wrote its own partition of the optimiser state
    assert sum("optim_states" in name for name in r["engine_files"]) == 2


def test_weight_sync_gives_the_engine_the_whole_trained_policy(zero):
    stage, ds = zero
    sync = ds["sync"]
    # outside the gather a ZeRO-3 rank holds no whole parameter; ZeRO-2 keeps them whole
    assert sync["partitioned_numel"] == (0 if stage == 3 else sync["full_numel"])
    assert sync["after"] == sync["transformers"]  # the engine greedy-decodes as the trained weights do
    assert sync["after"] != sync["before"]


def test_lora_trains_under_zero3_and_saves_from_gathered_weights(zero, plain):
    stage, ds = zero
    lora = ds["lora"]
    _assert_same(lora["weights"], plain["lora"]["weights"])
    w, w0 = lora["weights"], plain["lora"]["initial"]
    assert _moved(w, w0, "lora_B") > 1e-3
    base = [k for k in w if "lora_" not in k and k.startswith("policy.")]
    assert base and max((w[k] - w0[k]).abs().max().item() for k in base) == 0.0  # the base stays frozen
    if stage == 3:
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoModelForCausalLM

        saved = Path(lora["saved"])
        adapter = AutoPeftModelForCausalLM.from_pretrained(saved / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(saved / "merged")
        ids = torch.tensor([[2, 5, 6, 7]])
        with torch.no_grad():
            assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_the_real_command_under_zero2_on_cpu_and_its_exact_resume(tmp_path, tiny_model_path):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2_cpu.yaml -m lampo.ppo_vllm`:
    the shipped ZeRO-2 JSON (optimiser state offloaded, bf16), a critic, async rollouts, 2 steps with
    a checkpoint after each; then a run resumed from a copy of checkpoint-1 ends with the same weights."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    launcher = [accelerate, "launch", "--config_file", str(ROOT / "configs/accelerate/deepspeed_zero2_cpu.yaml"),
                "--main_process_port", str(free_port()), "-m"]
    # async: checkpoint-1 also holds each rank's own batch generated for step 2
    common = dict(reward_model="lampo.reward.rules.VowelReward", max_steps=2, save_step=1, bf16=True,
                  gradient_accumulation_steps=2, async_mode=True)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    out = run_app(write_config(a, tiny_model_path, **common), launcher=launcher)
    assert out.returncode == 0, out.stderr[-5000:]
    rows = check_run(a / "run", 2, critic=True)
    assert rows[-1]["episode"] == 2 * 2 * 4  # 2 steps x 2 ranks x 4 conversations
    assert_loads(a / "run")
    manifest = json.loads((a / "run" / "checkpoint-1" / "checkpoint.json").read_text())
    assert manifest["shards"] == ["deepspeed", "ranks"]

    shutil.copytree(a / "run" / "checkpoint-1", b / "run" / "checkpoint-1")
    resumed = run_app(write_config(b, tiny_model_path, **common), "--resume_from_checkpoint", "auto",
                      launcher=[*launcher[:-2], str(free_port()), "-m"])
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    wa, wb = load_file(str(a / "run" / "model.safetensors")), load_file(str(b / "run" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    step2 = [r for r in metrics(b / "run") if "objective/scores" in r]
    assert [r["step"] for r in step2] == [2]
    assert step2[0]["loss/value_avg"] == pytest.approx(rows[1]["loss/value_avg"], abs=1e-6)
