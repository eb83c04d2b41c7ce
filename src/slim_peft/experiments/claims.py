"""The SLIM paper's claims checked against stored runs: each claim a `Claim` with typed verdicts.

A verdict is computed from paired differences by one rule (beyond 2 stderr in the paper's direction: reproduces;
beyond 2 stderr against it: contradicted; else unresolved, with its sign), never written by hand, so the report
cannot claim more than the runs show. Verdicts are `Verdict` members, not prose: the discussion groups claims by
`Claim.verdict`, and the prose (`Finding.text`) is only how a verdict is shown.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .stats import Estimate, beyond, compare, estimate, fmt_diff, score, score_se
from .study import PARTS, StudyPlan, group_runs

SLIM = ("slim", "mds")


class Verdict(enum.Enum):
    """What the stored runs say about a claim (or one part of it)."""

    REPRODUCES = "reproduces"  # beyond 2 stderr in the paper's direction (or within, where the paper says "same")
    PARTLY = "partly"  # a claim only: one part reproduces, another does not resolve
    UNRESOLVED = "unresolved"  # within 2 stderr, the paper's sign
    OPPOSITE = "opposite"  # within 2 stderr, the opposite sign
    CONTRADICTED = "contradicted"  # beyond 2 stderr against the paper
    PENDING = "pending"  # runs missing


@dataclass(frozen=True)
class Finding:
    """One part of a claim's verdict and how it is written."""

    verdict: Verdict
    text: str


@dataclass(frozen=True)
class Claim:
    """A claim of the paper, what the stored runs show, and the findings that make its verdict. `missing`
    names main methods not yet run: the verdict is then pending, however its findings read."""

    claim: str
    shown: str
    findings: tuple[Finding, ...]
    missing: tuple[str, ...] = ()

    @property
    def verdict(self) -> Verdict:
        """Pending with a method or run missing; else contradicted if any part is; reproduces if every part
        does; partly if some part does; else opposite if any part has the opposite sign; else unresolved."""
        kinds = [f.verdict for f in self.findings]
        if self.missing or Verdict.PENDING in kinds:
            return Verdict.PENDING
        if Verdict.CONTRADICTED in kinds:
            return Verdict.CONTRADICTED
        if all(k is Verdict.REPRODUCES for k in kinds):
            return Verdict.REPRODUCES
        if Verdict.REPRODUCES in kinds:
            return Verdict.PARTLY
        return Verdict.OPPOSITE if Verdict.OPPOSITE in kinds else Verdict.UNRESOLVED

    @property
    def verdict_text(self) -> str:
        pending = f"pending: main methods not run: {', '.join(self.missing)}; " if self.missing else ""
        return pending + "; ".join(f.text for f in self.findings)


def sign_finding(d: tuple[float, float], yes: str, no: str) -> Finding:
    """`yes` (reproduces) when the difference is beyond +2 stderr, `no` (contradicted) beyond -2 stderr, else
    unresolved, with the sign it has."""
    if d[0] > 2 * d[1]:
        return Finding(Verdict.REPRODUCES, yes)
    if d[0] < -2 * d[1]:
        return Finding(Verdict.CONTRADICTED, no)
    same = d[0] >= 0
    return Finding(Verdict.UNRESOLVED if same else Verdict.OPPOSITE,
                   f"not resolved ({'same' if same else 'opposite'} sign as the paper, within 2 stderr)")


def pending(what: str) -> tuple[Finding]:
    return (Finding(Verdict.PENDING, f"pending: {what}"),)


@dataclass(frozen=True)
class Comparison:
    """Stored runs grouped by (method, setting), plus the base model as group "base", with their labels."""

    groups: dict[Any, list[dict]]
    label: dict[Any, str]
    parts: Mapping[str, tuple[str, ...]]

    def delta(self, a: Any, b: Any, part: str) -> tuple[float, float]:
        """Group a minus group b on `part`, with its stderr (paired by question where possible)."""
        return compare(self.groups[a], self.groups[b], part, self.parts[part])

    def estimate(self, key: Any, part: str) -> Estimate:
        return estimate(self.groups[key], part, self.parts[part])

    def main_keys(self) -> list[tuple[str, str]]:
        """The main-table groups (setting "mds"), in stored order."""
        return [k for k in self.groups if k != "base" and k[1] == "mds"]


def comparison(runs: dict[str, dict], base: dict, plan: StudyPlan) -> Comparison:
    groups: dict[Any, list[dict]] = {**group_runs(runs), "base": [base]}
    label = {k: rs[0]["method_label"] for k, rs in groups.items() if k != "base"}
    return Comparison(groups, label, plan.tasks.parts)


def claims(cmp: Comparison, plan: StudyPlan) -> list[Claim]:
    """Every claim checked, in the report's order."""
    return _main_claims(cmp, plan) + _forgetting_claims(cmp) + _ablation_claims(cmp) + _sweep_claims(cmp) + \
        _curve_claim(cmp)


def _main_claims(cmp: Comparison, plan: StudyPlan) -> list[Claim]:
    main = cmp.main_keys()
    if SLIM not in cmp.groups or len(main) <= 1:
        return []
    missing = tuple(m for m in plan.main_methods if (m, "mds") not in cmp.groups)
    others = [k for k in main if k != SLIM]
    d_gen = {k: cmp.delta(SLIM, k, "general") for k in others}
    closest = min(d_gen, key=lambda k: d_gen[k][0] / max(d_gen[k][1], 1e-12))
    ahead = sum(d[0] > 0 for d in d_gen.values())
    rows = [Claim("SLIM keeps the most general capability (Table 2: general average 75.65 vs LoRA 31.24, "
                  "MixLoRA 51.08, LoRAMoE 66.39)",
                  f"SLIM's general mean is above {ahead} of {len(others)} baselines; closest: {cmp.label[closest]} "
                  f"({fmt_diff(d_gen[closest])} pts)",
                  (sign_finding(d_gen[closest], "reproduces", "contradicted"),), missing)]
    best = max(others, key=lambda k: cmp.estimate(k, "downstream").mean)
    d_down = cmp.delta(SLIM, best, "downstream")
    below = d_down[0] < -2 * d_down[1]
    rows.append(Claim("SLIM matches the best baselines downstream (Table 1)",
                      f"SLIM minus the best baseline downstream ({cmp.label[best]}): {fmt_diff(d_down)} pts",
                      (Finding(Verdict.CONTRADICTED, "does not reproduce (SLIM below by more than 2 stderr)") if below
                       else Finding(Verdict.REPRODUCES, "reproduces (no difference beyond 2 stderr, or SLIM ahead)"),),
                      missing))
    return rows


def _forgetting_claims(cmp: Comparison) -> list[Claim]:
    rows = []
    for key in (("lora", "mds"), ("dora", "mds")):
        if key in cmp.groups:
            d_gen, d_math = cmp.delta("base", key, "general"), cmp.delta("base", key, "math")
            rows.append(Claim(
                f"{cmp.label[key]} forgets (Table 2: LoRA MMLU 32.7 / GSM8K 0.0, DoRA 31.1 / 0.0, SLIM 65.8 / 76.1)",
                f"base minus {cmp.label[key]}: general {fmt_diff(d_gen)}, arithmetic {fmt_diff(d_math)} pts",
                (sign_finding(d_math, "direction reproduces on arithmetic", "contradicted on arithmetic"),
                 sign_finding(d_gen, "direction reproduces on the general suite",
                              "contradicted on the general suite"))))
    return rows


def _ablation_claims(cmp: Comparison) -> list[Claim]:
    rows = []
    for setting, what in (("no_identity", "identity experts"), ("no_yield", "weight yielding"),
                          ("no_merge", "dynamic merging")):
        claim = f"removing {what} increases forgetting (Table 3)"
        if {SLIM, ("slim", setting)} <= set(cmp.groups):
            d = cmp.delta(SLIM, ("slim", setting), "general")
            rows.append(Claim(claim, f"SLIM minus w/o {what}: general {fmt_diff(d)}",
                              (sign_finding(d, "reproduces", "contradicted"),)))
        else:
            rows.append(Claim(claim, "-", pending(f"run `slim/{setting}`")))
    claim = "fast (factor-masked) merging changes accuracy only slightly (Table 3)"
    if {SLIM, ("slim", "exact_merge")} <= set(cmp.groups):
        d_down, d_gen = (cmp.delta(SLIM, ("slim", "exact_merge"), p) for p in ("downstream", "general"))
        close = not any(beyond(d) for d in (d_down, d_gen))
        rows.append(Claim(claim, f"fast minus exact: downstream {fmt_diff(d_down)}, general {fmt_diff(d_gen)}",
                          (Finding(Verdict.REPRODUCES, "reproduces") if close else
                           Finding(Verdict.CONTRADICTED, "does not reproduce (a difference beyond 2 stderr)"),)))
    else:
        rows.append(Claim(claim, "-", pending("run `slim/exact_merge`")))
    return rows


def _sweep_claims(cmp: Comparison) -> list[Claim]:
    lo, hi = ("slim", "mask0.1"), ("slim", "mask0.9")
    claim = "mask ratio: too large drops downstream accuracy, too small loses the forgetting benefit (Fig. 4)"
    if {SLIM, lo, hi} <= set(cmp.groups):
        d_down, d_gen = cmp.delta(SLIM, hi, "downstream"), cmp.delta(SLIM, lo, "general")
        rows = [Claim(claim, f"downstream at 0.5 minus 0.9: {fmt_diff(d_down)}; general at 0.5 minus 0.1: "
                             f"{fmt_diff(d_gen)}",
                      (sign_finding(d_down, "large-ratio drop reproduces", "contradicted"),
                       sign_finding(d_gen, "small-ratio loss reproduces", "contradicted")))]
    else:
        rows = [Claim(claim, "-", pending("run the `sweeps` budget"))]
    few, many = ("slim", "experts2"), ("slim", "experts16")
    claim = "more LoRA experts: better downstream, no effect on general ability (Fig. 6)"
    if {few, many} <= set(cmp.groups):
        d_down, d_gen = cmp.delta(many, few, "downstream"), cmp.delta(many, few, "general")
        # "no effect" within 2 stderr is not counted as reproducing (nor a change as contradicting): unresolved
        general = Finding(Verdict.UNRESOLVED, "general " + ("changed beyond 2 stderr" if beyond(d_gen)
                                                            else "unchanged within 2 stderr"))
        rows.append(Claim(claim, f"16 minus 2 experts: downstream {fmt_diff(d_down)}, general {fmt_diff(d_gen)}",
                          (sign_finding(d_down, "downstream gain reproduces", "contradicted"), general)))
    else:
        rows.append(Claim(claim, "-", pending("run the `sweeps` budget")))
    return rows


def _curve_claim(cmp: Comparison) -> list[Claim]:
    claim = "SLIM's general ability degrades less over training steps than LoRA's and MixLoRA's (Fig. 5)"
    curves = {k[0]: rs[0]["curve"] for k, rs in cmp.groups.items()
              if k != "base" and k[1] == "curve" and rs[0]["curve"]}
    if not {"slim", "lora", "mixlora"} <= set(curves):
        return [Claim(claim, "-", pending("run the `curves` budget"))]
    base = cmp.groups["base"][0]
    shown, findings = [], []
    for part, key, name in (("general", "general_mean", "general suite"), ("math", "math", "arithmetic")):
        if any(c.get(key) is None for m in ("slim", "lora", "mixlora") for c in curves[m]):
            continue
        drop = {m: score(base, part) - min(c[key] for c in curves[m]) for m in curves}
        se = score_se(base, part, cmp.parts[part]) * math.sqrt(2)  # curve points store no outcomes: unpaired
        d = (min(drop["lora"], drop["mixlora"]) - drop["slim"], se)
        shown.append(f"{name}: SLIM {100 * drop['slim']:.1f}, LoRA {100 * drop['lora']:.1f}, MixLoRA "
                     f"{100 * drop['mixlora']:.1f} pts (unpaired stderr of a difference about {100 * se:.1f})")
        findings.append(sign_finding(d, f"reproduces on the {name}", f"contradicted on the {name}"))
    return [Claim(claim, "largest drop below the base model over the curve, " + "; ".join(shown), tuple(findings))]


def slim_setting_keys(cmp: Comparison, plan: StudyPlan) -> list[tuple[str, str]]:
    """Group keys of the SLIM settings other than the main table and the curve (ablations, sweeps,
    diagnostics), in the plan's order of settings."""
    order = list(plan.settings)
    return sorted((k for k in cmp.groups if k != "base" and k[0] == "slim" and k[1] not in ("mds", "curve")),
                  key=lambda k: order.index(k[1]))


@dataclass(frozen=True)
class Effect:
    """A SLIM setting minus the main SLIM runs, per part, and its mean identity share at evaluation."""

    key: tuple[str, str]
    delta: dict[str, tuple[float, float]]
    identity_share: float | None


def identity_share(runs: list[dict]) -> float | None:
    """Mean routing weight on the identity experts at evaluation over the runs that recorded it."""
    shares = [(r.get("routing_eval") or {}).get("mean_identity_share") for r in runs]
    shares = [x for x in shares if x is not None]
    return statistics.fmean(shares) if shares else None


def effects(cmp: Comparison, plan: StudyPlan) -> list[Effect]:
    """Each stored SLIM setting other than the main one minus the main SLIM runs, in the plan's order."""
    if SLIM not in cmp.groups:
        return []
    return [Effect(k, {p: cmp.delta(k, SLIM, p) for p in PARTS}, identity_share(cmp.groups[k]))
            for k in slim_setting_keys(cmp, plan)]
