"""Fake scored runs and base scorings of the forgetting study for the experiments tests (no model is loaded),
and a reader of the report's Markdown tables, so that report tests check numbers rather than wording."""

from __future__ import annotations

import re
from pathlib import Path

from slim_peft.experiments.runner import summarize
from slim_peft.experiments.store import write_json
from slim_peft.experiments.study import Protocol, Run, load_plan

REPO = Path(__file__).resolve().parents[1]
PLAN_FILE = REPO / "benchmarks" / "studies" / "forgetting.yaml"
PLAN = load_plan(PLAN_FILE)
TASKS = PLAN.tasks


def fake_scores(shift: float = 0.0) -> dict:
    """Downstream 0.3 + shift, general 0.5 - shift, arithmetic 0.1 on every task; stderr 0.05, 40 questions."""
    def entry(score, n=40):
        return {"score": score, "stderr": 0.05, "metric": "acc", "n": n, "seconds": 1.0, "chance": 0.25,
                "metrics": {"acc": score}}

    out = {"downstream": {t: entry(0.3 + shift) for t in TASKS.downstream},
           "general": {t: entry(0.5 - shift) for t in TASKS.general},
           "math": {TASKS.math: entry(0.1)}, "seconds": 10.0}
    summarize(out, TASKS.math)
    return out


def env(**extra) -> dict:
    return {"python": "3", "torch": "2", "threads": 2, "cpu_count": 2, "machine": "x", "loadavg_1min": 1.0, **extra}


def fake_run(run: Run, protocol: Protocol, shift: float = 0.1) -> dict:
    """A stored run's record as `runner.Study.execute` writes it, with `fake_scores(shift)`."""
    spec, setting = PLAN.methods[run.method], PLAN.settings[run.setting]
    return {"kind": "run", "run_id": run.run_id, "method": run.method, "method_label": spec.label,
            "setting": run.setting, "setting_label": setting.label, "group": setting.group, "seed": run.seed,
            "protocol": protocol.to_dict(), "protocol_digest": protocol.digest(),
            "adapter_config": PLAN.run_config(run), "learning_rate": spec.lr, **fake_scores(shift),
            "train": {"steps": protocol.max_steps, "final_loss": 1.0, "seconds": 5.0, "seconds_per_step": 0.6,
                      "trainable_parameters": 1000, "total_parameters": 10000},
            "curve": [{"step": protocol.max_steps, "general_mean": 0.4, "math": 0.1}] if setting.curve else [],
            "routing_eval": {"mean_identity_share": 0.3}, "wall_seconds": 20.0, "environment": env(),
            "command": "python benchmarks/forgetting.py --budget pilot"}


def with_outcomes(scores: dict) -> dict:
    """Per-question outcomes matching each task's score (all its hits first), as a current evaluation stores."""
    for part in ("downstream", "general", "math"):
        for e in scores[part].values():
            hits = round(e["score"] * e["n"])
            e.update(correct="1" * hits + "0" * (e["n"] - hits), ids_digest="fake")
    return scores


def fake_base(protocol: Protocol | None = None) -> dict:
    base = {"kind": "base", **with_outcomes(fake_scores()), "wall_seconds": 30.0, "environment": env()}
    if protocol is not None:
        base.update(protocol=protocol.to_dict(), eval_digest=protocol.eval_digest())
    return base


def store_base(runs_dir: Path, protocol: Protocol) -> dict:
    base = fake_base(protocol)
    write_json(runs_dir / protocol.name / "base.json", base)
    return base


def runs_of(*specs: tuple[str, str, float], protocol: Protocol | None = None, seed: int = 0) -> dict[str, dict]:
    """{run_id: fake run} of (method, setting, shift) triples."""
    protocol = protocol or PLAN.protocols["pilot"]
    out = {}
    for method, setting, shift in specs:
        run = Run(method, setting, seed)
        out[run.run_id] = fake_run(run, protocol, shift)
    return out


def md_table(text: str, first_header: str) -> dict[str, list[str]]:
    """The Markdown table whose header row starts with `| first_header |`: {first cell: the other cells}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def nums(text: str) -> list[float]:
    """The numbers in a text, in order (signs kept; thousands separators dropped)."""
    return [float(x) for x in re.findall(r"[-+]?\d+(?:\.\d+)?", text.replace(",", ""))]


def section(text: str, heading: str) -> str:
    """The text under the Markdown heading that starts with `heading`, up to the next heading."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip().startswith(heading))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    return "\n".join(lines[start + 1:end])
