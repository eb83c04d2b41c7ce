"""Where a training step of the forgetting study spends its CPU time, and how fast the same kernels run alone.

For each `method:setting` of the forgetting study (`benchmarks/studies/forgetting.yaml`: its adapter config,
data, micro-batch 2 x 8 accumulation, 1 thread, fp32, embedded SmolLM2-135M-Instruct): `--steps` optimizer steps
of the real Trainer under torch.profiler, with the self CPU time per op kind (matmul, elementwise, attention,
random, other), the top ops by (name, input shapes), the minor page faults and the kernel (system) time of the
step. Then the heaviest matmul and elementwise shapes are timed alone in the same process (fp32, and bf16 for
the matmul): ratio = in-step time per call / isolated time per call. This is the evidence for where the study's
per-step cost can still come down.

    python benchmarks/step_profile.py                       # writes benchmarks/results/step_profile.md
    python benchmarks/step_profile.py --runs slim:exact_merge --steps 1
    python benchmarks/step_profile.py --preload /path/to/libjemalloc.so.2   # also each run under jemalloc
    # (jemalloc without root: apt-get download libjemalloc2 && dpkg-deb -x libjemalloc2_*.deb jem)

With `--preload`, each run is profiled twice, each time in a fresh process: with glibc's malloc and with the
given allocator in LD_PRELOAD (jemalloc with `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`, so freed pages
are kept for reuse), one after the other, and the report gives the ratio of their step times.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from slim_peft.experiments.runner import Study  # noqa: E402
from slim_peft.experiments.study import Run, load_plan  # noqa: E402

PLAN = load_plan(REPO / "benchmarks" / "studies" / "forgetting.yaml")
RUNS_DIR = REPO / "benchmarks" / "results" / "forgetting"
OUT = REPO / "benchmarks" / "results" / "step_profile.md"
KINDS = {"matmul": ("mm", "addmm", "bmm", "addmm_", "_grouped_mm", "linear", "matmul"),
         "attention": ("_scaled_dot_product_flash_attention_for_cpu",
                       "_scaled_dot_product_flash_attention_for_cpu_backward"),
         "random": ("random_", "uniform_", "bernoulli_", "normal_"),
         "elementwise": ("mul", "mul_", "add", "add_", "copy_", "fill_", "silu", "silu_backward", "sgn", "neg",
                         "sub", "div", "pow", "rsqrt", "lt", "where", "cat", "index_select", "index_add_",
                         "linalg_vector_norm", "sum", "mean", "exp", "clamp", "masked_fill", "zero_")}


def op_kind(name: str) -> str:
    """The kind of an aten op name ('aten::mm' -> 'matmul'); 'other' for anything not listed in KINDS."""
    short = name.split("::", 1)[-1]
    return next((k for k, names in KINDS.items() if short in names), "other")


def kind_shares(rows: list[tuple[str, float]]) -> dict[str, float]:
    """Share of the total self time per op kind, from (op name, self seconds) rows."""
    total = sum(s for _, s in rows) or 1.0
    out: dict[str, float] = {}
    for name, s in rows:
        out[op_kind(name)] = out.get(op_kind(name), 0.0) + s / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_run(method: str, setting: str, steps: int) -> dict:
    """Train `steps` steps of one study run under the profiler; the aten rows, wall/CPU time and faults."""
    from slim_peft.training import Trainer

    study = Study(PLAN, PLAN.protocols["study"], RUNS_DIR, Path(tempfile.gettempdir()), threads=1)
    _, tok, model, examples, _ = study.adapter_model(Run(method, setting, 0), 0)
    with tempfile.TemporaryDirectory() as tmp:
        args = study.training_arguments(tmp, method, steps, seed=0, save_steps=0, disable_tqdm=True)
        trainer = Trainer(model, args, examples, pad_token_id=tok.pad_token_id)
        r0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            trainer.train()
        wall, cpu, r1 = time.perf_counter() - t0, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF)
    rows = [(e.key, str(e.input_shapes), e.self_cpu_time_total / 1e6, e.count)
            for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    return {"run": f"{method}:{setting}", "steps": steps, "wall": wall, "cpu": cpu, "rows": rows,
            "faults": r1.ru_minflt - r0.ru_minflt, "system": r1.ru_stime - r0.ru_stime}


def _time_alone(fn, a: torch.Tensor, b: torch.Tensor, repeats: int = 30) -> float:
    for _ in range(3):
        fn(a, b)
    t = time.perf_counter()
    for _ in range(repeats):
        fn(a, b)
    return (time.perf_counter() - t) / repeats


def isolated(rows: list[tuple[str, str, float, int]]) -> list[dict]:
    """The heaviest 2-D `aten::mm` and same-shape `aten::mul` of the step, timed alone (fp32; bf16 for mm)."""
    def fits(op: str, shapes: list) -> bool:  # two tensors: 2-D x 2-D for mm, one shape twice for mul
        if len(shapes) != 2 or not all(shapes):
            return False
        return len(shapes[0]) == len(shapes[1]) == 2 if op == "aten::mm" else shapes[0] == shapes[1]

    out = []
    for op in ("aten::mm", "aten::mul"):
        cands = [r for r in rows if r[0] == op and fits(op, ast.literal_eval(r[1]))]
        if not cands:
            continue
        name, shapes, secs, count = max(cands, key=lambda r: r[2])
        dims = ast.literal_eval(shapes)
        a, b = torch.randn(*dims[0]), torch.randn(*dims[1])
        entry = {"op": name, "shapes": shapes, "in_step_ms": secs / count * 1e3}
        entry["alone_ms"] = _time_alone(torch.mm if op == "aten::mm" else torch.mul, a, b) * 1e3
        if op == "aten::mm":
            entry["alone_bf16_ms"] = _time_alone(torch.mm, a.bfloat16(), b.bfloat16()) * 1e3
        out.append(entry)
    return out


def markdown(results: list[dict], command: str) -> str:
    lines = ["# Where a study training step spends its CPU time", "",
             f"Command: `{command}` (1 thread, fp32, torch {torch.__version__}). Generated by "
             "`benchmarks/step_profile.py`; profiler overhead makes the profiled step somewhat slower than an "
             "unprofiled one.", ""]
    by_run: dict[str, dict[str, float]] = {}
    for r in results:
        by_run.setdefault(r["run"], {})[r["allocator"]] = r["wall"] / r["steps"]
    pairs = {k: v for k, v in by_run.items() if len(v) == 2}
    if pairs:
        lines += ["| run | wall s/step, glibc malloc | wall s/step, preloaded allocator | ratio |", "|---|---|---|---|"]
        for run, v in pairs.items():
            glibc, other = v["glibc"], next(x for k, x in v.items() if k != "glibc")
            lines.append(f"| {run} | {glibc:.1f} | {other:.1f} | {glibc / other:.2f}x |")
        lines.append("")
    for r in results:
        shares = kind_shares([(n, s) for n, _, s, _ in r["rows"]])
        lines += [f"## {r['run']} ({r['allocator']})", "",
                  f"{r['steps']} step(s): {r['wall'] / r['steps']:.1f} wall s/step, {r['cpu'] / r['steps']:.1f} CPU "
                  f"s/step, of which {r['system'] / r['steps']:.1f} s kernel time; {r['faults'] / r['steps']:,.0f} "
                  "minor page faults per step.", "",
                  "Self CPU time by op kind: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()) + ".", "",
                  "| op | input shapes | self s | calls |", "|---|---|---|---|"]
        lines += [f"| {n} | `{sh}` | {s:.2f} | {c} |" for n, sh, s, c in sorted(r["rows"], key=lambda x: -x[2])[:12]]
        lines += ["", "| kernel | shapes | ms per call in the step | ms alone (fp32) | ratio | ms alone (bf16) |",
                  "|---|---|---|---|---|---|"]
        for e in r["isolated"]:
            bf16 = f"{e['alone_bf16_ms']:.2f}" if "alone_bf16_ms" in e else "-"
            lines.append(f"| {e['op']} | `{e['shapes']}` | {e['in_step_ms']:.2f} | {e['alone_ms']:.2f} | "
                         f"{e['in_step_ms'] / e['alone_ms']:.1f}x | {bf16} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["lora:mds", "slim:mds"], help="method:setting of the study")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--preload", type=Path, help="an allocator library (e.g. libjemalloc.so.2) to compare with")
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # a child's results (internal)
    args = ap.parse_args(argv)
    if args.preload is not None and not args.preload.is_file():
        ap.error(f"--preload {args.preload}: no such file")
    for spec in args.runs:
        method, _, setting = spec.partition(":")
        if method not in PLAN.methods or (setting or "mds") not in PLAN.settings:
            ap.error(f"unknown run {spec!r}: methods {sorted(PLAN.methods)}, settings {sorted(PLAN.settings)}")
    if args.json is not None:  # a child: profile, write JSON
        torch.set_num_threads(1)
        method, _, setting = args.runs[0].partition(":")
        r = profile_run(method, setting or "mds", args.steps)
        r["isolated"] = isolated(r["rows"])
        r["allocator"] = Path(os.environ["LD_PRELOAD"]).name if os.environ.get("LD_PRELOAD") else "glibc"
        args.json.write_text(json.dumps(r))
        return 0
    results = []
    allocators = [None] + ([args.preload] if args.preload else [])
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            for lib in allocators:
                env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
                if lib is not None:
                    env.update(LD_PRELOAD=str(lib.resolve()), MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
                out = Path(tmp) / "child.json"
                subprocess.run([sys.executable, __file__, "--runs", spec, "--steps", str(args.steps),
                                "--json", str(out)], env=env, check=True)
                results.append(json.loads(out.read_text()))
                r = results[-1]
                print(f"[step_profile] {spec} ({r['allocator']}): {r['wall'] / args.steps:.1f} wall s/step", flush=True)
    args.out.write_text(markdown(results, "python benchmarks/step_profile.py " + " ".join(argv or sys.argv[1:])))
    print(f"[step_profile] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
