"""Task registry: loading, both prompt formats (golden strings from lm-eval 0.4.13's templates), splits,
JSONL user tasks."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from slim_peft.tasks import (
    DEFAULT_LETTER_INSTRUCTION,
    LETTERS,
    MMLU_SUBJECTS,
    Example,
    Task,
    TaskFileError,
    chat_prompt,
    get_task,
    in_test,
    letter_prompt,
    letter_target,
    list_tasks,
    register_jsonl_task,
)
from slim_peft.tasks.builtin import arc_example, arc_lm

BUILTIN = [
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "openbookqa",
    "piqa",
    "social_iqa",
    "commonsense_qa",
    "winogrande",
    "sciq",
    "copa",
    "basic_arithmetic",
    "mmlu",
]
SIZES = {
    "arc_easy": 570,
    "arc_challenge": 299,
    "boolq": 3270,
    "hellaswag": 10042,
    "openbookqa": 500,
    "piqa": 1838,
    "social_iqa": 1954,
    "commonsense_qa": 1221,
    "winogrande": 1267,
    "sciq": 1000,
    "copa": 100,
    "basic_arithmetic": 3000,
    "mmlu": 14042,
}


def first(name: str) -> tuple[Example, object]:
    task = get_task(name)
    ex = task.all_examples()[0]
    return ex, task.lm_eval_request(ex)


# ----------------------------------------------------------------------------------------- loading, rendering
def test_registry_has_every_builtin_task():
    names = list_tasks()
    for name in BUILTIN:
        assert name in names
    assert all(f"mmlu_{s}" in names for s in MMLU_SUBJECTS) and len(MMLU_SUBJECTS) == 57


@pytest.mark.parametrize("name", BUILTIN)
def test_task_loads_and_every_example_renders_in_both_formats(name):
    task = get_task(name)
    examples = task.all_examples()
    assert len(examples) == SIZES[name]
    for ex in examples:
        req = task.lm_eval_request(ex)
        n = len(ex.choices)
        assert n >= 2 and 0 <= ex.label < n
        assert len(req.contexts) == len(req.continuations) == len(req.choice_texts) == n
        assert 0 <= req.gold < n
        assert all(c for c in req.contexts) and all(c.strip() for c in req.continuations)
        text = letter_prompt(ex)
        for i, choice in enumerate(ex.choices):
            assert f"\n{LETTERS[i]}. {choice.strip()}\n" in text
        assert letter_target(ex) == LETTERS[ex.label]
    assert len({ex.id for ex in examples}) == len(examples)


def test_chance_and_sample_type_defaults():
    assert get_task("social_iqa").chance == pytest.approx(1 / 3)
    assert get_task("commonsense_qa").chance == pytest.approx(0.2)
    assert get_task("winogrande").chance == 0.5
    for name in ("boolq", "openbookqa", "social_iqa", "commonsense_qa"):
        assert get_task(name).sample_type == 1
    for name in ("arc_easy", "hellaswag", "piqa", "mmlu", "winogrande", "basic_arithmetic"):
        assert get_task(name).sample_type == 0


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="arc_easy"):
        get_task("arc_eazy")


# ----------------------------------------------------------------------------------------- golden strings
def test_golden_arc_easy():
    ex, req = first("arc_easy")
    assert req.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert req.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert req.gold == 0


def test_golden_arc_challenge():
    ex, req = first("arc_challenge")
    assert req.contexts[0] == (
        "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which "
        "object rolls the farthest. What should they do so they can repeat their "
        "investigation?\nAnswer:"
    )
    assert req.continuations[3] == " Record the details of the investigation."
    assert req.gold == 3


def test_golden_boolq():
    ex, req = first("boolq")
    passage = ex.raw["passage"]
    assert passage.startswith("All biomass goes through at least some of these steps")
    assert (
        req.contexts[0] == passage + "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert req.continuations == (" no", " yes") and req.gold == 0


def test_golden_hellaswag():
    ex, req = first("hellaswag")
    assert req.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert req.continuations == (
        " is using wrap to wrap a pair of skis.",
        " is ripping level tiles off.",
        " is holding a rubik's cube.",
        " starts pulling up roofing on a roof.",
    )
    assert req.gold == 3


def test_golden_hellaswag_preprocess():
    from slim_peft.tasks import hellaswag_preprocess

    assert (
        hellaswag_preprocess(" How to dry a towel [title] Hang it [step] up.  Then ")
        == "How to dry a towel. Hang it up. Then"
    )


def test_golden_openbookqa():
    ex, req = first("openbookqa")
    assert req.contexts[0] == (
        "Frilled sharks and angler fish live far beneath the surface of the ocean, which "
        "is why they are known as"
    )
    assert req.continuations == (" Deep sea animals", " fish", " Long Sea Fish", " Far Sea Animals")
    assert req.gold == 0


def test_golden_piqa():
    ex, req = first("piqa")
    assert req.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert req.continuations[1] == (
        " Provide the guinea pig with a cage full of a few inches of bedding made of "
        "ripped jeans material, you will also need to supply it with a water bottle "
        "and a food dish."
    )
    assert req.gold == 0


def test_golden_social_iqa():
    ex, req = first("social_iqa")
    assert req.contexts[0] == (
        "Q: Tracy didn't go home that evening and resisted Riley's attacks. "
        "What does Tracy need to do before this?\nA:"
    )
    assert req.continuations == (" make a new plan", " Go home and see Riley", " Find somewhere to go")
    assert req.gold == 2


def test_golden_commonsense_qa():
    ex, req = first("commonsense_qa")
    assert req.contexts[0] == (
        "Question: A revolving door is convenient for two direction travel, but it also "
        "serves as a security measure at a what?\nA. bank\nB. library\nC. department store"
        "\nD. mall\nE. new york\nAnswer:"
    )
    assert req.continuations == (" A", " B", " C", " D", " E") and req.gold == 0


def test_golden_winogrande_partial_scoring():
    ex, req = first("winogrande")
    assert req.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert req.continuations == (" always got the easier cases.", " always got the easier cases.")
    assert req.gold == 1


def test_golden_sciq():
    ex, req = first("sciq")
    assert (
        req.contexts[0] == "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:"
    )
    assert req.continuations == (" Linnaeus", " shaw", " Scopes", " darwin") and req.gold == 3


def test_golden_copa():
    ex, req = first("copa")
    assert req.contexts[0] == "The man turned on the faucet therefore"
    # lm-eval's choices start with a space and the default target delimiter adds another
    assert req.continuations == ("  the toilet filled with water.", "  water flowed from the spout.")
    assert req.choice_texts == (" the toilet filled with water.", " water flowed from the spout.")
    assert req.gold == 1


def test_golden_basic_arithmetic():
    ex, req = first("basic_arithmetic")
    assert req.contexts[0] == "Question: Calculate 5 + 91 =\nAnswer:"
    assert req.continuations == (" 97", " 95", " 106", " 96") and req.gold == 3
    assert ex.answer == "96" and get_task("basic_arithmetic").supports_generation


def test_golden_mmlu():
    ex, req = first("mmlu")
    assert req.contexts[0] == (
        "The following are multiple choice questions (with answers) about abstract algebra."
        "\n\nFind the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) "
        "over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert req.continuations == (" A", " B", " C", " D") and req.gold == 1
    ex, req = first("mmlu_high_school_biology")
    assert req.contexts[0].startswith(
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
    )


def test_golden_letter_format():
    ex, _ = first("arc_easy")
    assert letter_prompt(ex) == (
        "Which technology was developed most recently?\nA. cellular telephone\n"
        "B. television\nC. refrigerator\nD. airplane\n" + DEFAULT_LETTER_INSTRUCTION
    )
    assert letter_target(ex) == "A"
    ex, _ = first("social_iqa")
    assert letter_prompt(ex).startswith(
        "Tracy didn't go home that evening and resisted Riley's attacks.\n\n"
        "What does Tracy need to do before this?\nA. make a new plan\n"
    )
    assert letter_target(ex) == "C"


class _NoTemplate:
    chat_template = None


class _Template:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_prompt_uses_the_template_when_there_is_one():
    assert chat_prompt(_NoTemplate(), "Q?\nA. x") == "Q?\nA. x\nAnswer:"
    assert chat_prompt(_Template(), "Q?") == "<user>Q?</user><assistant>"


# ----------------------------------------------------------------------------------------- splits
def _test_ids(name: str) -> list[str]:
    return [ex.id for ex in get_task(name).examples("test")]


@pytest.mark.parametrize("name", ["arc_easy", "boolq", "winogrande", "mmlu"])
def test_splits_are_disjoint_and_cover_the_file(name):
    task = get_task(name)
    train = {ex.id for ex in task.examples("train")}
    test = {ex.id for ex in task.examples("test")}
    full = [ex.id for ex in task.examples("full")]
    assert train and test and not (train & test)
    assert train | test == set(full)
    frac = len(test) / len(full)
    assert abs(frac - task.test_fraction) < 0.05


def test_split_is_pinned():
    # The hash scheme is part of the results' meaning: changing it must be deliberate.
    assert len(_test_ids("arc_easy")) == 284
    assert len(_test_ids("copa")) == 52


def test_splits_are_stable_across_processes_and_hash_seeds():
    here = _test_ids("arc_easy")
    code = (
        "from slim_peft.tasks import get_task; import json; "
        "print(json.dumps([e.id for e in get_task('arc_easy').examples('test')]))"
    )
    for seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_splits_do_not_depend_on_example_order():
    rows = get_task("arc_easy").load()
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    a = Task("order_a", lambda: rows, arc_example, arc_lm, chance=0.25)
    b = Task("order_b", lambda: shuffled, arc_example, arc_lm, chance=0.25)
    assert {e.id for e in a.examples("test")} == {e.id for e in b.examples("test")}
    assert {e.id for e in a.examples("train")} == {e.id for e in b.examples("train")}
    # and membership is a function of the content alone
    assert all(in_test(r, 0.5) == in_test(dict(reversed(list(r.items()))), 0.5) for r in rows[:50])


def test_limit_takes_the_first_n_in_file_order():
    task = get_task("piqa")
    assert task.examples("full", limit=7) == task.all_examples()[:7]
    test = [ex for ex in task.all_examples() if in_test(ex.raw, task.test_fraction)]
    assert task.examples("test", limit=5) == test[:5]
    assert len(get_task("mmlu").examples("full", limit=2)) == 2 * 57  # per subject, as lm-eval's --limit


def test_split_info_records_the_definition():
    info = get_task("arc_easy").split_info("test", 10)
    assert info["name"] == "test" and info["test_fraction"] == 0.5 and "sha256" in info["hash"]
    assert info["limit"] == 10 and "ARC-Easy" in info["source"]
    with pytest.raises(ValueError, match="unknown split"):
        get_task("arc_easy").examples("validation")


# ----------------------------------------------------------------------------------------- JSONL tasks
def _write(tmp_path, lines, name="mytask.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_task_registers_and_renders(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"question": "2 + 2 =", "choices": ["3", "4"], "label": 1}),
            "",
            json.dumps(
                {
                    "question": "Sky colour?",
                    "choices": ["blue", "red", "green"],
                    "label": 0,
                    "context": "Look up.",
                    "id": "q2",
                }
            ),
        ],
    )
    task = register_jsonl_task(path)
    assert task.name == "mytask" and get_task("mytask") is task and task.sample_type == 1
    exs = task.examples("full")
    assert [e.question for e in exs] == ["2 + 2 =", "Sky colour?"] and exs[1].id == "q2"
    req = task.lm_eval_request(exs[1])
    assert req.contexts[0] == "Look up.\nQuestion: Sky colour?\nAnswer:"
    assert req.continuations == (" blue", " red", " green") and req.gold == 0
    assert letter_prompt(exs[1]).startswith("Look up.\n\nSky colour?\nA. blue\nB. red\nC. green\n")
    assert task.chance == pytest.approx((1 / 2 + 1 / 3) / 2)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"choices": ["a", "b"], "label": 0}', "line 2.*missing field 'question'"),
        ('{"question": "q", "label": 0}', "line 2.*missing field 'choices'"),
        ('{"question": "q", "choices": ["a", "b"]}', "line 2.*missing field 'label'"),
        ('{"question": "q", "choices": "ab", "label": 0}', "line 2.*'choices' must be a list"),
        ('{"question": "q", "choices": ["a", 3], "label": 0}', r"line 2.*'choices'\[1\]"),
        ('{"question": "q", "choices": ["a", "b"], "label": 2}', "line 2.*'label' = 2 is out of range"),
        ('{"question": "q", "choices": ["a", "b"], "label": "1"}', "line 2.*'label' must be an integer"),
        ('{"question": "", "choices": ["a", "b"], "label": 0}', "line 2.*'question' must be a non-empty"),
        ('{"question": "q", "choices": ["a", "b"], "label": 0, "context": 5}', "line 2.*'context'"),
        ('{"question": "q", "choices": ["a", "b"], "label": 0', "line 2.*not valid JSON"),
        ('["q", ["a", "b"], 0]', "line 2.*expected a JSON object"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, line, message):
    good = json.dumps({"question": "q", "choices": ["a", "b"], "label": 0})
    path = _write(tmp_path, [good, line], name="bad.jsonl")
    with pytest.raises(TaskFileError, match=message):
        register_jsonl_task(path)


def test_jsonl_empty_or_missing_file(tmp_path):
    path = _write(tmp_path, ["", "   "], name="empty.jsonl")
    with pytest.raises(TaskFileError, match="holds no examples"):
        register_jsonl_task(path)
    with pytest.raises(TaskFileError, match="no such file"):
        register_jsonl_task(tmp_path / "absent.jsonl")


def test_jsonl_cannot_shadow_a_builtin(tmp_path):
    path = _write(tmp_path, [json.dumps({"question": "q", "choices": ["a", "b"], "label": 0})])
    with pytest.raises(ValueError, match="built-in"):
        register_jsonl_task(path, name="arc_easy")
