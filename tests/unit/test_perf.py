"""The FLOP cost model (lampo.speed.cost) and MFU arithmetic (lampo.perf), against numbers worked out by
hand; the machine's peak and allocator setting (lampo.speed.machine)."""

import platform
import subprocess
import sys

import pytest
import torch

from lampo.perf import step_mfu
from lampo.speed import cost, machine
from lampo.speed.cost import ModelShape, count_flops, forward_flops, training_flops

# A toy shape: N = 1000 matmul parameters, L = 2 layers, d_attn = 4.
TOY = ModelShape(matmul_params=1000, num_layers=2, attn_dim=4)


def test_forward_flops_hand_numbers():
    # T = 3: matmuls 2 * 1000 * 3 = 6000.
    # Attention: token t attends to t + 1 keys, 4 * d * (t + 1) per layer -> 4 * 4 * (1 + 2 + 3) = 96,
    # times 2 layers = 192. Total 6192.
    assert forward_flops(TOY, [3]) == 6192
    # Two sequences add: T = 1 gives 2000 + 2 * 2 * 4 * 1 * 2 = 2032.
    assert forward_flops(TOY, [3, 1]) == 6192 + 2032


def test_training_is_three_forwards_lora_two_checkpointing_one_more():
    assert training_flops(TOY, [3]) == 3 * 6192  # 6N per token
    assert training_flops(TOY, [3], lora=True) == 2 * 6192  # no weight gradients for frozen weights
    assert training_flops(TOY, [3], recompute=True) == 4 * 6192  # one more forward


def test_count_flops_per_phase():
    # A sequence of 4 tokens is computed at its first 3 positions (its last token is only
    # predicted), so each pass over it costs forward_flops(TOY, [3]) = 6192.
    f = count_flops(TOY, [4], ppo_epochs=2)
    # rollout: one pass over the sequence; forward: policy + reference; optimize: 2 epochs x 3 forwards.
    assert f == {"rollout": 6192, "forward": 2 * 6192, "optimize": 2 * 3 * 6192}
    assert count_flops(TOY, [4], reference=False)["forward"] == 6192
    critic = ModelShape(matmul_params=500, num_layers=1, attn_dim=4)
    # critic forward over 3 positions: 2 * 500 * 3 + 2 * 1 * 4 * 3 * 4 = 3000 + 96 = 3096
    fc = count_flops(TOY, [4], critic=critic)
    assert fc["forward"] == 2 * 6192 + 3096
    assert fc["optimize"] == 3 * 6192 + 3 * 3096
    assert fc["rollout"] == 6192  # the critic does not generate
    with pytest.raises(ValueError, match="ppo_epochs"):
        count_flops(TOY, [4], ppo_epochs=0)
    # one token predicts nothing; nothing is computed
    assert count_flops(TOY, [1]) == count_flops(TOY, [0]) == {"rollout": 0, "forward": 0, "optimize": 0}


def test_rollout_counts_the_prompt_blocks_the_engine_cached_once():
    # vLLM's samples of a P-token prompt share its whole blocks of the first P - 1 positions.
    assert cost.rollout_cached_prompt_lens([40, 33, 32, 17, 16, 5], 16) == [32, 32, 16, 16, 0, 0]
    assert cost.rollout_cached_prompt_lens([40, 33], 0) == []  # transformers generate: no cache
    # A 4-token sequence whose first 2 positions came from the cache: the rollout computed
    # positions 3 only of [1..3], i.e. forward_flops([3]) - forward_flops([2]).
    # forward_flops([2]) = 2 * 1000 * 2 + 4 * L * d * (1 + 2) = 4000 + 4 * 2 * 4 * 3 = 4096.
    f = count_flops(TOY, [4], cached_prompt_lens=[2])
    assert f["rollout"] == 6192 - 4096
    assert f["optimize"] == 3 * 6192  # training computes every position itself


def test_small_model_numbers():
    # The benchmark model: hidden 512, 8 layers, 8 heads of 64, MLP 1408, vocab 1024, untied head.
    # Per layer 4 * 512^2 + 3 * 512 * 1408 = 1,048,576 + 2,162,688 = 3,211,264; x 8 = 25,690,112;
    # LM head 512 * 1024 = 524,288 -> N = 26,214,400.
    small = ModelShape(matmul_params=26_214_400, num_layers=8, attn_dim=512)
    # T = 48: 2 * N * 48 = 2,516,582,400; attention 2 * 8 * 512 * 48 * 49 = 19,267,584.
    assert forward_flops(small, [48]) == 2_535_849_984


@pytest.mark.slow  # imports transformers (several seconds on this machine)
def test_model_shape_from_a_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False)
    shape = ModelShape.from_model(LlamaForCausalLM(cfg))
    # per layer 4 * 64^2 + 3 * 64 * 128 = 16,384 + 24,576 = 40,960; x 2 = 81,920; head 64 * 1024 = 65,536.
    assert shape == ModelShape(matmul_params=147_456, num_layers=2, attn_dim=64)


@pytest.mark.slow  # imports transformers
def test_model_shape_counts_a_tied_head_once_as_a_matmul():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Same products as the untied model above: the head multiplies every token by the 64 x 1024
    # embedding matrix, which the look-up does not. 81,920 + 65,536 = 147,456.
    assert ModelShape.from_model(model) == ModelShape(matmul_params=147_456, num_layers=2, attn_dim=64)


@pytest.mark.slow  # imports transformers
def test_model_shape_counts_gpt2_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1024, n_embd=64, n_layer=2, n_head=1, n_inner=128, n_positions=1024)
    model = GPT2LMHeadModel(cfg)
    # GPT-2's projections are transformers' Conv1D (weight in x out), its tied head an nn.Linear.
    # Per layer c_attn 64 * 192 = 12,288, attn.c_proj 64 * 64 = 4,096, c_fc 64 * 128 = 8,192,
    # mlp.c_proj 128 * 64 = 8,192: 32,768; x 2 = 65,536. Head 64 * 1024 = 65,536 -> 131,072.
    # The position table (wpe) is a look-up like the token embedding: not counted.
    # attn_dim: 1 head x (64 / 1) = 64.
    assert ModelShape.from_model(model) == ModelShape(matmul_params=131_072, num_layers=2, attn_dim=64)
    # A separate critic's trunk (GPT2Model, no head): the Conv1D layers alone, 65,536.
    assert ModelShape.from_model(model.transformer).matmul_params == 65_536


@pytest.mark.slow  # imports transformers and peft
def test_model_shape_of_gpt2_with_lora_counts_base_and_adapters():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1024, n_embd=64, n_layer=2, n_head=1, n_inner=128, n_positions=1024)
    lora = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    # The base as above (131,072) plus, per layer, c_attn's adapter A (2 x 64) and B (192 x 2):
    # 128 + 384 = 512; x 2 = 1,024 -> 132,096.
    assert ModelShape.from_model(lora).matmul_params == 132_096


def test_step_mfu_per_phase_and_total():
    times = {"time/rollout": 2.0, "time/forward": 1.0, "time/optimize": 4.0, "time/reward": 9.0}
    flops = {"rollout": 100.0, "forward": 50.0, "optimize": 300.0}
    out = step_mfu(times, flops, peak_flops=100.0)
    assert out["perf/mfu_rollout"] == pytest.approx(0.5)  # 100 / 2 / 100
    assert out["perf/mfu_forward"] == pytest.approx(0.5)
    assert out["perf/mfu_optimize"] == pytest.approx(0.75)  # 300 / 4 / 100
    # Without time/training the step time is the sum of the timed model phases: 450 / 7 / 100.
    assert out["perf/mfu"] == pytest.approx(450 / 7 / 100)
    # With it, the whole step's wall time (reward and sync included): 450 / 9 / 100.
    out = step_mfu({**times, "time/training": 9.0}, flops, peak_flops=100.0)
    assert out["perf/mfu"] == pytest.approx(0.5)
    assert out["perf/flops_per_second"] == pytest.approx(50.0)


def test_step_mfu_leaves_out_untimed_phases_and_rejects_bad_peak():
    out = step_mfu({"time/optimize": 2.0}, {"rollout": 10.0, "optimize": 10.0}, peak_flops=10.0)
    assert "perf/mfu_rollout" not in out
    assert out["perf/mfu_optimize"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak_flops"):
        step_mfu({}, {}, peak_flops=0.0)


def test_measure_peak_is_a_positive_rate():
    assert machine.measure_peak(torch.float32, "matmul", n=64, repeats=1) > 0
    if machine.onednn_linear_available():
        assert machine.measure_peak(torch.float32, "onednn", n=64, repeats=1) > 0
    with pytest.raises(ValueError, match="kind"):
        machine.measure_peak(torch.float32, "gpu")


def test_the_peak_is_measured_on_the_device_that_holds_the_model(monkeypatch):
    # perf/mfu on a GPU must be against the GPU's rate, not this CPU's: the device reaches the
    # measurement and keys the cache, and oneDNN (a CPU kernel) is not offered for another device.
    monkeypatch.delenv("LAMPO_PEAK_FLOPS", raising=False)
    seen = []
    monkeypatch.setattr(machine, "measure_peak", lambda dtype, kind, repeats, device: seen.append(str(device)) or 1e9)
    monkeypatch.setattr(machine, "_PEAK_CACHE", {})
    assert machine.machine_peak(torch.float32, device="cpu") == 1e9
    assert machine.machine_peak(torch.float32, device="cuda:0") == 1e9
    assert machine.machine_peak(torch.float32, device="cuda:0") == 1e9  # cached per device
    assert seen == ["cpu", "cuda:0"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="CPU only"):
        machine.measure_peak(torch.float32, "onednn", n=8, repeats=1, device="meta")


def test_count_flops_without_the_old_logprob_pass():
    # Fused old log-probs and no reference: the forward phase costs nothing.
    assert count_flops(TOY, [4], old_logprobs=False, reference=False)["forward"] == 0
    assert count_flops(TOY, [4], old_logprobs=False)["forward"] == 6192  # the reference only


def test_machine_peak_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAMPO_PEAK_FLOPS", "4.5e11")
    assert machine.machine_peak() == 4.5e11
    monkeypatch.setenv("LAMPO_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="LAMPO_PEAK_FLOPS"):
        machine.machine_peak()


FAULTS_SCRIPT = """
import resource, sys, torch
from lampo.speed import machine
if sys.argv[1] == "keep":
    assert machine.keep_freed_memory()
def step():
    # a training step's pattern: activations pile up (forward), then are all freed (backward)
    live = [torch.ones(3 << 20) for _ in range(24)]  # 24 x 12 MB, every page written
    del live
step()  # first touch: faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_keep_freed_memory_stops_refaulting_a_steps_activations():
    """Later 'steps' re-use the first one's pages instead of faulting in fresh ones."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    pages = 24 * (12 << 20) // 4096  # 73,728 per step
    default, kept = faults("default"), faults("keep")
    # Summed over five steps, as the heap's layout varies with address-space randomisation: by
    # default glibc re-faults at least the second step's pages whole (all five steps' in most
    # runs; its dynamic mmap threshold settles the others after that), and with the setting at
    # most a few tensors' pages in the second or third step (0, 1 or 7 of the 24 measured), none later.
    assert default > pages * 9 // 10, default
    assert kept < pages // 2, kept
