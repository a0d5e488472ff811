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


def test_every_test_docs_reliability_cites_exists():
    # docs/reliability.md shows each guarantee with its test: a renamed or removed test must not
    # leave the page citing one that no longer runs
    text = (ROOT / "docs" / "reliability.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text)
    cited += [(file, name) for file, name in _continued(text)]
    assert len(cited) >= 30
    for file, name in cited:
        source = (ROOT / file).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{file}::{name} is cited but does not exist"


def _continued(text: str):
    """`::name` citations that continue the file of the citation before them on the same line."""
    for line in text.splitlines():
        file = None
        for m in re.finditer(r"`(?:(tests/[\w/]+\.py))?::(\w+)", line):
            file = m.group(1) or file
            if m.group(1) is None and file:
                yield file, m.group(2)
