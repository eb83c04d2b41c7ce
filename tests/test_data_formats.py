"""Instruction and chat rows (data/schemas.py, data/chat.py) with the embedded model's chat template: every format
gives the token ids and labels of a hand-built ChatML sequence, the supervised tokens decode to exactly the
assistant text (+ end of turn), truncation keeps whole turns, and bad rows are refused naming line and field."""

from __future__ import annotations

import pytest

from slim_peft.data import IGNORE_INDEX
from slim_peft.data.chat import encode_row
from slim_peft.data.schemas import detect_format, parse_row
from slim_peft.errors import DataError

SYSTEM, QUESTION, ANSWER = "Be brief.", "What is the capital of France?", "Paris."


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from slim_peft.assets import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


ROWS = {
    "messages": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                              {"role": "assistant", "content": ANSWER}]},
    "prompt_completion": {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                          "completion": ANSWER},
    "alpaca": {"system": SYSTEM, "instruction": QUESTION, "input": "", "output": ANSWER},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": QUESTION},
                                   {"from": "gpt", "value": ANSWER}]},
}


def hand_built(tok) -> tuple[list[int], list[int]]:
    """SmolLM2's ChatML written out: prompt part unsupervised, answer + <|im_end|> supervised, final newline not."""
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = [tok(part, add_special_tokens=False)["input_ids"] for part in (prompt, ANSWER + "<|im_end|>", "\n")]
    return ids[0] + ids[1] + ids[2], [IGNORE_INDEX] * len(ids[0]) + ids[1] + [IGNORE_INDEX] * len(ids[2])


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_every_format_gives_the_hand_built_sequence(tok, fmt):
    row = parse_row(ROWS[fmt], "rows.jsonl:1")
    assert detect_format(ROWS[fmt], "rows.jsonl:1") == fmt
    ex, cut = encode_row(tok, row, max_seq_length=512)
    ids, labels = hand_built(tok)
    assert list(ex.input_ids) == ids and list(ex.labels) == labels and not cut


def test_every_assistant_turn_of_a_chat_is_supervised_and_decodes_to_its_text(tok):
    turns = [("Capital of France?", "Paris."), ("And of Italy?", "Rome, since 1871."), ("Spain?", "Madrid.")]
    messages = [{"role": "system", "content": SYSTEM}]
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    ex, _ = encode_row(tok, parse_row({"messages": messages}, "chat.jsonl:3"), max_seq_length=512)
    supervised = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert supervised == "".join(a + "<|im_end|>" for _, a in turns)
    # each supervised run is one assistant turn: three runs
    runs = sum(1 for i, t in enumerate(ex.labels) if t != IGNORE_INDEX and (i == 0 or ex.labels[i - 1] == IGNORE_INDEX))
    assert runs == 3


def test_plain_text_is_supervised_on_every_token(tok):
    ex, _ = encode_row(tok, parse_row({"text": "The sun is a star."}, "lm.jsonl:1"), max_seq_length=512)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_truncation_drops_whole_earliest_turns_first(tok):
    messages = [{"role": "system", "content": SYSTEM}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 8}, {"role": "assistant", "content": f"answer {i}"}]
    full, cut = encode_row(tok, parse_row({"messages": messages}, "x:1"), max_seq_length=2048)
    assert not cut
    ex, cut = encode_row(tok, parse_row({"messages": messages}, "x:1"), max_seq_length=len(full) // 2)
    assert cut and len(ex) <= len(full) // 2
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\n" + SYSTEM)  # the system message stays
    assert "answer 5" in text and "question 0" not in text  # the latest turns stay, whole


@pytest.mark.parametrize("row,match", [
    ({"foo": 1}, r"rows.jsonl:7: a row with fields \['foo'\] matches no known format"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"rows.jsonl:7: message 1 is an empty assistant turn"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
     r"rows.jsonl:7: message 0 has role 'assistant' where 'user' is expected"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"must end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]\.role is 'robot'"),
    ({"conversations": [{"from": "human", "value": 3}]}, r"conversations\[0\]\.value must be a string"),
    ({"instruction": "x", "output": 5}, r"field 'output' must be a string"),
    ({"text": "x", "sample_type": "a"}, r"field 'sample_type' must be an integer"),
    ({"question": "q", "choices": ["a", "b"], "label": 0}, r"read as a task file"),
])
def test_bad_rows_name_the_line_and_the_field(row, match):
    with pytest.raises(DataError, match=match):
        parse_row(row, "rows.jsonl:7")


def test_a_stated_format_that_does_not_fit_the_row_is_refused():
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'instruction' must be a string"):
        parse_row({"text": "hello"}, "rows.jsonl:2", data_format="alpaca")
    with pytest.raises(DataError, match="data_format 'chatml' is not one of"):
        parse_row({"text": "hello"}, "rows.jsonl:2", data_format="chatml")
