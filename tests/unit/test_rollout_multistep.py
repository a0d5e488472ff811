"""Multi-step rollout with a scripted engine: token sequences, masks, stops and early ends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lampo.config import DataConfig, GenerationConfig
from lampo.data import PromptRow
from lampo.rollout.engines import Generation, SamplingSettings
from lampo.rollout.multistep import PromptTooLongError, rollout

EOT = 3  # <|im_end|> in the tiny tokenizer
TEMPLATED = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nDo you know the cat?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is its name?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


class ScriptedEngine:
    """Answers call k, prompt i, sample j with `answer(k, i, j)`; records every prompt it saw."""

    def __init__(self, tok, answer=None, stop=True):
        self.tok, self.calls, self.settings = tok, [], []
        self.answer = answer or (lambda k, i, j: f"answer {k}{i}{j}")
        self.stop = stop

    def generate(self, prompts, settings: SamplingSettings):
        k = len(self.calls)
        self.calls.append([list(p) for p in prompts])
        self.settings.append(settings)
        out = []
        for i, _ in enumerate(prompts):
            row = []
            for j in range(settings.n):
                ids = self.tok(self.answer(k, i, j), add_special_tokens=False)["input_ids"]
                stop = self.stop(k, i, j) if callable(self.stop) else self.stop
                ids = ids + [EOT] if stop else ids
                row.append(Generation(ids, [-0.5] * len(ids), "stop" if stop else "length"))
            out.append(row)
        return out


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def cfgs(**kw):
    gen = {k: v for k, v in kw.items() if k in GenerationConfig.__dataclass_fields__}
    data = {k: v for k, v in kw.items() if k in DataConfig.__dataclass_fields__}
    return GenerationConfig(**gen), DataConfig(**data)


def test_three_steps_templated_cells_token_identity(tok):
    engine = ScriptedEngine(tok)
    gen_cfg, data_cfg = cfgs()
    batch = rollout(engine, tok, [PromptRow(0, tuple(TEMPLATED))], gen_cfg, data_cfg, policy_version=3)
    p0, p1, p2 = (call[0] for call in engine.calls)
    r0, r1, r2 = (enc(tok, f"answer {k}00") + [EOT] for k in range(3))
    assert p0 == enc(tok, TEMPLATED[0])  # the templated cell, verbatim
    # step i prompt = step i-1 prompt + response (ending with <|im_end|>) + "\n" + text_i.
    # The "\n" is ChatML's separator after <|im_end|>; the model stops AT <|im_end|>.
    assert p1 == p0 + r0 + enc(tok, "\n" + TEMPLATED[1])
    assert p2 == p1 + r1 + enc(tok, "\n" + TEMPLATED[2])
    ids = batch.input_ids[0].tolist()
    assert ids == p2 + r2
    # The mask covers exactly the three responses (each with its end-of-turn token).
    mask = batch.action_mask[0].tolist()
    expected = [False] * len(p0) + [True] * len(r0) + [False] * (len(p1) - len(p0) - len(r0))
    expected += [True] * len(r1) + [False] * (len(p2) - len(p1) - len(r1)) + [True] * len(r2)
    assert mask == expected
    assert batch.turn_spans[0] == [(len(p0), len(p0) + len(r0)), (len(p1), len(p1) + len(r1)), (len(p2), len(ids))]
    assert batch.turn_ends[0][-1] == len(ids) - 1 and ids[-1] == EOT
    assert batch.finish_reasons == [["stop", "stop", "stop"]]
    assert batch.messages == [["Hi.", "answer 000", "Do you know the cat?", "answer 100", "What is its name?", "answer 200"]]
    assert batch.engine_logprobs[0][batch.action_mask[0]].eq(-0.5).all()
    assert batch.engine_logprobs[0][~batch.action_mask[0]].eq(0).all()
    assert batch.policy_version == 3 and batch.prompt_index.tolist() == [0]


def test_plain_cells_match_the_chat_template(tok):
    engine = ScriptedEngine(tok)
    gen_cfg, data_cfg = cfgs(system_prompt="Be brief.")
    cells = ("Hi.", "Do you know the cat?", "What is its name?")
    batch = rollout(engine, tok, [PromptRow(0, cells)], gen_cfg, data_cfg, policy_version=0)
    p0, p1, p2 = (call[0] for call in engine.calls)
    r0, r1 = enc(tok, "answer 000") + [EOT], enc(tok, "answer 100") + [EOT]
    segment = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    assert p1 == p0 + r0 + enc(tok, "\n" + segment.format(cells[1]))
    assert p2 == p1 + r1 + enc(tok, "\n" + segment.format(cells[2]))
    # The whole history reads exactly as the tokenizer's chat template writes the conversation.
    msgs = [{"role": "system", "content": "Be brief."}]
    for k, cell in enumerate(cells[:2]):
        msgs += [{"role": "user", "content": cell}, {"role": "assistant", "content": f"answer {k}00"}]
    msgs.append({"role": "user", "content": cells[2]})
    assert tok.decode(p2) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert batch.messages[0] == ["Hi.", "answer 000", "Do you know the cat?", "answer 100", "What is its name?", "answer 200"]


def test_templated_cell_with_its_own_separator_is_not_doubled(tok):
    engine = ScriptedEngine(tok)
    rollout(engine, tok, [PromptRow(0, (TEMPLATED[0], "\n" + TEMPLATED[1]))], *cfgs(), policy_version=0)
    p0, p1 = (call[0] for call in engine.calls)
    assert p1 == p0 + enc(tok, "answer 000") + [EOT] + enc(tok, "\n" + TEMPLATED[1])


def test_groups_are_contiguous_and_steps_are_batched(tok):
    engine = ScriptedEngine(tok)
    rows = [PromptRow(5, ("a", "b")), PromptRow(9, ("c", "d"))]
    batch = rollout(engine, tok, rows, *cfgs(num_generations=3), policy_version=0)
    assert batch.prompt_index.tolist() == [5, 5, 5, 9, 9, 9]
    # Step 0: one request per row with n=3; step 1: one request per conversation (6), n=1.
    assert [len(c) for c in engine.calls] == [2, 6]
    assert [s.n for s in engine.settings] == [3, 1]
    assert [m[1] for m in batch.messages] == [f"answer 0{i}{j}" for i in range(2) for j in range(3)]
    assert len(batch) == 6
    lengths = batch.attention_mask.sum(1)
    assert (batch.input_ids[torch.arange(6), lengths - 1] == EOT).all()


def test_empty_later_cells_end_conversations_early(tok):
    engine = ScriptedEngine(tok)
    rows = [PromptRow(0, ("a", "b", "c")), PromptRow(1, ("d",)), PromptRow(2, ("e", "f"))]
    batch = rollout(engine, tok, rows, *cfgs(), policy_version=0)
    assert [len(c) for c in engine.calls] == [3, 2, 1]  # rows still talking at steps 0, 1, 2
    assert [len(s) for s in batch.turn_spans] == [3, 1, 2]
    assert [len(m) for m in batch.messages] == [6, 2, 4]
    # Row 1 ends after its first answer; the rest of its row is padding.
    n1 = int(batch.attention_mask[1].sum())
    assert batch.input_ids[1, n1 - 1] == EOT and (batch.input_ids[1, n1:] == tok.pad_token_id).all()
    assert not batch.action_mask[1, n1:].any()


def test_non_stopped_turn_is_flagged_closed_and_the_conversation_goes_on(tok):
    # Call 0 (step 0): row 0 is cut off at max_new_tokens, row 1 stops.
    engine = ScriptedEngine(tok, stop=lambda k, i, j: not (k == 0 and i == 0))
    rows = [PromptRow(0, ("a", "b")), PromptRow(1, ("c", "d"))]
    batch = rollout(engine, tok, rows, *cfgs(), policy_version=0)
    assert batch.finish_reasons == [["length", "stop"], ["stop", "stop"]]
    assert batch.stopped.tolist() == [False, True]  # the non-stop penalty still sees the cut turn
    assert [len(c) for c in engine.calls] == [2, 2]
    assert len(batch.messages[0]) == 4  # the reward model receives every turn of the row
    # The cut turn is closed as the template writes it: <|im_end|> (not an action) + "\n" + next turn.
    end = batch.turn_spans[0][0][1]
    assert engine.calls[1][0][end:] == [EOT] + enc(tok, "\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n")
    assert not batch.action_mask[0, end] and batch.action_mask[0, end + 1 :].any()


def test_truncated_turn_end_ends_the_conversation_at_the_cut_turn(tok):
    engine = ScriptedEngine(tok, stop=lambda k, i, j: not (k == 0 and i == 0))
    rows = [PromptRow(0, ("a", "b")), PromptRow(1, ("c", "d"))]
    batch = rollout(engine, tok, rows, *cfgs(truncated_turn="end"), policy_version=0)
    assert batch.finish_reasons == [["length"], ["stop", "stop"]]
    assert batch.stopped.tolist() == [False, True]
    assert [len(c) for c in engine.calls] == [2, 1]


def test_stop_string_truncates_and_keeps_the_history_well_formed(tok):
    # The engine answers "yes### and more" without <|im_end|>; the stop string cuts after "###".
    engine = ScriptedEngine(tok, answer=lambda k, i, j: "yes### and more", stop=False)
    gen_cfg, data_cfg = cfgs(stop_token="###")
    batch = rollout(engine, tok, [PromptRow(0, ("a", "b"))], gen_cfg, data_cfg, policy_version=0)
    full = enc(tok, "yes### and more")
    start, end = batch.turn_spans[0][0]
    response = batch.input_ids[0, start:end].tolist()
    assert response == full[: len(response)] and "###" in tok.decode(response)
    assert "###" not in tok.decode(response[:-1])  # nothing after the token completing "###"
    assert batch.finish_reasons[0] == ["stop", "stop"]
    assert batch.messages[0][1] == "yes"  # the stop string and what follows are not sent to the reward
    # Before the next user turn Lampo writes <|im_end|> (a template token, not an action) + "\n".
    p1 = engine.calls[1][0]
    assert p1[end] == EOT and not batch.action_mask[0, end]
    assert p1[end:] == [EOT] + enc(tok, "\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n")


def test_paddlenlp_row_fixed_history_only_last_turn_generated(tok):
    engine = ScriptedEngine(tok)
    row = PromptRow(0, ("And Rome?",), history=(("user", "Hi"), ("assistant", "Hello! How can I help?")), format="paddlenlp")
    batch = rollout(engine, tok, [row], *cfgs(), policy_version=0)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "And Rome?"}]
    assert engine.calls[0][0] == enc(tok, tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    assert batch.messages[0] == ["Hi", "Hello! How can I help?", "And Rome?", "answer 000"]
    assert len(batch.turn_spans[0]) == 1  # the given history is not trained
    assert int(batch.action_mask.sum()) == len(enc(tok, "answer 000")) + 1


def test_messages_row_keeps_its_system_prompt_out_of_the_reward_turns(tok):
    engine = ScriptedEngine(tok)
    row = PromptRow(0, ("Next?",), history=(("system", "Sys."), ("user", "One"), ("assistant", "Two")), format="messages")
    gen_cfg, data_cfg = cfgs(system_prompt="Ignored: the row has its own.")
    batch = rollout(engine, tok, [row], gen_cfg, data_cfg, policy_version=0)
    assert tok.decode(engine.calls[0][0]).startswith("<|im_start|>system\nSys.<|im_end|>")
    assert batch.messages[0] == ["One", "Two", "Next?", "answer 000"]


def test_max_prompt_len_error_left_skip(tok):
    long_row, short_row = PromptRow(0, ("word " * 60,)), PromptRow(1, ("hi",))
    with pytest.raises(PromptTooLongError, match="row 0.*max_prompt_len=20"):
        rollout(ScriptedEngine(tok), tok, [long_row, short_row], *cfgs(max_prompt_len=20), policy_version=0)
    engine = ScriptedEngine(tok)
    batch = rollout(engine, tok, [long_row, short_row], *cfgs(max_prompt_len=20, truncation="skip"), policy_version=0)
    assert batch.skipped_rows == 1 and batch.prompt_index.tolist() == [1]
    engine = ScriptedEngine(tok)
    batch = rollout(engine, tok, [long_row], *cfgs(max_prompt_len=20, truncation="left"), policy_version=0)
    full = enc(tok, tok.apply_chat_template([{"role": "user", "content": "word " * 60}], tokenize=False,
                                            add_generation_prompt=True))
    assert engine.calls[0][0] == full[-20:]  # the end (with the generation prompt) is kept


def test_later_step_over_max_prompt_len_ends_the_conversation(tok):
    engine = ScriptedEngine(tok)
    first = enc(tok, tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True))
    batch = rollout(engine, tok, [PromptRow(0, ("a", "b " * 40))], *cfgs(max_prompt_len=len(first) + 10), policy_version=0)
    assert len(engine.calls) == 1 and len(batch.turn_spans[0]) == 1
    assert batch.cut_at_max_prompt_len == 1


def test_sampling_settings_follow_the_config(tok):
    engine = ScriptedEngine(tok)
    gen_cfg, data_cfg = cfgs(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=9, min_new_tokens=2)
    rollout(engine, tok, [PromptRow(0, ("a",))], gen_cfg, data_cfg, policy_version=0, seed=11)
    s = engine.settings[0]
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.min_new_tokens, s.seed) == (0.7, 0.9, 5, 9, 2, 11)
    assert s.stop_token_ids == [EOT]


def test_empty_rows_give_an_empty_batch(tok):
    batch = rollout(ScriptedEngine(tok), tok, [], *cfgs(), policy_version=0)
    assert len(batch) == 0 and batch.input_ids.shape == (0, 0)


def test_user_text_strips_markup_of_templated_cells(tok):
    from lampo.rollout.multistep import chat_format

    fmt = chat_format(tok)
    assert fmt.user_text(TEMPLATED[0]) == "Hi."
    # The design documents' table writes the markers with spaces instead of newlines.
    assert fmt.user_text("<|im_start|>system You are nice.<|im_end|> <|im_start|>user Hi.<|im_end|> "
                         "<|im_start|>assistant ") == "Hi."
    assert fmt.user_text("plain text") == "plain text"


def test_unused_namespace_config_is_accepted(tok):
    # Any object with the config attributes works (the trainer may pass its own sections).
    gen_cfg, data_cfg = cfgs()
    ns = SimpleNamespace(**{k: getattr(data_cfg, k) for k in DataConfig.__dataclass_fields__})
    batch = rollout(ScriptedEngine(tok), tok, [PromptRow(0, ("a",))], gen_cfg, ns, policy_version=0)
    assert len(batch) == 1


LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_another_template_is_read_off_the_template(tiny_model_path):
    # A Llama-3 style template: end of turn <|eot_id|>, no separator, a BOS in the template text.
    from transformers import AutoTokenizer

    from lampo.rollout.chat import ChatFormat

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    fmt = ChatFormat(tok)
    assert fmt.end_of_turn == "<|eot_id|>" and fmt.separator == ""
    eot = fmt.end_of_turn_id
    engine = ScriptedEngine(tok)
    engine.answer = lambda k, i, j: f"answer {k}"
    real_generate = engine.generate

    def generate(prompts, settings):  # answers end with <|eot_id|> instead of <|im_end|>
        out = real_generate(prompts, settings)
        return [[Generation(g.token_ids[:-1] + [eot], g.logprobs, "stop") for g in row] for row in out]

    engine.generate = generate
    gen_cfg, data_cfg = cfgs()
    batch = rollout(engine, tok, [PromptRow(0, ("Hi.", "Why?"))], gen_cfg, data_cfg, policy_version=0)
    assert engine.settings[0].stop_token_ids[0] == eot
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "answer 0"},
            {"role": "user", "content": "Why?"}]
    assert tok.decode(engine.calls[1][0]) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert batch.messages[0] == ["Hi.", "answer 0", "Why?", "answer 1"]
    templated = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>" \
                "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
    assert fmt.user_text(templated) == "Hello there"


def test_engine_logprob_diff_is_the_mean_over_action_tokens():
    from lampo.optimize import maths as M

    action_mask = torch.tensor([[False, True, True, False]])
    engine_logprobs = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    # |-1 - (-1.5)| = 0.5 and |-2 - (-2.1)| = 0.1 on the two actions; position 3 (not an action) is ignored.
    gap = M.engine_logprob_gap(torch.tensor([[9.0, -1.5, -2.1, 9.0]]), engine_logprobs, action_mask)
    assert abs(gap.item() - 0.3) < 1e-6


def test_prompts_over_max_prompt_len_are_found_at_load_naming_file_line_length_and_key(tok):
    from lampo.rollout.multistep import check_prompt_lengths

    rows = [PromptRow(0, ("hi",), origin="data/p.jsonl, line 1"),
            PromptRow(1, ("word " * 60,), origin="data/p.jsonl, line 7"),
            PromptRow(2, ("word " * 30,), origin="data/p.jsonl, line 9")]
    length = len(enc(tok, tok.apply_chat_template([{"role": "user", "content": "word " * 60}], tokenize=False,
                                                  add_generation_prompt=True)))
    _, data = cfgs(max_prompt_len=20)
    with pytest.raises(PromptTooLongError, match=rf"query_dataset data/p.jsonl, line 7 \(train split\): the step-0 "
                                                 rf"prompt has {length} tokens, more than max_prompt_len = 20 "
                                                 r"\(truncation: error\); 1 more rows of the train split"):
        check_prompt_lengths(tok, rows, data, "train")
    # the same prompt the rollout builds: the system prompt counts
    _, data = cfgs(max_prompt_len=length, system_prompt="Be brief and kind. " * 5)
    with pytest.raises(PromptTooLongError, match="line 7"):
        check_prompt_lengths(tok, rows, data, "train")
    for ok in (cfgs(max_prompt_len=length)[1], cfgs(max_prompt_len=20, truncation="left")[1]):
        check_prompt_lengths(tok, rows, ok, "train")  # fits, or cut by the rollout
