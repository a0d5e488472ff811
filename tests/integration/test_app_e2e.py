"""End-to-end runs of the real commands (`python -m lampo.ppo_vllm`, `torchrun`, the reward
server) on the offline tiny model: PPO and GRPO, hf and vLLM, sync and async, 2-process data
parallel, 3-step conversations, LoRA, resume, signals and a reward server that dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lampo.reward.client import wait_until_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "multistep"

REQUIRED_METRICS = (
    "episode lr epoch objective/kl objective/scores objective/rlhf_reward objective/non_score_reward "
    "objective/entropy objective/loss loss/policy_avg policy/approxkl_avg policy/clipfrac_avg policy/entropy_avg "
    "val/ratio val/sequence_lengths val/num_stop_token_ids time/from_scratch time/training time/rollout "
    "time/reward time/weight_sync perf/tokens_per_second perf/mfu policy/version_lag"
).split()
CRITIC_METRICS = ["loss/value_avg", "val/clipfrac_avg"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="WARNING", LAMPO_PEAK_FLOPS="2e11",
             PYTHONPATH=str(ROOT / "tests" / "integration"))
    return e


class RewardServer:
    """`python -m lampo.reward_server` on a free loopback port; always stopped by the test."""

    def __init__(self, tmp: Path, port: int | None = None, model: str = "lampo.reward.rules.VowelReward"):
        self.port = port or free_port()
        self.tmp, self.model = tmp, model
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RewardServer:
        log = (self.tmp / f"server-{self.port}-{time.monotonic_ns()}.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lampo.reward_server", "--model", self.model,
                                      "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=env())
        wait_until_healthy(self.url, self.proc, timeout=60, log_path=log.name)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture()
def server(tmp_path):
    s = RewardServer(tmp_path).start()
    yield s
    s.kill()


def write_config(tmp_path: Path, model_path: Path, **overrides) -> Path:
    cfg = {
        "model_name_or_path": str(model_path),
        "query_dataset": str(DATA),
        "output_dir": str(tmp_path / "run"),
        "engine": "hf",
        "batch_size": 4,
        "mini_batch_size": 4,
        "max_new_tokens": 6,
        "max_steps": 3,
        "non_stop_penalty": False,  # a random tiny model never produces <|im_end|> within 6 tokens
        "learning_rate": 1e-3,
        "progress": False,
        "log_samples_steps": 1,
        "seed": 3,
        "vllm_kv_cache_gb": 0.25,
        # eager starts 10-25 s sooner; the compiled default is covered by test_engines_vllm.py
        "vllm_enforce_eager": True,
        **overrides,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_app(config: Path, *extra: str, launcher: list[str] | None = None, timeout: float = 600):
    cmd = (launcher or [sys.executable, "-m"]) + ["lampo.ppo_vllm", "--config", str(config), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


class Started:
    """A command started in the background, its output going to files (not pipes: none fills up and
    blocks it); `finish` waits for it, `stop` kills it if it still runs."""

    def __init__(self, cmd: list[str]):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, text=True, env=env(), cwd=ROOT)

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=timeout)
        self.out.seek(0), self.err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read(), self.err.read())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.out.close(), self.err.close()


def run_together(commands: dict[str, list[str]], timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Independent commands started together, each with its output captured: name -> the finished
    process. Much of a tiny run is start-up on one core, so two side by side take less time than
    one after the other. Commands still going when one times out are killed."""
    started = {name: Started(cmd) for name, cmd in commands.items()}
    try:
        return {name: run.finish(timeout) for name, run in started.items()}
    finally:
        for run in started.values():
            run.stop()


def app_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lampo.ppo_vllm", "--config", str(config), *extra]


def start_app_and_wait_for_step_1(config: Path, stderr=subprocess.PIPE, pythonpath: Path | None = None
                                  ) -> subprocess.Popen:
    """Start `python -m lampo.ppo_vllm` and return once metrics.jsonl has its first line."""
    e = env()
    if pythonpath is not None:
        e["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{e['PYTHONPATH']}"
    proc = subprocess.Popen([sys.executable, "-m", "lampo.ppo_vllm", "--config", str(config)], env=e, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    metrics_file = yaml.safe_load(config.read_text())["output_dir"] + "/metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (Path(metrics_file).exists() and Path(metrics_file).read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = proc.stderr.read() if proc.stderr else Path(stderr.name).read_text()
            raise AssertionError(f"no step trained: {output[-3000:]}")
        time.sleep(0.1)
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def check_run(run_dir: Path, steps: int, critic: bool) -> list[dict]:
    rows = [r for r in metrics(run_dir) if "objective/scores" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for name in REQUIRED_METRICS + (CRITIC_METRICS if critic else []):
        assert name in rows[-1], f"metric {name} missing"
    assert (run_dir / "rollouts.jsonl").exists() and (run_dir / "rollouts.jsonl").read_text().strip()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    return rows


def assert_loads(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model(input_ids=torch.tensor([[2, 5, 6]])).logits.shape[-1] >= 1024


def test_ppo_hf_async_three_step_conversations_through_the_reward_server(tmp_path, tiny_model_path, server):
    # stop_token "e": most turns stop early on a decoded "e", so conversations reach all 3 steps.
    cfg = write_config(tmp_path, tiny_model_path, reward_model=server.url, stop_token="e", max_new_tokens=8,
                       eval_steps=2)
    out = run_app(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    rows = check_run(run, 3, critic=True)
    # async: step 1 trains on data from policy 0 (lag 0), later steps on the previous policy (lag 1)
    assert [r["policy/version_lag"] for r in rows] == [0.0, 1.0, 1.0]
    samples = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert max(len(s["messages"]) for s in samples) == 6  # user, assistant x 3
    assert all("<|im_start|>" not in m for s in samples for m in s["messages"])
    evals = [r for r in metrics(run) if "eval/scores" in r]
    assert [r["step"] for r in evals] == [2] and 0.0 <= evals[0]["eval/scores"] <= 1.0
    assert_loads(run)


def test_grpo_hf_sync_lora_in_process_reward(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path, estimator="grpo", num_generations=2, batch_size=2,
                       reward_model="lampo.reward.rules.VowelReward", async_mode=False, use_peft=True,
                       lora_r=4, lora_alpha=8, save_merged=True, max_steps=10, early_stop={"episode": 12.0})
    out = run_app(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    rows = check_run(run, 3, critic=False)  # early_stop: episode 12 = 3 steps x 2 prompts x 2 samples
    assert "early stop at step 3" in out.stdout + out.stderr
    assert [r["policy/version_lag"] for r in rows] == [0.0, 0.0, 0.0]  # sync: always the current policy
    assert all(r["val/engine_logprob_diff"] < 1e-4 for r in rows)  # the hf engine holds the synced weights
    assert (run / "adapter_config.json").exists()
    assert_loads(run / "merged")
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(run) is not None


@pytest.mark.vllm
def test_ppo_vllm_sync_lora_weights_reach_the_engine(tmp_path, tiny_model_path):
    pytest.importorskip("vllm")
    # top-k and top-p on: vLLM reports the log-probs of the truncated distribution it samples from,
    # and the learner computes that distribution too
    cfg = write_config(tmp_path, tiny_model_path, engine="vllm", async_mode=False, use_peft=True, lora_r=4,
                       lora_alpha=8, learning_rate=1e-2, reward_model="lampo.reward.rules.VowelReward",
                       top_k=20, top_p=0.9)
    out = run_app(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = check_run(tmp_path / "run", 3, critic=True)
    # vLLM samples with the merged LoRA weights pushed after every step: its log-probs match the learner's.
    assert all(r["val/engine_logprob_diff"] < 1e-3 for r in rows), [r["val/engine_logprob_diff"] for r in rows]
    assert rows[-1]["objective/kl"] != 0.0  # the policy did move away from the reference


@pytest.mark.vllm
def test_grpo_vllm_async(tmp_path, tiny_model_path):
    pytest.importorskip("vllm")
    # bf16: autocast in the learner (fp32 master weights) and a bf16 engine, synced from fp32 weights
    cfg = write_config(tmp_path, tiny_model_path, engine="vllm", estimator="grpo", num_generations=4, batch_size=2,
                       mini_batch_size=8, reward_model="lampo.reward.rules.VowelReward", bf16=True)
    out = run_app(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = check_run(tmp_path / "run", 3, critic=False)
    assert [r["policy/version_lag"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["val/engine_logprob_diff"] < 0.01  # step 1, same weights: only bf16 rounding separates them
    assert_loads(tmp_path / "run")
    # The final model also loads in vLLM, like any hub model.
    script = (
        "import os; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'; os.environ['VLLM_CPU_KVCACHE_SPACE'] = '1'\n"
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(model={str(tmp_path / 'run')!r}, dtype='float32', max_model_len=256, enforce_eager=True)\n"
        "    out = llm.generate(['<|im_start|>user\\nHi.<|im_end|>\\n<|im_start|>assistant\\n'],\n"
        "                       SamplingParams(max_tokens=4, temperature=0))\n"
        "    print('TOKENS', len(out[0].outputs[0].token_ids))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env(), timeout=300)
    assert "TOKENS 4" in loaded.stdout, loaded.stderr[-3000:]


@pytest.mark.vllm
def test_two_process_data_parallel_on_compiled_vllm(tmp_path, tiny_model_path, monkeypatch):
    pytest.importorskip("vllm")
    # vLLM's default compiled model, both ranks compiling into one empty cache at the same time
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    cfg = write_config(tmp_path, tiny_model_path, engine="vllm", vllm_enforce_eager=False, estimator="grpo",
                       num_generations=2, batch_size=2, reward_model="lampo.reward.rules.VowelReward", max_steps=2,
                       async_mode=False)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    out = run_app(cfg, launcher=[accelerate, "launch", "--config_file", str(ROOT / "configs/accelerate/multi_cpu_2proc.yaml"),
                                 "--main_process_port", str(free_port()), "-m"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = check_run(tmp_path / "run", 2, critic=False)
    assert rows[-1]["episode"] == 2 * 2 * 4
    assert all(r["val/engine_logprob_diff"] < 1e-3 for r in rows)  # the synced weights reached both engines
    assert any((tmp_path / "vllm-cache" / "torch_compile_cache").rglob("*"))  # it did compile


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_two_process_data_parallel(tmp_path, tiny_model_path, estimator):
    # grpo: the learner runs each group's prompt once and its answers on the prompt's KV cache,
    # two forward calls of the DDP-wrapped policy before one backward. It also runs without the
    # engine's log-probs (engine_logprobs: false), which only removes their diagnostic.
    # The grpo case also runs asynchronously: each rank overlaps its next rollout with training.
    extra = (dict(estimator="grpo", num_generations=2, batch_size=2, engine_logprobs=False, async_mode=True)
             if estimator == "grpo" else dict(async_mode=False))
    cfg = write_config(tmp_path, tiny_model_path, reward_model="lampo.reward.rules.VowelReward", max_steps=2,
                       **extra)
    # The product command: accelerate launch with the shipped 2-process CPU config.
    accelerate = str(Path(sys.executable).parent / "accelerate")
    out = run_app(cfg, launcher=[accelerate, "launch", "--config_file", str(ROOT / "configs/accelerate/multi_cpu_2proc.yaml"),
                                 "--main_process_port", str(free_port()), "-m"])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = check_run(tmp_path / "run", 2, critic=estimator == "gae")
    assert rows[-1]["episode"] == 2 * 2 * 4  # 2 steps x 2 ranks x 4 conversations
    assert all(("val/engine_logprob_diff" in r) == (estimator == "gae") for r in rows)
    # async: step 2 trains on the rollout generated while step 1 trained (one version behind)
    assert [r["policy/version_lag"] for r in rows] == ([0.0, 1.0] if estimator == "grpo" else [0.0, 0.0])
    assert_loads(tmp_path / "run")


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


KILL_IN_SAVE = """
import os, signal, sys
import lampo.checkpoint as ckpt
real = ckpt.save_checkpoint
def save(output_dir, step, **kw):
    if step == 3:  # die half-way through writing checkpoint-3: the policy is on disk, the rest is not
        policy = kw["models"]["policy"]
        class Dying:
            def save_pretrained(self, path, **k):
                policy.save_pretrained(path, **k)
                os.kill(os.getpid(), signal.SIGKILL)
        kw["models"] = {**kw["models"], "policy": Dying()}
    return real(output_dir, step, **kw)
ckpt.save_checkpoint = save
from lampo.ppo_vllm import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_during_checkpoint_write_equals_uninterrupted_run(tmp_path, tiny_model_path):
    common = dict(reward_model="lampo.reward.rules.VowelReward", max_steps=4, save_step=1, async_mode=True)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    cfg_b = write_config(b, tiny_model_path, **common)
    done = run_together({"a": app_command(write_config(a, tiny_model_path, **common)),
                         "killed": [sys.executable, "-c", KILL_IN_SAVE, "--config", str(cfg_b)]})
    out, killed = done["a"], done["killed"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    from lampo.checkpoint import find_latest_checkpoint

    assert find_latest_checkpoint(b / "run").name == "checkpoint-2"  # the half-written 3 does not count
    resumed = run_app(cfg_b, "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    wa, wb = _final_weights(a / "run"), _final_weights(b / "run")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    ma, mb = metrics(a / "run"), metrics(b / "run")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["objective/scores"] == pytest.approx(rb["objective/scores"], abs=1e-6)
        assert ra["episode"] == rb["episode"]
    sa = [json.loads(x)["messages"] for x in (a / "run" / "rollouts.jsonl").read_text().splitlines()]
    sb = [json.loads(x)["messages"] for x in (b / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert sa == sb  # same data order and the same samples


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path, reward_model="lampo.reward.rules.VowelReward", max_steps=500)
    proc = start_app_and_wait_for_step_1(cfg)
    try:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "--resume_from_checkpoint auto" in stderr
    from lampo.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(tmp_path / "run")
    assert latest is not None and int(latest.name.split("-")[1]) < 500


def test_unreachable_reward_server_stops_before_loading_models(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path, reward_model=f"http://127.0.0.1:{free_port()}")
    out = run_app(cfg, timeout=120)
    assert out.returncode == 2
    assert "python -m lampo.reward_server" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_reward_server_dies_mid_run_then_returns(tmp_path, tiny_model_path):
    srv = RewardServer(tmp_path).start()
    cfg = write_config(tmp_path, tiny_model_path, reward_model=srv.url, max_steps=6, async_mode=False,
                       reward_timeout=5.0, reward_deadline=90.0, reward_max_retries=30)
    proc = start_app_and_wait_for_step_1(cfg)
    try:
        srv.kill()
        time.sleep(3)
        srv.start()  # same port
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.kill()
    assert proc.returncode == 0, stderr[-3000:]
    rows = [r for r in metrics(tmp_path / "run") if "objective/scores" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert sum(r["reward/failed_requests"] for r in rows) >= 1  # the outage was seen and retried


def test_reward_server_dies_for_good_run_stops_with_checkpoint(tmp_path, tiny_model_path):
    srv = RewardServer(tmp_path).start()
    cfg = write_config(tmp_path, tiny_model_path, reward_model=srv.url, max_steps=50, async_mode=False,
                       reward_timeout=2.0, reward_deadline=6.0, reward_max_retries=3)
    proc = start_app_and_wait_for_step_1(cfg)
    try:
        srv.kill()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stderr[-3000:]
    assert "reward" in stderr and "python -m lampo.reward_server" in stderr
    assert "--resume_from_checkpoint auto" in stderr
    from lampo.checkpoint import find_latest_checkpoint, load_checkpoint

    latest = find_latest_checkpoint(tmp_path / "run")
    _, state = load_checkpoint(latest)
    trained = [r["step"] for r in metrics(tmp_path / "run") if "objective/scores" in r]
    assert state["step"] == trained[-1]  # the checkpoint holds every trained step, and no more


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_lora_resume_equals_uninterrupted_run(tmp_path, tiny_model_path, estimator):
    # LoRA trains the adapter; with gae the separate critic trains fully beside it. Run b stops
    # after step 2 (early_stop on the episode count, same max_steps so the schedule is the same),
    # then resumes from checkpoint-2 and trains step 3.
    group = dict(estimator="grpo", num_generations=2, batch_size=2) if estimator == "grpo" else {}
    common = dict(reward_model="lampo.reward.rules.VowelReward", max_steps=3, save_step=1, async_mode=True,
                  use_peft=True, lora_r=4, lora_alpha=8, learning_rate=1e-2, **group)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    cfg_b = write_config(b, tiny_model_path, **common, early_stop={"episode": 8.0})
    done = run_together({"a": app_command(write_config(a, tiny_model_path, **common)), "b": app_command(cfg_b)})
    out, first = done["a"], done["b"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert first.returncode == 0 and "early stop at step 2" in first.stdout + first.stderr, first.stderr[-3000:]
    resumed = run_app(cfg_b, "--resume_from_checkpoint", str(b / "run" / "checkpoint-2"), "--early_stop", "null")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    adapter = "adapter_model.safetensors"
    wa, wb = load_file(str(a / "run" / adapter)), load_file(str(b / "run" / adapter))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    if estimator == "gae":  # the critic trains fully under LoRA, and resumes exactly
        from lampo.checkpoint import model_path

        va = load_file(str(model_path(a / "run" / "checkpoint-3", "value_model") / "model.safetensors"))
        vb = load_file(str(model_path(b / "run" / "checkpoint-3", "value_model") / "model.safetensors"))
        first_ckpt = load_file(str(model_path(a / "run" / "checkpoint-1", "value_model") / "model.safetensors"))
        assert any(not torch.equal(va[k], first_ckpt[k]) for k in va if "layers" in k)  # the trunk trains
        for k in va:
            assert torch.allclose(va[k], vb[k], atol=1e-6, rtol=0), k
    ra = [r["objective/scores"] for r in metrics(a / "run") if "objective/scores" in r]
    rb = [r["objective/scores"] for r in metrics(b / "run") if "objective/scores" in r]
    assert rb == pytest.approx(ra, abs=1e-6)


@pytest.mark.parametrize("async_mode", [False, True], ids=["sync", "async"])
def test_sigterm_while_retrying_a_dead_reward_server_stops_within_seconds(tmp_path, tiny_model_path, async_mode):
    # reward_deadline 600 s and retries without end: without the stop cancelling the reward
    # phase, the run would keep retrying the dead server for ten minutes.
    srv = RewardServer(tmp_path).start()
    cfg = write_config(tmp_path, tiny_model_path, reward_model=srv.url, max_steps=500, async_mode=async_mode,
                       reward_deadline=600.0, reward_max_retries=100_000)
    proc = start_app_and_wait_for_step_1(cfg)
    try:
        srv.kill()
        time.sleep(3)  # every step takes well under this: the reward phase is retrying by now
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert took < 20
    assert "stopped by SIGTERM after step" in stderr and "--resume_from_checkpoint auto" in stderr
    from lampo.checkpoint import find_latest_checkpoint, load_checkpoint

    states, state = load_checkpoint(find_latest_checkpoint(tmp_path / "run"))
    trained = [r["step"] for r in metrics(tmp_path / "run") if "objective/scores" in r]
    assert state["step"] == trained[-1]  # every trained step, and no step trained on a cancelled reward
    assert states["pending"]["produced"] is None  # no rollout without its rewards either


HANGS_ON_UNLOAD = """
import time

from lampo.reward.rules import VowelReward


class HangsOnUnload(VowelReward):
    def unload(self):
        time.sleep(3600)  # clean-up that never returns: only a forced exit ends the run now
"""


def test_second_sigint_exits_at_once(tmp_path, tiny_model_path):
    (tmp_path / "hanging_reward.py").write_text(HANGS_ON_UNLOAD)
    cfg = write_config(tmp_path, tiny_model_path, reward_model="hanging_reward.HangsOnUnload", max_steps=500)
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = start_app_and_wait_for_step_1(cfg, stderr=err, pythonpath=tmp_path)
    try:
        proc.send_signal(signal.SIGINT)  # the first: stop after a checkpoint
        end = time.monotonic() + 120
        while "--resume_from_checkpoint auto" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < end, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None  # held in the model's unload()
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)  # the second: exit now
        proc.wait(timeout=10)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, log.read_text()[-3000:]
    assert took < 5
    assert "second SIGINT: exiting now" in log.read_text()
    from lampo.checkpoint import find_latest_checkpoint

    assert find_latest_checkpoint(tmp_path / "run") is not None  # the first SIGINT's checkpoint


def test_logging_steps_writes_every_nth_step_with_the_window_averaged(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path, reward_model="lampo.reward.rules.VowelReward", max_steps=5,
                       logging_steps=2, async_mode=False)
    out = run_app(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in metrics(tmp_path / "run") if "objective/scores" in r]
    # the first step, every second, and the last: steps 3 and 4 are one record at step 4
    assert [r["step"] for r in rows] == [1, 2, 4, 5]
    assert [r["episode"] for r in rows] == [4.0, 8.0, 16.0, 20.0]  # running totals: the latest value


def test_a_verifiable_reward_logs_the_correct_rate_in_training_and_evaluation(tmp_path, tiny_model_path):
    cfg = write_config(tmp_path, tiny_model_path, reward_model="lampo.reward.rules.ExactAnswerReward",
                       reward_model_config={"expected_answer": 4}, max_steps=2, eval_steps=2, async_mode=False)
    out = run_app(cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    train = [r for r in rows if "objective/scores" in r]
    evals = [r for r in rows if "eval/scores" in r]
    assert all(0.0 <= r["objective/verifiable_correct_rate"] <= 1.0 for r in train)
    # a random tiny model almost never answers 4: the rate is the share of 1.0 scores, like eval/scores
    assert [r["step"] for r in evals] == [2]
    assert evals[0]["eval/verifiable_correct_rate"] == pytest.approx(evals[0]["eval/scores"])
