"""The learner under DeepSpeed, driven by tests/integration/test_deepspeed.py.

    torchrun --nproc_per_node 2 deepspeed_worker.py <tiny-model> <out.pt> --stage 2|3
    python deepspeed_worker.py <tiny-model> <out.pt>            # one process, the plain path

Every run trains the same global batch: with 2 processes each rank takes its half of the rows
(its own minibatch of 4, 2 micro-batches), alone the one process takes all 8 rows (one minibatch
of 8, 4 micro-batches), so every micro-batch has 2 rows either way. Rank 0 (or the one process)
saves what each scenario ended with into <out.pt>; the test compares the files.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

from lampo import checkpoint as ckpt
from lampo.config import LampoConfig
from lampo.distributed.strategy import Strategy
from lampo.optimize.learner import Learner, TrainBatch, TrainingDiverged
from lampo.optimize.models import prepare_policy
from lampo.rollout.weight_sync import engine_weights

ROWS = 8


def config(world: int, **kw) -> LampoConfig:
    rows = ROWS // world
    values = dict(
        estimator="gae", batch_size=rows, mini_batch_size=rows, gradient_accumulation_steps=rows // 2,
        ppo_epochs=2, max_steps=3, seed=0, max_new_tokens=8,
        learning_rate=3e-3, critic_learning_rate=1e-2, lr_scheduler_type="linear", warmup_ratio=0.3,
        # clipping is active: the first steps' gradient norms are several times this
        max_grad_norm=0.5,
        # Adam divides by sqrt(v) + eps: with eps 1e-8 a gradient entry near 0 turns a rounding
        # difference between the reduction orders into a step of up to lr; 1e-4 keeps the update
        # a smooth function of the gradient, so equal gradients give equal weights within 1e-5.
        adam_eps=1e-4,
        kl_coef=0.05, whiten_advantages=False, whiten_rewards=False, non_stop_penalty=False,
        onednn_linear=False,
    )
    values.update(kw)
    return LampoConfig.from_dict(values)


def batches(steps: int, nan_step: int | None) -> list[TrainBatch]:
    """ROWS conversations per step, ragged; with `nan_step`, row 5's score (rank 1's half) is NaN."""
    g = torch.Generator().manual_seed(7)
    out = []
    for step in range(steps):
        prompt = torch.randint(5, 9, (ROWS,), generator=g)
        answer = torch.randint(1, 9, (ROWS,), generator=g)
        T = int((prompt + answer).max())
        ids = torch.randint(4, 1000, (ROWS, T), generator=g)
        attention = torch.zeros(ROWS, T, dtype=torch.long)
        action = torch.zeros(ROWS, T, dtype=torch.bool)
        placed = torch.zeros(ROWS, T)
        scores = torch.rand(ROWS, generator=g)
        for i in range(ROWS):
            p, a = int(prompt[i]), int(answer[i])
            attention[i, : p + a] = 1
            action[i, p : p + a] = True
            placed[i, p + a - 1] = scores[i]
        ids = ids * attention
        if step == nan_step:
            placed[5, int(prompt[5] + answer[5]) - 1] = float("nan")
        out.append(TrainBatch(ids, attention, action, placed, scores, torch.ones(ROWS, dtype=torch.bool)))
    return out


def half(batch: TrainBatch, rank: int, world: int) -> TrainBatch:
    n = ROWS // world
    return batch.select(torch.arange(rank * n, (rank + 1) * n))


def learner(model_path: str, cfg: LampoConfig, strategy: Strategy, policy_dir: str | None = None,
            value_dir: str | None = None) -> Learner:
    from transformers import AutoModelForCausalLM

    from lampo.optimize.models import ValueModel

    torch.manual_seed(0)  # the value head's and LoRA's initialisation
    policy = AutoModelForCausalLM.from_pretrained(policy_dir or model_path, dtype=torch.float32)
    policy = prepare_policy(policy, cfg.model)
    value = ValueModel.from_pretrained(value_dir) if value_dir else None
    # resumed: the reference is still the model the run started from (as Trainer._load_models)
    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32) if policy_dir else None
    return Learner(cfg, policy, ref_model=ref, value_model=value, strategy=strategy,
                   num_training_steps=cfg.num_steps)


def weights(ln: Learner) -> dict[str, torch.Tensor]:
    """Every trained weight, whole (gathered under ZeRO-3: call on every rank)."""
    out = {}
    with ln.full_weights():
        for prefix, m in (("policy.", ln.unwrapped_policy()), ("value.", ln.unwrapped_value_model()),
                          ("head.", ln.value_head)):
            if m is not None:
                out.update({prefix + k: v.detach().float().clone() for k, v in m.named_parameters()})
    return out


def train(ln: Learner, data: list[TrainBatch], rank: int, world: int) -> list[dict]:
    return [ln.train(half(b, rank, world)) for b in data]


def from_every_rank(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def greedy(engine, prompts, stop: int) -> list[list[int]]:
    from lampo.rollout.engines import SamplingSettings

    gens = engine.generate(prompts, SamplingSettings(temperature=0.0, max_new_tokens=12, stop_token_ids=[stop]))
    return [g[0].token_ids for g in gens]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--stage", type=int, default=0, help="ZeRO stage; 0: one process, the plain path")
    args = ap.parse_args()
    if args.stage:
        from lampo.distributed.deepspeed_zero import DeepSpeedStrategy

        # as configs/ds_z2_offload_config.json (stage 2: the optimiser state offloaded to the CPU)
        # and configs/ds_z3_config.json, with the precision left to Lampo's bf16 key (fp32 here)
        zero = ({"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                 "contiguous_gradients": True, "reduce_bucket_size": "auto"} if args.stage == 2 else
                {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
                 "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"})
        ds = {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
              "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto"}
        make = lambda: DeepSpeedStrategy(ds, source=f"zero{args.stage}")  # noqa: E731
    else:
        make = Strategy
    strategy = make()
    rank, world = strategy.rank, strategy.world
    results: dict = {}

    # 1. a separate critic (gae): 3 steps, the second with a NaN score in rank 1's half; then
    #    that batch again with max_bad_steps 1
    cfg = config(world)
    ln = learner(args.model, cfg, strategy)
    initial = weights(ln)
    data = batches(3, nan_step=1)
    stats, after = [], []
    for b in data:
        stats.append(ln.train(half(b, rank, world)))
        after.append(weights(ln))
    unchanged = max((after[1][k] - after[0][k]).abs().max().item() for k in after[0])
    ln.opt_cfg.max_bad_steps = 1
    try:
        ln.train(half(data[1], rank, world))
        diverged = False
    except TrainingDiverged:
        diverged = True
    results["critic"] = {"initial": initial, "weights": after[-1], "lr": [s["lr"] for s in stats],
                         "skipped": from_every_rank([s["optim/skipped_steps"] for s in stats], world),
                         "step_2_change": from_every_rank(unchanged, world),
                         "diverged": from_every_rank(diverged, world)}

    # 2. a value head on the policy trunk
    cfg_head = config(world, value_model="head")
    ln = learner(args.model, cfg_head, make())
    initial = weights(ln)
    train(ln, batches(2, None), rank, world)
    results["head"] = {"initial": initial, "weights": weights(ln)}

    if args.stage:
        # 3. checkpoint after step 1, resume in a new engine, step 2: as the uninterrupted run
        data = batches(2, None)
        first = learner(args.model, cfg, make())
        first.train(half(data[0], rank, world))
        staged = Path(strategy.broadcast_object(
            ckpt.stage_checkpoint(Path(args.out).parent / "checkpoints", 1) if rank == 0 else None))
        shards = first.save_shards(staged)
        strategy.barrier()
        with first.full_weights():
            if rank == 0:
                path = ckpt.save_checkpoint(staged.parent, 1, models={"policy": first.unwrapped_policy(),
                                                                      "value_model": first.unwrapped_value_model()},
                                            states={"learner": first.state_dict()}, staged=staged, shards=shards)
        path = Path(strategy.broadcast_object(str(path) if rank == 0 else None))
        resumed = learner(args.model, cfg, make(), policy_dir=str(path / "policy"),
                          value_dir=str(path / "value_model"))
        resumed.load_state_dict(ckpt.load_checkpoint(path)[0]["learner"])
        resumed.load_shards(path)
        fresh = learner(args.model, cfg, make(), policy_dir=str(path / "policy"), value_dir=str(path / "value_model"))
        for ln_ in (first, resumed, fresh):
            ln_.train(half(data[1], rank, world))
        results["resume"] = {"uninterrupted": weights(first), "resumed": weights(resumed),
                             "fresh_optimiser": weights(fresh),
                             "engine_files": sorted(os.listdir(path / "deepspeed" / "engine"))}

    # 4. LoRA: the adapter trains, the reference is the base with the adapter disabled
    cfg_lora = config(world, use_peft=True, lora_r=4, lora_alpha=8, learning_rate=2e-2)
    ln = learner(args.model, cfg_lora, make())
    initial = weights(ln)
    train(ln, batches(2, None), rank, world)
    results["lora"] = {"initial": initial, "weights": weights(ln)}
    if args.stage == 3:  # the adapter and the merged model, saved from the gathered weights
        out_dir = Path(args.out).parent / "lora"
        policy = ln.unwrapped_policy()
        with ln.full_weights(policy):
            if rank == 0:
                policy.save_pretrained(out_dir / "adapter")
                copy.deepcopy(policy).merge_and_unload().save_pretrained(out_dir / "merged")
        results["lora"]["saved"] = str(out_dir)

    if args.stage:
        # 5. weight sync: the engine's greedy output after a sync equals the trained model's
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lampo.rollout.engines import HFEngine

        tok = AutoTokenizer.from_pretrained(args.model)
        engine = HFEngine(args.model, tok)
        stop = tok.convert_tokens_to_ids("<|im_end|>")
        prompts = [tok(t).input_ids for t in ("Hello there", "Why is the sky blue?")]
        before = greedy(engine, prompts, stop)
        ln = learner(args.model, config(world, learning_rate=3e-2, max_grad_norm=0.0), make())
        train(ln, batches(2, None), rank, world)
        policy = ln.unwrapped_policy()
        with ln.full_weights(policy):
            engine.update_weights(engine_weights(policy))
            reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            reference.load_state_dict({k: v.detach().clone() for k, v in policy.state_dict().items()})
        reference.eval()
        want = []
        for p in prompts:
            out = reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                     eos_token_id=stop, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
        results["sync"] = {"before": before, "after": greedy(engine, prompts, stop), "transformers": want,
                           "partitioned_numel": sum(p.numel() for p in policy.parameters()),
                           "full_numel": sum(p.numel() for p in reference.parameters())}

    if rank == 0:
        torch.save(results, args.out)
    strategy.close()


if __name__ == "__main__":
    sys.exit(main())
