"""A reward model for Lampo: the share of letters in the response that are vowels.

Start the reward server from the folder that holds this file:
    python -m lampo.reward_server --model my_reward_model.MyRewardModel --config my_config.yaml
"""

from lampo.reward_model import RewardModelTemplate


class MyRewardModel(RewardModelTemplate):
    def __init__(self, config):
        # config: the parsed YAML file given to the server (a dict), kept as self.config.
        super().__init__(config)
        self.load()

    def load(self):
        # Load weights, tokenizers or word lists here: once, before the first compute.
        self.vowels = set("aeiouAEIOU")

    def unload(self):
        # Free them here: called once when the server stops.
        self.vowels = None

    def score(self, text):
        letters = [c for c in text if c.isalpha()]
        return sum(c in self.vowels for c in letters) / len(letters) if letters else 0.0

    async def compute(self, messages):
        # messages: one list per conversation, [user_1, assistant_1, user_2, assistant_2, ...].
        # [["Hi", "Hello"]] -> [0.4]: "Hello" has 2 vowels among 5 letters.
        # For one score per assistant turn, return a list per conversation instead:
        #     return [[self.score(turn) for turn in conversation[1::2]] for conversation in messages]
        return [self.score(conversation[-1]) for conversation in messages]
