"""lm_ppo's basic example (design document 004, its README) running on Lampo.

    python examples/lm_ppo_basic.py [--model DIR] [--steps N] [key=value ...]

The README's code comes first, with `from lampo.compat.lm_ppo import` for lm_ppo's two imports
and a tiny GPT-2 built offline (`lampo tiny-model --arch gpt2`) for the hub's 'gpt2'. Then, as the
README's "Advanced example" trains with a sentiment model, `--steps N` more steps train the same
trainer with the same calls on a rule reward (vowels and spaces in the response: a stand-in for
the hub's classifier) and print each step's mean reward. `key=value` pairs (the README's
`ppo_config` names or any Lampo config key) are added to `ppo_config`.
"""

import argparse
import json
from pathlib import Path

from lampo.config import parse_overrides

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="a local GPT-2 (default: a tiny one built offline)")
parser.add_argument("--steps", type=int, default=0, help="training steps after the README's one (default 0)")
args, rest = parser.parse_known_args()
if args.model is None:
    from lampo.testing import build_tiny_model

    args.model = str(build_tiny_model(HERE.parent / "build" / "tiny-gpt2", arch="gpt2"))

# --------------------------------------------------------------------------------------------
# The README's basic example (only the import path and the model's location differ)
# --------------------------------------------------------------------------------------------
# imports
import torch  # noqa: E402
from transformers import GPT2Tokenizer  # noqa: E402

from lampo.compat.lm_ppo import GPT2HeadWithValueModel, PPOTrainer, respond_to_batch  # noqa: E402

# get models
gpt2_model = GPT2HeadWithValueModel.from_pretrained(args.model)
gpt2_model_ref = GPT2HeadWithValueModel.from_pretrained(args.model)
gpt2_tokenizer = GPT2Tokenizer.from_pretrained(args.model)

# initialize trainer
ppo_config = {'batch_size': 1, 'forward_batch_size': 1}
ppo_config.update(parse_overrides(rest))  # local: the command line's key=value
ppo_trainer = PPOTrainer(gpt2_model, gpt2_model_ref, **ppo_config)

# encode a query
query_txt = "This morning I went to the "
query_tensor = gpt2_tokenizer.encode(query_txt, return_tensors="pt")

# get model response
response_tensor  = respond_to_batch(gpt2_model, query_tensor, pad_token_id=gpt2_tokenizer.eos_token_id)
response_txt = gpt2_tokenizer.decode(response_tensor[0,:])

# define a reward for response
reward = torch.tensor([1.0]) # this could be any reward such as a human or another model

# train model with ppo
train_stats = ppo_trainer.step(query_tensor, response_tensor, reward)

# --------------------------------------------------------------------------------------------
# More steps with the same calls, on a rule reward (the README's advanced example uses a classifier)
# --------------------------------------------------------------------------------------------
def rule_reward(text):
    """Vowels and spaces in the response over 40, capped at 1 (a random tiny model scores about 0.4)."""
    return min(1.0, sum(c in "aeiou " for c in text) / 40)


batch_size = ppo_trainer.ppo_params["batch_size"]
queries = query_tensor.repeat(batch_size, 1)
for step in range(args.steps):
    responses = respond_to_batch(gpt2_model, queries, txt_len=12, pad_token_id=gpt2_tokenizer.eos_token_id)
    rewards = torch.tensor([rule_reward(gpt2_tokenizer.decode(r)) for r in responses])
    stats = ppo_trainer.step(queries, responses, rewards)
    print(json.dumps({"step": step + 1, "reward": rewards.mean().item(), "kl": stats["objective/kl"]}), flush=True)
