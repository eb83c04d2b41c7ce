"""Learn-vs-forget study of every method on SmolLM2-135M-Instruct (issue 6).

Each method is fine-tuned on MDS (OpenBookQA + SocialIQA + BoolQ train splits mixed, letter format, loss on the
answer only) with the same data, steps, batch and schedule; only the learning rate differs (each method's paper
or reference code, see ``METHODS``). Afterwards it is scored on

- the downstream tasks' test splits with the ``letter`` protocol (what was learned), and
- the general suite (ARC-Easy, ARC-Challenge, PIQA, SciQ, HellaSwag, Winogrande, MMLU) with the ``loglik``
  protocol plus basic_arithmetic by greedy generation (what was kept), compared with the base model.

Every (method, setting, seed) run is stored as ``benchmarks/results/forgetting/<protocol>/<setting>__<method>__
seed<k>.json`` and skipped when present, so the study continues across sessions; the base model is scored once
(``base.json``). The report ``benchmarks/results/forgetting.md`` (and the PNG plots beside it) is regenerated
from the stored JSONs after every run, or alone with ``--report-only``.

    python benchmarks/forgetting.py --budget pilot --methods lora,slim      # small end-to-end check
    python benchmarks/forgetting.py --budget main                           # 8 methods x 3 seeds
    python benchmarks/forgetting.py --budget ablations                      # SLIM ablations (paper Table 3)
    python benchmarks/forgetting.py --budget sweeps                         # mask ratio, number of experts
    python benchmarks/forgetting.py --budget curves                         # general score over steps (*)
    python benchmarks/forgetting.py --budget diagnostics                    # what moves SLIM's retention
    python benchmarks/forgetting.py --plan --budget main                    # what would run, sizes, stderr
    python benchmarks/forgetting.py --report-only

(*) A curve run trains the same model as the main run of its method and seed (seed 0 of LoRA, MixLoRA and
SLIM), so that main run scores the curve as it trains and is stored under both names (``twin``): after
``--budget main`` the curves budget has nothing left to run.

The study runs under glibc's malloc by default. ``--allocator jemalloc`` (or ``auto``: jemalloc when found,
see ``src/slim_peft/allocator.py``) gives the same numbers with training steps 1.1-1.3x faster, but with its
decay off jemalloc never returns freed pages: the exact-merge run grew to 23 GB resident by step 16 (glibc:
8.0 GB peak over 10 steps) and was killed for memory, and with its default decay (10 s) its steps were 1.6x
slower than glibc's (110.6 vs 68.8 CPU s). Use it for the runs that fit in memory.

Budgets "main", "ablations", "sweeps", "curves" and "diagnostics" share one protocol ("study"): their runs are
comparable and share the base scores and the SLIM x mds runs. ``--max-steps``, ``--limit-general`` or
``--limit-downstream`` change the protocol, so such runs go into their own directory (``custom-<hash>``) and
never mix with the study's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
RUNS_DIR = RESULTS_DIR / "forgetting"
REPORT = RESULTS_DIR / "forgetting.md"
DEFAULT_WORK_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slim-peft" / "forgetting-work"
MODEL = "smollm2-135m"

DOWNSTREAM_TASKS = ("openbookqa", "social_iqa", "boolq")
GENERAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag", "winogrande", "mmlu")
MATH_TASK = "basic_arithmetic"
PART_TASKS = {"downstream": DOWNSTREAM_TASKS, "general": GENERAL_TASKS, "math": (MATH_TASK,)}
SHORT = {"openbookqa": "OBQA", "social_iqa": "SIQA", "boolq": "BoolQ", "arc_easy": "ARC-e", "arc_challenge": "ARC-c",
         "piqa": "PIQA", "sciq": "SciQ", "hellaswag": "HellaS", "winogrande": "WinoG", "mmlu": "MMLU",
         "basic_arithmetic": "Arith"}
MMLU_SUBJECTS = 57
STDERR_TARGET = 0.015  # the stderr of the general-suite mean must be at most 1.5 points


# ================================================================================================ methods
@dataclass(frozen=True)
class MethodSpec:
    """A method as the study trains it: its adapter config, its learning rate and where that rate comes from."""

    label: str
    config: dict[str, Any]
    lr: float
    lr_source: str
    note: str = ""


METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(
        "LoRA", {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        2e-4, "2e-4: MoE-PEFT LoRA template (the SLIM paper's baselines); Hu et al. give no single LLM rate",
        "rank 16 on all 7 projections: the paper's rank 128 on a 4096-wide model scaled to this 576-wide one "
        "(128/4096*576 = 18 -> 16); `lora_r128` runs the literal rank"),
    "dora": MethodSpec(
        "DoRA", {"method": "dora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        1e-4, "1e-4: official DoRA repo (llama3_8B_DoRA.sh, commonsense reasoning)", "rank 16, all 7 projections"),
    "mixlora": MethodSpec(
        "MixLoRA", {"method": "mixlora", "num_experts": 8, "top_k": 2},
        2e-4, "2e-4: MixLoRA paper / MoE-PEFT mixlora template", "8 FFN experts r16 top-2 + attention LoRA, aux 0.01"),
    "mixlora_dy": MethodSpec(
        "MixLoRA-Dy", {"method": "mixlora", "num_experts": 8, "top_p": 0.8},
        2e-4, "2e-4: MixLoRA paper / MoE-PEFT mixlora template", "top-p 0.8 (dynamic) routing"),
    "loramoe": MethodSpec(
        "LoRAMoE", {"method": "loramoe", "num_experts": 8},
        2e-4, "2e-4: official LoRAMoE code (run_loramoe.sh) and MoE-PEFT template",
        "8 experts r16 on gate/up/down, dense router, localized balancing delta 0.1 beta 0.1; all MDS samples "
        "are typed downstream"),
    "mola": MethodSpec(
        "MoLA", {"method": "mola", "experts_per_layer": "2,4,6,8", "top_k": 2},
        2e-4, "2e-4: MoE-PEFT MoLA template", "2-4-6-8 experts over the layer quarters (MoLA's best), top-2"),
    "ilora": MethodSpec(
        "I-LoRA", {"method": "ilora", "ema_alpha": 0.99},
        1.6e-4, "LLMCL train_seq.sh uses 1e-5 at per-device batch 1 over thousands of steps per task; scaled "
        "linearly to our batch 16 (16 x 1e-5 = 1.6e-4), since 1e-5 over this study's few steps barely moves the "
        "adapter (`ilora_lr1e-5` runs the literal rate)",
        "r8 alpha32 on q/k/v/o, EMA 0.99, replay 500; single-stage setting, so the buffer holds only MDS data "
        "(replay = regularising towards its own EMA); evaluated with the slow learner"),
    "slim": MethodSpec(
        "SLIM", {"method": "slim"},
        2e-4, "2e-4: SLIM paper (OpenChat-8B, MoE-PEFT template value)",
        "8 LoRA r16 + 2 identity experts, top-2, FFN block routing, calibrated yielding, mask ratio 0.5, L1 1e-3"),
    # variants outside the main table (run them with --methods)
    "lora_r128": MethodSpec(
        "LoRA r128", {"method": "lora", "r": 128, "lora_alpha": 256, "lora_dropout": 0.05,
                      "target_modules": "all-linear"},
        2e-4, "2e-4: MoE-PEFT LoRA template", "the paper's literal rank 128 (alpha 256)"),
    "ilora_lr1e-5": MethodSpec(
        "I-LoRA lr1e-5", {"method": "ilora", "ema_alpha": 0.99},
        1e-5, "1e-5: LLMCL train_seq.sh, literal", "the literal LLMCL rate"),
}
MAIN_METHODS = ("lora", "dora", "mixlora", "mixlora_dy", "loramoe", "mola", "ilora", "slim")


# ================================================================================================ settings
@dataclass(frozen=True)
class SettingSpec:
    """A variation of a method's config (``overrides``) within the study; ``curve`` also scores the general
    suite at intermediate steps."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    curve: bool = False
    group: str = "main"
    x: float | None = None  # position on a sweep plot


SETTINGS: dict[str, SettingSpec] = {
    "mds": SettingSpec("MDS (main)"),
    # paper Table 3
    "no_identity": SettingSpec("w/o identity experts", {"num_identity_experts": 0}, group="ablation"),
    "no_yield": SettingSpec("w/o weight yielding", {"yield_strength": 0.0}, group="ablation"),
    "no_merge": SettingSpec("w/o dynamic merging", {"mask_ratio": 0.0}, group="ablation"),
    "exact_merge": SettingSpec("exact (DARE) merging", {"merge_form": "exact"}, group="ablation"),
    # Fig. 4: mask ratio (0.5 is the main setting)
    **{f"mask{p}": SettingSpec(f"mask ratio {p}", {"mask_ratio": p}, group="mask_sweep", x=p)
       for p in (0.1, 0.3, 0.7, 0.9)},
    # Fig. 6: number of LoRA experts (8 is the main setting), 2 identity experts, top-2
    **{f"experts{n}": SettingSpec(f"{n} LoRA experts", {"num_lora_experts": n}, group="experts_sweep", x=n)
       for n in (2, 4, 16)},
    # Fig. 5: general capability over training steps
    "curve": SettingSpec("general score over steps", curve=True, group="curve"),
    # what moves SLIM's retention (issue 6 item 4)
    **{f"yield{g}": SettingSpec(f"yield strength {g}", {"yield_strength": g}, group="diagnostics", x=g)
       for g in (0.5, 2.0, 4.0)},
    **{f"l1_{w:g}": SettingSpec(f"L1 weight {w:g}", {"l1_weight": w}, group="diagnostics") for w in (0.0, 1e-2)},
    "clusters1": SettingSpec("1 cluster", {"num_clusters": 1}, group="diagnostics"),
    "clusters32": SettingSpec("32 clusters", {"num_clusters": 32}, group="diagnostics"),
    "all_linear": SettingSpec("SLIM on all 7 projections", {"target_modules": "all-linear"}, group="diagnostics"),
}
SWEEP_REFERENCE = {"mask_sweep": ("mask_ratio", 0.5), "experts_sweep": ("num_lora_experts", 8),
                   "diagnostics": ("yield_strength", 1.0)}


# ================================================================================================ protocol
@dataclass(frozen=True)
class Protocol:
    """Everything that must be identical for runs to be comparable (and so is hashed into the directory)."""

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
    math_metric: str = "number_match"  # see number_match()

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
        return _hash({k: v for k, v in self.to_dict().items() if k != "name"})

    def eval_digest(self) -> str:
        return _hash(self.eval_dict())


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# Per-task test sizes of the study (questions; the test splits hold arc_challenge 159, arc_easy 284, sciq 482,
# winogrande 621, piqa 898, hellaswag 2073, mmlu 2836). The stderr of the 7-task mean is sqrt(sum_t v_t/n_t)/7
# with v_t = p_t(1-p_t); the cheapest sizes for a given stderr are n_t ~ sqrt(v_t / c_t) (Lagrange), c_t the
# measured cost of a question (pilot, CPU s at 1 thread: arc_easy 0.08, arc_challenge 0.11, piqa 0.11, sciq
# 0.25, hellaswag 0.21, winogrande 0.06, mmlu 0.22). For a 1.35-point target that gives about arc_easy 242,
# arc_challenge 195 (all 159 exist), piqa 202, sciq 118, hellaswag 148, winogrande 273, mmlu 130; rounded
# below (mmlu: 3 per subject x 57). Result: 1.34 points with the base accuracies, 1.43 if every p were 0.5.
STUDY_GENERAL = (("arc_easy", 250), ("arc_challenge", 159), ("piqa", 200), ("sciq", 120), ("hellaswag", 150),
                 ("winogrande", 280), ("mmlu", 171))
PILOT_GENERAL = tuple((t, 40) for t, _ in STUDY_GENERAL[:-1]) + (("mmlu", 57),)

PROTOCOLS: dict[str, Protocol] = {
    # 50 steps: the main budget then projects to about 5.5 h with 2 workers x 1 thread from the measured costs
    # (see the report's "Sizing" section, regenerated from the stored measurements); 60 steps projected 6.3 h.
    # micro-batches of 2 (x 8 accumulation = 16): a worker's peak memory is dominated by the activations of the
    # longest micro-batch (BoolQ passages, up to 512 tokens); micro-batches of 4 peaked at 8 GB per worker.
    "study": Protocol(name="study", max_steps=50, per_device_batch=2, grad_accum=8, max_seq_length=512,
                      scheduler="constant", warmup_ratio=0.03, weight_decay=0.01, max_grad_norm=1.0,
                      downstream_limit=300, general_sizes=STUDY_GENERAL, math_limit=200, curve_points=5),
    "pilot": Protocol(name="pilot", max_steps=20, per_device_batch=4, grad_accum=4, max_seq_length=512,
                      scheduler="constant", warmup_ratio=0.03, weight_decay=0.01, max_grad_norm=1.0,
                      downstream_limit=40, general_sizes=PILOT_GENERAL, math_limit=40, curve_points=2),
}

BUDGETS: dict[str, dict[str, Any]] = {
    "main": {"protocol": "study", "seeds": (0, 1, 2), "runs": [(m, "mds") for m in MAIN_METHODS]},
    "ablations": {"protocol": "study", "seeds": (0,),
                  "runs": [("slim", s) for s in ("mds", "no_identity", "no_yield", "no_merge", "exact_merge")]},
    "sweeps": {"protocol": "study", "seeds": (0,),
               "runs": [("slim", s) for s, spec in SETTINGS.items() if spec.group in ("mask_sweep", "experts_sweep")]},
    "curves": {"protocol": "study", "seeds": (0,), "runs": [(m, "curve") for m in ("lora", "mixlora", "slim")]},
    "diagnostics": {"protocol": "study", "seeds": (0,),
                    "runs": [("slim", s) for s, spec in SETTINGS.items() if spec.group == "diagnostics"]},
    "pilot": {"protocol": "pilot", "seeds": (0,), "runs": [("lora", "mds"), ("slim", "mds")]},
}


def make_protocol(budget: str, max_steps: int | None = None, limit_general: int | None = None,
                  limit_downstream: int | None = None, limit_math: int | None = None) -> Protocol:
    """The budget's protocol with the command-line overrides; an override makes a ``custom-<hash>`` protocol."""
    proto = PROTOCOLS[BUDGETS[budget]["protocol"]]
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


# ================================================================================================ planning
@dataclass(frozen=True)
class Run:
    method: str
    setting: str
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.setting}__{self.method}__seed{self.seed}"

    def path(self, runs_dir: Path, protocol: Protocol) -> Path:
        return runs_dir / protocol.name / f"{self.run_id}.json"


def steps_path(protocol_dir: Path, run: Run, allocator: str = "system") -> Path:
    """Where `--measure-steps` stores the step timing of a run's method and setting under `allocator`."""
    name = run.method if run.setting == "mds" else f"{run.setting}__{run.method}"
    return protocol_dir / f"steps__{name}{'' if allocator == 'system' else '__' + allocator}.json"


def run_config(run: Run) -> dict[str, Any]:
    """The adapter config dict of a run (the method's config with the setting's overrides)."""
    spec, setting = METHODS[run.method], SETTINGS[run.setting]
    cfg = dict(spec.config)
    if setting.overrides:
        if cfg["method"] != "slim":
            raise ValueError(f"setting {run.setting!r} changes SLIM fields; it does not apply to {run.method!r}")
        cfg.update(setting.overrides)
    return cfg


def plan(budget: str, methods: list[str] | None = None, seeds: list[int] | None = None,
         settings: list[str] | None = None) -> list[Run]:
    """The runs of a budget, optionally restricted to some methods and settings and with replaced seeds, in
    execution order (seed-major, so that every method gets its first seed before any gets its second)."""
    b = BUDGETS[budget]
    pairs = b["runs"]
    if settings:
        in_budget = sorted({s for _, s in pairs})
        unknown = [s for s in settings if s not in in_budget]
        if unknown:
            raise SystemExit(f"setting(s) {unknown} not in budget {budget!r}; choose from {in_budget}")
        pairs = [p for p in pairs if p[1] in settings]
    if methods:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        in_budget = [p for p in pairs if p[0] in methods]
        extra = [(m, pairs[0][1]) for m in methods if m not in {p[0] for p in pairs}]
        pairs = in_budget + extra
    seeds = list(seeds) if seeds else list(b["seeds"])
    return [Run(m, s, seed) for seed in seeds for m, s in pairs]


def twin(run: Run, protocol: str = "study") -> Run | None:
    """The other run that trains exactly the same model: a curve run (Fig. 5) and the main run of its method
    and seed differ only in the curve run's intermediate scorings, which do not touch training (same data,
    RNG and steps: the stored LoRA pair has identical losses and scores). So each such run scores the curve
    too and is stored under both names (`twin_result`); the curves budget costs no training of its own."""
    curve_pairs = BUDGETS["curves"]["runs"]
    if SETTINGS[run.setting].curve:
        return Run(run.method, "mds", run.seed)
    if (run.setting == "mds" and protocol == BUDGETS["curves"]["protocol"] and (run.method, "curve") in curve_pairs
            and run.seed in BUDGETS["curves"]["seeds"]):  # the curves budget's protocol only (not the pilot's)
        return Run(run.method, "curve", run.seed)
    return None


def twin_result(result: dict[str, Any], other: Run) -> dict[str, Any]:
    """`result` stored under its twin's name (`twin`): the same scores, training and curve; `twin_of` names
    the run it was trained as (costs and timings count it once)."""
    spec = SETTINGS[other.setting]
    return {**result, "run_id": other.run_id, "setting": other.setting, "setting_label": spec.label,
            "group": spec.group, "adapter_config": run_config(other), "twin_of": result["run_id"]}


def load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_status(run: Run, runs_dir: Path, protocol: Protocol) -> str:
    """"done" (stored with this protocol), "stale" (stored with another protocol: kept, not overwritten
    unless --rerun-stale) or "pending"."""
    data = load_json(run.path(runs_dir, protocol))
    if data is None:
        return "pending"
    if data.get("protocol_digest") != protocol.digest() or data.get("adapter_config") != run_config(run):
        return "stale"
    return "done"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class RunLock:
    """An exclusive lock file (``O_EXCL``) holding the owner's pid, so that several worker processes can share
    one budget: a run locked by a live process is left to it; a lock left by a dead process is taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    return False
                self.path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ================================================================================================ stderr
# Base-model accuracies used only when no base.json exists yet (baseline_eval.md: arc_challenge acc_norm,
# hellaswag acc_norm, the others acc).
PRIOR_ACC = {"arc_easy": 0.523, "arc_challenge": 0.314, "piqa": 0.634, "sciq": 0.755, "hellaswag": 0.413,
             "winogrande": 0.505, "mmlu": 0.273}


def stderr_table(protocol: Protocol, base: dict | None = None) -> dict[str, Any]:
    """Per task: n, p (base accuracy, or the prior), se = sqrt(p(1-p)/(n-1)); the stderr of the 7-task mean
    = sqrt(sum se^2) / 7, and the worst case (every p = 0.5)."""
    rows = []
    for task, n in protocol.general_sizes:
        n_eff = n
        if task == "mmlu":
            n_eff = protocol.general_limit(task) * MMLU_SUBJECTS
        p, source = PRIOR_ACC[task], "prior"
        if base and task in base.get("general", {}):
            p, n_eff, source = base["general"][task]["score"], base["general"][task]["n"], "base"
        rows.append({"task": task, "n": n_eff, "p": p, "se": math.sqrt(p * (1 - p) / max(1, n_eff - 1)),
                     "source": source})
    k = len(rows)
    se_mean = math.sqrt(sum(r["se"] ** 2 for r in rows)) / k
    worst = math.sqrt(sum(0.25 / max(1, r["n"] - 1) for r in rows)) / k
    return {"rows": rows, "se_mean": se_mean, "se_mean_worst": worst, "target": STDERR_TARGET,
            "ok": se_mean <= STDERR_TARGET}


def stderr_markdown(st: dict[str, Any]) -> str:
    lines = ["| task | n | p | se = sqrt(p(1-p)/(n-1)) |", "|---|---|---|---|"]
    for r in st["rows"]:
        lines.append(f"| {r['task']} | {r['n']} | {r['p']:.3f} ({r['source']}) | {100 * r['se']:.2f} pts |")
    terms = " + ".join(f"{100 * r['se']:.2f}^2" for r in st["rows"])
    lines += ["", f"stderr of the 7-task mean = sqrt({terms}) / 7 = **{100 * st['se_mean']:.2f} points** "
              f"(target <= {100 * st['target']:.1f}: {'met' if st['ok'] else 'NOT met'}); worst case, every "
              f"p = 0.5: {100 * st['se_mean_worst']:.2f} points."]
    return "\n".join(lines)


# ================================================================================================ execution
class Study:
    """Runs the planned runs of one protocol (model loading, training and evaluation through slim_peft)."""

    def __init__(self, protocol: Protocol, runs_dir: Path, work_dir: Path, threads: int = 0,
                 keep_adapters: bool = False, command: str = "") -> None:
        self.protocol = protocol
        self.runs_dir = runs_dir
        self.work_dir = work_dir
        self.threads = threads
        self.keep_adapters = keep_adapters
        self.command = command
        self._train_data: tuple[list, dict] | None = None

    @property
    def dir(self) -> Path:
        return self.runs_dir / self.protocol.name

    # -- helpers
    def _torch_setup(self) -> None:
        import torch

        if self.threads > 0:
            torch.set_num_threads(self.threads)

    def _load(self):
        from slim_peft.assets import load_base_model

        return load_base_model(MODEL)

    def train_data(self, tokenizer) -> tuple[list, dict]:
        if self._train_data is None:
            from slim_peft.data import build_task_examples

            self._train_data = build_task_examples(tokenizer, DOWNSTREAM_TASKS, split="train",
                                                   max_seq_length=self.protocol.max_seq_length)
        return self._train_data

    def evaluate_all(self, model, tokenizer, with_downstream: bool = True, with_math: bool = True) -> dict:
        """Downstream (letter), general (loglik, per-task sizes) and arithmetic (generate) scores."""
        from slim_peft.evaluate import evaluate

        p = self.protocol
        out: dict[str, Any] = {"downstream": {}, "general": {}, "math": {}}
        t0, c0 = time.perf_counter(), time.process_time()

        def score(part: str, task: str, protocol: str, limit: int) -> None:
            c = time.process_time()
            gen = protocol == "generate"
            res = evaluate(model, tokenizer, [task], protocol=protocol, split="test", limit=limit,
                           batch_size=p.eval_batch_size, progress=True, log_samples=True)
            r = res["tasks"][task]
            entry = {"score": r["score"], "stderr": r["stderr"], "metric": r["metric"], "n": r["n"],
                     "seconds": r["seconds"], "cpu_seconds": round(time.process_time() - c, 2),
                     "chance": r["chance"], "metrics": r["metrics"]}
            if gen:  # see number_match: the study's math score
                hits = [number_match(s["generated"], s["gold"]) for s in r["samples"]]
                entry["metrics"]["number_match"] = statistics.fmean(hits)
                entry["metric"], entry["score"] = "number_match", statistics.fmean(hits)
                entry["stderr"] = _binary_stderr(hits)
                entry["examples"] = [{"generated": s["generated"], "gold": s["gold"]} for s in r["samples"][:5]]
            else:
                pred = "pred_norm" if r["metric"] == "acc_norm" else "pred"
                hits = [float(s[pred] == s["gold"]) for s in r["samples"]]
            entry.update(per_question(hits, [s["id"] for s in r["samples"]], entry["score"]))
            out[part][task] = entry

        if with_downstream:
            for task in DOWNSTREAM_TASKS:
                score("downstream", task, "letter", p.downstream_limit)
        for task in GENERAL_TASKS:
            score("general", task, "loglik", p.general_limit(task))
        if with_math:
            score("math", MATH_TASK, "generate", p.math_limit)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["cpu_seconds"] = round(time.process_time() - c0, 2)
        summarize(out)
        return out

    # -- base
    def base_path(self) -> Path:
        return self.dir / "base.json"

    def ensure_base(self, wait: bool = True) -> dict | None:
        """Score the base model unless stored; when another worker is scoring it, wait (or, with
        ``wait=False``, return None at once: runs do not need it, only the report does)."""
        lock = RunLock(self.work_dir / self.protocol.name / "base.lock")
        while not lock.acquire():  # another worker is scoring it
            if not wait:
                return None
            time.sleep(10)
        try:
            return self._ensure_base()
        finally:
            lock.release()

    def _ensure_base(self) -> dict:
        path = self.base_path()
        data = load_json(path)
        if base_is_current(data, self.protocol):
            return data
        if data is not None:
            print(f"[forgetting] {path} was scored with other test sizes or without per-question outcomes; "
                  "re-scoring the base model")
        self._torch_setup()
        print(f"[forgetting] scoring the base model ({self.protocol.name} sizes)", flush=True)
        model, tok = self._load()
        t0 = time.perf_counter()
        scores = self.evaluate_all(model, tok)
        data = {"kind": "base", "model": MODEL, "protocol": self.protocol.to_dict(),
                "eval_digest": self.protocol.eval_digest(), **scores,
                "wall_seconds": round(time.perf_counter() - t0, 2),
                "environment": environment(), "command": self.command,
                "finished_at": _dt.datetime.now().isoformat(timespec="seconds")}
        write_json(path, data)
        print(f"[forgetting] base: downstream {fmt_pct(data['downstream_mean'])}, general "
              f"{fmt_pct(data['general_mean'])}, arithmetic {fmt_pct(data['math_score'])} "
              f"({data['wall_seconds']:.0f} s)", flush=True)
        return data

    def training_arguments(self, output_dir: str, method: str, max_steps: int, seed: int, **extra: Any):
        """The protocol's TrainingArguments for `method` (its paper's learning rate), the same for every run,
        step timing and profile; `extra` sets the run-specific fields (checkpoints, evaluation, logging)."""
        from slim_peft.train import TrainingArguments

        p = self.protocol
        return TrainingArguments(
            output_dir=output_dir, learning_rate=METHODS[method].lr, weight_decay=p.weight_decay,
            per_device_train_batch_size=p.per_device_batch, gradient_accumulation_steps=p.grad_accum,
            max_steps=max_steps, lr_scheduler_type=p.scheduler, warmup_ratio=p.warmup_ratio,
            max_grad_norm=p.max_grad_norm, seed=seed, logging_steps=1, max_seq_length=p.max_seq_length,
            group_by_length=True, torch_num_threads=self.threads, **extra)

    # -- training cost only
    def measure_steps(self, run: Run, steps: int) -> dict:
        """Train ``steps`` steps of ``run``'s method and setting (seed 0) on the protocol's data and batch (no
        evaluation): CPU and wall seconds per step, for sizing the study."""
        import tempfile

        from slim_peft import config_from_dict, get_adapter_model
        from slim_peft.train import Trainer, seed_everything

        self._torch_setup()
        p = self.protocol
        base_model, tok = self._load()
        examples, _ = self.train_data(tok)
        seed_everything(0)
        model = get_adapter_model(base_model, config_from_dict(run_config(run)))
        with tempfile.TemporaryDirectory() as tmp:
            args = self.training_arguments(tmp, run.method, steps, seed=0, save_steps=0, disable_tqdm=True)
            t0, c0 = time.perf_counter(), time.process_time()
            out = Trainer(model, args, examples, pad_token_id=tok.pad_token_id).train()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            from slim_peft.train import read_metrics

            tokens = read_metrics(Path(out.run_dir) / "metrics.jsonl")[-1].get("tokens_seen")
        return {"kind": "steps", "method": run.method, "setting": run.setting, "steps": steps, "protocol": p.to_dict(),
                "cpu_seconds_per_step": round(cpu / steps, 3), "wall_seconds_per_step": round(wall / steps, 3),
                "tokens_per_step": tokens / steps if tokens else None,
                "trainable_parameters": model.num_parameters()[0],
                "environment": environment(), "command": self.command,
                "finished_at": _dt.datetime.now().isoformat(timespec="seconds")}

    # -- one run
    def execute(self, run: Run) -> dict:
        from slim_peft import config_from_dict, get_adapter_model
        from slim_peft.train import Trainer, read_metrics, seed_everything

        self._torch_setup()
        p, spec, setting = self.protocol, METHODS[run.method], SETTINGS[run.setting]
        cfg_dict = run_config(run)
        t_start = time.perf_counter()
        base_model, tok = self._load()
        examples, counts = self.train_data(tok)
        seed_everything(run.seed)
        model = get_adapter_model(base_model, config_from_dict(cfg_dict))
        trainable, total = model.num_parameters()
        out_dir = self.work_dir / p.name / f"{run.run_id}-{p.digest()}"  # checkpoints of this protocol only
        resume, start_step = None, 0
        from slim_peft.train import CHECKPOINT_PREFIX, list_checkpoints

        if checkpoints := list_checkpoints(out_dir):
            resume = "latest"
            start_step = int(checkpoints[-1].name[len(CHECKPOINT_PREFIX):])
            print(f"[forgetting] {run.run_id}: resuming training from {checkpoints[-1]}", flush=True)
        elif out_dir.exists():
            shutil.rmtree(out_dir)
        eval_steps = 0
        curve_state: dict[str, Any] = {}
        holder: dict[str, Any] = {}
        eval_fn = None
        other = twin(run, p.name)
        with_curve = setting.curve or (other is not None and SETTINGS[other.setting].curve)
        if with_curve:
            eval_steps = max(1, math.ceil(p.max_steps / p.curve_points))

            def eval_fn(m):  # general suite at intermediate steps (the final step is scored after training)
                step = holder["trainer"].state.global_step
                if step >= p.max_steps or step in curve_state:
                    return {}
                res = self.evaluate_all(m, tok, with_downstream=False)
                curve_state[step] = res
                flat = {f"general/{t}": r["score"] for t, r in res["general"].items()}
                flat["general_mean"] = res["general_mean"]
                flat["math"] = res["math_score"]
                flat["eval_seconds"] = res["seconds"]
                return flat

        args = self.training_arguments(
            str(out_dir), run.method, p.max_steps, seed=run.seed, eval_steps=eval_steps,
            save_steps=max(5, p.max_steps // 4), save_total_limit=1, resume_from_checkpoint=resume,
            disable_tqdm=not sys.stderr.isatty(), report_to="jsonl")
        trainer = Trainer(model, args, examples, pad_token_id=tok.pad_token_id, eval_fn=eval_fn,
                          run_config={"study": "forgetting", "run": run.run_id, "model": MODEL})
        holder["trainer"] = trainer
        print(f"[forgetting] {run.run_id}: training {p.max_steps} steps x batch {p.batch}, lr {spec.lr:g}, "
              f"{trainable:,d} trainable parameters", flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = trainer.train()
        train_seconds = time.perf_counter() - t0
        train_cpu = time.process_time() - c0
        curve_eval_cpu = sum(r.get("cpu_seconds", 0) for r in curve_state.values())
        records = read_metrics(out_dir / "metrics.jsonl")
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        step_times = [r for r in records if "tokens_per_s" in r]
        curve = []
        for r in records:
            if "eval/general_mean" in r:
                curve.append({"step": r["step"], "general_mean": r["eval/general_mean"], "math": r.get("eval/math"),
                              "general": {k.split("/", 2)[2]: v for k, v in r.items() if k.startswith("eval/general/")},
                              "eval_seconds": r.get("eval/eval_seconds")})
        routing = model.routing_stats() if hasattr(model, "routing_stats") else {}
        model.eval()
        if hasattr(model, "reset_routing_stats"):
            model.reset_routing_stats()
        scores = self.evaluate_all(model, tok)
        eval_routing = model.routing_stats() if hasattr(model, "routing_stats") else {}
        curve.append({"step": p.max_steps, "general_mean": scores["general_mean"], "math": scores["math_score"],
                      "general": {t: r["score"] for t, r in scores["general"].items()}})
        curve_eval_seconds = sum(c.get("eval_seconds") or 0 for c in curve[:-1])
        result = {
            "kind": "run", "run_id": run.run_id, "method": run.method, "method_label": spec.label,
            "setting": run.setting, "setting_label": setting.label, "group": setting.group, "seed": run.seed,
            "model": MODEL, "protocol": p.to_dict(), "protocol_digest": p.digest(), "adapter_config": cfg_dict,
            "learning_rate": spec.lr, "lr_source": spec.lr_source, "method_note": spec.note,
            "train": {"steps": out.global_step, "final_loss": out.final_loss, "losses": losses,
                      "seconds": round(train_seconds - curve_eval_seconds, 2),
                      "seconds_per_step": round((train_seconds - curve_eval_seconds)
                                                / max(1, out.global_step - start_step), 3),
                      "cpu_seconds": round(train_cpu - curve_eval_cpu, 2),
                      "tokens_seen": step_times[-1]["tokens_seen"] if step_times else None,
                      "trainable_parameters": trainable, "total_parameters": total, "data_counts": counts,
                      "resumed": resume is not None, "steps_timed": out.global_step - start_step},
            **scores,
            "curve": curve if with_curve else [],
            "routing_train": _routing_summary(routing), "routing_eval": _routing_summary(eval_routing),
            "wall_seconds": round(time.perf_counter() - t_start, 2),
            "environment": environment(), "command": self.command,
            "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        if self.keep_adapters:
            result["adapter_dir"] = out.adapter_dir
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
        del model, base_model, trainer
        return result


def number_match(generated: str, gold: str) -> float:
    """1.0 when the last number in the greedy generation equals the gold answer. The evaluator's exact match
    compares the whole first line, and this model restates the sum before answering (" 18 + 37 = 55"), so
    exact match is 0 for nearly every question whatever the model knows; the last number is its answer."""
    import re

    nums = re.findall(r"-?\d+(?:\.\d+)?", generated.replace(",", ""))
    return float(bool(nums) and nums[-1] == gold.strip())


def per_question(hits: list[float], ids: list[str], score: float) -> dict[str, str]:
    """A run's per-question outcomes of its primary metric ("0"/"1" per question, in test order) and a digest
    of the question ids: two evaluations with the same digest answered the same questions, so their difference
    can be taken question by question (see ``paired_test_se``)."""
    if abs(statistics.fmean(hits) - score) > 1e-9:
        raise AssertionError(f"per-question outcomes average {statistics.fmean(hits)}, the score is {score}")
    return {"correct": "".join("1" if h else "0" for h in hits), "ids_digest": _hash(ids)}


def base_is_current(base: dict | None, protocol: Protocol) -> bool:
    """The stored base scores fit ``protocol``'s test sizes and carry per-question outcomes (for paired
    differences); else the base model is scored again (deterministic: the scores themselves do not change)."""
    return (base is not None and base.get("eval_digest") == protocol.eval_digest()
            and all("correct" in e for part in PART_TASKS for e in base[part].values()))


def _binary_stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    p = statistics.fmean(values)
    return math.sqrt(p * (1 - p) / (n - 1))


def _routing_summary(stats: dict) -> dict:
    if not stats:
        return {}
    return {"mean_identity_share": stats.get("mean_identity_share"), "sites": len(stats.get("sites", {}))}


def summarize(scores: dict) -> None:
    """Add the means: downstream_mean (3 tasks), general_mean (7 loglik tasks), math_score."""
    d, g, m = scores.get("downstream", {}), scores.get("general", {}), scores.get("math", {})
    scores["downstream_mean"] = statistics.fmean(r["score"] for r in d.values()) if d else None
    scores["general_mean"] = statistics.fmean(r["score"] for r in g.values()) if g else None
    scores["math_score"] = m[MATH_TASK]["score"] if MATH_TASK in m else None


def environment() -> dict[str, Any]:
    import torch
    import transformers

    from slim_peft.allocator import loaded_allocator
    from slim_peft.layers.base import adapter_dropout

    return {"allocator": loaded_allocator(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "adapter_dropout": type(adapter_dropout(0.1)).__name__,  # absent in runs trained with nn.Dropout
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGTERM this process when its parent dies. Without it, killing the study (or a
    worker) leaves the spawned run training on its own while a restarted study takes the run's lock over and
    trains it a second time."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: nothing to do
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(study: Study, method: str, args: tuple, out: str, parent: int) -> None:
    import resource

    _die_with_parent(parent)
    result = getattr(study, method)(*args)
    if isinstance(result, dict):
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    Path(out).write_text(json.dumps(result, default=str))


def run_isolated(study: Study, method: str, *args: Any) -> Any:
    """``getattr(study, method)(*args)`` in a fresh (spawned) process: its memory goes back to the system when
    the run ends, and a run killed by the kernel (out of memory) raises here instead of ending the worker."""
    import multiprocessing as mp
    import tempfile

    fd, out = tempfile.mkstemp(prefix="forgetting-", suffix=".json")
    os.close(fd)
    try:
        proc = mp.get_context("spawn").Process(target=_child, args=(study, method, args, out, os.getpid()))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            why = " (killed: out of memory?)" if proc.exitcode == -9 else ""
            raise RuntimeError(f"{method} exited with code {proc.exitcode}{why}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


# ================================================================================================ report
def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_ms(values: list[float], digits: int = 1) -> str:
    m, s = mean_std([v for v in values if v is not None])
    if m is None:
        return "-"
    return f"{100 * m:.{digits}f}" + (f" ± {100 * s:.{digits}f}" if s is not None else "")


def collect(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Every protocol directory: its base scores and its stored runs (by run_id)."""
    out: dict[str, dict[str, Any]] = {}
    if not runs_dir.is_dir():
        return out
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        base = load_json(d / "base.json")
        runs = {}
        for f in sorted(d.glob("*__*__seed*.json")):
            data = load_json(f)
            if data and data.get("kind") == "run":
                runs[data["run_id"]] = data
        steps = {}
        for f in sorted(d.glob("steps__*.json")):
            data = load_json(f)
            if data and data.get("kind") == "steps":
                steps[f.stem.removeprefix("steps__")] = data
        if base or runs or steps:
            out[d.name] = {"base": base, "runs": runs, "steps": steps}
    return out


def group_runs(runs: dict[str, dict], setting: str | None = None, group: str | None = None) -> dict[tuple, list]:
    """(method, setting) -> list of runs (seeds)."""
    out: dict[tuple, list] = {}
    for r in runs.values():
        if setting is not None and r["setting"] != setting:
            continue
        if group is not None and r.get("group") != group:
            continue
        out.setdefault((r["method"], r["setting"]), []).append(r)
    return out


def _method_order(key: tuple) -> tuple:
    m = key[0]
    return (list(METHODS).index(m) if m in METHODS else 99, key[1])


def downstream_table(groups: dict[tuple, list], base: dict | None, label_setting: bool = False) -> list[str]:
    head = ["method"] + (["setting"] if label_setting else []) + ["seeds"] + [SHORT[t] for t in DOWNSTREAM_TASKS] + \
        ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base and base.get("downstream"):
        cells = ["base model"] + ([""] if label_setting else []) + ["-"] + \
            [fmt_pct(base["downstream"][t]["score"]) for t in DOWNSTREAM_TASKS] + [fmt_pct(base["downstream_mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    for key in sorted(groups, key=_method_order):
        rs = groups[key]
        cells = [rs[0]["method_label"]] + ([rs[0]["setting_label"]] if label_setting else []) + [str(len(rs))]
        cells += [fmt_ms([r["downstream"][t]["score"] for r in rs]) for t in DOWNSTREAM_TASKS]
        cells.append(fmt_ms([r["downstream_mean"] for r in rs]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def retention(run: dict, base: dict) -> float | None:
    if not base or not base.get("general_mean"):
        return None
    return run["general_mean"] / base["general_mean"]


def general_table(groups: dict[tuple, list], base: dict | None, label_setting: bool = False) -> list[str]:
    head = ["method"] + (["setting"] if label_setting else []) + ["seeds"] + [SHORT[t] for t in GENERAL_TASKS] + \
        ["Avg (7)", "retention %", SHORT[MATH_TASK]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base and base.get("general"):
        cells = ["base model"] + ([""] if label_setting else []) + ["-"] + \
            [fmt_pct(base["general"][t]["score"]) for t in GENERAL_TASKS] + \
            [fmt_pct(base["general_mean"]), "100.0", fmt_pct(base["math_score"])]
        lines.append("| " + " | ".join(cells) + " |")
    for key in sorted(groups, key=_method_order):
        rs = groups[key]
        cells = [rs[0]["method_label"]] + ([rs[0]["setting_label"]] if label_setting else []) + [str(len(rs))]
        cells += [fmt_ms([r["general"][t]["score"] for r in rs]) for t in GENERAL_TASKS]
        cells.append(fmt_ms([r["general_mean"] for r in rs]))
        cells.append(fmt_ms([retention(r, base) for r in rs]) if base else "-")
        cells.append(fmt_ms([r["math_score"] for r in rs]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def timing_table(runs: dict[str, dict]) -> list[str]:
    lines = ["| run | trainable params | train s | s/step | train CPU s/step | eval s | wall s | peak RSS GB | "
             "load avg | final loss | identity share (eval) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    own = {k: r for k, r in runs.items() if not r.get("twin_of")}  # a twin's copy: the same training and timing
    for rid in sorted(own, key=lambda k: (_method_order((own[k]["method"], own[k]["setting"])), own[k]["seed"])):
        r = own[rid]
        share = (r.get("routing_eval") or {}).get("mean_identity_share")
        t = r["train"]
        timed = steps_timed(t)
        cps = "-" if t.get("cpu_seconds") is None or not timed else f"{t['cpu_seconds'] / timed:.2f}"
        sps = f"{t['seconds_per_step']:.2f}" if timed else "-"
        train_s = f"{t['seconds']:.0f}" + (f" ({timed} steps after resuming)" if t.get("resumed") and timed else
                                           " (resumed)" if t.get("resumed") else "")
        lines.append(f"| {rid} | {t['trainable_parameters']:,d} | {train_s} | "
                     f"{sps} | {cps} | {r['seconds']:.0f} | {r['wall_seconds']:.0f} | "
                     f"{r.get('peak_rss_gb', '-')} | "
                     f"{r['environment'].get('loadavg_1min') or 0:.1f} | {r['train']['final_loss']:.3f} | "
                     f"{'-' if share is None else f'{share:.3f}'} |")
    return lines


def scatter_plot(groups: dict[tuple, list], base: dict, path: Path, title: str) -> Path | None:
    if not groups or not base:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for key in sorted(groups, key=_method_order):
        rs = groups[key]
        xs = [100 * retention(r, base) for r in rs]
        ys = [100 * r["downstream_mean"] for r in rs]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        ex = statistics.stdev(xs) if len(xs) > 1 else 0
        ey = statistics.stdev(ys) if len(ys) > 1 else 0
        label = rs[0]["method_label"] + ("" if rs[0]["setting"] in ("mds", "curve") else f" ({rs[0]['setting']})")
        ax.errorbar(mx, my, xerr=ex, yerr=ey, fmt="o", capsize=3, label=label,
                    markersize=9 if rs[0]["method"] == "slim" else 6)
        ax.scatter(xs, ys, s=8, alpha=0.35, color=ax.lines[-1].get_color() if ax.lines else None)
    ax.axvline(100, color="grey", lw=0.8, ls=":")
    ax.axhline(100 * base["downstream_mean"], color="grey", lw=0.8, ls="--")
    ax.text(100, 100 * base["downstream_mean"], " base", fontsize=8, va="bottom")
    ax.set_xlabel("general-suite retention (% of the base model's 7-task mean)")
    ax.set_ylabel("downstream accuracy, OBQA+SIQA+BoolQ mean (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves_plot(runs: list[dict], base: dict, path: Path) -> Path | None:
    runs = [r for r in runs if r.get("curve")]
    if not runs or not base:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for r in sorted(runs, key=lambda r: _method_order((r["method"], r["setting"]))):
        steps = [0] + [c["step"] for c in r["curve"]]
        axes[0].plot(steps, [100 * base["general_mean"]] + [100 * c["general_mean"] for c in r["curve"]], "o-",
                     label=f"{r['method_label']} (seed {r['seed']})")
        axes[1].plot(steps, [100 * base["math_score"]] + [100 * (c["math"] or 0) for c in r["curve"]], "o-",
                     label=r["method_label"])
    axes[0].set_ylabel("general 7-task mean (%)")
    axes[1].set_ylabel("basic_arithmetic exact match (%)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    fig.suptitle("general capability over training steps (step 0 = base model)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_plot(runs: dict[str, dict], base: dict, path: Path) -> Path | None:
    panels = []
    for group, (fld, ref) in SWEEP_REFERENCE.items():
        if group == "diagnostics":
            continue
        pts = [r for r in runs.values() if r.get("group") == group and r["method"] == "slim"]
        pts += [r for r in runs.values() if r["method"] == "slim" and r["setting"] == "mds"]
        xs = sorted({r["adapter_config"].get(fld, ref) for r in pts})
        if len(xs) < 2:
            continue
        panels.append((group, fld, ref, pts, xs))
    if not panels or not base:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (_group, fld, ref, pts, xs) in zip(axes[0], panels, strict=True):
        ret = [statistics.fmean(100 * retention(r, base) for r in pts if r["adapter_config"].get(fld, ref) == x)
               for x in xs]
        down = [statistics.fmean(100 * r["downstream_mean"] for r in pts if r["adapter_config"].get(fld, ref) == x)
                for x in xs]
        ax.plot(xs, ret, "o-", label="general retention %")
        ax.plot(xs, down, "s--", label="downstream acc %")
        ax.set_xlabel(fld)
        ax.set_title(f"SLIM: {fld} sweep", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def _allocator(src: dict[str, Any]) -> str:
    """The malloc a measurement ran with ("system" when it did not record one: those predate the record)."""
    return src.get("environment", {}).get("allocator", "system")


def _rank(src: dict[str, Any], allocator: str) -> tuple[bool, bool] | None:
    """How well a measurement prices a run under `allocator`: (current code, same allocator), higher is better;
    None to leave it out. A projection for jemalloc falls back to system-malloc costs where jemalloc has none
    (which errs long); one for the system malloc never uses a faster allocator's costs."""
    other = _allocator(src)
    if other != allocator and other != "system":
        return None
    return _current_code(src), other == allocator


def measured_costs(data: dict[str, Any], allocator: str = "system") -> dict[str, Any]:
    """CPU seconds of a 1-thread worker per training step (median per method, and per (setting, method) run)
    and per question (median per task) over a protocol's stored runs, step timings and base scores, for
    workers running with `allocator`. CPU time of a 1-thread worker approximates its wall time on an idle core,
    and it is far less distorted than wall time when other jobs share the machine.

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
    question: dict[str, list[tuple[tuple, float]]] = {}
    bases = data.get("bases") or ([data["base"]] if data.get("base") else [])
    for src in runs + bases:
        if src["environment"].get("threads") != 1 or not _rank(src, allocator):
            continue
        for part in PART_TASKS:
            for t, v in src.get(part, {}).items():
                if v.get("cpu_seconds") is not None:
                    question.setdefault(t, []).append((_rank(src, allocator), v["cpu_seconds"] / max(1, v["n"])))
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


def projection(costs: dict[str, Any], protocol: Protocol, workers: int = 2) -> list[str]:
    """The study's expected time from measured costs: steps x s/step + sum over tasks of n x s/question."""
    if not costs["step"] or not costs["question"]:
        return ["(no 1-thread measurement stored yet)"]
    q = costs["question"]
    sizes = {t: protocol.downstream_limit for t in DOWNSTREAM_TASKS}
    test_sizes = {"openbookqa": 247, "social_iqa": 951, "boolq": 1682}
    sizes = {t: min(n, test_sizes[t]) for t, n in sizes.items()}
    sizes.update({t: (protocol.general_limit(t) * MMLU_SUBJECTS if t == "mmlu" else n)
                  for t, n in protocol.general_sizes})
    sizes[MATH_TASK] = protocol.math_limit
    missing = [t for t in sizes if t not in q]
    if missing:
        return [f"(no per-question cost measured yet for {', '.join(missing)})"]
    eval_s = sum(n * q[t] for t, n in sizes.items())
    worst = max(costs["step"].values())
    lines = [f"Evaluation of one model at the `{protocol.name}` sizes: " +
             " + ".join(f"{n} x {q[t]:.3f}" for t, n in sizes.items()) + f" = **{eval_s:.0f} s**.", ""]
    main_runs = plan("main")
    # a curve run scores the general suite (and the math probe) at curve_points - 1 intermediate steps on top of
    # its final evaluation; the main runs that are curve runs too (`twin`) pay that, and the curves budget nothing
    general_s = sum(n * q[t] for t, n in sizes.items() if t not in DOWNSTREAM_TASKS)
    curve_s = (protocol.curve_points - 1) * general_s
    with_curve = [r for r in main_runs if twin(r, protocol.name) is not None]
    total = eval_s + len(with_curve) * curve_s  # the base model, once
    lines += ["| method | s/step | measured? | train s | eval s | run s |", "|---|---|---|---|---|---|"]
    for m in MAIN_METHODS:
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
    rest, own = 0.0, 0
    rest_runs = {r for b in ("ablations", "sweeps", "curves", "diagnostics") for r in plan(b) if r.setting != "mds"}
    trained_in_main = {r for r in rest_runs if twin(r, protocol.name) in main_runs}
    for r in rest_runs - trained_in_main:
        per = costs.get("run_step", {}).get((protocol.name, r.run_id))
        own += per is not None
        per = per if per is not None else costs["step"].get(r.method, worst)
        extra = curve_s if SETTINGS[r.setting].curve else 0.0
        rest += protocol.max_steps * per + eval_s + extra + 10
    lines.append(f"The other budgets (ablations, sweeps, curves, diagnostics: {len(rest_runs)} runs, "
                 f"{len(trained_in_main)} of them trained by the main budget, {own} at "
                 f"their own s/step measured with the current code, the others at their method's s/step, which "
                 f"prices low a setting that does more work per step) = {rest / 3600:.2f} core-hours, i.e. "
                 f"**{rest / 3600 / workers:.2f} h** "
                 f"(target: 4 h: {'met' if rest / workers <= 4 * 3600 else 'not met'}).")
    return lines


ALLOCATOR_LABEL = {"system": "glibc malloc", "jemalloc": "jemalloc"}


def sizing_section(proto_name: str, data: dict[str, Any]) -> list[str]:
    """Measured costs of this protocol's runs and, from them, the projected cost of the study's budgets: with
    the system malloc and, where anything was measured under it, with jemalloc (`slim_peft.allocator`)."""
    costs = measured_costs(data)
    if not costs["step"] and not costs["question"]:
        return []
    sources = [*data["runs"].values(), *data.get("steps", {}).values(), *(data.get("bases") or [])]
    fast = measured_costs(data, "jemalloc") if any(_allocator(x) == "jemalloc" for x in sources) else None
    loads = costs.get("current_loads") or []
    load = f" (1-min load average {min(loads):.1f}-{max(loads):.1f} at their end)" if loads else ""
    lines = ["CPU seconds of one 1-thread worker: medians over the stored runs, base scorings and step timings "
             "(`--measure-steps`) done with `--threads 1`, keeping only those made with the current code (they "
             "record `adapter_dropout`) where a method or task has any" + load + "; a step timing is scaled to the "
             "runs' median tokens per step. Wall time of a 1-thread worker equals its CPU time when it has a core "
             "to itself: two workers on the 2 cores make a load average of 2; above that other jobs shared the "
             "cores, which inflates CPU time too (shared caches), so a projection from such measurements errs "
             "long."]
    if fast:
        lines[0] += (" Each cost is given for both allocators the study runs with (`--allocator`): glibc's malloc "
                     "and jemalloc, preloaded with `--allocator jemalloc` (see "
                     "`src/slim_peft/allocator.py`); `-` where jemalloc has no measurement of its own (its "
                     "projection then uses glibc's, which errs long). glibc's is the default: jemalloc with its "
                     "decay off keeps every freed page, and the exact-merge run outgrew the 24 GB machine under "
                     "it (see the script's docstring), so its projection holds only where memory allows.")
    lines += [""] + _cost_table("method", f"CPU s per training step (batch {PROTOCOLS['study'].batch})",
                                costs, fast, "step", lambda m: _method_order((m, "")), 2)
    if fast and fast["run_step"]:
        own = {k: v for k, v in fast["run_step"].items() if k in fast["own_allocator"]["run_step"]}
        if own:
            lines += ["", "Settings timed on their own (jemalloc): " + ", ".join(
                f"{rid.split('__')[0]} {v:.2f} (glibc {costs['run_step'][(p, rid)]:.2f})"
                if (p, rid) in costs["run_step"] else f"{rid.split('__')[0]} {v:.2f}"
                for (p, rid), v in sorted(own.items())) + " CPU s per step."]
    if costs.get("micro_batches"):
        lines += ["", "Measured with micro-batch x accumulation: " + ", ".join(costs["micro_batches"]) +
                  f" (the study uses {PROTOCOLS['study'].per_device_batch} x {PROTOCOLS['study'].grad_accum}; "
                  "same 16 examples per step)."]
    if costs.get("tokens_per_step"):
        lines += ["", f"Tokens per step (median, padding included): {costs['tokens_per_step']:.0f}."]
    lines += [""] + _cost_table("task", "CPU s per question", costs, fast, "question", None, 3)
    for c in (costs, fast) if fast else (costs,):
        lines += ["", f"Projected cost of the study with {ALLOCATOR_LABEL[c['allocator']]} from these "
                  "measurements:", ""]
        lines += projection(c, PROTOCOLS["study"])
    return lines


def _cost_table(key: str, what: str, costs: dict, fast: dict | None, part: str, order, digits: int) -> list[str]:
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


def write_report(runs_dir: Path = RUNS_DIR, report: Path = REPORT, quiet: bool = False) -> Path:
    """Regenerate forgetting.md and the PNGs from the stored JSONs (never from anything else)."""
    data = collect(runs_dir)
    lines = ["# Learn vs forget on SmolLM2-135M-Instruct", "",
             "Generated by `python benchmarks/forgetting.py --report-only` from the JSONs under "
             "`benchmarks/results/forgetting/`; every number below comes from those files. Rerun any budget with "
             "the commands listed per protocol (runs already stored are skipped).", ""]
    lines += status_section(data, runs_dir)
    lines += methods_section()
    merged = {"base": None, "runs": {}, "steps": {}, "bases": []}
    for name, d in data.items():
        merged["runs"].update({f"{name}/{k}": v for k, v in d["runs"].items()})
        merged["steps"].update({f"{name}/{k}": v for k, v in d.get("steps", {}).items()})
        if d["base"]:
            merged["bases"].append(d["base"])
    sizing = sizing_section("all", merged)
    if sizing:
        lines += ["## Sizing: measured costs and the arithmetic behind the study's defaults", ""] + sizing + [""]
    order = sorted(data, key=lambda n: (n != "study", n != "pilot", n))
    if not data:
        lines += ["No run is stored yet.", ""]
    for name in order:
        lines += protocol_section(name, data[name], runs_dir, report.parent)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines).rstrip() + "\n")
    study = data.get("study")
    if report == REPORT and runs_dir == RUNS_DIR and study and study["base"]:  # the repo's own report only
        update_readme(readme_headline(study, runs_dir))
    if not quiet:
        print(f"[forgetting] wrote {report}")
    return report


README = REPO / "README.md"
README_MARKERS = ("<!-- forgetting-headline:start -->", "<!-- forgetting-headline:end -->")


def readme_headline(d: dict[str, Any], runs_dir: Path) -> list[str]:
    """The README's headline: the main tables, the scatter and the computed orderings (no hand-copied numbers)."""
    base, main = d["base"], group_runs(d["runs"], setting="mds")
    proto = PROTOCOLS["study"]
    runs = plan("main")
    done = sum(run_status(r, runs_dir, proto) == "done" for r in runs)
    state = "8 methods x 3 seeds" if done == len(runs) else f"partial: {done} of the {len(runs)} main runs"
    sizes = dict(proto.general_sizes)
    lines = [f"### Learn vs forget on SmolLM2-135M-Instruct ({state})", "",
             "`python benchmarks/forgetting.py --budget main --workers 2` (resumable). Training on OBQA + SIQA + "
             f"BoolQ mixed, {proto.max_steps} steps x batch {proto.batch}, each method at its paper's learning rate; "
             f"downstream = letter protocol on {proto.downstream_limit} test questions per task; general = lm-eval "
             f"loglik templates on {sum(sizes.values()):,} test questions; Arith = basic_arithmetic by generation "
             f"({proto.math_limit} questions). Mean ± std over seeds. This block is written by the script from the "
             "stored runs; `benchmarks/results/forgetting.md` has the stderrs, the paper's claims checked one by "
             "one, the ablations, sweeps and curves, what moves SLIM, a discussion generated from the verdicts, and "
             "what is still pending.", ""]
    lines += downstream_table(main, base) + [""] + general_table(main, base) + [""]
    if (RESULTS_DIR / "forgetting_study_scatter.png").is_file():
        lines += ["![learn vs forget](benchmarks/results/forgetting_study_scatter.png)", ""]
    lines += observations(main, base)
    rows = _claims(*comparison(d["runs"], base))
    if rows:
        claim, shown, verdict = rows[0]
        lines += [f"The paper's main claim, {claim}: {shown}; verdict: **{verdict}** (2-stderr rule; the "
                  "report checks each claim).", ""]
    return lines


def update_readme(block: list[str], readme: Path = README) -> bool:
    """Replace the text between the README's headline markers; False (README untouched) without markers."""
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + "\n".join(block).rstrip() + "\n" + end + tail)
    return True


def status_section(data: dict[str, Any], runs_dir: Path) -> list[str]:
    """Where the study stands, and how to continue it."""
    proto = PROTOCOLS["study"]
    lines = ["## Status", ""]
    for budget, b in BUDGETS.items():
        if b["protocol"] != "study":
            continue
        runs = plan(budget)
        done = sum(run_status(r, runs_dir, proto) == "done" for r in runs)
        lines.append(f"- `{budget}`: {done} of {len(runs)} runs stored" + (" (complete)" if done == len(runs) else ""))
    base_done = bool(data.get("study", {}).get("base"))
    lines += [f"- base model scored at the study's sizes: {'yes' if base_done else 'not yet'}", "",
              "Sections below show only what is stored. Conclusions about the paper's claims (which reproduce at "
              "this scale and which do not) belong with the complete main table; until every main run is stored, "
              "the study tables are partial and the pilot is a smoke test of the pipeline, not evidence.", "",
              "Continue or extend the study (stored runs are skipped; a killed run resumes from its last training "
              "checkpoint in `~/.cache/slim-peft/forgetting-work/`; seed 0 of LoRA, MixLoRA and SLIM scores the "
              "general suite over steps as it trains and is stored as the curves budget's run too; "
              "`--allocator jemalloc` makes training steps 1.1-1.3x faster where memory allows, see the module "
              "docstring):", "",
              "    python benchmarks/forgetting.py --budget main --workers 2      # 8 methods x 3 seeds, curves",
              "    python benchmarks/forgetting.py --budget ablations --workers 2",
              "    python benchmarks/forgetting.py --budget sweeps --workers 2",
              "    python benchmarks/forgetting.py --budget curves --workers 2",
              "    python benchmarks/forgetting.py --budget diagnostics --workers 2",
              "    python benchmarks/forgetting.py --budget sweeps --settings experts2 --seeds 1,2   # more seeds "
              "for one setting",
              "    python benchmarks/forgetting.py --report-only                  # regenerate this file", ""]
    return lines


def methods_section() -> list[str]:
    lines = ["## Methods and learning rates", "",
             "Same data, steps, batch, schedule and seeds for every method; only the learning rate differs, each "
             "the one its paper or reference code recommends:", "",
             "| key | method | learning rate | source | configuration |", "|---|---|---|---|---|"]
    for key, m in METHODS.items():
        lines.append(f"| `{key}` | {m.label} | {m.lr:g} | {m.lr_source} | {m.note} |")
    lines += ["", "Main table: " + ", ".join(f"`{m}`" for m in MAIN_METHODS) + ". Settings of the other budgets "
              "(SLIM only): " + ", ".join(f"`{k}` ({s.label})" for k, s in SETTINGS.items() if k != "mds") + ".", ""]
    return lines


def protocol_section(name: str, d: dict[str, Any], runs_dir: Path, out_dir: Path) -> list[str]:
    base, runs = d["base"], d["runs"]
    if not base and not runs:
        proto_obj = PROTOCOLS.get(name)
        if proto_obj is None:
            return []
        proto = proto_obj.to_dict()
    else:
        # a run's protocol (base.json records the training fields of whenever it was scored; only its
        # evaluation fields are checked against the protocol)
        proto = (next(iter(runs.values())) if runs else base)["protocol"]
    lines = [f"## Protocol `{name}`" + (" (the study)" if name == "study" else
                                          " (smoke-sized: numbers are NOT conclusions)" if name == "pilot" else ""),
             ""]
    lines += [f"- training: MDS = {' + '.join(DOWNSTREAM_TASKS)} train splits mixed (letter format, loss on the "
              f"answer only), {proto['max_steps']} optimizer steps x batch {proto['per_device_batch']} x "
              f"{proto['grad_accum']} accumulation = "
              f"{proto['max_steps'] * proto['per_device_batch'] * proto['grad_accum']}"
              f" examples, AdamW (weight decay {proto['weight_decay']}), {proto['scheduler']} schedule with "
              f"{proto['warmup_ratio']:.0%} warmup, clip {proto['max_grad_norm']}, max {proto['max_seq_length']} "
              f"tokens, length-grouped batches;",
              f"- downstream: letter protocol on the test splits, first {proto['downstream_limit']} questions per "
              "task;",
              "- general: loglik protocol (lm-eval templates; acc_norm for ARC-Challenge and HellaSwag, acc "
              "otherwise), first N test questions per task: " +
              ", ".join(f"{t} {n}" for t, n in proto["general_sizes"].items()) +
              " (MMLU: N/57 per subject); basic_arithmetic: greedy generation of the lm-eval ARC-style prompt, "
              f"first {proto['math_limit']} test questions, scored by whether the last number generated equals the "
              "answer (the model restates the sum, ' 18 + 37 = 55', so the evaluator's first-line exact match is 0 "
              "for nearly every answer; both are stored in the JSONs);",
              "- retention = adapted 7-task mean / base 7-task mean; mean ± sample std over seeds.", ""]
    if base:
        p = Protocol(**{**proto, "general_sizes": tuple(proto["general_sizes"].items())})
        lines += ["### Test sizes and the stderr target", "", stderr_markdown(stderr_table(p, base)), ""]
    main = group_runs(runs, setting="mds")
    if main or base:
        lines += ["### Downstream accuracy (Table 1 style, letter protocol, %)", ""]
        lines += downstream_table(main, base) + [""]
        lines += ["### General capability (Table 2 style, loglik protocol, %; retention vs base)", ""]
        lines += general_table(main, base) + [""]
    if main and base:
        png = scatter_plot(main, base, out_dir / f"forgetting_{name}_scatter.png",
                           f"learn vs forget, protocol '{name}' (SmolLM2-135M-Instruct, MDS)")
        if png:
            lines += [f"![learn vs forget](./{png.name})", ""]
        lines += observations(main, base)
        if name == "study":
            lines += claims_section(runs, base)
    others = {k: v for k, v in runs.items() if v["setting"] not in ("mds",)}
    if others:
        og = group_runs(others)
        lines += ["### Ablations, sweeps, diagnostics and curve runs (SLIM unless stated)", ""]
        lines += downstream_table(og, None, label_setting=True) + [""]
        lines += general_table(og, base, label_setting=True) + [""]
        png = sweep_plot(runs, base, out_dir / f"forgetting_{name}_sweeps.png") if base else None
        if png:
            lines += [f"![sweeps](./{png.name})", ""]
        png = curves_plot(list(runs.values()), base, out_dir / f"forgetting_{name}_curves.png") if base else None
        if png:
            lines += [f"![curves](./{png.name})", ""]
    if name == "study" and base and main:
        lines += effects_section(runs, base) + discussion_section(runs, base)
    if name in ("study", "pilot"):
        lines += pending_section(name, runs_dir)
    if runs:
        lines += ["### Wall time", ""]
        total_train = sum(r["train"]["seconds"] for r in runs.values())
        total_wall = sum(r["wall_seconds"] for r in runs.values())
        lines += [f"{len(runs)} runs: {total_train / 3600:.2f} h training, {total_wall / 3600:.2f} h in all"
                  f" ({total_wall / 7200:.2f} h with 2 workers sharing the 2 cores)"
                  + (f"; base model scored once in {base['wall_seconds']:.0f} s" if base else "") +
                  ". Machine: " + _env_line(runs, base) + ".", ""]
        lines += timing_table(runs) + [""]
        cmds = sorted({r["command"] for r in runs.values() if r.get("command")})
        lines += ["### Commands that produced these runs", ""] + [f"    {c}" for c in cmds] + [""]
    return lines


def _env_line(runs: dict, base: dict | None) -> str:
    envs = [r["environment"] for r in runs.values()] + ([base["environment"]] if base else [])
    e = envs[0]
    loads = [x.get("loadavg_1min") or 0 for x in envs]
    hf = sorted({x["transformers"] for x in envs if x.get("transformers")})
    hf_text = f", transformers {', '.join(hf)}" if hf else ""
    unrecorded = sum(not x.get("transformers") for x in envs)
    if hf and unrecorded:
        hf_text += f" ({unrecorded} older evaluations did not record it)"
    fast_drop = sum(x.get("adapter_dropout") == "LoraDropout" for x in [r["environment"] for r in runs.values()])
    drop_text = (f"; adapter dropout: {len(runs) - fast_drop} runs with torch's nn.Dropout, {fast_drop} with "
                 "LoraDropout (same distribution, cheaper CPU mask, another random stream: "
                 "`benchmarks/results/dropout_speed.md`)") if fast_drop else ""
    return (f"{e['cpu_count']} CPU cores, {e['threads']} torch threads, torch {e['torch']}{hf_text}; 1-min load "
            f"average at run end {min(loads):.1f}-{max(loads):.1f} (above {e['cpu_count']} means other jobs shared the "
            f"cores and timings are inflated){drop_text}")


def observations(groups: dict[tuple, list], base: dict) -> list[str]:
    """Plain statements computed from the table (no interpretation beyond ordering)."""
    rows = []
    for rs in groups.values():
        rows.append((rs[0]["method_label"], statistics.fmean(r["downstream_mean"] for r in rs),
                     statistics.fmean(retention(r, base) for r in rs), len(rs)))
    if len(rows) < 2:
        return []
    by_ret = sorted(rows, key=lambda r: -r[2])
    by_down = sorted(rows, key=lambda r: -r[1])
    front = learn_forget_front([(n, d, r) for n, d, r, _ in rows])
    lines = ["Computed from the table above:", "",
             "- retention, highest first: " + ", ".join(f"{n} {100 * r:.1f}%" for n, _, r, _ in by_ret) + ";",
             "- downstream mean, highest first: " + ", ".join(f"{n} {100 * d:.1f}" for n, d, _, _ in by_down) + ";",
             "- on the learn-forget front (no other method higher on both the downstream mean and retention; "
             "means over seeds, before any stderr): " + ", ".join(front) + "."]
    return lines + [""]


def learn_forget_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, downstream, retention) points that no other point beats on both coordinates, in
    order of falling downstream score."""
    beaten = {n for n, d, r in points
              if any(d2 >= d and r2 >= r and (d2, r2) != (d, r) for _, d2, r2 in points)}
    return [n for n, _, _ in sorted(points, key=lambda p: -p[1]) if n not in beaten]


def pending_section(name: str, runs_dir: Path) -> list[str]:
    lines = [f"### Planned runs of protocol `{name}`", "", "| budget | done | pending | stale |", "|---|---|---|---|"]
    pending_ids: list[str] = []
    for budget, b in BUDGETS.items():
        if b["protocol"] != name:
            continue
        proto = PROTOCOLS[name]
        st = [(r, run_status(r, runs_dir, proto)) for r in plan(budget)]
        lines.append(f"| {budget} | {sum(s == 'done' for _, s in st)} | {sum(s == 'pending' for _, s in st)} | "
                     f"{sum(s == 'stale' for _, s in st)} |")
        pending_ids += [f"{budget}:{r.run_id}" for r, s in st if s != "done"]
    lines.append("")
    if pending_ids:
        lines += ["Not yet run: " + ", ".join(f"`{p}`" for p in pending_ids) + ".", ""]
    return lines


# ================================================================================================ the paper's claims
@dataclass(frozen=True)
class Estimate:
    """A score averaged over seeds, with its two sources of noise: the spread over seeds (None with one seed)
    and the test-set stderr of one evaluation (binomial, from the stored per-task stderrs)."""

    mean: float
    seeds: int
    seed_std: float | None
    test_se: float


def _test_se(src: dict, part: str) -> float:
    """Binomial stderr of a run's (or the base model's) mean score over the tasks of ``part``."""
    tasks = PART_TASKS[part]
    return math.sqrt(sum(src[part][t]["stderr"] ** 2 for t in tasks)) / len(tasks)


def _score(src: dict, part: str) -> float:
    return src[{"general": "general_mean", "downstream": "downstream_mean", "math": "math_score"}[part]]


def estimate(rs: list[dict], part: str) -> Estimate:
    """Mean over a group's seeds (the base model: a group of one)."""
    values = [_score(r, part) for r in rs]
    return Estimate(statistics.fmean(values), len(values), statistics.stdev(values) if len(values) > 1 else None,
                    statistics.fmean(_test_se(r, part) for r in rs))


def difference(a: Estimate, b: Estimate, paired_se: float | None = None) -> tuple[float, float]:
    """a - b and its stderr. Without ``paired_se`` the test-set errors are counted as independent, which is
    conservative: both evaluations answer the same questions. With it (``paired_test_se``), the test-set part
    is the stderr of the question-by-question difference. The spread over seeds is added where measured."""
    var = paired_se ** 2 if paired_se is not None else a.test_se ** 2 + b.test_se ** 2
    var += sum(e.seed_std ** 2 / e.seeds for e in (a, b) if e.seed_std is not None)
    return a.mean - b.mean, math.sqrt(var)


def paired_test_se(a: list[dict], b: list[dict], part: str) -> float | None:
    """Stderr of the mean over ``part``'s tasks of the question-by-question difference between two groups of
    evaluations (each question's outcome averaged over a group's seeds). Only the evaluations that stored
    per-question outcomes enter (runs stored before they were recorded have none); None when a group has no
    such evaluation or they answered different questions."""
    tasks = PART_TASKS[part]
    a, b = ([src for src in g if all("correct" in src[part][t] for t in tasks)] for g in (a, b))
    if not a or not b:
        return None
    var = 0.0
    for t in tasks:
        entries = [src[part][t] for src in a + b]
        if len({e["ids_digest"] for e in entries}) > 1:
            return None
        mean_a = [statistics.fmean(int(e["correct"][i]) for e in entries[: len(a)]) for i in range(entries[0]["n"])]
        mean_b = [statistics.fmean(int(e["correct"][i]) for e in entries[len(a):]) for i in range(entries[0]["n"])]
        d = [x - y for x, y in zip(mean_a, mean_b, strict=True)]
        var += statistics.variance(d) / len(d)
    return math.sqrt(var) / len(tasks)


def compare(a: list[dict], b: list[dict], part: str) -> tuple[float, float]:
    """Mean score of group ``a`` minus group ``b`` (runs or the base model) with its stderr, paired by question
    where both stored their per-question outcomes."""
    return difference(estimate(a, part), estimate(b, part), paired_test_se(a, b, part))


def fmt_diff(d: tuple[float, float]) -> str:
    """Points, with the stderr; '*' marks a difference beyond 2 stderr."""
    return f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f}" + ("*" if abs(d[0]) > 2 * d[1] else "")


def _sign_verdict(d: tuple[float, float], yes: str, no: str) -> str:
    """'yes' when the difference is beyond +2 stderr, 'no' beyond -2 stderr, else unresolved."""
    if d[0] > 2 * d[1]:
        return yes
    if d[0] < -2 * d[1]:
        return no
    return f"not resolved ({'same' if d[0] >= 0 else 'opposite'} sign as the paper, within 2 stderr)"


def comparison(runs: dict[str, dict], base: dict) -> tuple[dict[Any, list[dict]], dict[Any, str], Any]:
    """The runs grouped by (method, setting) plus the base model as group "base", their labels, and
    ``delta(a, b, part)``: group a minus group b with its stderr (``compare``)."""
    groups: dict[Any, list[dict]] = {**group_runs(runs), "base": [base]}
    label = {k: rs[0]["method_label"] for k, rs in groups.items() if k != "base"}

    def delta(a: Any, b: Any, part: str) -> tuple[float, float]:
        return compare(groups[a], groups[b], part)

    return groups, label, delta


def claims_section(runs: dict[str, dict], base: dict) -> list[str]:
    """The paper's claims next to what the stored runs show, with a verdict per claim (computed, not
    written by hand: a claim whose runs are missing is marked pending)."""
    groups, label, delta = comparison(runs, base)
    with_outcomes = sum("correct" in src["general"][GENERAL_TASKS[0]] for rs in groups.values() for src in rs)
    total = sum(len(rs) for rs in groups.values())
    parts = tuple(PART_TASKS)
    lines = ["### The paper's claims at this scale", "",
             "Differences in points ± stderr; `*` marks a difference beyond 2 stderr. The stderr's test-set part "
             "pairs the two sides question by question, from the evaluations that stored per-question outcomes "
             f"({with_outcomes} of {total} here, the base model included); where a side has none, the test-set "
             "errors are counted as independent, which overstates the stderr. The spread over seeds is added where "
             "there are several (one seed: seed noise not measured).", ""]
    main = sorted((k for k in groups if k != "base" and k[1] == "mds"), key=_method_order)
    lines += ["| vs base model | seeds | downstream | general (7) | arithmetic |", "|---|---|---|---|---|"]
    lines += [f"| {label[k]} | {len(groups[k])} | " + " | ".join(fmt_diff(delta(k, "base", p)) for p in parts) + " |"
              for k in main]
    slim = ("slim", "mds")
    if slim in groups and len(main) > 1:
        lines += ["", "| SLIM minus | seeds (SLIM / other) | downstream | general (7) | arithmetic |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label[k]} | {len(groups[slim])} / {len(groups[k])} | " +
                  " | ".join(fmt_diff(delta(slim, k, p)) for p in parts) + " |" for k in main if k != slim]
    lines += ["", "| claim (paper) | what the stored runs show | verdict |", "|---|---|---|"]
    lines += [f"| {c} | {shown} | {verdict} |" for c, shown, verdict in _claims(groups, label, delta)]
    return lines + [""]


def _claims(groups: dict, label: dict, delta) -> list[tuple[str, str, str]]:
    """(claim, evidence, verdict) rows."""
    slim = ("slim", "mds")
    main = [k for k in groups if k != "base" and k[1] == "mds"]
    missing = [m for m in MAIN_METHODS if (m, "mds") not in groups]
    pending = f"pending: main methods not run: {', '.join(missing)}; " if missing else ""
    rows = []
    if slim in groups and len(main) > 1:
        others = [k for k in main if k != slim]
        d_gen = {k: delta(slim, k, "general") for k in others}
        closest = min(d_gen, key=lambda k: d_gen[k][0] / max(d_gen[k][1], 1e-12))
        ahead = sum(d[0] > 0 for d in d_gen.values())
        rows.append(("SLIM keeps the most general capability (Table 2: general average 75.65 vs LoRA 31.24, "
                     "MixLoRA 51.08, LoRAMoE 66.39)",
                     f"SLIM's general mean is above {ahead} of {len(others)} baselines; closest: {label[closest]} "
                     f"({fmt_diff(d_gen[closest])} pts)",
                     pending + _sign_verdict(d_gen[closest], "reproduces", "contradicted")))
        best = max(others, key=lambda k: estimate(groups[k], "downstream").mean)
        d_down = delta(slim, best, "downstream")
        rows.append(("SLIM matches the best baselines downstream (Table 1)",
                     f"SLIM minus the best baseline downstream ({label[best]}): {fmt_diff(d_down)} pts",
                     pending + ("does not reproduce (SLIM below by more than 2 stderr)" if d_down[0] < -2 * d_down[1]
                                else "reproduces (no difference beyond 2 stderr, or SLIM ahead)")))
    for key in (("lora", "mds"), ("dora", "mds")):
        if key in groups:
            d_gen, d_math = delta("base", key, "general"), delta("base", key, "math")
            rows.append((f"{label[key]} forgets (Table 2: LoRA MMLU 32.7 / GSM8K 0.0, DoRA 31.1 / 0.0, SLIM "
                         "65.8 / 76.1)",
                         f"base minus {label[key]}: general {fmt_diff(d_gen)}, arithmetic {fmt_diff(d_math)} pts",
                         _sign_verdict(d_math, "direction reproduces on arithmetic", "contradicted on arithmetic")
                         + "; " + _sign_verdict(d_gen, "direction reproduces on the general suite",
                                                "contradicted on the general suite")))
    for setting, what in (("no_identity", "identity experts"), ("no_yield", "weight yielding"),
                          ("no_merge", "dynamic merging")):
        claim = f"removing {what} increases forgetting (Table 3)"
        if {slim, ("slim", setting)} <= set(groups):
            d = delta(slim, ("slim", setting), "general")
            rows.append((claim, f"SLIM minus w/o {what}: general {fmt_diff(d)}",
                         _sign_verdict(d, "reproduces", "contradicted")))
        else:
            rows.append((claim, "-", f"pending: run `slim/{setting}`"))
    claim = "fast (factor-masked) merging changes accuracy only slightly (Table 3)"
    if {slim, ("slim", "exact_merge")} <= set(groups):
        d_down, d_gen = (delta(slim, ("slim", "exact_merge"), p) for p in ("downstream", "general"))
        rows.append((claim, f"fast minus exact: downstream {fmt_diff(d_down)}, general {fmt_diff(d_gen)}",
                     "reproduces" if all(abs(d[0]) <= 2 * d[1] for d in (d_down, d_gen))
                     else "does not reproduce (a difference beyond 2 stderr)"))
    else:
        rows.append((claim, "-", "pending: run `slim/exact_merge`"))
    return rows + _sweep_claims(groups, delta) + _curve_claim(groups)


def _sweep_claims(groups: dict, delta) -> list[tuple[str, str, str]]:
    ref, lo, hi = ("slim", "mds"), ("slim", "mask0.1"), ("slim", "mask0.9")
    claim = "mask ratio: too large drops downstream accuracy, too small loses the forgetting benefit (Fig. 4)"
    if {ref, lo, hi} <= set(groups):
        d_down, d_gen = delta(ref, hi, "downstream"), delta(ref, lo, "general")
        rows = [(claim, f"downstream at 0.5 minus 0.9: {fmt_diff(d_down)}; general at 0.5 minus 0.1: "
                        f"{fmt_diff(d_gen)}",
                 _sign_verdict(d_down, "large-ratio drop reproduces", "contradicted") + "; " +
                 _sign_verdict(d_gen, "small-ratio loss reproduces", "contradicted"))]
    else:
        rows = [(claim, "-", "pending: run the `sweeps` budget")]
    few, many = ("slim", "experts2"), ("slim", "experts16")
    claim = "more LoRA experts: better downstream, no effect on general ability (Fig. 6)"
    if {few, many} <= set(groups):
        d_down, d_gen = delta(many, few, "downstream"), delta(many, few, "general")
        rows.append((claim, f"16 minus 2 experts: downstream {fmt_diff(d_down)}, general {fmt_diff(d_gen)}",
                     _sign_verdict(d_down, "downstream gain reproduces", "contradicted") + "; general " +
                     ("unchanged within 2 stderr" if abs(d_gen[0]) <= 2 * d_gen[1] else "changed beyond 2 stderr")))
    else:
        rows.append((claim, "-", "pending: run the `sweeps` budget"))
    return rows


def _curve_claim(groups: dict) -> list[tuple[str, str, str]]:
    claim = "SLIM's general ability degrades less over training steps than LoRA's and MixLoRA's (Fig. 5)"
    curves = {k[0]: rs[0]["curve"] for k, rs in groups.items() if k != "base" and k[1] == "curve" and rs[0]["curve"]}
    if not {"slim", "lora", "mixlora"} <= set(curves):
        return [(claim, "-", "pending: run the `curves` budget")]
    base = groups["base"][0]
    shown, verdicts = [], []
    for part, key, name in (("general", "general_mean", "general suite"), ("math", "math", "arithmetic")):
        if any(c.get(key) is None for m in ("slim", "lora", "mixlora") for c in curves[m]):
            continue
        drop = {m: _score(base, part) - min(c[key] for c in curves[m]) for m in curves}
        se = _test_se(base, part) * math.sqrt(2)  # curve points store no per-question outcomes: unpaired
        d = (min(drop["lora"], drop["mixlora"]) - drop["slim"], se)
        shown.append(f"{name}: SLIM {100 * drop['slim']:.1f}, LoRA {100 * drop['lora']:.1f}, MixLoRA "
                     f"{100 * drop['mixlora']:.1f} pts (unpaired stderr of a difference about {100 * se:.1f})")
        verdicts.append(_sign_verdict(d, f"reproduces on the {name}", f"contradicted on the {name}"))
    return [(claim, "largest drop below the base model over the curve, " + "; ".join(shown), "; ".join(verdicts))]


def slim_setting_keys(groups: dict) -> list[tuple[str, str]]:
    """Group keys of the SLIM settings other than the main table and the curve (ablations, sweeps,
    diagnostics), in the order of ``SETTINGS``."""
    return sorted((k for k in groups if k != "base" and k[0] == "slim" and k[1] not in ("mds", "curve")),
                  key=lambda k: list(SETTINGS).index(k[1]))


def effects_rows(groups: dict, delta) -> list[tuple[Any, dict[str, tuple[float, float]], float | None]]:
    """Each stored SLIM setting other than the main one: (key, {part: setting minus main SLIM}, identity
    share at evaluation), in the order of ``SETTINGS``."""
    slim = ("slim", "mds")
    if slim not in groups:
        return []
    keys = slim_setting_keys(groups)
    rows = []
    for k in keys:
        shares = [(r.get("routing_eval") or {}).get("mean_identity_share") for r in groups[k]]
        shares = [x for x in shares if x is not None]
        rows.append((k, {p: delta(k, slim, p) for p in PART_TASKS}, statistics.fmean(shares) if shares else None))
    return rows


def effects_section(runs: dict[str, dict], base: dict) -> list[str]:
    """What moves SLIM: every ablation, sweep and diagnostic setting minus the main SLIM runs."""
    groups, _, delta = comparison(runs, base)
    rows = effects_rows(groups, delta)
    lines = ["### What moves SLIM: each setting minus the main SLIM runs", ""]
    if not rows:
        return lines + ["No ablation, sweep or diagnostic run is stored yet (budgets `ablations`, `sweeps`, "
                        "`diagnostics`).", ""]
    main_share = [(r.get("routing_eval") or {}).get("mean_identity_share") for r in groups[("slim", "mds")]]
    main_share = [x for x in main_share if x is not None]
    lines += ["Points ± stderr (paired by question; the setting's own seed noise is not measured with one seed, so "
              "`*` is optimistic); identity share = mean routing weight on the identity experts at evaluation "
              + (f"(main SLIM: {statistics.fmean(main_share):.3f})." if main_share else "."), "",
              "| setting | group | seeds | downstream | general (7) | arithmetic | identity share |",
              "|---|---|---|---|---|---|---|"]
    for k, d, share in rows:
        spec = SETTINGS[k[1]]
        cells = [f"{spec.label} (`{k[1]}`)", spec.group, str(len(groups[k]))] + [fmt_diff(d[p]) for p in PART_TASKS]
        lines.append("| " + " | ".join(cells + ["-" if share is None else f"{share:.3f}"]) + " |")
    best_gen = max(rows, key=lambda row: row[1]["general"][0])
    best_down = max(rows, key=lambda row: row[1]["downstream"][0])
    lines += ["", f"Highest general-suite change: {SETTINGS[best_gen[0][1]].label} "
                  f"({fmt_diff(best_gen[1]['general'])}); highest downstream change: "
                  f"{SETTINGS[best_down[0][1]].label} ({fmt_diff(best_down[1]['downstream'])})"
                  + ("; no setting keeps more general capability than the main SLIM"
                     if best_gen[1]["general"][0] <= 0 else "") + ".", ""]
    return lines + seed_offset_lines(groups)


def seed_offset_lines(groups: dict) -> list[str]:
    """How far the main SLIM run of each seed the settings used sits from the main SLIM mean: a single-seed
    setting's difference carries that offset before any effect of the setting."""
    main = groups[("slim", "mds")]
    if len(main) < 2:
        return []
    used = sorted({r["seed"] for k in slim_setting_keys(groups) for r in groups[k]})
    offsets = []
    for seed in used:
        same = [r for r in main if r["seed"] == seed]
        if same:
            offsets.append(f"seed {seed}: " + ", ".join(
                f"{name} {100 * (_score(same[0], p) - estimate(main, p).mean):+.1f}"
                for p, name in (("downstream", "downstream"), ("general", "general"), ("math", "arithmetic"))))
    if not offsets:
        return []
    return [f"The settings ran with seed(s) {', '.join(map(str, used))}; the main SLIM run of that seed minus the "
            f"main SLIM mean over {len(main)} seeds is " + "; ".join(offsets) + " points, which every single-seed "
            "difference above contains (same data order and initialisation as that run).", ""]


def matched_downstream_line(groups: dict, best: Any, best_label: str, delta) -> str:
    """The SLIM settings (ablations, sweeps, diagnostics) whose downstream mean reaches the best baseline's,
    each minus that baseline: does SLIM keep more general capability at matched downstream accuracy?"""
    bar = estimate(groups[best], "downstream").mean
    keys = [k for k in slim_setting_keys(groups) if estimate(groups[k], "downstream").mean >= bar]
    head = f"- At matched downstream accuracy (SLIM settings at or above {best_label}'s {100 * bar:.1f})"
    if not keys:
        return head + ": none of the stored settings."
    keys.sort(key=lambda k: -estimate(groups[k], "downstream").mean)
    items = [f"{SETTINGS[k[1]].label} ({len(groups[k])} seed{'s' if len(groups[k]) > 1 else ''}): downstream "
             f"{100 * estimate(groups[k], 'downstream').mean:.1f}, general minus {best_label} "
             f"{fmt_diff(delta(k, best, 'general'))}, arithmetic {fmt_diff(delta(k, best, 'math'))}" for k in keys]
    return head + ": " + "; ".join(items) + "."


def verdict_kind(verdict: str) -> str:
    """A claim's verdict in one word: pending, contradicted, reproduces, partly (one part reproduces, another is
    unresolved), opposite (unresolved, a part with the opposite sign to the paper's) or unresolved."""
    parts = verdict.split("; ")
    if verdict.startswith("pending"):
        return "pending"
    if any("contradicted" in p or "does not reproduce" in p for p in parts):
        return "contradicted"
    ok = ["reproduces" in p and "not resolved" not in p for p in parts]
    if all(ok):
        return "reproduces"
    if any(ok):
        return "partly"
    return "opposite" if any("opposite sign" in p for p in parts) else "unresolved"


def discussion_section(runs: dict[str, dict], base: dict) -> list[str]:
    """The plain reading of the study, generated from the claims and effects above (so it cannot drift from the
    numbers): what reproduces, what does not, how this setting differs from the paper's, and what was tried."""
    groups, label, delta = comparison(runs, base)
    claims = _claims(groups, label, delta)
    lines = ["### Discussion (generated from the tables above)", ""]
    if not claims:
        return lines + ["Nothing to discuss yet: the main SLIM runs and at least one baseline are needed.", ""]
    by_kind: dict[str, list[str]] = {}
    for claim, _, verdict in claims:
        by_kind.setdefault(verdict_kind(verdict), []).append(re.sub(r" \((Table|Fig)[^)]*\)$", "", claim))
    for kind, head in (("reproduces", "Reproduces at this scale"), ("partly", "Partly reproduces"),
                       ("unresolved", "Same direction as the paper but within 2 stderr"),
                       ("opposite", "Opposite direction to the paper, within 2 stderr"),
                       ("contradicted", "Does not reproduce"), ("pending", "Pending (runs missing)")):
        if by_kind.get(kind):
            lines.append(f"- {head}: " + "; ".join(by_kind[kind]) + ".")
    main = [k for k in groups if k != "base" and k[1] == "mds"]
    proto = groups[main[0]][0]["protocol"] if main else None
    if len(main) > 1 and proto:
        gen = {k: -delta(k, "base", "general")[0] for k in main}
        math_loss = {k: -delta(k, "base", "math")[0] for k in main}
        worst_gen, worst_math = max(gen, key=gen.get), max(math_loss, key=math_loss.get)
        points = [(label[k], estimate(groups[k], "downstream").mean, estimate(groups[k], "general").mean)
                  for k in main]
        front = learn_forget_front(points)
        lines += ["", f"- Size: the largest general-suite loss of a main method is {100 * gen[worst_gen]:.1f} points "
                      f"({label[worst_gen]}), the largest arithmetic loss {100 * math_loss[worst_math]:.1f} points "
                      f"({label[worst_math]}); after MDS training the paper reports MMLU / GSM8K of 32.7 / 0.0 for "
                      "LoRA and 65.8 / 76.1 for SLIM (OpenChat-8B, 2 epochs over the full datasets). "
                      f"{proto['max_steps']} steps x {proto['per_device_batch'] * proto['grad_accum']} examples on a "
                      "135M model compare with that on direction and ordering only, not on size.",
                  "- Trade-off: on the learn-forget front (no method higher on both means) are " + ", ".join(front)
                  + "; " + ("SLIM is on it." if "SLIM" in front else "SLIM is not: a method is ahead on both.")]
        slim = ("slim", "mds")
        if slim in main:
            best = max((k for k in main if k != slim), key=lambda k: estimate(groups[k], "downstream").mean)
            d_down, d_gen = delta(slim, best, "downstream"), delta(slim, best, "general")
            lines[-1] += (f" Against the best downstream baseline ({label[best]}) SLIM is {fmt_diff(d_down)} points "
                          f"downstream and {fmt_diff(d_gen)} on the general suite.")
            lines.append(matched_downstream_line(groups, best, label[best], delta))
        effects = effects_rows(groups, delta)
        if effects:
            part_names = {"downstream": "downstream", "general": "general", "math": "arithmetic"}
            moved, still = [], []
            for k, d, _ in effects:
                beyond = [f"{name} {fmt_diff(d[p])}" for p, name in part_names.items() if abs(d[p][0]) > 2 * d[p][1]]
                if beyond:
                    moved.append(f"{SETTINGS[k[1]].label} ({', '.join(beyond)})")
                else:
                    still.append(SETTINGS[k[1]].label)
            lines.append("- What moves SLIM (settings beyond 2 stderr from the main SLIM runs): " +
                         ("; ".join(moved) if moved else f"none of the {len(effects)} stored") + "." +
                         (f" Within 2 stderr on downstream, general and arithmetic alike: {', '.join(still)}."
                          if still and moved else ""))
        else:
            lines.append("- What moves SLIM's retention (yield strength, mask ratio, L1 weight, cluster count, "
                         "which layers): pending, the `ablations`, `sweeps` and `diagnostics` budgets.")
    lines += ["", "Decided or tried to keep the comparison fair at this scale (see the methods table): each method "
              "at its paper's learning rate (I-LoRA's scaled to our batch); LoRA/DoRA rank scaled to the model "
              "width; the general suite scored with lm-eval's loglik templates and sized for a 1.5-point stderr; "
              "differences paired question by question; arithmetic scored by the last number generated (first-line "
              "exact match is 0 for every model); MMLU kept although the 135M model is at chance on it, so it "
              "cannot separate methods.", ""]
    return lines


# ================================================================================================ CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="main",
                    help="which runs: main (8 methods x 3 seeds), ablations, sweeps, curves, diagnostics, pilot")
    ap.add_argument("--methods", default=None, help="comma-separated method keys (default: the budget's)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the budget's)")
    ap.add_argument("--settings", default=None,
                    help="comma-separated settings of the budget to run (default: all of them), e.g. "
                         "`--budget sweeps --settings experts2 --seeds 1,2`")
    ap.add_argument("--max-steps", type=int, default=None, help="override the training steps (new protocol)")
    ap.add_argument("--limit-general", type=int, default=None,
                    help="questions per general task (MMLU: at least 1 per subject) (new protocol)")
    ap.add_argument("--limit-downstream", type=int, default=None,
                    help="questions per downstream task (new protocol)")
    ap.add_argument("--limit-math", type=int, default=None, help="basic_arithmetic questions (new protocol)")
    ap.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="where run JSONs are stored")
    ap.add_argument("--report", type=Path, default=REPORT, help="the Markdown report to regenerate")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                    help="training checkpoints (a killed run resumes from its last checkpoint); deleted after a run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (default 1; 0: torch's default, all cores)")
    ap.add_argument("--workers", type=int, default=1,
                    help="start this many worker processes that share the budget's runs (lock files); on a "
                         "2-core machine 2 workers x 1 thread beat 1 x 2 threads")
    ap.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter in --work-dir")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="re-run runs stored with another protocol or config instead of skipping them")
    ap.add_argument("--plan", action="store_true",
                    help="print the runs, their status and the stderr table; run nothing")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the report from stored JSONs")
    ap.add_argument("--measure-steps", type=int, default=None, metavar="N",
                    help="only time N training steps of each selected (method, setting) (no evaluation) and "
                         "store steps__[<setting>__]<method>[__<allocator>].json, for sizing")
    ap.add_argument("--allocator", choices=("auto", "jemalloc", "system"), default="system",
                    help="malloc of the study's processes: system (default, glibc's), jemalloc (required; "
                         "1.1-1.3x faster training steps, but it keeps every freed page: the exact-merge run "
                         "outgrew 23 GB), auto (jemalloc when found, see src/slim_peft/allocator.py)")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate the report after each run")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    return ap.parse_args(argv)


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python benchmarks/forgetting.py " + " ".join(shlex.quote(a) for a in args)


def spawn_workers(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run ``args.workers`` copies of this command (``--workers 1``), the first scoring the base model first;
    each writes its own log next to the work dir. Returns the worst exit code."""
    import subprocess

    base_argv = list(sys.argv[1:] if argv is None else argv)
    clean: list[str] = []
    skip = False
    for a in base_argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        clean.append(a)
    log_dir = args.work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(args.workers):
        log = open(log_dir / f"worker{i}.log", "a")  # noqa: SIM115 - kept open for the child
        cmd = [sys.executable, str(Path(__file__).resolve()), *clean, "--workers", "1"]
        if i > 0:
            cmd.append("--no-report")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        print(f"[forgetting] worker {i}: pid {procs[-1].pid}, log {log.name}")
        if i == 0:
            time.sleep(5)
    codes = [p.wait() for p in procs]
    if not args.no_report:
        write_report(args.runs_dir, args.report)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        write_report(args.runs_dir, args.report)
        return 0
    protocol = make_protocol(args.budget, args.max_steps, args.limit_general, args.limit_downstream, args.limit_math)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    settings = [x.strip() for x in args.settings.split(",")] if args.settings else None
    runs = plan(args.budget, methods, seeds, settings)
    status = {r: run_status(r, args.runs_dir, protocol) for r in runs}
    base = load_json(args.runs_dir / protocol.name / "base.json")
    print(f"[forgetting] budget {args.budget}, protocol {protocol.name} ({protocol.digest()}): {len(runs)} runs, "
          f"{sum(s == 'done' for s in status.values())} done, {sum(s == 'stale' for s in status.values())} stale")
    for r in runs:
        spec = METHODS[r.method]
        print(f"  {r.run_id:40s} {status[r]:8s} lr {spec.lr:g}")
    print(stderr_markdown(stderr_table(protocol, base)))
    if args.plan:
        return 0
    if args.workers > 1:
        return spawn_workers(args, argv)
    if args.measure_steps:
        study = Study(protocol, args.runs_dir, args.work_dir, threads=args.threads, command=command_line(argv))
        for r in dict.fromkeys(Run(r.method, r.setting, 0) for r in runs):
            res = run_isolated(study, "measure_steps", r, args.measure_steps)
            write_json(steps_path(args.runs_dir / protocol.name, r, res["environment"]["allocator"]), res)
            print(f"[forgetting] {r.setting} {r.method}: {res['cpu_seconds_per_step']:.2f} CPU s/step, "
                  f"{res['wall_seconds_per_step']:.2f} wall s/step, peak RSS {res['peak_rss_gb']} GB "
                  f"({res['environment']['allocator']} malloc)", flush=True)
        if not args.no_report:
            write_report(args.runs_dir, args.report)
        return 0
    todo = [r for r in runs if status[r] == "pending" or (status[r] == "stale" and args.rerun_stale)]
    for r in runs:
        if status[r] == "stale" and not args.rerun_stale:
            print(f"[forgetting] {r.run_id}: stored with another protocol or config; kept (use --rerun-stale)")
    study = Study(protocol, args.runs_dir, args.work_dir, threads=args.threads, keep_adapters=args.keep_adapters,
                  command=command_line(argv))
    if todo and not base_is_current(base, protocol):
        run_isolated(study, "ensure_base", False)
    done = failures = streak = 0
    for r in todo:
        if args.max_runs is not None and done >= args.max_runs:
            break
        lock = RunLock(args.work_dir / protocol.name / f"{r.run_id}.lock")
        if not lock.acquire():
            print(f"[forgetting] {r.run_id}: another worker is running it; next")
            continue
        try:
            if run_status(r, args.runs_dir, protocol) == "done":  # another worker finished it meanwhile
                continue
            t0 = time.perf_counter()
            try:
                result = run_isolated(study, "execute", r)
            except RuntimeError as e:
                failures += 1
                streak += 1
                print(f"[forgetting] {r.run_id}: FAILED: {e}", flush=True)
                if streak >= 2:
                    print("[forgetting] two runs failed in a row; stopping this worker (rerun the same command to "
                          "continue: stored runs are skipped, started ones resume from their checkpoints)")
                    break
                continue
            streak = 0
            write_json(r.path(args.runs_dir, protocol), result)
            if (other := twin(r, protocol.name)) is not None and run_status(other, args.runs_dir, protocol) != "done":
                write_json(other.path(args.runs_dir, protocol), twin_result(result, other))
                print(f"[forgetting] {r.run_id}: stored as {other.run_id} too (the same training)", flush=True)
        finally:
            lock.release()
        done += 1
        base = load_json(args.runs_dir / protocol.name / "base.json")
        ret = retention(result, base)
        print(f"[forgetting] {r.run_id}: downstream {fmt_pct(result['downstream_mean'])}, general "
              f"{fmt_pct(result['general_mean'])} (retention {fmt_pct(ret)}%), arithmetic "
              f"{fmt_pct(result['math_score'])}; train {result['train']['seconds']:.0f} s, eval "
              f"{result['seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s", flush=True)
        if not args.no_report:
            write_report(args.runs_dir, args.report, quiet=True)
    if not args.no_report:
        write_report(args.runs_dir, args.report)
    return 1 if failures else 0


def _allocator_choice(argv: list[str]) -> str:
    """--allocator's value, read before argparse (the process is replaced before anything else runs)."""
    for i, a in enumerate(argv):
        if a.startswith("--allocator="):
            return a.split("=", 1)[1]
        if a == "--allocator" and i + 1 < len(argv):
            return argv[i + 1]
    return "system"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    choice = _allocator_choice(sys.argv[1:])
    if choice in ("auto", "jemalloc") and not {"--report-only", "--plan", "-h", "--help"} & set(sys.argv):
        from slim_peft.allocator import reexec_with_jemalloc

        reexec_with_jemalloc(choice)  # returns only when already preloaded, or (auto) when there is none
    raise SystemExit(main())
