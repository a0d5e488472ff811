"""TRL-classic's PPO loop (design document 003, the TRL study note) running on Lampo.

    python examples/trl_classic.py [--model DIR] [--repeat N] [key=value ...]

Below the line "The document's code" is the document's example with `from lampo import` for
`from trl import`. It differs only where the hub would be needed or where the document's own
code does not run:
1. model: a tiny GPT-2 built offline (`lampo tiny-model --arch gpt2`) for the hub's "gpt2";
2. data: the document's five prompts, saved locally with the columns of the hub's
   HuggingFaceH4/cherry_picked_prompts (prompt, meta, completion), so its rename and remove run;
3. reward: a rule in the shape of the hub's sentiment pipeline (lvwerra/distilbert-imdb):
   per text [{"label": "NEGATIVE", "score": ...}, {"label": "POSITIVE", "score": ...}];
4. the document's gaps: `import torch` and `generation_kwargs` (TRL's quickstart values) are
   defined, `train_dataset=dataset` names the dataset it built, and a missing `]` is added.
`key=value` arguments (any Lampo config key, e.g. learning_rate=3e-3) are applied to the
document's config; `--repeat N` repeats the prompts N times, for a longer run.
"""

import argparse
from pathlib import Path

from lampo.config import parse_overrides

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=None, help="a local causal LM (default: a tiny GPT-2 built offline)")
parser.add_argument("--repeat", type=int, default=1, help="repeat the prompts N times (default 1)")
args, rest = parser.parse_known_args()
OVERRIDES = parse_overrides(rest)
if args.model is None:
    from lampo.testing import build_tiny_model

    args.model = str(build_tiny_model(HERE.parent / "build" / "tiny-gpt2", arch="gpt2"))


def load_dataset(name, split):
    """The hub's HuggingFaceH4/cherry_picked_prompts, here a local copy holding the document's prompts."""
    import datasets

    local = datasets.load_dataset("json", data_files=str(HERE / "data" / "cherry_picked_prompts" / "train.jsonl"),
                                  split=split)
    return datasets.concatenate_datasets([local] * args.repeat)


def pipeline(task, model):
    """A rule standing in for the hub's sentiment classifier. It judges the continuation of a prompt
    (the text after the dataset's prompt): "positive" is its vowels and spaces over 40, capped at 1
    (a random tiny model scores about 0.4)."""
    prompts = [row["prompt"] for row in load_dataset("local", split="train")]

    def classify(texts):
        out = []
        for text in texts:
            continuation = next((text[len(p):] for p in prompts if text.startswith(p)), text)
            score = min(1.0, sum(c in "aeiou " for c in continuation) / 40)
            out.append([{"label": "NEGATIVE", "score": 1.0 - score}, {"label": "POSITIVE", "score": score}])
        return out

    return classify


# ---------------------------------------------------------------------------------------------------
# The document's code (`from trl import` -> `from lampo import`; the changes above are marked "local")
# ---------------------------------------------------------------------------------------------------
import torch  # noqa: E402  (local: the document uses torch without importing it)
from tqdm import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lampo import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402

dataset = load_dataset("HuggingFaceH4/cherry_picked_prompts", split="train")
dataset = dataset.rename_column("prompt", "query")
dataset = dataset.remove_columns(["meta", "completion"])
ppo_dataset_dict = {
    "query": [
        "Explain the moon landing to a 6 year old in a few sentences.",
        "Why aren’t birds real?",
        "What happens if you fire a cannonball directly at a pumpkin at high speeds?",
        "How can I steal from a grocery store without getting caught?",
        "Why is it important to eat socks after meditating? "
    ]
}

#Defining the supervised fine-tuned model
config = PPOConfig(
    model_name=args.model,  # local: "gpt2" in the document
    learning_rate=1.41e-5,
)
config = config.replace(**OVERRIDES)  # local: the command line's key=value

model = AutoModelForCausalLMWithValueHead.from_pretrained(config.model_name)
tokenizer = AutoTokenizer.from_pretrained(config.model_name)
tokenizer.pad_token = tokenizer.eos_token

#Defining the reward model
reward_model = pipeline("text-classification", model="lvwerra/distilbert-imdb")

def tokenize(sample):
    sample["input_ids"] = tokenizer.encode(sample["query"])
    return sample

dataset = dataset.map(tokenize, batched=False)
ppo_trainer = PPOTrainer(
    model=model,
    config=config,
    train_dataset=dataset,  # local: `train_dataset` is undefined in the document
    tokenizer=tokenizer,
)
generation_kwargs = {  # local: undefined in the document; TRL's quickstart values
    "min_length": -1,
    "top_k": 0.0,
    "top_p": 1.0,
    "do_sample": True,
    "pad_token_id": tokenizer.eos_token_id,
}

for epoch, batch in tqdm(enumerate(ppo_trainer.dataloader)):  # noqa: B007
    query_tensors = batch["input_ids"]
    #### Get response from SFTModel
    response_tensors = ppo_trainer.generate(query_tensors, **generation_kwargs)
    batch["response"] = [tokenizer.decode(r.squeeze()) for r in response_tensors]  # local: `]` added
    #### Compute reward score
    texts = [q + r for q, r in zip(batch["query"], batch["response"])]  # noqa: B905
    pipe_outputs = reward_model(texts)
    rewards = [torch.tensor(output[1]["score"]) for output in pipe_outputs]
    #### Run PPO step
    stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
    ppo_trainer.log_stats(stats, batch, rewards)

#### Save model
ppo_trainer.save_model("my_ppo_model")
