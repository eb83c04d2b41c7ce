"""The embedded free-form training set, `sciq_instruct`: SciQ questions (Welbl et al. 2017) with their support
passage as instruction -> short answer rows, built from the *train* half of the embedded SciQ validation file
(the content-hash split of `slim_peft.tasks`), so no row is a question of any evaluation split: the `sciq` task
is scored on the other half. Rows without a passage ask the question alone. About 500 rows; `slim-peft run
--data sciq_instruct` holds out a content-hash 20% of them for the generative downstream score."""

from __future__ import annotations

from typing import Any

from slim_peft.tasks import get_task

from .sources import EmbeddedData, register_embedded_data

DEMO_DATA = "sciq_instruct"
INSTRUCTION = "Answer the question from the passage with a short phrase."


def sciq_instruct_rows() -> list[dict[str, Any]]:
    """Alpaca rows {instruction, input, output} of the SciQ train half, in file order."""
    rows = []
    for ex in get_task("sciq").examples("train"):
        passage = ex.context.strip()
        question = f"Passage: {passage}\n\nQuestion: {ex.question.strip()}" if passage else \
            f"Question: {ex.question.strip()}"
        rows.append({"instruction": INSTRUCTION, "input": question, "output": ex.answer.strip()})
    return rows


register_embedded_data(DEMO_DATA, EmbeddedData(
    sciq_instruct_rows, "SciQ (train half) passage + question -> short answer, alpaca rows", related_tasks=("sciq",)))
