"""Sizing a study: the stderr its test sizes give, and its projected time from the costs its runs measured.

Both are computed, not estimated by hand: the test sizes are chosen for a stderr target, and a budget is only
worth starting if its projected hours fit; the projection is rebuilt from every stored run, base scoring and step
timing, so it follows the code as it gets faster. CPU time of a 1-thread worker is used: it approximates wall
time on an idle core and is far less distorted than wall time when other jobs share the machine.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from .study import MMLU_SUBJECTS, PARTS, Protocol, Run, StudyPlan

ALLOCATOR_LABEL = {"system": "glibc malloc", "jemalloc": "jemalloc"}


def stderr_table(plan: StudyPlan, protocol: Protocol, base: dict | None = None) -> dict[str, Any]:
    """Per task: n, p (base accuracy, or the prior), se = sqrt(p(1-p)/(n-1)); the stderr of the 7-task mean
    = sqrt(sum se^2) / 7, and the worst case (every p = 0.5)."""
    rows = []
    for task, n in protocol.general_sizes:
        n_eff = n
        if task == "mmlu":
            n_eff = protocol.general_limit(task) * MMLU_SUBJECTS
        p, source = plan.prior_acc[task], "prior"
        if base and task in base.get("general", {}):
            p, n_eff, source = base["general"][task]["score"], base["general"][task]["n"], "base"
        rows.append({"task": task, "n": n_eff, "p": p, "se": math.sqrt(p * (1 - p) / max(1, n_eff - 1)),
                     "source": source})
    k = len(rows)
    se_mean = math.sqrt(sum(r["se"] ** 2 for r in rows)) / k
    worst = math.sqrt(sum(0.25 / max(1, r["n"] - 1) for r in rows)) / k
    return {"rows": rows, "se_mean": se_mean, "se_mean_worst": worst, "target": plan.stderr_target,
            "ok": se_mean <= plan.stderr_target}


def stderr_markdown(st: dict[str, Any]) -> str:
    lines = ["| task | n | p | se = sqrt(p(1-p)/(n-1)) |", "|---|---|---|---|"]
    for r in st["rows"]:
        lines.append(f"| {r['task']} | {r['n']} | {r['p']:.3f} ({r['source']}) | {100 * r['se']:.2f} pts |")
    terms = " + ".join(f"{100 * r['se']:.2f}^2" for r in st["rows"])
    lines += ["", f"stderr of the 7-task mean = sqrt({terms}) / 7 = **{100 * st['se_mean']:.2f} points** "
              f"(target <= {100 * st['target']:.1f}: {'met' if st['ok'] else 'NOT met'}); worst case, every "
              f"p = 0.5: {100 * st['se_mean_worst']:.2f} points."]
    return "\n".join(lines)


def steps_timed(train: dict[str, Any]) -> int | None:
    """Training steps whose time a run's `train` record holds: all of them, or for a resumed run the steps
    after its checkpoint (`steps_timed`; None for older resumed runs, which did not record it)."""
    if train.get("resumed"):
        return train.get("steps_timed") or None
    return train["steps"] or None


def _current_code(src: dict[str, Any]) -> bool:
    """Measured with the current training code: runs and step timings record `adapter_dropout` since
    LoraDropout replaced nn.Dropout (older ones paid the slower dropout and mostly ran beside other jobs)."""
    return "adapter_dropout" in src.get("environment", {})


def allocator_of(src: dict[str, Any]) -> str:
    """The malloc a measurement ran with ("system" when it did not record one: those predate the record)."""
    return src.get("environment", {}).get("allocator", "system")


def _rank(src: dict[str, Any], allocator: str) -> tuple[bool, bool] | None:
    """How well a measurement prices a run under `allocator`: (current code, same allocator), higher is better;
    None to leave it out. A projection for jemalloc falls back to system-malloc costs where jemalloc has none
    (which errs long); one for the system malloc never uses a faster allocator's costs."""
    other = allocator_of(src)
    if other != allocator and other != "system":
        return None
    return _current_code(src), other == allocator


def measured_costs(data: dict[str, Any], allocator: str = "system") -> dict[str, Any]:
    """CPU seconds of a 1-thread worker per training step (median per method, and per (setting, method) run)
    and per question (median per task) over a protocol's stored runs, step timings and base scores, for
    workers running with `allocator`.

    Per method (task, run) only the best-ranked measurements are used (`_rank`: current code first, then the
    same allocator). A step timing (`--measure-steps`, the first N steps) is scaled to the runs' median tokens
    per step, since its few batches are not the average length; a timing of a setting other than "mds" prices
    that setting's runs, not its method."""
    runs = [r for r in data["runs"].values() if not r.get("twin_of")]  # a twin's copy is the same measurement
    one_thread = [r for r in runs if r["environment"].get("threads") == 1 and r["train"].get("cpu_seconds")
                  and steps_timed(r["train"]) and _rank(r, allocator)]
    tokens = _median([r["train"]["tokens_seen"] / max(1, r["train"]["steps"])
                      for r in runs if r["train"].get("tokens_seen")])
    step: dict[str, list[tuple[tuple, float]]] = {}
    run_step: dict[tuple[str, str], list[tuple[tuple, float]]] = {}
    for r in one_thread:
        per = r["train"]["cpu_seconds"] / steps_timed(r["train"])
        step.setdefault(r["method"], []).append((_rank(r, allocator), per))
        if _current_code(r):
            run_step.setdefault((r.get("protocol", {}).get("name", ""), r["run_id"]), []).append(
                (_rank(r, allocator), per))
    timings = [st for st in data.get("steps", {}).values()
               if st["environment"].get("threads") == 1 and _rank(st, allocator)]
    for st in timings:
        scale = tokens / st["tokens_per_step"] if tokens and st.get("tokens_per_step") else 1.0
        value = (_rank(st, allocator), st["cpu_seconds_per_step"] * scale)
        if st.get("setting", "mds") == "mds":
            step.setdefault(st["method"], []).append(value)
        else:
            run_id = Run(st["method"], st["setting"], 0).run_id
            run_step.setdefault((st.get("protocol", {}).get("name", ""), run_id), []).append(value)
    question = _question_costs(runs + (data.get("bases") or ([data["base"]] if data.get("base") else [])),
                               allocator)
    micro = sorted({f"{x['protocol']['per_device_batch']} x {x['protocol']['grad_accum']}"
                    for x in list(data.get("steps", {}).values()) + runs if x.get("protocol")})
    return {"allocator": allocator, "micro_batches": micro, "step": _prefer_best(step),
            "question": _prefer_best(question), "run_step": _prefer_best(run_step),
            "current": {k for k, v in step.items() if any(rank[0] for rank, _ in v)},
            "own_allocator": {"step": _best_is_own(step), "question": _best_is_own(question),
                              "run_step": _best_is_own(run_step)},
            "current_loads": [x["environment"]["loadavg_1min"] for x in one_thread + timings
                              if _current_code(x) and x["environment"].get("loadavg_1min") is not None],
            "tokens_per_step": tokens}


def _question_costs(sources: list[dict], allocator: str) -> dict[str, list[tuple[tuple, float]]]:
    """CPU seconds per question of each task scored by a 1-thread run or base scoring, with each's rank."""
    question: dict[str, list[tuple[tuple, float]]] = {}
    for src in sources:
        if src["environment"].get("threads") != 1 or not _rank(src, allocator):
            continue
        for part in PARTS:
            for t, v in src.get(part, {}).items():
                if v.get("cpu_seconds") is not None:
                    question.setdefault(t, []).append((_rank(src, allocator), v["cpu_seconds"] / max(1, v["n"])))
    return question


def _prefer_best(values: dict[Any, list[tuple[tuple, float]]]) -> dict[Any, float]:
    """Median per key of the values of the best rank that key has."""
    out = {}
    for k, v in values.items():
        best = max(rank for rank, _ in v)
        out[k] = statistics.median([x for rank, x in v if rank == best])
    return out


def _best_is_own(values: dict[Any, list[tuple[tuple, float]]]) -> set:
    """Keys whose best-ranked values were measured with the allocator asked for."""
    return {k for k, v in values.items() if max(rank for rank, _ in v)[1]}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _eval_sizes(plan: StudyPlan, protocol: Protocol) -> dict[str, int]:
    """Questions scored per task in one evaluation at the protocol's sizes."""
    tasks = plan.tasks
    sizes = {t: min(protocol.downstream_limit, tasks.test_sizes[t]) for t in tasks.downstream}
    sizes.update({t: (protocol.general_limit(t) * MMLU_SUBJECTS if t == "mmlu" else n)
                  for t, n in protocol.general_sizes})
    sizes[tasks.math] = protocol.math_limit
    return sizes


def projection(plan: StudyPlan, costs: dict[str, Any], protocol: Protocol, workers: int = 2) -> list[str]:
    """The study's expected time from measured costs: steps x s/step + sum over tasks of n x s/question."""
    if not costs["step"] or not costs["question"]:
        return ["(no 1-thread measurement stored yet)"]
    q = costs["question"]
    sizes = _eval_sizes(plan, protocol)
    missing = [t for t in sizes if t not in q]
    if missing:
        return [f"(no per-question cost measured yet for {', '.join(missing)})"]
    eval_s = sum(n * q[t] for t, n in sizes.items())
    worst = max(costs["step"].values())
    lines = [f"Evaluation of one model at the `{protocol.name}` sizes: " +
             " + ".join(f"{n} x {q[t]:.3f}" for t, n in sizes.items()) + f" = **{eval_s:.0f} s**.", ""]
    main_runs = plan.runs("main")
    # a curve run scores the general suite (and the math probe) at curve_points - 1 intermediate steps on top of
    # its final evaluation; the main runs that are curve runs too (`twin`) pay that, and the curves budget nothing
    general_s = sum(n * q[t] for t, n in sizes.items() if t not in plan.tasks.downstream)
    curve_s = (protocol.curve_points - 1) * general_s
    with_curve = [r for r in main_runs if plan.twin(r, protocol.name) is not None]
    total = eval_s + len(with_curve) * curve_s  # the base model, once
    lines += ["| method | s/step | measured? | train s | eval s | run s |", "|---|---|---|---|---|---|"]
    for m in plan.main_methods:
        per = costs["step"].get(m, worst)
        train = protocol.max_steps * per
        total += sum(1 for r in main_runs if r.method == m) * (train + eval_s + 10)
        measured = ("current code" if m in costs.get("current", ()) else "older code") if m in costs["step"] \
            else "no: slowest measured used"
        lines.append(f"| {m} | {per:.1f} | {measured} | {train:.0f} | {eval_s:.0f} | {train + eval_s + 10:.0f} |")
    lines += ["", "Main budget: base + 24 runs (+10 s model loading each)"
              + (f", {len(with_curve)} of which ({', '.join(r.run_id for r in with_curve)}) also score the curves "
                 f"({protocol.curve_points - 1} general-suite scorings of {general_s:.0f} s each) and are stored as "
                 "the curves budget's runs too" if with_curve else "")
              + f" = {total / 3600:.2f} core-hours, i.e. "
              f"**{total / 3600 / workers:.2f} h with {workers} workers x 1 thread** on the 2 cores "
              f"(target: 6 h: {'met' if total / workers <= 6 * 3600 else 'not met'})."]
    return lines + [_rest_projection(plan, costs, protocol, main_runs, eval_s, curve_s, worst, workers)]


def _rest_projection(plan: StudyPlan, costs: dict[str, Any], protocol: Protocol, main_runs: list[Run],
                     eval_s: float, curve_s: float, worst: float, workers: int) -> str:
    """The line pricing the budgets other than the main one (their runs not trained by the main budget)."""
    rest, own = 0.0, 0
    rest_runs = {r for b in ("ablations", "sweeps", "curves", "diagnostics") for r in plan.runs(b)
                 if r.setting != "mds"}
    trained_in_main = {r for r in rest_runs if plan.twin(r, protocol.name) in main_runs}
    for r in rest_runs - trained_in_main:
        per = costs.get("run_step", {}).get((protocol.name, r.run_id))
        own += per is not None
        per = per if per is not None else costs["step"].get(r.method, worst)
        extra = curve_s if plan.settings[r.setting].curve else 0.0
        rest += protocol.max_steps * per + eval_s + extra + 10
    return (f"The other budgets (ablations, sweeps, curves, diagnostics: {len(rest_runs)} runs, "
            f"{len(trained_in_main)} of them trained by the main budget, {own} at "
            f"their own s/step measured with the current code, the others at their method's s/step, which "
            f"prices low a setting that does more work per step) = {rest / 3600:.2f} core-hours, i.e. "
            f"**{rest / 3600 / workers:.2f} h** "
            f"(target: 4 h: {'met' if rest / workers <= 4 * 3600 else 'not met'}).")


def sizing_section(plan: StudyPlan, data: dict[str, Any]) -> list[str]:
    """Measured costs of the stored runs and, from them, the projected cost of the study's budgets: with the
    system malloc and, where anything was measured under it, with jemalloc (`slim_peft.training.allocator`)."""
    costs = measured_costs(data)
    if not costs["step"] and not costs["question"]:
        return []
    sources = [*data["runs"].values(), *data.get("steps", {}).values(), *(data.get("bases") or [])]
    fast = measured_costs(data, "jemalloc") if any(allocator_of(x) == "jemalloc" for x in sources) else None
    study = plan.study_protocol
    lines = [_sizing_intro(costs, fast), ""]
    lines += _cost_table("method", f"CPU s per training step (batch {study.batch})",
                         costs, fast, "step", lambda m: plan.method_order((m, "")), 2)
    if fast and fast["run_step"]:
        own = {k: v for k, v in fast["run_step"].items() if k in fast["own_allocator"]["run_step"]}
        if own:
            lines += ["", "Settings timed on their own (jemalloc): " + ", ".join(
                f"{rid.split('__')[0]} {v:.2f} (glibc {costs['run_step'][(p, rid)]:.2f})"
                if (p, rid) in costs["run_step"] else f"{rid.split('__')[0]} {v:.2f}"
                for (p, rid), v in sorted(own.items())) + " CPU s per step."]
    if costs.get("micro_batches"):
        lines += ["", "Measured with micro-batch x accumulation: " + ", ".join(costs["micro_batches"]) +
                  f" (the study uses {study.per_device_batch} x {study.grad_accum}; "
                  "same 16 examples per step)."]
    if costs.get("tokens_per_step"):
        lines += ["", f"Tokens per step (median, padding included): {costs['tokens_per_step']:.0f}."]
    lines += [""] + _cost_table("task", "CPU s per question", costs, fast, "question", None, 3)
    for c in (costs, fast) if fast else (costs,):
        lines += ["", f"Projected cost of the study with {ALLOCATOR_LABEL[c['allocator']]} from these "
                  "measurements:", ""]
        lines += projection(plan, c, study)
    return lines


def _sizing_intro(costs: dict[str, Any], fast: dict[str, Any] | None) -> str:
    loads = costs.get("current_loads") or []
    load = f" (1-min load average {min(loads):.1f}-{max(loads):.1f} at their end)" if loads else ""
    text = ("CPU seconds of one 1-thread worker: medians over the stored runs, base scorings and step timings "
            "(`--measure-steps`) done with `--threads 1`, keeping only those made with the current code (they "
            "record `adapter_dropout`) where a method or task has any" + load + "; a step timing is scaled to the "
            "runs' median tokens per step. Wall time of a 1-thread worker equals its CPU time when it has a core "
            "to itself: two workers on the 2 cores make a load average of 2; above that other jobs shared the "
            "cores, which inflates CPU time too (shared caches), so a projection from such measurements errs "
            "long.")
    if fast:
        text += (" Each cost is given for both allocators the study runs with (`--allocator`): glibc's malloc "
                 "and jemalloc, preloaded with `--allocator jemalloc` (see "
                 "`src/slim_peft/training/allocator.py`); `-` where jemalloc has no measurement of its own (its "
                 "projection then uses glibc's, which errs long). glibc's is the default: jemalloc with its "
                 "decay off keeps every freed page, and the exact-merge run outgrew the 24 GB machine under "
                 "it (see the script's docstring), so its projection holds only where memory allows.")
    return text


def _cost_table(key: str, what: str, costs: dict, fast: dict | None, part: str,
                order: Callable[[Any], Any] | None, digits: int) -> list[str]:
    """A Markdown table of `costs[part]`, with jemalloc's figures and the ratio beside them when measured."""
    keys = sorted(costs[part], key=order) if order else list(costs[part])
    if not fast:
        current = costs.get("current", ()) if part == "step" else None
        head = [f"| {key} | {what} |" + (" measured with |" if current is not None else ""),
                "|---|---|" + ("---|" if current is not None else "")]
        return head + [f"| {k} | {costs[part][k]:.{digits}f} |" +
                       ((" current code |" if k in current else " older code |") if current is not None else "")
                       for k in keys]
    lines = [f"| {key} | {what}: glibc | jemalloc | glibc / jemalloc |", "|---|---|---|---|"]
    for k in keys:
        own = k in fast["own_allocator"][part]
        j = fast[part].get(k)
        lines.append(f"| {k} | {costs[part][k]:.{digits}f} | " + (f"{j:.{digits}f} | {costs[part][k] / j:.2f}x |"
                                                                if own and j else "- | - |"))
    return lines
