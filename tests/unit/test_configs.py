"""The shipped configs: every Lampo YAML validates, JSON parses, accelerate files do what they say."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lampo.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
LAMPO_YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.relative_to(CONFIGS).parts)


def test_the_expected_files_are_shipped():
    names = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*") if p.is_file()}
    assert {"tiny.yaml", "sample_llama3.yaml", "ds_z2_offload_config.json", "accelerate/deepspeed_zero2.yaml",
            "accelerate/multi_cpu_2proc.yaml"} <= names


@pytest.mark.parametrize("path", LAMPO_YAMLS, ids=lambda p: p.name)
def test_every_lampo_yaml_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.num_steps >= 1


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.json")), ids=lambda p: p.name)
def test_every_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def test_deepspeed_zero2_offload_json():
    ds = json.loads((CONFIGS / "ds_z2_offload_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is True and "fp16" not in ds
    # accelerate fills "auto" from the training script, so batch sizes live in one place (lampo.config)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key


def test_accelerate_yamls():
    ds = yaml.safe_load((CONFIGS / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert ds["distributed_type"] == "DEEPSPEED" and ds["num_processes"] > 1
    assert (ROOT / ds["deepspeed_config"]["deepspeed_config_file"]).is_file()
    # with a deepspeed_config_file, accelerate rejects mixed_precision in its own yaml (bf16 is in the JSON)
    assert "mixed_precision" not in ds
    cpu = yaml.safe_load((CONFIGS / "accelerate" / "multi_cpu_2proc.yaml").read_text())
    assert cpu["num_processes"] == 2 and cpu["use_cpu"] is True


def test_deepspeed_launch_configs_for_zero3_and_for_a_cpu_machine():
    z3 = yaml.safe_load((CONFIGS / "accelerate" / "deepspeed_zero3.yaml").read_text())
    assert z3["distributed_type"] == "DEEPSPEED" and z3["deepspeed_config"]["zero3_init_flag"] is False
    ds3 = json.loads((ROOT / z3["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds3["zero_optimization"]["stage"] == 3 and ds3["bf16"]["enabled"] == "auto"  # Lampo's bf16 key decides
    cpu = yaml.safe_load((CONFIGS / "accelerate" / "deepspeed_zero2_cpu.yaml").read_text())
    z2 = yaml.safe_load((CONFIGS / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert cpu["use_cpu"] is True and cpu["num_processes"] == 2 and cpu["distributed_type"] == "DEEPSPEED"
    assert cpu["deepspeed_config"] == z2["deepspeed_config"]  # the same JSON as on GPUs


@pytest.mark.slow
def test_accelerate_yamls_parse_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    ds = load_config_from_file(str(CONFIGS / "accelerate" / "deepspeed_zero2.yaml"))
    assert ds.distributed_type == "DEEPSPEED" and ds.mixed_precision is None
    for name in ("deepspeed_zero3.yaml", "deepspeed_zero2_cpu.yaml"):
        assert load_config_from_file(str(CONFIGS / "accelerate" / name)).distributed_type == "DEEPSPEED"
    cpu = load_config_from_file(str(CONFIGS / "accelerate" / "multi_cpu_2proc.yaml"))
    assert cpu.num_processes == 2 and cpu.use_cpu is True


def test_sample_llama3_sets_the_documented_keys_explicitly():
    raw = yaml.safe_load((CONFIGS / "sample_llama3.yaml").read_text())
    # The keys the design documents name for configs/sample_llama3.yaml, plus the precision/engine choices.
    for key in ("model_name_or_path", "use_peft", "lora_alpha", "lora_r", "lora_dropout", "output_dir",
                "reward_model", "query_dataset", "ppo_epochs", "mini_batch_size", "batch_size",
                "gradient_accumulation_steps", "gradient_checkpointing", "learning_rate", "save_step"):
        assert key in raw, key
    cfg = load_config(CONFIGS / "sample_llama3.yaml")
    assert cfg.model.bf16 and cfg.model.use_peft and cfg.generation.engine == "vllm"
    assert "Llama-3" in cfg.model.model_name_or_path


def test_tiny_yaml_points_at_the_tiny_model_and_example_data():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.model.model_name_or_path == "build/tiny-model"
    assert cfg.data.query_dataset == "examples/data/multistep" and (ROOT / cfg.data.query_dataset).is_dir()
    assert cfg.reward.reward_model == "http://localhost:8000"
    assert cfg.rollout_batch_size <= 16 and cfg.num_steps <= 50


@pytest.mark.slow
def test_deepspeed_json_auto_values_are_filled_by_accelerate():
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(CONFIGS / "ds_z2_offload_config.json"))
    assert plugin.zero_stage == 2 and plugin.offload_optimizer_device == "cpu"
    plugin.deepspeed_config_process(
        must_match=True, mixed_precision="no", train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2,
        train_batch_size=64, gradient_clipping=1.0, **{"zero_optimization.reduce_bucket_size": 4096 * 4096})
    cfg = plugin.deepspeed_config
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"]["enabled"] is True  # kept although accelerate's own mixed_precision is "no"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_cpu_accelerate_config_starts_two_ranks_that_all_reduce(tmp_path):
    """`accelerate launch --config_file configs/accelerate/multi_cpu_2proc.yaml` really runs 2 gloo ranks."""
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from accelerate import Accelerator
        acc = Accelerator()
        t = acc.reduce(torch.tensor([acc.process_index + 1.0]), reduction="sum")
        # one file per rank: two processes printing to one pipe interleave their lines
        with open(f"{OUT}/rank{acc.process_index}.txt", "w") as f:
            f.write(f"rank {acc.process_index}/{acc.num_processes} {acc.distributed_type} "
                    f"backend={dist.get_backend()} sum={t.item()}")
        acc.end_training()  # destroys the process group, as lampo's run() does (else gloo may abort at exit)
        """
    ).replace("{OUT}", str(tmp_path)))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(CONFIGS / "accelerate" / "multi_cpu_2proc.yaml"),
         "--main_process_port", str(_free_port()), str(script)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    # ranks contribute 1 and 2, so the all-reduced sum is 3 on both
    assert lines == [
        "rank 0/2 DistributedType.MULTI_CPU backend=gloo sum=3.0",
        "rank 1/2 DistributedType.MULTI_CPU backend=gloo sum=3.0",
    ]
