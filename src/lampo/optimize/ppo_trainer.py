"""The library API, in the style of the design documents (TRL's classic PPOTrainer loop):

    from lampo import PPOConfig, PPOTrainer
    trainer = PPOTrainer(config, model, tokenizer, ref_model=None)
    responses = trainer.generate(query_tensors, max_new_tokens=16)
    stats = trainer.step(query_tensors, responses, scores)
    trainer.save_model("out/")

TRL-classic's way works too (lampo.compat.trl, docs/compat.md): keyword arguments with a dataset,
`trainer.dataloader`, transformers' generation keywords, `log_stats`, and a model with a value
head (`AutoModelForCausalLMWithValueHead`), whose head is then the critic.

The training application (`lampo.ppo_vllm`) uses the same Learner with its own rollout engine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lampo.compat import trl
from lampo.compat.value_head import save_value_head, split_value_head
from lampo.config import LampoConfig
from lampo.optimize import maths as M
from lampo.optimize.batch import Sampling, TrainBatch, build_train_batch
from lampo.optimize.learner import Learner
from lampo.optimize.models import is_peft_model, prepare_policy
from lampo.optimize.ptx import ptx_batch
from lampo.rollout.batch import left_pad


class PPOTrainer:
    """Generate with the policy, then `step` on (queries, responses, scores)."""

    def __init__(
        self,
        config: LampoConfig | None = None,
        model: nn.Module | None = None,
        tokenizer=None,
        ref_model: nn.Module | None = None,
        value_model: nn.Module | None = None,
        num_training_steps: int | None = None,
        *,
        train_dataset=None,
        dataset=None,
        data_collator=None,
    ):
        # TRL-classic's positional order is (config, model, ref_model, tokenizer, dataset)
        if isinstance(tokenizer, nn.Module) and not isinstance(ref_model, nn.Module):
            tokenizer, ref_model = ref_model, tokenizer
        if config is None or model is None or tokenizer is None:
            raise TypeError("PPOTrainer needs config, model and tokenizer")
        if train_dataset is not None and dataset is not None:
            raise TypeError("give the dataset once: train_dataset= or dataset=")
        # A model with a value head (TRL-classic): its trunk is the policy and its head the critic.
        self.value_head_model = model if split_value_head(model)[1] is not None else None
        model, head = split_value_head(model)
        ref_model = split_value_head(ref_model)[0] if ref_model is not None else None
        if head is not None:
            config = trl.classic_settings(config)
        self.config = config
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token before building PPOTrainer")
        # Seed first: LoRA and value-head initialisation draw from torch's global generator.
        torch.manual_seed(config.train.seed)
        self.model = prepare_policy(model, config.model)
        ptx = ptx_batch(config, tokenizer)
        self.learner = Learner(
            config, self.model, ref_model=ref_model, value_model=value_model, num_training_steps=num_training_steps,
            ptx=ptx,
        )
        if self.value_head_model is not None:
            self.value_head_model.pretrained_model = self.model  # the LoRA-wrapped policy, with use_peft
            if self.learner.value_head is not None:
                # one head: the learner trains the model's own head (loaded weights included)
                self.learner.value_head.load_state_dict(head.state_dict())
                self.value_head_model.v_head = self.learner.value_head
        self.stop_token_id = _stop_token_id(tokenizer, config.generation.stop_token)
        g = config.generation
        self.sampling = Sampling(g.temperature, g.top_k, g.top_p)
        """How the last `generate` call sampled (the config's before any): `step` trains under it."""
        self.dataset = train_dataset if train_dataset is not None else dataset
        self.dataloader = None
        """With a dataset: its rows in shuffled batches of `batch_size` (TRL-classic's, lampo.compat.trl)."""
        if self.dataset is not None:
            self.dataloader = trl.make_dataloader(self.dataset, config.optim.batch_size, config.train.seed,
                                                  data_collator)
        self.tracker = None
        """The trackers `log_stats` writes to (lampo.tracking.Tracker), opened by its first call."""

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self, query_tensors: list[torch.Tensor] | torch.Tensor, return_logprobs: bool = False, **overrides
    ) -> list[torch.Tensor] | torch.Tensor | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sample one response per query (1-D LongTensors, prompt not included).

        Queries are left-padded into one batch (open-instruct detail 1). Responses are cut
        after the stop token. With `return_logprobs`, also the sampling log-probs of each
        response token under the sampling distribution (temperature, then top-k and top-p).
        Keywords: max_new_tokens, min_new_tokens, temperature, top_p, top_k, do_sample,
        repetition_penalty, and any other transformers generation keyword (`min_length`,
        `pad_token_id`, `eos_token_id`, ...); TRL's `return_prompt` (default False: the prompt is
        left out, as `step` wants it), `batch_size` (queries per call) and `length_sampler`.
        One 1-D query gives one [1, length] tensor, as TRL's single-query form did.
        """
        single = isinstance(query_tensors, torch.Tensor) and query_tensors.dim() == 1
        queries = [query_tensors] if single else list(query_tensors)
        call = trl.generate_call(self.config.generation, self.tokenizer.pad_token_id, self.stop_token_id, overrides)
        # `step` recomputes log-probs under the distribution the responses came from
        self.sampling = Sampling(call.temperature, call.top_k, call.top_p)
        chunk = call.chunk or max(len(queries), 1)
        responses, logprobs = [], []
        for start in range(0, len(queries), chunk):
            if call.length_sampler is not None:
                call.hf_kwargs["max_new_tokens"] = int(call.length_sampler())
            r, lp = self._generate_batch(queries[start : start + chunk], call, return_logprobs)
            responses += r
            logprobs += lp
        if call.return_prompt:
            responses = [torch.cat([q.to(r.dtype), r]) for q, r in zip(queries, responses, strict=True)]
        if single:
            return responses[0][None]
        return (responses, logprobs) if return_logprobs else responses

    def _generate_batch(self, query_tensors: list[torch.Tensor], call: trl.GenerateCall, return_logprobs: bool):
        input_ids, attention = left_pad(query_tensors, call.pad_token_id)
        width = input_ids.shape[1]
        model = self.learner.unwrapped_policy()
        model.eval()
        out = model.generate(
            input_ids=input_ids.to(self.learner.device),
            attention_mask=attention.to(self.learner.device),
            eos_token_id=call.stop_token_id,
            pad_token_id=call.pad_token_id,
            return_dict_in_generate=True,
            output_logits=return_logprobs,
            **call.hf_kwargs,
        )
        generated = out.sequences[:, width:].to(input_ids.device)
        responses, logprobs = [], []
        for i in range(len(query_tensors)):
            row = generated[i]
            stop = (row == call.stop_token_id).nonzero()
            end = int(stop[0]) + 1 if len(stop) else len(row)
            responses.append(row[:end].clone())
            if return_logprobs:
                logits = torch.stack([step_logits[i] for step_logits in out.logits[:end]]).to(row.device)
                logprobs.append(M.logprobs_and_entropy(logits, row[:end], call.temperature, False,
                                                       call.top_k, call.top_p)[0])
        return responses, logprobs

    # ------------------------------------------------------------------ optimisation
    def step(
        self,
        query_tensors: list[torch.Tensor],
        response_tensors: list[torch.Tensor],
        scores: list[float] | list[torch.Tensor],
        response_masks: list[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One PPO step; `response_masks` (optional, per sample, 1 = train this token) lets a
        multi-turn response be trained on its assistant turns only. Scores: floats, or 0-d or
        one-element tensors (TRL's rewards). Returns flat metrics."""
        batch = self.make_batch(query_tensors, response_tensors, scores, response_masks)
        return self.learner.train(batch)

    def log_stats(self, stats: dict, batch: dict, rewards, columns_to_log=("query", "response")) -> None:
        """TRL-classic's logging: `stats` to the configured trackers (metrics.jsonl, TensorBoard,
        W&B: `report_to`, in `output_dir`) and a table of the batch's query, response and reward."""
        trl.log_stats(self, stats, batch, rewards, tuple(columns_to_log))

    def make_batch(self, queries, responses, scores, response_masks=None) -> TrainBatch:
        """Queries and responses right-padded into one batch, each score on its response's last
        trained token (`build_train_batch`)."""
        queries, responses = [_flat(q) for q in queries], [_flat(r) for r in responses]
        n = len(queries)
        if not (len(responses) == n and len(scores) == n):
            raise ValueError(f"got {n} queries, {len(responses)} responses and {len(scores)} scores: they must match")
        if response_masks is not None and len(response_masks) != n:
            raise ValueError(f"got {len(response_masks)} response_masks for {n} responses")
        seq_len = max(max(len(q) + len(r) for q, r in zip(queries, responses, strict=True)), 2)
        ids = torch.full((n, seq_len), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, seq_len), dtype=torch.long)
        action = torch.zeros((n, seq_len), dtype=torch.bool)
        ends: list[list[int]] = []
        for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
            lq, lr = len(q), len(r)
            ids[i, :lq] = q
            ids[i, lq : lq + lr] = r
            attention[i, : lq + lr] = 1
            if response_masks is not None:
                m = response_masks[i].bool()
                if len(m) != lr:
                    raise ValueError(f"response_masks[{i}] has {len(m)} entries for a response of {lr} tokens")
                action[i, lq : lq + lr] = m
            else:
                action[i, lq : lq + lr] = True
            trained = action[i].nonzero()
            # An empty response has no action: its score lands nowhere and it takes no loss.
            ends.append([int(trained[-1])] if len(trained) else [])
        stopped = torch.tensor([len(r) > 0 and int(r[-1]) == self.stop_token_id for r in responses])
        opt = self.config.optim
        return build_train_batch(
            ids, attention, action, [float(s) for s in scores], ends, stopped,
            non_stop_penalty=opt.penalty_reward_value if opt.non_stop_penalty else None,
            overlong=(self.config.generation.max_new_tokens, opt.overlong_buffer_len, opt.overlong_penalty_factor)
            if opt.overlong_buffer_len else None,
            turn_lengths=[[len(r)] if e else [] for r, e in zip(responses, ends, strict=True)],
            group_size=self.config.generation.num_generations, sampling=self.sampling,
        )

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | Path, merged: bool = False) -> Path:
        """Save the policy and tokenizer, loadable with `from_pretrained`.

        With LoRA: the adapter (load with peft), and with `merged=True` the merged full
        weights instead (load with AutoModelForCausalLM).
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.learner.unwrapped_policy()
        if is_peft_model(model) and merged:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(out)
        if self.value_head_model is not None:  # TRL-classic: the head goes with the model
            save_value_head(self.value_head_model.v_head, out)
        self.tokenizer.save_pretrained(out)
        return out


def _flat(ids: torch.Tensor) -> torch.Tensor:
    """A [1, length] tensor (TRL's single-query form) as its one row."""
    return ids.reshape(-1) if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1 else ids


def _stop_token_id(tokenizer, stop_token: str | None) -> int:
    """The end-of-turn token: `stop_token` if given (must be one token), else eos."""
    if stop_token is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token: set stop_token in the config")
        return tokenizer.eos_token_id
    ids = tokenizer.convert_tokens_to_ids(stop_token)
    if ids is None or ids == tokenizer.unk_token_id:
        raise ValueError(f"config key 'stop_token' = {stop_token!r} is not a single token of the tokenizer")
    return ids
