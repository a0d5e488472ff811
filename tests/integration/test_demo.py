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


def test_lampo_demo_runs_from_an_installed_wheel_outside_the_repository(tmp_path):
    # pip install of the built wheel (its dependencies are this environment's), then the `lampo`
    # console script from an empty folder: the example data must come from the package itself.
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(root)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = wheels.glob("lampo-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import lampo; print(lampo.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the wheel's code, not the repository's
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    out = subprocess.run([str(site / "bin" / "lampo"), "demo", "--max-steps", "2", "--engine", "hf",
                          "--pretrain-steps", "5"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "=== after training ===" in out.stdout
    assert (folder / "build" / "demo" / "data" / "train.jsonl").exists()
