"""A study's plan as data: methods, settings, protocols and budgets, loaded from YAML into dataclasses.

The plan is what a reader checks (which learning rate, which test sizes, which runs a budget holds) and what
stored runs are matched against: a run's JSON records its protocol's digest and its adapter config, and a run
counts as done only when both equal the plan's. Keeping the plan in one data file (`benchmarks/studies/*.yaml`)
and the rules here means a script only chooses among budgets; it cannot drift from the stored runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import json_digest, load_json

MMLU_SUBJECTS = 57  # MMLU's `limit` is per subject: a protocol's MMLU size is spread over them
PARTS = ("downstream", "general", "math")  # the scored parts of a run: what was learned, what was kept


class PlanError(ValueError):
    """A study plan, or a selection from it, names something the plan does not hold."""


@dataclass(frozen=True)
class StudyMethod:
    """A method as the study trains it: its adapter config, its learning rate and where that rate comes from."""

    label: str
    config: dict[str, Any]
    lr: float
    lr_source: str
    note: str = ""


@dataclass(frozen=True)
class SettingSpec:
    """A variation of a method's config (``overrides``) within the study; ``curve`` also scores the general
    suite at intermediate steps; ``x`` is its position on a sweep plot."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    curve: bool = False
    group: str = "main"
    x: float | None = None


@dataclass(frozen=True)
class Protocol:
    """Everything that must be identical for runs to be comparable (and so is hashed into the directory).

    The field names and values are hashed (`digest`, `eval_digest`) and stored runs are found by those digests:
    adding, renaming or retyping a field (1 vs 1.0) makes every stored run stale."""

    name: str
    max_steps: int
    per_device_batch: int
    grad_accum: int
    max_seq_length: int
    scheduler: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    downstream_limit: int
    general_sizes: tuple[tuple[str, int], ...]  # (task, questions); mmlu: questions per subject x 57
    math_limit: int
    curve_points: int
    eval_batch_size: int = 16
    math_metric: str = "number_match"  # see runner.number_match

    @property
    def batch(self) -> int:
        return self.per_device_batch * self.grad_accum

    def general_limit(self, task: str) -> int:
        """The ``limit`` argument of ``evaluate`` for a general task (per subject for MMLU)."""
        n = dict(self.general_sizes)[task]
        return max(1, math.ceil(n / MMLU_SUBJECTS)) if task == "mmlu" else n

    def eval_dict(self) -> dict[str, Any]:
        return {"downstream_limit": self.downstream_limit, "general_sizes": dict(self.general_sizes),
                "math_limit": self.math_limit, "eval_batch_size": self.eval_batch_size,
                "math_metric": self.math_metric}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["general_sizes"] = dict(self.general_sizes)
        return d

    def digest(self) -> str:
        """The hash of every field but the name: training and evaluation."""
        return json_digest({k: v for k, v in self.to_dict().items() if k != "name"})

    def eval_digest(self) -> str:
        """The hash of the evaluation fields only: base-model scores are shared by protocols that train
        differently but score alike."""
        return json_digest(self.eval_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Protocol:
        """A protocol from `to_dict`'s form (as stored in a run) or a YAML entry: each field read as its
        declared type, so that a YAML `1` for a float field hashes as 1.0, as the stored runs did."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise PlanError(f"protocol {d.get('name')!r}: unknown field(s) {unknown}")
        cast = {"int": int, "float": float, "str": str}
        values = {k: cast[known[k].type](v) if known[k].type in cast else v for k, v in d.items()}
        values["general_sizes"] = tuple((str(t), int(n)) for t, n in dict(d["general_sizes"]).items())
        try:
            return cls(**values)
        except TypeError as e:
            raise PlanError(f"protocol {d.get('name')!r}: {e}") from None


@dataclass(frozen=True)
class Budget:
    """A named group of runs under one protocol: every (method, setting) pair of `runs` for each seed."""

    protocol: str
    seeds: tuple[int, ...]
    runs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TaskSuite:
    """The tasks a run is trained and scored on, by part, with their short column names."""

    downstream: tuple[str, ...]
    general: tuple[str, ...]
    math: str
    short: Mapping[str, str]
    test_sizes: Mapping[str, int]  # questions in the downstream test splits

    @property
    def parts(self) -> dict[str, tuple[str, ...]]:
        return {"downstream": self.downstream, "general": self.general, "math": (self.math,)}


@dataclass(frozen=True)
class Run:
    """One training run of a study: a method, a setting of it and a seed."""

    method: str
    setting: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.setting}__{self.method}__seed{self.seed}"

    def path(self, runs_dir: Path, protocol: Protocol) -> Path:
        return runs_dir / protocol.name / f"{self.run_id}.json"


@dataclass(frozen=True)
class StudyPlan:
    """A whole study: what it trains and scores, and the budgets it can run."""

    name: str
    script: str
    model: str
    tasks: TaskSuite
    stderr_target: float
    prior_acc: Mapping[str, float]
    methods: Mapping[str, StudyMethod]
    main_methods: tuple[str, ...]
    settings: Mapping[str, SettingSpec]
    sweep_reference: Mapping[str, tuple[str, float]]
    protocols: Mapping[str, Protocol]
    budgets: Mapping[str, Budget]

    @property
    def study_protocol(self) -> Protocol:
        """The protocol of the main budget (the study proper)."""
        return self.protocols[self.budgets["main"].protocol]

    def run_config(self, run: Run) -> dict[str, Any]:
        """The adapter config dict of a run (the method's config with the setting's overrides)."""
        spec, setting = self.methods[run.method], self.settings[run.setting]
        cfg = dict(spec.config)
        if setting.overrides:
            if cfg["method"] != "slim":
                raise ValueError(f"setting {run.setting!r} changes SLIM fields; it does not apply to {run.method!r}")
            cfg.update(setting.overrides)
        return cfg

    def runs(self, budget: str, methods: list[str] | None = None, seeds: list[int] | None = None,
             settings: list[str] | None = None) -> list[Run]:
        """The runs of a budget, optionally restricted to some methods and settings and with replaced seeds, in
        execution order (seed-major, so that every method gets its first seed before any gets its second)."""
        b = self.budgets[budget]
        pairs = list(b.runs)
        if settings:
            in_budget = sorted({s for _, s in pairs})
            unknown = [s for s in settings if s not in in_budget]
            if unknown:
                raise PlanError(f"setting(s) {unknown} not in budget {budget!r}; choose from {in_budget}")
            pairs = [p for p in pairs if p[1] in settings]
        if methods:
            unknown = [m for m in methods if m not in self.methods]
            if unknown:
                raise PlanError(f"unknown method(s) {unknown}; choose from {sorted(self.methods)}")
            in_budget = [p for p in pairs if p[0] in methods]
            extra = [(m, pairs[0][1]) for m in methods if m not in {p[0] for p in pairs}]
            pairs = in_budget + extra
        seeds = list(seeds) if seeds else list(b.seeds)
        return [Run(m, s, seed) for seed in seeds for m, s in pairs]

    def twin(self, run: Run, protocol: str = "study") -> Run | None:
        """The other run that trains exactly the same model: a curve run (Fig. 5) and the main run of its method
        and seed differ only in the curve run's intermediate scorings, which do not touch training (same data,
        RNG and steps: the stored LoRA pair has identical losses and scores). So each such run scores the curve
        too and is stored under both names (`twin_result`); the curves budget costs no training of its own."""
        curves = self.budgets["curves"]
        if self.settings[run.setting].curve:
            return Run(run.method, "mds", run.seed)
        if (run.setting == "mds" and protocol == curves.protocol and (run.method, "curve") in curves.runs
                and run.seed in curves.seeds):  # the curves budget's protocol only (not the pilot's)
            return Run(run.method, "curve", run.seed)
        return None

    def twin_result(self, result: dict[str, Any], other: Run) -> dict[str, Any]:
        """`result` stored under its twin's name (`twin`): the same scores, training and curve; `twin_of` names
        the run it was trained as (costs and timings count it once)."""
        spec = self.settings[other.setting]
        return {**result, "run_id": other.run_id, "setting": other.setting, "setting_label": spec.label,
                "group": spec.group, "adapter_config": self.run_config(other), "twin_of": result["run_id"]}

    def make_protocol(self, budget: str, max_steps: int | None = None, limit_general: int | None = None,
                      limit_downstream: int | None = None, limit_math: int | None = None) -> Protocol:
        """The budget's protocol with the command-line overrides; an override makes a ``custom-<hash>``
        protocol, so such runs go into their own directory and never mix with the study's."""
        proto = self.protocols[self.budgets[budget].protocol]
        changes: dict[str, Any] = {}
        if max_steps is not None:
            changes["max_steps"] = max_steps
        if limit_general is not None:
            changes["general_sizes"] = tuple((t, limit_general if t != "mmlu" else max(limit_general, MMLU_SUBJECTS))
                                             for t, _ in proto.general_sizes)
        if limit_downstream is not None:
            changes["downstream_limit"] = limit_downstream
        if limit_math is not None:
            changes["math_limit"] = limit_math
        changed = {k: v for k, v in changes.items() if getattr(proto, k) != v}
        if not changed:
            return proto
        proto = dataclasses.replace(proto, **changed)
        return dataclasses.replace(proto, name=f"custom-{proto.digest()}")

    def method_order(self, key: tuple) -> tuple:
        """Sort key of a (method, setting) group: the plan's method order, then the setting."""
        m = key[0]
        return (list(self.methods).index(m) if m in self.methods else 99, key[1])


def steps_path(protocol_dir: Path, run: Run, allocator: str = "system") -> Path:
    """Where `--measure-steps` stores the step timing of a run's method and setting under `allocator`."""
    name = run.method if run.setting == "mds" else f"{run.setting}__{run.method}"
    return protocol_dir / f"steps__{name}{'' if allocator == 'system' else '__' + allocator}.json"


def run_status(plan: StudyPlan, run: Run, runs_dir: Path, protocol: Protocol) -> str:
    """"done" (stored with this protocol), "stale" (stored with another protocol or config: kept, not
    overwritten unless asked) or "pending"."""
    data = load_json(run.path(runs_dir, protocol))
    if data is None:
        return "pending"
    if data.get("protocol_digest") != protocol.digest() or data.get("adapter_config") != plan.run_config(run):
        return "stale"
    return "done"


def base_is_current(base: dict | None, protocol: Protocol) -> bool:
    """The stored base scores fit ``protocol``'s test sizes and carry per-question outcomes (for paired
    differences); else the base model is scored again (deterministic: the scores themselves do not change)."""
    return (base is not None and base.get("eval_digest") == protocol.eval_digest()
            and all("correct" in e for part in PARTS for e in base[part].values()))


def group_runs(runs: dict[str, dict], setting: str | None = None, group: str | None = None) -> dict[tuple, list]:
    """Stored runs by (method, setting), each a list over seeds; optionally only one setting or group."""
    out: dict[tuple, list] = {}
    for r in runs.values():
        if setting is not None and r["setting"] != setting:
            continue
        if group is not None and r.get("group") != group:
            continue
        out.setdefault((r["method"], r["setting"]), []).append(r)
    return out


def load_plan(path: Path) -> StudyPlan:
    """Read a study plan from YAML (see `benchmarks/studies/forgetting.yaml` for the layout) and check that
    its budgets name only methods, settings and protocols it defines."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    try:
        plan = _plan_from_dict(raw)
    except KeyError as e:
        raise PlanError(f"{path}: missing key {e}") from None
    _check(plan, path)
    return plan


def _plan_from_dict(raw: dict[str, Any]) -> StudyPlan:
    t = raw["tasks"]
    tasks = TaskSuite(tuple(t["downstream"]), tuple(t["general"]), t["math"], dict(t["short"]),
                      dict(t.get("test_sizes", {})))
    methods = {k: StudyMethod(m["label"], dict(m["config"]), float(m["lr"]), m["lr_source"], m.get("note", ""))
               for k, m in raw["methods"].items()}
    settings = {k: SettingSpec(s["label"], dict(s.get("overrides", {})), bool(s.get("curve", False)),
                               s.get("group", "main"), s.get("x")) for k, s in raw["settings"].items()}
    protocols = {k: Protocol.from_dict({"name": k, **p}) for k, p in raw["protocols"].items()}
    budgets = {k: Budget(b["protocol"], tuple(int(s) for s in b["seeds"]),
                         tuple((m, s) for m in b["methods"] for s in b["settings"]))
               for k, b in raw["budgets"].items()}
    return StudyPlan(
        name=raw["name"], script=raw["script"], model=raw["model"], tasks=tasks,
        stderr_target=float(raw["stderr_target"]), prior_acc={k: float(v) for k, v in raw["prior_acc"].items()},
        methods=methods, main_methods=tuple(raw["main_methods"]), settings=settings,
        sweep_reference={k: (f, v) for k, (f, v) in raw.get("sweep_reference", {}).items()},
        protocols=protocols, budgets=budgets)


def _check(plan: StudyPlan, path: Path) -> None:
    problems = [f"main method {m!r} is not defined" for m in plan.main_methods if m not in plan.methods]
    for name, b in plan.budgets.items():
        if b.protocol not in plan.protocols:
            problems.append(f"budget {name!r}: unknown protocol {b.protocol!r}")
        problems += [f"budget {name!r}: unknown method {m!r}" for m in {m for m, _ in b.runs} - set(plan.methods)]
        problems += [f"budget {name!r}: unknown setting {s!r}" for s in {s for _, s in b.runs} - set(plan.settings)]
    for needed in ("main", "curves"):
        if needed not in plan.budgets:
            problems.append(f"no {needed!r} budget")
    if problems:
        raise PlanError(f"{path}: " + "; ".join(sorted(problems)))
