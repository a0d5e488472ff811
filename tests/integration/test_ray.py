"""`python -m lampo.ppo_ray` on a local Ray cluster with the offline tiny model: parity with
`lampo.ppo_vllm`, several rollout workers that hold the learner's weights after every sync, two
learners, a rollout worker killed mid-run, a learner killed mid-run and the resume after it,
and stale batches rolled out again.

Some runs drive `RayTrainer` from the test process, to reach into its phases (kill an actor at
a chosen moment, inspect every sync); they share one local cluster, and each kills its actors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from test_app_e2e import DATA, ROOT, Started, env, metrics, run_together, write_config

from lampo.config import LampoConfig
from lampo.distributed.ray.driver import RayTrainer
from lampo.distributed.ray.wire import unpack_weights
from lampo.rollout.engines import HFEngine, SamplingSettings
from lampo.trainer import RunStopped

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMPARED = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "val/sequence_lengths",
            "val/ratio", "policy/approxkl_avg")


def run_module(module: str, config: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, "--config", str(config), *extra], capture_output=True,
                          text=True, timeout=timeout, env=env(), cwd=ROOT)


def run_side_by_side(runs: dict[str, tuple[str, Path]], out: Path, timeout: float = 600) -> dict[str, Path]:
    """name -> (module, config): the runs started together (each has its own engines, and a ppo_ray run
    its own cluster); name -> its output directory."""
    commands = {}
    for name, (module, config) in runs.items():
        (out / name).mkdir(parents=True)
        commands[name] = [sys.executable, "-m", module, "--config", str(config), "--output_dir", str(out / name)]
    for name, done in run_together(commands, timeout).items():
        assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return {name: out / name for name in runs}


def run_in_process_and_on_ray(config: Path, out: Path) -> dict[str, Path]:
    """`lampo.ppo_vllm` and `lampo.ppo_ray` on `config`, side by side: module -> its output directory."""
    return run_side_by_side({module: (module, config) for module in ("lampo.ppo_vllm", "lampo.ppo_ray")}, out)


def trained(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "objective/scores" in r]


def assert_same_steps(a: list[dict], b: list[dict], rel: float = 1e-4) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in COMPARED:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-6), (ra["step"], key)


def driver_config(tmp_path: Path, model: Path, **overrides) -> LampoConfig:
    values = {"model_name_or_path": str(model), "query_dataset": str(DATA), "output_dir": str(tmp_path / "run"),
              "engine": "hf", "batch_size": 4, "mini_batch_size": 4, "max_new_tokens": 6, "max_steps": 3,
              "non_stop_penalty": False, "learning_rate": 1e-3, "progress": False, "seed": 3, "report_to": [],
              "reward_model": "lampo.reward.rules.VowelReward", "vllm_kv_cache_gb": 0.25,
              "vllm_enforce_eager": True, **overrides}
    return LampoConfig(values)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the runs this test process drives: `RayTrainer` joins the Ray it finds
    started (`cluster.connect`), and each run kills the actors it made. Starting and stopping a
    cluster costs seconds a run."""
    from lampo.config import RayConfig
    from lampo.distributed.ray.cluster import connect

    started = connect(RayConfig(local_num_cpus=4), cpus_needed=4)  # two rollout workers and two learners at most
    assert started, "Ray was already running in the test process: its CPUs may not fit these runs"
    yield
    ray.shutdown()


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_one_worker_one_learner_matches_ppo_vllm(tmp_path, tiny_model_path, engine):
    """The same samples and losses as the in-process application, one step off-policy; on each engine,
    though the Ray worker gets the batch in parts (`chunks_per_engine`) and the in-process one whole."""
    cfg = write_config(tmp_path, tiny_model_path, engine=engine, reward_model="lampo.reward.rules.VowelReward",
                       async_mode=True, max_staleness=1, report_to=[])
    out = run_in_process_and_on_ray(cfg, tmp_path)
    a, b = (trained(out[m]) for m in ("lampo.ppo_vllm", "lampo.ppo_ray"))
    assert len(a) == 3 and [r["policy/version_lag"] for r in b] == [0.0, 1.0, 1.0]
    assert_same_steps(a, b)
    samples = [[json.loads(line)["messages"] for line in (out[m] / "rollouts.jsonl").read_text().splitlines()]
               for m in ("lampo.ppo_vllm", "lampo.ppo_ray")]
    assert samples[0] == samples[1] and samples[0]
    assert (out["lampo.ppo_ray"] / "model.safetensors").exists()


def assert_engines_hold_the_learners_weights(trainer: RayTrainer, model: Path) -> None:
    """Every live engine's greedy output is that of the learner's weights, and it holds the policy version."""
    tok = trainer.tokenizer
    prompts = [tok("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
               ["input_ids"], tok("Why do rivers bend?", add_special_tokens=False)["input_ids"]]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    # what the learner holds, through the object store whichever way the workers got it
    weights = dict(unpack_weights(ray.get(trainer.group.publish_weights()[0])))
    reference = HFEngine(str(model), tok)
    missing, unexpected = reference.model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    expected = [g[0].token_ids for g in reference.generate(prompts, greedy)]
    held = [[g[0].token_ids for g in out] for out in trainer.pool.call_all("generate", prompts, greedy)]
    live = sum(trainer.pool.alive)
    assert held == [expected] * live
    assert trainer.pool.call_all("held_version") == [trainer.policy_version] * live


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize("weight_sync", ["object_store", "broadcast", "colocated"])
def test_two_vllm_workers_hold_the_learners_weights_after_every_sync(tmp_path, tiny_model_path, weight_sync):
    # the broadcast sends each update while no rollout runs: on-policy; colocated, each of two
    # learners holds an engine in its process and loads it from memory
    staleness = 1 if weight_sync == "object_store" else 0
    ray_section = (dict(colocate=True, num_learners=2) if weight_sync == "colocated"
                   else dict(weight_sync=weight_sync))
    cfg = driver_config(tmp_path, tiny_model_path, engine="vllm", num_engines=2, max_staleness=staleness,
                        **ray_section)
    trainer = RayTrainer(cfg)
    assert trainer.pool.broadcasting == (weight_sync == "broadcast")
    assert trainer.pool.colocated == (weight_sync == "colocated")
    used, checked = set(), []
    send = trainer.pool._send

    def record_send(chunk, seed):
        send(chunk, seed)
        used.add(chunk.engine)

    sync = trainer.sync

    def checked_sync():
        sync()
        assert trainer.pool.alive == [True, True]
        assert_engines_hold_the_learners_weights(trainer, tiny_model_path)
        checked.append(trainer.policy_version)

    trainer.pool._send, trainer.sync = record_send, checked_sync
    try:
        last = trainer.train()
    finally:
        trainer.close()
    assert checked == [1, 2, 3] and used == {0, 1}
    assert last["ray/weight_broadcast"] == float(weight_sync == "broadcast")


def test_a_broadcast_run_trains_as_the_object_store_run(tmp_path, tiny_model_path):
    """Two workers, on-policy: the same samples and losses whichever way the weights travel."""
    configs = {}
    for mode in ("object_store", "broadcast"):
        (tmp_path / mode).mkdir()
        configs[mode] = ("lampo.ppo_ray", write_config(tmp_path / mode, tiny_model_path, engine="hf",
                                                       reward_model="lampo.reward.rules.VowelReward", num_engines=2,
                                                       max_staleness=0, weight_sync=mode, report_to=[]))
    runs = {mode: trained(run_dir) for mode, run_dir in run_side_by_side(configs, tmp_path / "runs").items()}
    assert len(runs["broadcast"]) == 3
    assert [r["ray/weight_broadcast"] for r in runs["broadcast"]] == [1.0] * 3
    assert_same_steps(runs["object_store"], runs["broadcast"])


@pytest.mark.usefixtures("cluster")
def test_a_colocated_run_trains_as_ppo_vllm_and_resumes_with_the_checkpoints_weights_in_its_engine(tmp_path,
                                                                                                    tiny_model_path):
    """colocate: the engine in the learner's actor, on-policy: the in-process synchronous run's samples
    and losses. Resumed from checkpoint-2 in a new directory, the engine (started from the base model)
    holds the checkpoint's weights before the first step, and step 3 is the whole run's."""
    cfg = write_config(tmp_path, tiny_model_path, engine="vllm", reward_model="lampo.reward.rules.VowelReward",
                       async_mode=False, colocate=True, max_staleness=0, save_step=2, report_to=[])
    out = run_in_process_and_on_ray(cfg, tmp_path)
    a, b = (trained(out[m]) for m in ("lampo.ppo_vllm", "lampo.ppo_ray"))
    assert len(a) == 3 and [r["policy/version_lag"] for r in b] == [0.0] * 3
    assert_same_steps(a, b)
    samples = [[json.loads(line)["messages"] for line in (out[m] / "rollouts.jsonl").read_text().splitlines()]
               for m in ("lampo.ppo_vllm", "lampo.ppo_ray")]
    assert samples[0] == samples[1] and samples[0]

    resumed = tmp_path / "resumed"
    shutil.copytree(out["lampo.ppo_ray"] / "checkpoint-2", resumed / "checkpoint-2")
    trainer = RayTrainer(LampoConfig({**yaml.safe_load(cfg.read_text()), "output_dir": str(resumed),
                                      "resume_from_checkpoint": "auto"}))
    try:
        assert trainer.pool.colocated and trainer.policy_version == 2
        assert_engines_hold_the_learners_weights(trainer, tiny_model_path)
        trainer.train()
    finally:
        trainer.close()
    assert [r["step"] for r in trained(resumed)] == [3]
    assert_same_steps(b[2:], trained(resumed))


def kill_a_worker_in_step_2(trainer) -> list:
    """Kill the worker holding step 2's first part right after step 2 is sent out (its rows are then
    queued on both workers); returns the list every trained batch is appended to."""
    dispatches, batches = [], []
    dispatch, to_train_batch = trainer.pool.dispatch, trainer.to_train_batch

    def dispatch_then_kill(rows, seed):
        job = dispatch(rows, seed)
        dispatches.append(job)
        if len(dispatches) == 2:  # step 2's rows are queued on both workers: one dies under them
            ray.kill(trainer.pool.workers[job.chunks[0].engine], no_restart=False)
        return job

    def recording_to_train_batch(produced):
        batches.append(produced.batch)
        return to_train_batch(produced)

    trainer.pool.dispatch, trainer.to_train_batch = dispatch_then_kill, recording_to_train_batch
    return batches


@pytest.mark.usefixtures("cluster")
def test_a_worker_killed_under_broadcast_sync_is_restarted_and_the_run_goes_on_by_object_store(tmp_path,
                                                                                             tiny_model_path):
    cfg = driver_config(tmp_path, tiny_model_path, num_engines=2, max_staleness=0, max_steps=4, weight_sync="broadcast")
    trainer = RayTrainer(cfg)
    batches, modes = kill_a_worker_in_step_2(trainer), []
    sync = trainer.sync

    def recording_sync():
        modes.append(trainer.pool.broadcasting)
        sync()
        # either way every worker holds the new version (a call queues behind an object-store update)
        assert trainer.pool.call_all("held_version") == [trainer.policy_version] * 2

    trainer.sync = recording_sync
    try:
        last = trainer.train()
        G = cfg.generation.num_generations
        expected = [sorted(r.index for r in trainer.sampler.rows_for(s) for _ in range(G)) for s in range(4)]
    finally:
        trainer.close()
    assert modes == [True, False, False, False]  # the sync after step 1 broadcast; the death came in step 2
    assert last["ray/engine_restarts"] == 1 and last["ray/weight_broadcast"] == 0.0 and last["ray/live_engines"] == 2
    assert [sorted(b.prompt_index.tolist()) for b in batches] == expected
    assert [r["policy/version_lag"] for r in trained(Path(cfg.train.output_dir))] == [0.0] * 4


@pytest.mark.usefixtures("cluster")
def test_a_worker_killed_mid_run_is_restarted_and_its_rows_rolled_out_again(tmp_path, tiny_model_path):
    cfg = driver_config(tmp_path, tiny_model_path, num_engines=2, max_staleness=1, max_steps=4)
    trainer = RayTrainer(cfg)
    batches = kill_a_worker_in_step_2(trainer)
    try:
        last = trainer.train()
        G = cfg.generation.num_generations
        expected = [sorted(r.index for r in trainer.sampler.rows_for(s) for _ in range(G)) for s in range(4)]
    finally:
        trainer.close()
    assert last["ray/engine_restarts"] == 1 and last["ray/requeued_chunks"] >= 1 and last["ray/live_engines"] == 2
    # every step trained once, on its whole batch: no rows lost, none twice
    assert [sorted(b.prompt_index.tolist()) for b in batches] == expected
    assert (Path(cfg.train.output_dir) / "model.safetensors").exists()


@pytest.mark.usefixtures("cluster")
def test_a_colocated_pair_that_dies_rolling_out_stops_the_run_and_rank_0_saves_alone(tmp_path, tiny_model_path):
    """colocate: pair 1 (rollout worker and learner rank 1 in one actor) dies under step 2's rollout.
    Its rows are not sent elsewhere: a learner is lost, so the run stops, and rank 0 writes the
    checkpoint of step 1 on its own."""
    cfg = driver_config(tmp_path, tiny_model_path, colocate=True, num_engines=2, num_learners=2, max_staleness=0,
                        max_steps=4)
    trainer = RayTrainer(cfg)
    learn, learned = trainer.group.learn, []

    def learn_then_kill_pair_1(*args, **kwargs):
        stats = learn(*args, **kwargs)
        learned.append(stats)
        if len(learned) == 1:  # step 2's parts were sent behind step 1's update: both pairs roll out now
            assert {c.engine for c in trainer._dispatched[(1, 0)].chunks} == {0, 1}
            ray.kill(trainer.pool.workers[1], no_restart=False)
        return stats

    trainer.group.learn = learn_then_kill_pair_1
    try:
        with pytest.raises(RunStopped, match=r"(?s)colocated worker 1 \(rollout worker and learner rank 1\) died"
                                             r".*stopped after 1 trained steps; learner rank 0 saved checkpoint"):
            trainer.train()
    finally:
        trainer.close()
    state = json.loads((Path(cfg.train.output_dir) / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["processes"] == 2
    assert [r["step"] for r in trained(Path(cfg.train.output_dir))] == [1]


TWO_LEARNERS = dict(num_learners=2, max_staleness=1, max_steps=3, estimator="grpo", num_generations=2,
                    batch_size=2, mini_batch_size=4, reward_model="lampo.reward.rules.VowelReward", report_to=[])


@pytest.fixture(scope="module")
def two_learners(tmp_path_factory, tiny_model_path):
    """(config file, `reference()`): an uninterrupted ppo_ray run with two data-parallel learners,
    started in the background so that the tests' own runs start beside it; `reference()` waits for
    it and returns its trained steps' metrics."""
    tmp = tmp_path_factory.mktemp("two_learners")
    cfg = write_config(tmp, tiny_model_path, output_dir=str(tmp / "whole"), **TWO_LEARNERS)
    whole = Started([sys.executable, "-m", "lampo.ppo_ray", "--config", str(cfg)])

    def reference() -> list[dict]:
        done = whole.finish()
        assert done.returncode == 0, done.stderr[-3000:]
        rows = trained(tmp / "whole")
        assert len(rows) == 3
        return rows

    try:
        yield cfg, reference
    finally:
        whole.stop()


@pytest.mark.usefixtures("cluster")
def test_two_learners_a_learner_killed_then_resumed_equals_the_uninterrupted_run(tmp_path, tiny_model_path,
                                                                                 two_learners):
    """Learner rank 1 dies in step 3: rank 0 writes the checkpoint of step 2 on its own (with the
    batch being trained), the run stops, and the resumed run's step 3 is the uninterrupted run's."""
    cfg, reference = two_learners
    common = {k: v for k, v in TWO_LEARNERS.items() if k not in ("reward_model", "report_to")}
    cut = tmp_path / "cut"
    trainer = RayTrainer(driver_config(tmp_path, tiny_model_path, output_dir=str(cut), **common))
    learn = trainer.group.learn
    calls = []

    def learn_and_lose_rank_1(batch, *args, **kwargs):
        calls.append(len(batch))
        if len(calls) == 3:
            ray.kill(trainer.group.workers[1], no_restart=True)
        return learn(batch, *args, **kwargs)

    trainer.group.learn = learn_and_lose_rank_1
    try:
        with pytest.raises(RunStopped, match=r"(?s)rank\(s\) \[1\] of 2 died.*rank 0 saved checkpoint"):
            trainer.train()
    finally:
        trainer.close()
    state = json.loads((cut / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["processes"] == 2

    resumed = run_module("lampo.ppo_ray", cfg, "--output_dir", str(cut), "--resume_from_checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = reference()
    assert_same_steps(whole[:2], trained(cut)[:2])
    assert_same_steps(whole[2:], [r for r in trained(cut) if r["step"] == 3])


def test_a_deepspeed_zero3_learner_group_trains_as_the_ddp_one(tmp_path, two_learners):
    """learner_backend: deepspeed (ZeRO-3 over the two learners, weights gathered for every sync and
    save) gives the data-parallel group's numbers."""
    cfg, reference = two_learners
    out = tmp_path / "zero3"
    done = run_module("lampo.ppo_ray", cfg, "--output_dir", str(out), "--learner_backend", "deepspeed",
                      "--deepspeed_config", str(ROOT / "configs" / "ds_z3_config.json"), "--save_step", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_steps(reference(), trained(out), rel=1e-3)
    assert (out / "model.safetensors").exists() and (out / "checkpoint-3" / "deepspeed").is_dir()


def test_batches_sampled_too_long_ago_are_rolled_out_again(tmp_path, tiny_model_path):
    """A checkpoint of an asynchronous run holds the next batch, sampled one update ago; resumed
    on-policy (async_mode: false) that batch is too stale and is rolled out again, not trained on."""
    cfg = write_config(tmp_path, tiny_model_path, reward_model="lampo.reward.rules.VowelReward", report_to=[],
                       async_mode=True, max_steps=2, save_step=1)
    first = run_module("lampo.ppo_vllm", cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    again = tmp_path / "again"
    shutil.copytree(run_dir / "checkpoint-1", again / "checkpoint-1")
    resumed = run_module("lampo.ppo_vllm", cfg, "--output_dir", str(again), "--resume_from_checkpoint", "auto",
                         "--async_mode", "false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step2 = [r for r in trained(again) if r["step"] == 2][0]
    assert step2["data/regenerated_groups"] == 4 and step2["policy/version_lag"] == 0.0


@pytest.mark.usefixtures("cluster")
def test_a_reward_that_fails_for_good_stops_the_run_with_a_checkpoint(tmp_path, tiny_model_path):
    """As in ppo_vllm: the retries are the scorer's; once it gives up, the learners write a checkpoint
    of the steps trained so far and the run stops. No step is trained on a made-up reward."""
    from lampo.reward import RewardError

    cfg = driver_config(tmp_path, tiny_model_path, max_staleness=1, max_steps=4)
    trainer = RayTrainer(cfg)
    score, calls = trainer.scorer.score, []

    def score_then_fail(messages):
        calls.append(len(messages))
        if len(calls) > 4:  # the parts of steps 1 and 2 are scored; step 3's fail
            raise RewardError("the reward server is gone")
        return score(messages)

    trainer.scorer.score = score_then_fail
    try:
        with pytest.raises(RunStopped, match="none of them on a made-up reward"):
            trainer.train()
    finally:
        trainer.close()
    out = Path(cfg.train.output_dir)
    assert [r["step"] for r in trained(out)] == [1, 2]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2


@pytest.fixture(scope="module")
def two_node_cluster():
    """docs/ray.md's multi-node commands on this machine: a head and a second node, one CPU each, on
    loopback, with token authentication on both (a token of the test's own, in a file named by
    RAY_AUTH_TOKEN_PATH). Yields (address, the environment a driver needs); stops only the
    processes of its own temp dir."""
    import os
    import secrets
    import tempfile

    from lampo.distributed.ray.cluster import free_port

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = Path(temp) / "token"
    token.write_text(secrets.token_hex(32))
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        for args in (["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                     [f"--address=127.0.0.1:{port}"]):
            done = subprocess.run([ray_cli, "start", *args, *common], capture_output=True, text=True, timeout=120,
                                  env={**os.environ, **auth, "LAMPO_TEST_RAY_CLUSTER": temp})
            assert done.returncode == 0, done.stderr[-3000:]
        for _ in range(60):  # the second node registers with the head a moment after `ray start` returns
            status = subprocess.run([ray_cli, "status", f"--address=127.0.0.1:{port}"], env={**os.environ, **auth},
                                    capture_output=True, text=True, timeout=60)
            if "0.0/2.0 CPU" in status.stdout and status.stdout.count(" node_") == 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the two-node cluster did not come up:\n{status.stdout}{status.stderr}")
        yield f"127.0.0.1:{port}", auth
    finally:
        _kill_processes_started_with(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_processes_started_with(marker: str) -> None:
    """Kill every process whose environment holds `marker` (the cluster's temp dir, in a variable of
    the test's own, which `ray start` passes on to what it starts), and their descendants (the
    raylets' agents get an environment of their own). `ray stop` would stop every Ray cluster on
    the machine."""
    import os
    import signal

    parents: dict[int, int] = {}
    marked: set[int] = set()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                marked.add(pid)
        except (OSError, IndexError, ValueError):
            continue
    doomed, grew = set(marked), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        doomed |= more
        grew = bool(more)
    for pid in doomed - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("weight_sync", ["object_store", "broadcast"])
def test_a_run_joins_a_two_node_cluster_its_worker_and_learner_on_different_nodes(tmp_path, tiny_model_path,
                                                                                 weight_sync, two_node_cluster):
    """The multi-node path: `python -m lampo.ppo_ray --address` of a cluster `ray start` made, with
    its token. Each node has one CPU and the worker and the learner take one each, so they run on
    different nodes, and the weights cross between the nodes' object stores (or over the broadcast
    group's TCP links)."""
    import os

    address, auth = two_node_cluster
    cfg = write_config(tmp_path, tiny_model_path, reward_model="lampo.reward.rules.VowelReward", max_staleness=0,
                       weight_sync=weight_sync, report_to=[])
    done = subprocess.run([sys.executable, "-m", "lampo.ppo_ray", "--config", str(cfg), "--address", address],
                          capture_output=True, text=True, timeout=600, env={**env(), **auth}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = trained(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["ray/weight_broadcast"] == float(weight_sync == "broadcast")
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert os.environ.get("RAY_AUTH_TOKEN_PATH") is None  # the cluster's token went to the driver only
