"""docs/reward-server.md shows examples/my_reward_model.py exactly, and that example works."""

from __future__ import annotations

import asyncio
import importlib.util
import re
from pathlib import Path

from lampo.reward_model import check_scores

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "my_reward_model.py"
DOC = ROOT / "docs" / "reward-server.md"


def load_example():
    spec = importlib.util.spec_from_file_location("my_reward_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_show_the_example_file_exactly():
    text = DOC.read_text()
    match = re.search(r"`examples/my_reward_model\.py`:\n\n```python\n(.*?)```\n", text, re.S)
    assert match, "docs/reward-server.md must show examples/my_reward_model.py in a ```python block"
    assert match.group(1) == EXAMPLE.read_text()


def test_example_scores_the_design_doc_example():
    model = load_example().MyRewardModel({"any_user_key": 1})
    assert model.is_loaded and model.config == {"any_user_key": 1}
    # "Hello": e, o among H, e, l, l, o -> 2/5 = 0.4; "Hi", "Hey" -> "Hey" 1/3
    scores = asyncio.run(model.compute([["Hi", "Hello"], ["Yo", "Hey"]]))
    assert check_scores(scores, [["Hi", "Hello"], ["Yo", "Hey"]]) == [0.4, 1 / 3]
    model.unload()
    assert not model.is_loaded
