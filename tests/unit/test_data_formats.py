"""Prompt formats: multi-step columns, PaddleNLP src/tgt, messages, and every malformed case."""

from __future__ import annotations

import pytest

from lampo.data import DataFormatError, PromptRow, detect_format, parse_rows
from lampo.data.formats import text_columns


def test_multistep_columns_in_step_order():
    cols = ["text2", "id", "text", "text10", "text1", "text3", "text4", "text5", "text6", "text7", "text8", "text9"]
    assert text_columns(cols) == ["text"] + [f"text{i}" for i in range(1, 11)]


def test_multistep_rows_and_early_end():
    cols = ["text", "text1", "text2"]
    recs = [
        {"text": "a", "text1": "b", "text2": "c"},
        {"text": "d", "text1": "e", "text2": ""},  # ends after two steps
        {"text": "f", "text1": None, "text2": None},  # one step
        {"text": "g", "text1": "  ", "text2": None},  # whitespace is empty too
    ]
    rows = parse_rows(recs, cols)
    assert rows == [
        PromptRow(0, ("a", "b", "c")),
        PromptRow(1, ("d", "e")),
        PromptRow(2, ("f",)),
        PromptRow(3, ("g",)),
    ]


def test_paddlenlp_rows():
    recs = [
        {"src": ["Hi", "And Paris?"], "tgt": ["Hello!"]},
        {"src": ["Only one"], "tgt": []},
        {"src": "A plain string is one user turn", "tgt": None},
    ]
    rows = parse_rows(recs, ["src", "tgt"])
    assert rows[0] == PromptRow(0, ("And Paris?",), (("user", "Hi"), ("assistant", "Hello!")), "paddlenlp")
    assert rows[1] == PromptRow(1, ("Only one",), (), "paddlenlp")
    assert rows[2].steps == ("A plain string is one user turn",)


def test_messages_rows():
    recs = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]},
        {"messages": [{"role": "user", "content": "Q"}]},
    ]
    rows = parse_rows(recs, ["messages"])
    assert rows[0] == PromptRow(0, ("U2",), (("system", "S"), ("user", "U1"), ("assistant", "A1")), "messages")
    assert rows[1] == PromptRow(1, ("Q",), (), "messages")


def test_detect_format():
    assert detect_format(["text", "text1"]) == "multistep"
    assert detect_format(["src", "tgt"]) == "paddlenlp"
    assert detect_format(["messages", "id"]) == "messages"
    with pytest.raises(DataFormatError, match=r"columns \['prompt'\] match no prompt format"):
        detect_format(["prompt"])


@pytest.mark.parametrize(
    ("cols", "rec", "match"),
    [
        # multi-step
        (["text", "text2"], {"text": "a", "text2": "b"}, r"column 'text2' found but 'text1' is missing"),
        (["text", "text1"], {"text": "", "text1": "b"}, r"train row 0, column 'text': the first step is empty"),
        (["text", "text1"], {"text": None, "text1": "b"}, r"row 0, column 'text': the first step is empty"),
        (["text", "text1"], {"text": 7, "text1": "b"}, r"row 0, column 'text': expected a string, found int 7"),
        (["text", "text1"], {"text": "a", "text1": ["b"]}, r"column 'text1': expected a string, found list"),
        (["text", "text1", "text2"], {"text": "a", "text1": "", "text2": "c"},
         r"row 0, column 'text2': filled after the empty cell 'text1'"),
        # PaddleNLP
        (["src", "tgt"], {"src": ["a", "b"], "tgt": []}, r"column 'tgt': has 0 turns but 'src' has 2.*len\(tgt\) == len\(src\) - 1"),
        (["src", "tgt"], {"src": ["a"], "tgt": ["x"]}, r"column 'tgt': has 1 turns but 'src' has 1"),
        (["src", "tgt"], {"src": [], "tgt": []}, r"column 'src': empty"),
        (["src", "tgt"], {"src": None, "tgt": []}, r"column 'src': expected a list of strings \(user turns\), found NoneType"),
        (["src", "tgt"], {"src": ["a", 3], "tgt": ["x"]}, r"column 'src'\[1\]: expected a string, found int"),
        (["src", "tgt"], {"src": ["a", "b"], "tgt": 5}, r"column 'tgt': expected a list of strings \(assistant turns\)"),
        # messages
        (["messages"], {"messages": []}, r"column 'messages': expected a non-empty list"),
        (["messages"], {"messages": "hi"}, r"column 'messages': expected a non-empty list"),
        (["messages"], {"messages": [{"role": "user"}]}, r"'messages'\[0\]: expected \{'role': str, 'content': str\}"),
        (["messages"], {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
         r"'messages'\[1\]: role 'user' where 'assistant' was expected"),
        (["messages"], {"messages": [{"role": "assistant", "content": "a"}]}, r"'messages'\[0\]: role 'assistant' where 'user'"),
        (["messages"], {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
         r"'messages'\[1\]: role 'system' where 'assistant'"),
        (["messages"], {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         r"the last message has role 'assistant'; it must be the user turn"),
    ],
)
def test_malformed_rows_name_row_column_and_what_was_found(cols, rec, match):
    good = {"text": "ok"} if "text" in cols else {"src": ["ok"], "tgt": []} if "src" in cols else {
        "messages": [{"role": "user", "content": "ok"}]}
    with pytest.raises(DataFormatError, match=match.replace("row 0", "row 1")):
        parse_rows([good, rec], cols)
