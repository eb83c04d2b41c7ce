"""slim_peft.experiments.claims: typed verdicts computed from paired differences, the effects of SLIM's
settings, and the discussion's grouping by verdict. Fake runs (no model): downstream 0.3 + shift, general
0.5 - shift, arithmetic 0.1, every task at stderr 0.05 (so a general difference of one run each has stderr
0.05 * sqrt(2/7) = 2.7 points, a downstream one 4.1, arithmetic 7.1)."""

from __future__ import annotations

import math
import statistics

import pytest
from study_fakes import PLAN, fake_base, fake_scores, nums, runs_of

from slim_peft.experiments.claims import (
    SLIM,
    Claim,
    Finding,
    Verdict,
    claims,
    comparison,
    effects,
    sign_finding,
    slim_setting_keys,
)
from slim_peft.experiments.study_discussion import claims_by_verdict

BASE = {"kind": "base", **fake_scores()}  # no per-question outcomes: differences are unpaired


def checked(runs: dict, base: dict = BASE) -> dict[str, Claim]:
    return {c.claim.split(" (")[0]: c for c in claims(comparison(runs, base, PLAN), PLAN)}


@pytest.mark.parametrize("kinds, verdict", [
    ((Verdict.REPRODUCES,), Verdict.REPRODUCES),
    ((Verdict.REPRODUCES, Verdict.REPRODUCES), Verdict.REPRODUCES),
    ((Verdict.REPRODUCES, Verdict.UNRESOLVED), Verdict.PARTLY),
    ((Verdict.OPPOSITE, Verdict.REPRODUCES), Verdict.PARTLY),
    ((Verdict.UNRESOLVED,), Verdict.UNRESOLVED),
    ((Verdict.OPPOSITE,), Verdict.OPPOSITE),
    ((Verdict.OPPOSITE, Verdict.UNRESOLVED), Verdict.OPPOSITE),
    ((Verdict.REPRODUCES, Verdict.CONTRADICTED), Verdict.CONTRADICTED),
    ((Verdict.PENDING,), Verdict.PENDING),
])
def test_a_claims_verdict_combines_its_findings(kinds, verdict):
    assert Claim("c", "s", tuple(Finding(k, k.value) for k in kinds)).verdict is verdict


def test_missing_main_methods_make_any_claim_pending_and_say_so():
    claim = Claim("c", "s", (Finding(Verdict.REPRODUCES, "reproduces"),), missing=("dora", "mola"))
    assert claim.verdict is Verdict.PENDING
    assert claim.verdict_text == "pending: main methods not run: dora, mola; reproduces"
    both = Claim("c", "s", (Finding(Verdict.REPRODUCES, "a"), Finding(Verdict.UNRESOLVED, "b")))
    assert both.verdict_text == "a; b"


def test_sign_rule_is_two_stderr_either_way():
    assert sign_finding((0.05, 0.02), "yes", "no") == Finding(Verdict.REPRODUCES, "yes")
    assert sign_finding((-0.05, 0.02), "yes", "no") == Finding(Verdict.CONTRADICTED, "no")
    assert sign_finding((0.04, 0.02), "yes", "no").verdict is Verdict.UNRESOLVED
    assert sign_finding((-0.01, 0.02), "yes", "no").verdict is Verdict.OPPOSITE
    assert sign_finding((0.0, 0.02), "yes", "no").verdict is Verdict.UNRESOLVED


def test_main_claims_follow_the_numbers():
    ahead = checked(runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1)))  # general: SLIM 50, LoRA 40
    keeps = ahead["SLIM keeps the most general capability"]
    assert keeps.missing == ("dora", "mixlora", "mixlora_dy", "loramoe", "mola", "ilora")
    assert keeps.verdict is Verdict.PENDING and [f.verdict for f in keeps.findings] == [Verdict.REPRODUCES]
    assert nums(keeps.shown) == [1, 1, 10.0, 2.7]  # above 1 of 1 baselines, closest +10.0 ± 2.7
    matches = ahead["SLIM matches the best baselines downstream"]  # -10.0 ± 4.1: beyond 2 stderr below
    assert nums(matches.shown)[-2:] == [-10.0, 4.1] and matches.findings[0].verdict is Verdict.CONTRADICTED
    forgets = ahead["LoRA forgets"]  # base minus LoRA: general +10 (beyond), arithmetic 0 (within)
    assert [f.verdict for f in forgets.findings] == [Verdict.UNRESOLVED, Verdict.REPRODUCES]
    assert forgets.verdict is Verdict.PARTLY and nums(forgets.shown) == [10.0, 2.7, 0.0, 7.1]

    behind = checked(runs_of(("slim", "mds", 0.2), ("lora", "mds", 0.0)))
    assert behind["SLIM keeps the most general capability"].findings[0].verdict is Verdict.CONTRADICTED
    close = checked(runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.02)))
    assert close["SLIM keeps the most general capability"].findings[0].verdict is Verdict.UNRESOLVED
    assert "SLIM keeps the most general capability" not in checked(runs_of(("slim", "mds", 0.0)))


def test_claims_without_their_runs_are_pending():
    rows = checked(runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1)))
    for name in ("removing identity experts increases forgetting", "fast", "mask ratio: too large drops "
                 "downstream accuracy, too small loses the forgetting benefit", "more LoRA experts: better "
                 "downstream, no effect on general ability", "SLIM's general ability degrades less over "
                 "training steps than LoRA's and MixLoRA's"):
        assert rows[name].verdict is Verdict.PENDING and rows[name].shown == "-", name


def test_ablation_sweep_and_experts_claims():
    rows = checked(runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1), ("slim", "no_yield", 0.1),
                           ("slim", "exact_merge", 0.0), ("slim", "mask0.1", 0.2), ("slim", "mask0.9", 0.0),
                           ("slim", "experts2", 0.0), ("slim", "experts16", 0.0)))
    no_yield = rows["removing weight yielding increases forgetting"]
    assert no_yield.verdict is Verdict.REPRODUCES and nums(no_yield.shown) == [10.0, 2.7]
    assert rows["fast"].verdict is Verdict.REPRODUCES and nums(rows["fast"].shown) == [0.0, 4.1, 0.0, 2.7]
    mask = rows["mask ratio: too large drops downstream accuracy, too small loses the forgetting benefit"]
    assert [f.verdict for f in mask.findings] == [Verdict.UNRESOLVED, Verdict.REPRODUCES]  # general +20 at 0.1
    experts = rows["more LoRA experts: better downstream, no effect on general ability"]
    # no difference at all: the downstream gain is unresolved, and "no effect" within noise is not counted
    assert [f.verdict for f in experts.findings] == [Verdict.UNRESOLVED, Verdict.UNRESOLVED]
    assert experts.verdict is Verdict.UNRESOLVED


def test_curve_claim_compares_the_largest_drops_on_both_parts():
    runs = runs_of(("lora", "curve", 0.1), ("mixlora", "curve", 0.1), ("slim", "curve", 0.1))
    lows = {"lora": (0.40, 0.00), "mixlora": (0.42, 0.02), "slim": (0.49, 0.10)}
    for method, (gen, arith) in lows.items():
        runs[f"curve__{method}__seed0"]["curve"] = [{"step": 5, "general_mean": gen, "math": arith},
                                                    {"step": 10, "general_mean": 0.495, "math": 0.05}]
    claim = checked(runs)["SLIM's general ability degrades less over training steps than LoRA's and MixLoRA's"]
    # general drops: SLIM 1.0, LoRA 10.0, MixLoRA 8.0 (stderr 2.7); arithmetic: 5.0, 10.0, 8.0 (stderr 7.1)
    assert nums(claim.shown) == [1.0, 10.0, 8.0, 2.7, 5.0, 10.0, 8.0, 7.1]
    assert [f.verdict for f in claim.findings] == [Verdict.REPRODUCES, Verdict.UNRESOLVED]  # 7.0 > 5.4; 3.0 < 14
    assert claim.verdict is Verdict.PARTLY
    del runs["curve__mixlora__seed0"]
    assert checked(runs)[claim.claim.split(" (")[0]].verdict is Verdict.PENDING


def test_paired_outcomes_shrink_the_stderr_of_a_difference():
    base = fake_base()  # stores per-question outcomes; the fake runs do not: unpaired against them
    runs = runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1))
    cmp = comparison(runs, base, PLAN)
    unpaired = cmp.delta("base", ("lora", "mds"), "general")
    for r in runs.values():  # the base's answers (20 of 40 right), LoRA's with 4 of them lost: score 0.4
        hits = round(r["general"]["piqa"]["score"] * 40)
        r["general"] = {t: {**e, "correct": "1" * hits + "0" * (40 - hits), "ids_digest": "fake"}
                        for t, e in r["general"].items()}
    paired = comparison(runs, base, PLAN).delta("base", ("lora", "mds"), "general")
    d = [1.0] * 4 + [0.0] * 36  # base minus LoRA, question by question, on each of the 7 tasks
    assert paired == (pytest.approx(unpaired[0]), pytest.approx(math.sqrt(7 * statistics.variance(d) / 40) / 7))
    assert paired[1] < unpaired[1]


def test_effects_are_each_setting_minus_the_main_slim_runs_in_plan_order():
    runs = runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1), ("slim", "mask0.7", 0.0), ("slim", "no_yield", 0.1))
    runs["mask0.7__slim__seed0"]["math_score"] = 0.6  # only arithmetic moves
    runs["no_yield__slim__seed0"]["routing_eval"] = {}
    cmp = comparison(runs, BASE, PLAN)
    assert slim_setting_keys(cmp, PLAN) == [("slim", "no_yield"), ("slim", "mask0.7")]
    rows = {e.key[1]: e for e in effects(cmp, PLAN)}
    assert rows["no_yield"].delta["downstream"] == (pytest.approx(0.1), pytest.approx(0.0408, abs=1e-4))
    assert rows["no_yield"].delta["general"][0] == pytest.approx(-0.1) and rows["no_yield"].identity_share is None
    assert rows["mask0.7"].delta["math"][0] == pytest.approx(0.5) and rows["mask0.7"].identity_share == 0.3
    assert effects(comparison(runs_of(("lora", "mds", 0.1)), BASE, PLAN), PLAN) == []
    assert SLIM == ("slim", "mds")


def test_discussion_groups_claims_by_verdict():
    runs = runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1), ("slim", "no_yield", 0.1))
    groups = claims_by_verdict(claims(comparison(runs, BASE, PLAN), PLAN))
    assert list(groups) == [Verdict.REPRODUCES, Verdict.PARTLY, Verdict.PENDING]  # the headings' order
    assert groups[Verdict.REPRODUCES] == ["removing weight yielding increases forgetting"]
    assert groups[Verdict.PARTLY] == ["LoRA forgets"]  # the paper reference is dropped
    assert "SLIM keeps the most general capability" in groups[Verdict.PENDING]  # 6 main methods missing
