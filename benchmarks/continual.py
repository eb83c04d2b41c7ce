"""Continual-learning study on SmolLM2-135M-Instruct: one adapter trained on four embedded tasks in sequence,
judged after every stage on all four and on a general suite (`slim_peft.experiments.continual`).

Sequence: OpenBookQA -> SocialIQA -> CommonsenseQA -> BoolQ (train splits, letter format). Why these: the base
model is at chance on each in the letter format (it answers " A" to nearly every question), so every stage has
something to learn; each has hundreds of training questions; and their answer formats differ (4, 3 and 5 options,
then yes/no), so a later task can overwrite an earlier one's answer habits and forgetting shows in the matrix.
They are study 1's downstream tasks (OBQA, SIQA, BoolQ) plus CommonsenseQA, so stage results relate to it.
General suite (loglik): ARC-Easy, ARC-Challenge, PIQA, SciQ.

Variants: LoRA (sequential fine-tuning, no replay), ER (LoRA + the same reservoir buffer, replay of earlier
tasks only), I-LoRA (ER + slow EMA learner + consistency loss, evaluated with the slow learner; replay of earlier
tasks only, the paper's setting), MixLoRA, SLIM with its clusters sliding (`slim`) and with each finished task's
clusters kept (`slim_keep`). Every variant: 25 optimizer steps of 8 examples (2 x 4) per stage, learning rate
5e-4 with cosine decay and 5% warmup per stage (`slim-peft run`'s recipe, which learns BoolQ in 80 steps; one rate
for every method, so that differences come from the methods), seeds 0, 1, 2; 80 test questions per task.

Sizing. Measured here with 2 one-thread workers: LoRA 10.8 s per step of 8 OBQA examples, 1.35x the 8.0 s that
study 1's 1-thread figure (16.08 CPU s per 16 examples, benchmarks/results/forgetting.md) gives; the other methods
are study 1's figures halved and scaled by the same 1.35: ER ~17.6 s (LoRA + one replay pass with gradient),
I-LoRA 20.7, MixLoRA 14.4, SLIM 11.9. 100 steps per run: LoRA 18 min, ER 29, I-LoRA 35, MixLoRA 24, SLIM 20 (x2)
= 146 min of training per seed. Judging: the base model's judgement (8 x 80 questions, ~4 min) is shared per seed;
4 stages x (320 task questions + 320 general questions, ~3.3 min) = ~13 min per run, 80 min per seed. 3 seeds x
226 min = 678 worker-minutes = 5.7 h with 2 workers on the 2 cores (budget: 6 h). Each run resumes from its stage
checkpoints; stored runs are skipped.

    python benchmarks/continual.py --workers 2                # the whole study (resumable)
    python benchmarks/continual.py --variants lora,ilora --seeds 0
    python benchmarks/continual.py --report-only              # regenerate the report from the stored JSONs

Stored runs: benchmarks/results/continual/<variant>__seed<k>.json; report: benchmarks/results/continual.md.
Working directories (checkpoints): runs/continual-study/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from slim_peft.experiments import sweep  # noqa: E402
from slim_peft.experiments.store import load_json, write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STORE = RESULTS / "continual"
WORK = REPO / "runs" / "continual-study"
TASKS = ("openbookqa", "social_iqa", "commonsense_qa", "boolq")
GENERAL = ("arc_easy", "arc_challenge", "piqa", "sciq")
STEPS, EVAL_LIMIT, LEARNING_RATE, SEEDS = 25, 80, 5e-4, (0, 1, 2)
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"label": "LoRA (sequential)", "method": "lora", "adapter": {}},
    "er": {"label": "ER", "method": "er", "adapter": {}},
    "ilora": {"label": "I-LoRA", "method": "ilora", "adapter": {}},
    "mixlora": {"label": "MixLoRA", "method": "mixlora", "adapter": {}},
    "slim": {"label": "SLIM (clusters slide)", "method": "slim", "adapter": {"clusters_across_tasks": "slide"}},
    "slim_keep": {"label": "SLIM (clusters kept)", "method": "slim", "adapter": {"clusters_across_tasks": "keep"}},
}


def job_name(job: tuple[str, int]) -> str:
    return f"{job[0]}__seed{job[1]}"


def run_one(variant: str, seed: int, threads: int) -> dict[str, Any]:
    """One continual run (in its own process), resumed from its working directory when it has one."""
    import torch

    from slim_peft.experiments.continual import ContinualConfig, run_continual

    torch.set_num_threads(threads)
    v = VARIANTS[variant]
    out = WORK / job_name((variant, seed))
    base = WORK / f"base__seed{seed}.json"
    if base.is_file() and not (out / "base_eval.json").is_file():  # the base model is judged once per seed
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(base, out / "base_eval.json")
    cfg = ContinualConfig(tasks=TASKS, method=v["method"], max_steps=STEPS, eval_limit=EVAL_LIMIT,
                          general_tasks=GENERAL, learning_rate=LEARNING_RATE, seed=seed, output_dir=str(out),
                          resume=True, adapter=dict(v["adapter"]), save_steps=10, threads=threads)
    result = run_continual(cfg).to_dict()
    if not base.is_file():
        shutil.copy(out / "base_eval.json", base)
    for judgement in result["judgements"]:  # per-question samples are not kept; outcomes are
        for part in judgement.values():
            for task in part["tasks"].values():
                task.pop("samples", None)
    return {"variant": variant, "seed": seed, **result}


# ------------------------------------------------------------------------------------------------ report


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def _fmt(m: float | None, se: float | None, signed: bool = True) -> str:
    if m is None:
        return "-"
    return f"{100 * m:{'+' if signed else ''}.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def summarize(stored: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: seeds, the mean matrix and each metric's mean over seeds with the stderr across seeds."""
    out: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        runs = [r for r in stored.values() if r["variant"] == variant]
        if not runs:
            continue
        metrics = {}
        for key in ("average", "backward_transfer", "forward_transfer"):
            values = [r["metrics"][key]["value"] for r in runs if r["metrics"][key]["value"] is not None]
            metrics[key] = _mean_se(values) if values else (None, None)
        final_general = [r["metrics"]["general_retention"][-1]["value"] for r in runs
                         if r["metrics"]["general_retention"]]
        metrics["general"] = _mean_se(final_general) if final_general else (None, None)
        matrices = [r["matrix"] for r in runs]
        mean_matrix = [[sum(m[i][j] for m in matrices) / len(matrices) for j in range(len(matrices[0][0]))]
                       for i in range(len(matrices[0]))]
        out[variant] = {"seeds": sorted(r["seed"] for r in runs), "metrics": metrics, "matrix": mean_matrix,
                        "per_seed": {r["seed"]: r["metrics"] for r in runs}}
    return out


def claim(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The I-LoRA paper's claim: I-LoRA beats sequential LoRA and ER on AP and on BWT. Per comparison the
    difference of the seed means with the stderr sqrt(se_a^2 + se_b^2) across seeds: 'reproduces' beyond 2
    stderr, 'contradicted' below -2 stderr, else 'not resolved'."""
    lines = []
    if "ilora" not in summary:
        return ["I-LoRA has no stored run yet: not resolved."]
    for other in ("lora", "er"):
        if other not in summary:
            lines.append(f"- I-LoRA vs {VARIANTS[other]['label']}: no stored run yet, not resolved.")
            continue
        for key, name in (("average", "AP"), ("backward_transfer", "BWT")):
            (a, sa), (b, sb) = summary["ilora"]["metrics"][key], summary[other]["metrics"][key]
            if a is None or b is None:
                continue
            se = math.sqrt((sa or 0) ** 2 + (sb or 0) ** 2) if sa is not None and sb is not None else None
            d = a - b
            verdict = "not resolved" if se is None or abs(d) <= 2 * se else \
                ("reproduces" if d > 0 else "contradicted")
            n = min(len(summary["ilora"]["seeds"]), len(summary[other]["seeds"]))
            lines.append(f"- {name}: I-LoRA - {VARIANTS[other]['label']} = {_fmt(d, se)} points over {n} seed(s): "
                         f"**{verdict}**")
    return lines


def report(stored: dict[str, dict[str, Any]]) -> str:
    summary = summarize(stored)
    lines = ["# Continual-learning study (SmolLM2-135M-Instruct)", "",
             f"Sequence {' -> '.join(TASKS)} (letter format), {STEPS} steps of 8 examples per stage at lr "
             f"{LEARNING_RATE}, {EVAL_LIMIT} test questions per task; general suite {', '.join(GENERAL)} (loglik). "
             "Values in points (accuracy x 100): the mean over seeds ± the stderr across seeds. "
             "Generated by `python benchmarks/continual.py --report-only` from the stored JSONs "
             "(benchmarks/results/continual/); how it is sized: the script's docstring.", "",
             "| variant | seeds | AP | BWT | FWT | general delta after the last stage |", "|---|---|---|---|---|---|"]
    for variant, s in summary.items():
        m = s["metrics"]
        lines.append(f"| {VARIANTS[variant]['label']} | {','.join(map(str, s['seeds']))} | "
                     f"{_fmt(*m['average'], signed=False)} | "
                     f"{_fmt(*m['backward_transfer'])} | {_fmt(*m['forward_transfer'])} | {_fmt(*m['general'])} |")
    lines += ["", "## The I-LoRA paper's claim (I-LoRA beats sequential LoRA and ER on AP and BWT)", "",
              *claim(summary), "", "## Mean accuracy matrices R[stage][task] (rows: base, after each stage)", ""]
    for variant, s in summary.items():
        lines += [f"### {VARIANTS[variant]['label']} (seeds {', '.join(map(str, s['seeds']))})", "",
                  "| after stage | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
        for i, row in enumerate(s["matrix"]):
            name = "base" if i == 0 else f"{i}: {TASKS[i - 1]}"
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines.append("")
    lines += ["## Per seed (AP, BWT, FWT with their within-run paired stderr)", "",
              "| variant | seed | AP | BWT | FWT |", "|---|---|---|---|---|"]
    for variant, s in summary.items():
        for seed, m in sorted(s["per_seed"].items()):
            cells = [_fmt(m[k]["value"], m[k]["stderr"]) for k in ("average", "backward_transfer",
                                                                       "forward_transfer")]
            lines.append(f"| {VARIANTS[variant]['label']} | {seed} | " + " | ".join(cells) + " |")
    done, total = len(stored), len(VARIANTS) * len(SEEDS)
    lines += ["", f"Stored runs: {done} of {total}.", ""]
    return "\n".join(lines)


def collect() -> dict[str, dict[str, Any]]:
    return {p.stem: d for p in sorted(STORE.glob("*__seed*.json")) if (d := load_json(p)) is not None}


def write_report() -> Path:
    path = RESULTS / "continual.md"
    path.write_text(report(collect()))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the runs (each 1 thread)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        print(f"wrote {write_report()}")
        return 0
    if args.workers > 1:
        command = sweep.python_command(Path(__file__), sweep.without_option(sys.argv[1:], "--workers"))
        return sweep.spawn_workers(command, args.workers, WORK / "logs")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    jobs = [(v, int(s)) for s in args.seeds.split(",") for v in variants]
    study = sweep.Sweep(name=job_name, is_done=lambda j: (STORE / f"{job_name(j)}.json").is_file(),
                        execute=lambda j: sweep.run_isolated(run_one, j[0], j[1], args.threads),
                        store=lambda j, r: write_json(STORE / f"{job_name(j)}.json", r), lock_dir=WORK / "locks")
    tally = sweep.run_sweep(study, jobs, after_each=lambda j, r, s: print(
        f"{job_name(j)}: stored ({s / 60:.1f} min); report {write_report()}", flush=True))
    print(json.dumps({"stored": [job_name(j) for j in tally.done], "failures": tally.failures}))
    write_report()
    return 0 if tally.failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
