"""The report's reading of the study: the claims table, what moves SLIM, and a discussion generated from both.

Generated from `claims` (typed verdicts) and the paired differences, so it cannot drift from the numbers: a claim
is listed under the heading of its `Verdict`, and every figure quoted is computed here from the stored runs.
"""

from __future__ import annotations

import re
from typing import Any

from . import claims as cl
from .claims import SLIM, Comparison, Verdict
from .stats import beyond, fmt_diff, learn_forget_front, score
from .study import PARTS, StudyPlan

HEADINGS = {Verdict.REPRODUCES: "Reproduces at this scale", Verdict.PARTLY: "Partly reproduces",
            Verdict.UNRESOLVED: "Same direction as the paper but within 2 stderr",
            Verdict.OPPOSITE: "Opposite direction to the paper, within 2 stderr",
            Verdict.CONTRADICTED: "Does not reproduce", Verdict.PENDING: "Pending (runs missing)"}


def checked_claims(plan: StudyPlan, runs: dict[str, dict], base: dict) -> list[cl.Claim]:
    """The paper's claims checked against `runs` and the base model."""
    return cl.claims(cl.comparison(runs, base, plan), plan)


def claims_section(plan: StudyPlan, runs: dict[str, dict], base: dict) -> list[str]:
    """The paper's claims next to what the stored runs show, with a verdict per claim (computed, not
    written by hand: a claim whose runs are missing is marked pending)."""
    cmp = cl.comparison(runs, base, plan)
    general0 = plan.tasks.general[0]
    with_outcomes = sum("correct" in src["general"][general0] for rs in cmp.groups.values() for src in rs)
    total = sum(len(rs) for rs in cmp.groups.values())
    lines = ["### The paper's claims at this scale", "",
             "Differences in points ± stderr; `*` marks a difference beyond 2 stderr. The stderr's test-set part "
             "pairs the two sides question by question, from the evaluations that stored per-question outcomes "
             f"({with_outcomes} of {total} here, the base model included); where a side has none, the test-set "
             "errors are counted as independent, which overstates the stderr. The spread over seeds is added where "
             "there are several (one seed: seed noise not measured).", ""]
    main = sorted(cmp.main_keys(), key=plan.method_order)
    lines += ["| vs base model | seeds | downstream | general (7) | arithmetic |", "|---|---|---|---|---|"]
    lines += [f"| {cmp.label[k]} | {len(cmp.groups[k])} | " +
              " | ".join(fmt_diff(cmp.delta(k, "base", p)) for p in PARTS) + " |" for k in main]
    if SLIM in cmp.groups and len(main) > 1:
        lines += ["", "| SLIM minus | seeds (SLIM / other) | downstream | general (7) | arithmetic |",
                  "|---|---|---|---|---|"]
        lines += [f"| {cmp.label[k]} | {len(cmp.groups[SLIM])} / {len(cmp.groups[k])} | " +
                  " | ".join(fmt_diff(cmp.delta(SLIM, k, p)) for p in PARTS) + " |" for k in main if k != SLIM]
    lines += ["", "| claim (paper) | what the stored runs show | verdict |", "|---|---|---|"]
    lines += [f"| {c.claim} | {c.shown} | {c.verdict_text} |" for c in cl.claims(cmp, plan)]
    return lines + [""]


def effects_section(plan: StudyPlan, runs: dict[str, dict], base: dict) -> list[str]:
    """What moves SLIM: every ablation, sweep and diagnostic setting minus the main SLIM runs."""
    cmp = cl.comparison(runs, base, plan)
    rows = cl.effects(cmp, plan)
    lines = ["### What moves SLIM: each setting minus the main SLIM runs", ""]
    if not rows:
        return lines + ["No ablation, sweep or diagnostic run is stored yet (budgets `ablations`, `sweeps`, "
                        "`diagnostics`).", ""]
    main_share = cl.identity_share(cmp.groups[SLIM])
    lines += ["Points ± stderr (paired by question; the setting's own seed noise is not measured with one seed, so "
              "`*` is optimistic); identity share = mean routing weight on the identity experts at evaluation "
              + (f"(main SLIM: {main_share:.3f})." if main_share is not None else "."), "",
              "| setting | group | seeds | downstream | general (7) | arithmetic | identity share |",
              "|---|---|---|---|---|---|---|"]
    for e in rows:
        spec = plan.settings[e.key[1]]
        cells = [f"{spec.label} (`{e.key[1]}`)", spec.group, str(len(cmp.groups[e.key]))] + \
            [fmt_diff(e.delta[p]) for p in PARTS]
        lines.append("| " + " | ".join(cells + ["-" if e.identity_share is None else f"{e.identity_share:.3f}"])
                     + " |")
    best_gen = max(rows, key=lambda e: e.delta["general"][0])
    best_down = max(rows, key=lambda e: e.delta["downstream"][0])
    lines += ["", f"Highest general-suite change: {plan.settings[best_gen.key[1]].label} "
                  f"({fmt_diff(best_gen.delta['general'])}); highest downstream change: "
                  f"{plan.settings[best_down.key[1]].label} ({fmt_diff(best_down.delta['downstream'])})"
                  + ("; no setting keeps more general capability than the main SLIM"
                     if best_gen.delta["general"][0] <= 0 else "") + ".", ""]
    return lines + seed_offset_lines(cmp, plan)


def seed_offset_lines(cmp: Comparison, plan: StudyPlan) -> list[str]:
    """How far the main SLIM run of each seed the settings used sits from the main SLIM mean: a single-seed
    setting's difference carries that offset before any effect of the setting."""
    main = cmp.groups[SLIM]
    if len(main) < 2:
        return []
    used = sorted({r["seed"] for k in cl.slim_setting_keys(cmp, plan) for r in cmp.groups[k]})
    offsets = []
    for seed in used:
        same = [r for r in main if r["seed"] == seed]
        if same:
            offsets.append(f"seed {seed}: " + ", ".join(
                f"{name} {100 * (score(same[0], p) - cmp.estimate(SLIM, p).mean):+.1f}"
                for p, name in (("downstream", "downstream"), ("general", "general"), ("math", "arithmetic"))))
    if not offsets:
        return []
    return [f"The settings ran with seed(s) {', '.join(map(str, used))}; the main SLIM run of that seed minus the "
            f"main SLIM mean over {len(main)} seeds is " + "; ".join(offsets) + " points, which every single-seed "
            "difference above contains (same data order and initialisation as that run).", ""]


def matched_downstream_line(cmp: Comparison, plan: StudyPlan, best: Any) -> str:
    """The SLIM settings (ablations, sweeps, diagnostics) whose downstream mean reaches the best baseline's,
    each minus that baseline: does SLIM keep more general capability at matched downstream accuracy?"""
    best_label = cmp.label[best]
    bar = cmp.estimate(best, "downstream").mean
    keys = [k for k in cl.slim_setting_keys(cmp, plan) if cmp.estimate(k, "downstream").mean >= bar]
    head = f"- At matched downstream accuracy (SLIM settings at or above {best_label}'s {100 * bar:.1f})"
    if not keys:
        return head + ": none of the stored settings."
    keys.sort(key=lambda k: -cmp.estimate(k, "downstream").mean)
    items = [f"{plan.settings[k[1]].label} ({len(cmp.groups[k])} seed{'s' if len(cmp.groups[k]) > 1 else ''}): "
             f"downstream {100 * cmp.estimate(k, 'downstream').mean:.1f}, general minus {best_label} "
             f"{fmt_diff(cmp.delta(k, best, 'general'))}, arithmetic {fmt_diff(cmp.delta(k, best, 'math'))}"
             for k in keys]
    return head + ": " + "; ".join(items) + "."


def claims_by_verdict(checked: list[cl.Claim]) -> dict[Verdict, list[str]]:
    """The claims' names (without the paper reference) under each verdict that has any, in `HEADINGS` order."""
    by_verdict: dict[Verdict, list[str]] = {}
    for c in checked:
        by_verdict.setdefault(c.verdict, []).append(re.sub(r" \((Table|Fig)[^)]*\)$", "", c.claim))
    return {v: by_verdict[v] for v in HEADINGS if v in by_verdict}


def discussion_section(plan: StudyPlan, runs: dict[str, dict], base: dict) -> list[str]:
    """The plain reading of the study, generated from the claims and effects above (so it cannot drift from the
    numbers): what reproduces, what does not, how this setting differs from the paper's, and what was tried."""
    cmp = cl.comparison(runs, base, plan)
    checked = cl.claims(cmp, plan)
    lines = ["### Discussion (generated from the tables above)", ""]
    if not checked:
        return lines + ["Nothing to discuss yet: the main SLIM runs and at least one baseline are needed.", ""]
    for verdict, names in claims_by_verdict(checked).items():
        lines.append(f"- {HEADINGS[verdict]}: " + "; ".join(names) + ".")
    main = cmp.main_keys()
    proto = cmp.groups[main[0]][0]["protocol"] if main else None
    if len(main) > 1 and proto:
        lines += ["", _size_line(cmp, main, proto), _tradeoff_line(cmp, main)]
        if SLIM in main:
            best = max((k for k in main if k != SLIM), key=lambda k: cmp.estimate(k, "downstream").mean)
            d_down, d_gen = cmp.delta(SLIM, best, "downstream"), cmp.delta(SLIM, best, "general")
            lines[-1] += (f" Against the best downstream baseline ({cmp.label[best]}) SLIM is {fmt_diff(d_down)} "
                          f"points downstream and {fmt_diff(d_gen)} on the general suite.")
            lines.append(matched_downstream_line(cmp, plan, best))
        lines.append(_moves_line(cmp, plan))
    lines += ["", "Decided or tried to keep the comparison fair at this scale (see the methods table): each method "
              "at its paper's learning rate (I-LoRA's scaled to our batch); LoRA/DoRA rank scaled to the model "
              "width; the general suite scored with lm-eval's loglik templates and sized for a 1.5-point stderr; "
              "differences paired question by question; arithmetic scored by the last number generated (first-line "
              "exact match is 0 for every model); MMLU kept although the 135M model is at chance on it, so it "
              "cannot separate methods.", ""]
    return lines


def _size_line(cmp: Comparison, main: list, proto: dict[str, Any]) -> str:
    gen = {k: -cmp.delta(k, "base", "general")[0] for k in main}
    math_loss = {k: -cmp.delta(k, "base", "math")[0] for k in main}
    worst_gen, worst_math = max(gen, key=gen.get), max(math_loss, key=math_loss.get)
    return (f"- Size: the largest general-suite loss of a main method is {100 * gen[worst_gen]:.1f} points "
            f"({cmp.label[worst_gen]}), the largest arithmetic loss {100 * math_loss[worst_math]:.1f} points "
            f"({cmp.label[worst_math]}); after MDS training the paper reports MMLU / GSM8K of 32.7 / 0.0 for "
            "LoRA and 65.8 / 76.1 for SLIM (OpenChat-8B, 2 epochs over the full datasets). "
            f"{proto['max_steps']} steps x {proto['per_device_batch'] * proto['grad_accum']} examples on a "
            "135M model compare with that on direction and ordering only, not on size.")


def _tradeoff_line(cmp: Comparison, main: list) -> str:
    points = [(cmp.label[k], cmp.estimate(k, "downstream").mean, cmp.estimate(k, "general").mean) for k in main]
    front = learn_forget_front(points)
    return ("- Trade-off: on the learn-forget front (no method higher on both means) are " + ", ".join(front)
            + "; " + ("SLIM is on it." if "SLIM" in front else "SLIM is not: a method is ahead on both."))


def _moves_line(cmp: Comparison, plan: StudyPlan) -> str:
    effects = cl.effects(cmp, plan)
    if not effects:
        return ("- What moves SLIM's retention (yield strength, mask ratio, L1 weight, cluster count, "
                "which layers): pending, the `ablations`, `sweeps` and `diagnostics` budgets.")
    part_names = {"downstream": "downstream", "general": "general", "math": "arithmetic"}
    moved, still = [], []
    for e in effects:
        past = [f"{name} {fmt_diff(e.delta[p])}" for p, name in part_names.items() if beyond(e.delta[p])]
        if past:
            moved.append(f"{plan.settings[e.key[1]].label} ({', '.join(past)})")
        else:
            still.append(plan.settings[e.key[1]].label)
    return ("- What moves SLIM (settings beyond 2 stderr from the main SLIM runs): " +
            ("; ".join(moved) if moved else f"none of the {len(effects)} stored") + "." +
            (f" Within 2 stderr on downstream, general and arithmetic alike: {', '.join(still)}."
             if still and moved else ""))
