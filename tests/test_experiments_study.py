"""slim_peft.experiments.study and .store: the YAML plan, its protocols and digests, run selection, twins, run
status against stored JSONs. No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study_fakes import PLAN, PLAN_FILE, REPO, fake_run, store_base

from slim_peft.experiments.store import collect, json_digest, load_json, write_json
from slim_peft.experiments.study import (
    MMLU_SUBJECTS,
    PlanError,
    Protocol,
    Run,
    base_is_current,
    group_runs,
    load_plan,
    run_status,
    steps_path,
)

STORED = REPO / "benchmarks" / "results" / "forgetting"


def test_the_plan_finds_every_stored_run_by_its_digests():
    """Stored runs are found by protocol digest and adapter config: the YAML plan must reproduce both exactly."""
    assert PLAN.protocols["study"].digest() == "a1ba65cc33" and PLAN.protocols["pilot"].digest() == "38247a2b74"
    stored, planned = set(), set()
    for proto_dir in sorted(p for p in STORED.iterdir() if p.is_dir()):
        proto = PLAN.protocols[proto_dir.name]
        base = load_json(proto_dir / "base.json")
        assert base["eval_digest"] == proto.eval_digest()
        assert base_is_current(base, proto) == (proto.name == "study")  # the pilot's base predates the outcomes
        for f in proto_dir.glob("*__seed*.json"):
            data = json.loads(f.read_text())
            run = Run(data["method"], data["setting"], data["seed"])
            assert data["protocol_digest"] == proto.digest(), f.name
            assert data["protocol"] == proto.to_dict(), f.name
            assert data["adapter_config"] == PLAN.run_config(run), f.name
            assert data["learning_rate"] == PLAN.methods[run.method].lr, f.name
            stored.add((proto.name, run))
    for budget, b in PLAN.budgets.items():
        proto = PLAN.protocols[b.protocol]
        assert {run_status(PLAN, r, STORED, proto) for r in PLAN.runs(budget)} == {"done"}, budget
        planned |= {(proto.name, r) for r in PLAN.runs(budget)}
    assert stored == planned and len(stored) == 48  # every planned run is stored, and nothing else


def test_protocol_fields_are_typed_so_yaml_ints_hash_like_the_stored_floats():
    d = PLAN.protocols["study"].to_dict()
    again = Protocol.from_dict({**d, "max_grad_norm": 1, "weight_decay": "0.01"})  # YAML spellings
    assert again == PLAN.protocols["study"] and again.digest() == PLAN.protocols["study"].digest()
    assert isinstance(again.max_grad_norm, float) and isinstance(again.general_sizes, tuple)
    assert Protocol.from_dict({**d, "max_grad_norm": 2.0}).digest() != again.digest()
    with pytest.raises(PlanError, match="unknown field"):
        Protocol.from_dict({**d, "epochs": 2})


def test_eval_digest_ignores_training_fields():
    study = PLAN.protocols["study"]
    longer = PLAN.make_protocol("main", max_steps=99)
    assert longer.eval_digest() == study.eval_digest() and longer.digest() != study.digest()
    assert PLAN.make_protocol("main", limit_math=7).eval_digest() != study.eval_digest()


def test_main_budget_is_8_methods_by_3_seeds_seed_major():
    runs = PLAN.runs("main")
    assert len(runs) == 24 and len({r.run_id for r in runs}) == 24
    assert {r.method for r in runs} == set(PLAN.main_methods) and len(PLAN.main_methods) == 8
    assert [r.seed for r in runs[:8]] == [0] * 8  # every method gets seed 0 before any gets seed 1
    assert all(r.setting == "mds" for r in runs)


def test_method_setting_and_seed_selection():
    assert [(r.method, r.seed) for r in PLAN.runs("main", ["slim", "lora"], [5])] == [("lora", 5), ("slim", 5)]
    assert [(r.method, r.setting) for r in PLAN.runs("pilot", ["dora"])] == [("dora", "mds")]
    # a method outside the budget runs in the budget's first setting only
    assert [(r.method, r.setting) for r in PLAN.runs("ablations", ["lora"])] == [("lora", "mds")]
    with pytest.raises(PlanError, match="unknown method"):
        PLAN.runs("main", ["lorra"])
    picked = PLAN.runs("sweeps", seeds=[1, 2], settings=["experts2", "mask0.1"])
    assert [(r.setting, r.seed) for r in picked] == [("mask0.1", 1), ("experts2", 1), ("mask0.1", 2),
                                                      ("experts2", 2)]
    with pytest.raises(PlanError, match="not in budget 'sweeps'"):
        PLAN.runs("sweeps", settings=["yield0.5"])  # a diagnostics setting


def test_budgets_hold_their_groups_settings():
    groups = {name: [k for k, s in PLAN.settings.items() if s.group == name] for name in
              ("mask_sweep", "experts_sweep", "diagnostics")}
    assert [r.setting for r in PLAN.runs("sweeps")] == groups["mask_sweep"] + groups["experts_sweep"]
    assert [r.setting for r in PLAN.runs("diagnostics")] == groups["diagnostics"]
    assert {r.setting for r in PLAN.runs("ablations")} == {"mds", "no_identity", "no_yield", "no_merge",
                                                           "exact_merge"}
    assert {r.method for r in PLAN.runs("curves")} == {"lora", "mixlora", "slim"}


def test_settings_override_slim_only():
    assert PLAN.run_config(Run("slim", "no_identity", 0)) == {"method": "slim", "num_identity_experts": 0}
    assert PLAN.run_config(Run("slim", "l1_0.01", 0))["l1_weight"] == pytest.approx(0.01)
    assert PLAN.run_config(Run("lora", "mds", 0))["r"] == 16
    with pytest.raises(ValueError):
        PLAN.run_config(Run("lora", "no_yield", 0))


def test_every_planned_config_is_a_valid_adapter_config():
    from slim_peft.adapters import config_from_dict

    for budget in PLAN.budgets:
        for run in PLAN.runs(budget):
            config_from_dict(PLAN.run_config(run))  # raises on a bad field or value


def test_overrides_make_a_separate_protocol():
    study = PLAN.make_protocol("main")
    assert study.name == "study" and PLAN.make_protocol("ablations") is study
    custom = PLAN.make_protocol("main", max_steps=3)
    assert custom.name == f"custom-{custom.digest()}" and custom.max_steps == 3
    assert PLAN.make_protocol("main", max_steps=study.max_steps) is study  # no real change
    small = PLAN.make_protocol("pilot", limit_general=10, limit_downstream=5)
    assert small.general_limit("arc_easy") == 10 and small.general_limit("mmlu") == 1
    assert dict(small.general_sizes)["mmlu"] == MMLU_SUBJECTS and small.downstream_limit == 5


def test_twins_are_the_main_and_curve_runs_of_the_curves_budget():
    assert PLAN.twin(Run("lora", "mds", 0)) == Run("lora", "curve", 0)
    assert PLAN.twin(Run("lora", "curve", 0)) == Run("lora", "mds", 0)
    assert PLAN.twin(Run("lora", "mds", 1)) is None and PLAN.twin(Run("dora", "mds", 0)) is None
    assert PLAN.twin(Run("slim", "mds", 0), "pilot") is None  # the pilot's runs score no curve
    result = fake_run(Run("lora", "mds", 0), PLAN.protocols["study"])
    copy = PLAN.twin_result(result, Run("lora", "curve", 0))
    assert (copy["run_id"], copy["setting"], copy["group"], copy["twin_of"]) == (
        "curve__lora__seed0", "curve", "curve", "mds__lora__seed0")
    assert copy["general_mean"] == result["general_mean"]


def test_run_status_pending_done_and_stale(tmp_path):
    proto = PLAN.protocols["pilot"]
    done, other = PLAN.runs("pilot")
    assert run_status(PLAN, done, tmp_path, proto) == "pending"
    write_json(done.path(tmp_path, proto), fake_run(done, proto))
    assert run_status(PLAN, done, tmp_path, proto) == "done"
    stale = fake_run(other, proto)
    stale["protocol_digest"] = "something-else"
    write_json(other.path(tmp_path, proto), stale)
    assert run_status(PLAN, other, tmp_path, proto) == "stale"
    changed = fake_run(other, proto)
    changed["adapter_config"] = {**changed["adapter_config"], "top_k": 3}
    write_json(other.path(tmp_path, proto), changed)
    assert run_status(PLAN, other, tmp_path, proto) == "stale"
    other.path(tmp_path, proto).write_text("{not json")  # a half-written file reads as not stored
    assert run_status(PLAN, other, tmp_path, proto) == "pending"


def test_a_base_without_per_question_outcomes_is_scored_again(tmp_path):
    proto = PLAN.protocols["pilot"]
    base = store_base(tmp_path, proto)
    assert base_is_current(load_json(tmp_path / "pilot" / "base.json"), proto)
    del base["general"]["piqa"]["correct"]
    assert not base_is_current(base, proto)
    assert not base_is_current({**store_base(tmp_path, proto), "eval_digest": "other"}, proto)
    assert not base_is_current(None, proto)


def test_steps_paths_name_setting_and_allocator(tmp_path):
    assert steps_path(tmp_path, Run("slim", "mds", 0)).name == "steps__slim.json"
    assert steps_path(tmp_path, Run("slim", "exact_merge", 0)).name == "steps__exact_merge__slim.json"
    assert steps_path(tmp_path, Run("slim", "mds", 0), "jemalloc").name == "steps__slim__jemalloc.json"


def test_store_writes_atomically_and_collects_by_protocol(tmp_path):
    proto = PLAN.protocols["pilot"]
    store_base(tmp_path, proto)
    run = Run("lora", "mds", 0)
    write_json(run.path(tmp_path, proto), fake_run(run, proto))
    write_json(tmp_path / "pilot" / "steps__lora.json", {"kind": "steps", "method": "lora"})
    write_json(tmp_path / "pilot" / "x__y__seed0.json", {"kind": "other"})  # not a run: left out
    assert not list(tmp_path.rglob(".*.tmp"))
    data = collect(tmp_path)
    assert list(data) == ["pilot"] and list(data["pilot"]["runs"]) == ["mds__lora__seed0"]
    assert list(data["pilot"]["steps"]) == ["lora"] and data["pilot"]["base"]["kind"] == "base"
    assert collect(tmp_path / "missing") == {}
    assert json_digest({"b": 1, "a": [2]}) == json_digest({"a": [2], "b": 1}) != json_digest({"a": [3], "b": 1})


def test_group_runs_by_method_and_setting():
    proto = PLAN.protocols["pilot"]
    runs = {r.run_id: fake_run(r, proto) for r in [Run("slim", "mds", 0), Run("slim", "mds", 1),
                                                   Run("slim", "no_yield", 0)]}
    assert {k: len(v) for k, v in group_runs(runs).items()} == {("slim", "mds"): 2, ("slim", "no_yield"): 1}
    assert list(group_runs(runs, setting="no_yield")) == [("slim", "no_yield")]
    assert list(group_runs(runs, group="ablation")) == [("slim", "no_yield")]


def test_a_plan_naming_undefined_things_is_refused(tmp_path):
    text = PLAN_FILE.read_text().replace("methods: [lora, mixlora, slim], settings: [curve]",
                                         "methods: [lora, mixlorra, slim], settings: [curve, kurve]")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(PlanError, match="unknown method 'mixlorra'.*unknown setting 'kurve'"):
        load_plan(bad)
    bad.write_text(PLAN_FILE.read_text().replace("stderr_target:", "stderr_goal:"))
    with pytest.raises(PlanError, match="missing key 'stderr_target'"):
        load_plan(bad)


def test_plan_values_read_as_their_types():
    assert isinstance(PLAN.methods["ilora_lr1e-5"].lr, float) and PLAN.methods["ilora_lr1e-5"].lr == 1e-5
    assert PLAN.settings["experts16"].x == 16 and PLAN.settings["mask0.9"].x == 0.9
    assert PLAN.settings["curve"].curve and not PLAN.settings["mds"].curve
    assert PLAN.sweep_reference["experts_sweep"] == ("num_lora_experts", 8)
    assert Path(PLAN.script) == Path("benchmarks/forgetting.py")
