"""`lampo demo`'s path, shortened: 2 steps, a 5-step warm-up, the hf engine."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = "from lampo.demo import run_demo; raise SystemExit(run_demo({'max_steps': 2, 'engine': 'hf'}, pretrain_steps=5))"


def test_demo_runs_end_to_end_and_reports(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    for text in ("=== before training ===", "=== after training ===", "mean reward, first 10% of steps"):
        assert text in out.stdout
    run = tmp_path / "build" / "demo" / "run"
    assert (run / "training_curves.png").stat().st_size > 10_000
    assert (run / "model.safetensors").exists() and (run / "metrics.jsonl").exists()
