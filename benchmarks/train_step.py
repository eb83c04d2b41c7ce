"""The forgetting study's training step in fp32 and in bf16 autocast on the CPU: time per step, the loss curves of
both, and the step's matrix-multiply floor.

Each method (`--methods`, default LoRA and SLIM at the study's settings, `benchmarks/studies/forgetting.yaml`:
micro-batches of 2 x 8 accumulation over the MDS train data, length-grouped, 1 thread) is built twice from one
seed, one copy per precision, each with its own AdamW (fp32 states; adapters, routers and clusters stay fp32 in
both, as the trainer's bf16 mode). The two copies then take the same `--steps` optimizer steps on the same
micro-batches, alternating step by step in one process, so load from other processes hits both alike. Written
to benchmarks/results/train_step.md (and .json):

- time per step, median and min-max, and the bf16 / fp32 speed-up (ratio of medians, min-max of the
  step-by-step ratios);
- the loss curves: the largest |loss_bf16 - loss_fp32| over the steps, against the tolerance `--tolerance`
  (default 0.05 nats, about a tenth of the loss's own step-to-step movement on this data);
- the floor: the step's matmul FLOPs (forward, the backward's input gradients and the adapters' weight
  gradients of the decoder linears and the selected-position head, from the shapes of the batch) over the rate
  of one [tokens x 576] x [576 x 1536] matmul timed alone in each precision.

bf16 pays only on CPUs that run it in hardware (AVX512-BF16 or AMX); elsewhere bf16 matmuls are emulated (17x
slower than fp32 for one linear's forward and backward on the AMD EPYC AVX2 machine of 2026-12-08) and the script
stops before the long part unless `--force`.

    python benchmarks/train_step.py                                  # lora and slim, 50 steps each precision
    python benchmarks/train_step.py --methods lora --steps 5 --precisions fp32   # a quick look at fp32 alone
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from slim_peft.experiments.runner import Study  # noqa: E402
from slim_peft.experiments.study import Run, load_plan  # noqa: E402

PLAN = load_plan(REPO / "benchmarks" / "studies" / "forgetting.yaml")
OUT = REPO / "benchmarks" / "results"
PRECISIONS = ("fp32", "bf16")


def cpu_flags() -> dict[str, Any]:
    from slim_peft.training.trainer import cpu_has_native_bf16

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16()}


def micro_batches(study: Study, tokenizer: Any, examples: list, steps: int) -> list[list[dict[str, torch.Tensor]]]:
    """The study's first `steps` optimizer steps as lists of collated micro-batches (the trainer's seeded,
    length-grouped order, seed 0)."""
    from slim_peft.data import Collator, SeededBatchOrder

    p = study.protocol
    order = SeededBatchOrder([len(e) for e in examples], p.per_device_batch, 0, group_by_length=True)
    collate = Collator(tokenizer.pad_token_id)
    flat = [collate([examples[i] for i in order.batch_at(0, k)]) for k in range(steps * p.grad_accum)]
    return [flat[s * p.grad_accum:(s + 1) * p.grad_accum] for s in range(steps)]


def step_fn(model: Any, lr: float, weight_decay: float, max_grad_norm: float, bf16: bool):
    """One optimizer step over a list of micro-batches (mean of their losses), as the trainer's: autocast bf16
    around the forward when `bf16`, clipping, AdamW, the adapters' per-step statistics."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()

    def step(batches: list[dict[str, torch.Tensor]]) -> float:
        total = 0.0
        for b in batches:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                loss = model(**b).loss
            (loss / len(batches)).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        return total / len(batches)
    return step


def matmul_flops(model: Any, steps: list[list[dict[str, torch.Tensor]]]) -> float:
    """Multiply-add FLOPs (2 per MAC) of one average step's matmuls: every decoder linear on every position in the
    forward and again for its input gradient, the adapters' factors three times (forward, input and weight
    gradients, counted at their dense size), and the head on the supervised positions (forward + input
    gradient). Attention's score products are left out (under 5% here)."""
    base = model.base_model
    linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
               and "lora_" not in n]  # the frozen linears (an adapted one sits inside its wrapper)
    per_token = sum(m.in_features * m.out_features for m in linears)
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "router" not in n)
    head = base.get_output_embeddings().weight.numel()
    tokens = statistics.mean(sum(b["input_ids"].numel() for b in s) for s in steps)  # padding computes too
    supervised = statistics.mean(sum(int((b["labels"] != -100).sum()) for b in s) for s in steps)
    return 2 * (2 * per_token * tokens + 3 * adapter * tokens + 2 * head * supervised)


def kernel_rate(tokens: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of one [tokens x 576] x [576 x 1536] matmul alone."""
    a, b = torch.randn(tokens, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * tokens * 576 * 1536 * repeats / (time.perf_counter() - t)


def linear_check(repeats: int = 5) -> dict[str, float]:
    """One FFN-sized linear's forward and backward (766 x 576 -> 1536, the study's longest micro-batch) in fp32
    and under bf16 autocast, ms each: whether bf16 pays on this CPU at all."""
    x = torch.randn(766, 576, requires_grad=True)
    lin = torch.nn.Linear(576, 1536, bias=False)
    out = {}

    def run(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = lin(x)
        y.float().sum().backward()

    for precision in PRECISIONS:
        run(precision == "bf16")
        t = time.perf_counter()
        for _ in range(repeats):
            run(precision == "bf16")
        out[precision] = (time.perf_counter() - t) / repeats * 1e3
    return out


def measure(method: str, steps: int, precisions: tuple[str, ...]) -> dict[str, Any]:
    study = Study(PLAN, PLAN.protocols["study"], OUT / "forgetting", Path(tempfile.gettempdir()), threads=1)
    torch.set_num_threads(1)
    _, tok, _, examples, _ = study.adapter_model(Run(method, "mds", 0), 0)
    batches = micro_batches(study, tok, examples, steps)
    p, lr = study.protocol, PLAN.methods[method].lr
    sides = {}
    for precision in precisions:
        _, _, model, _, _ = study.adapter_model(Run(method, "mds", 0), 0)  # the same seed: equal copies
        sides[precision] = (model, step_fn(model, lr, p.weight_decay, p.max_grad_norm, precision == "bf16"))
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, list[float]] = {k: [] for k in sides}
    for s, micro in enumerate(batches):
        for precision, (_, step) in sides.items():
            t = time.perf_counter()
            losses[precision].append(step(micro))
            times[precision].append(time.perf_counter() - t)
        print(f"{method} step {s + 1}/{steps}: " + ", ".join(f"{k} {times[k][-1]:.1f} s loss {losses[k][-1]:.4f}"
                                                          for k in sides), flush=True)
    model = next(iter(sides.values()))[0]
    flops = matmul_flops(model, batches)
    tokens = int(statistics.mean(int(b["attention_mask"].sum()) for s in batches for b in s))
    rates = {k: kernel_rate(tokens, torch.float32 if k == "fp32" else torch.bfloat16) for k in sides}
    return {"method": method, "steps": steps, "times": times, "losses": losses, "step_flops": flops,
            "kernel_rate": rates, "floor_s": {k: flops / r for k, r in rates.items()},
            "micro_batch_tokens": tokens}


def report(meta: dict[str, Any], results: list[dict[str, Any]], tolerance: float) -> str:
    L = ["# Training step: fp32 and bf16 autocast on the CPU", "",
         f"Command: `{meta['command']}`  ", f"Machine: {meta['cpu']} (torch CPU capability {meta['capability']}, "
         f"native bf16: {meta['native_bf16']}), 1 thread, torch {torch.__version__}; {meta['date']}; "
         f"run time {meta['wall_s']:.0f} s; load average at the end {tuple(round(x, 2) for x in meta['load_avg_end'])} "
         "(above 1: other jobs shared the cores, and the step, the kernel rate and so the floor are slower)", "",
         "The forgetting study's step (micro-batches of 2 x 8, MDS train data, the method's learning rate, seed "
         "0); both precisions take the same steps on the same micro-batches, alternating step by step. Times: "
         "median (min-max) seconds per step. Floor: the step's matmul FLOPs over the rate of one "
         "[tokens x 576] x [576 x 1536] matmul alone in that precision.", "",
         f"One linear's forward and backward (766 x 576 -> 1536, 1 thread): fp32 {meta['linear_ms']['fp32']:.1f} "
         f"ms, bf16 autocast {meta['linear_ms']['bf16']:.1f} ms "
         f"({meta['linear_ms']['bf16'] / meta['linear_ms']['fp32']:.1f}x the fp32 time)."
         + ("" if meta["native_bf16"] or "bf16" in results[0]["times"] else
            " This CPU has no native bf16: the bf16 steps were not run (`--force` runs them)."), "",
         "| method | precision | s / step | floor s | step / floor | final loss |", "|---|---|---|---|---|---|"]
    for r in results:
        for k, ts in r["times"].items():
            med = statistics.median(ts)
            L.append(f"| {r['method']} | {k} | {med:.2f} ({min(ts):.2f}-{max(ts):.2f}) | {r['floor_s'][k]:.2f} | "
                     f"{med / r['floor_s'][k]:.1f}x | {r['losses'][k][-1]:.4f} |")
    if all(len(r["times"]) == 2 for r in results):
        L += ["", "| method | bf16 speed-up (fp32 / bf16) | paired min-max | max abs loss difference | within "
              f"{tolerance} |", "|---|---|---|---|---|"]
        for r in results:
            f, b = r["times"]["fp32"], r["times"]["bf16"]
            paired = [x / y for x, y in zip(f, b, strict=True)]
            gap = max(abs(x - y) for x, y in zip(r["losses"]["fp32"], r["losses"]["bf16"], strict=True))
            L.append(f"| {r['method']} | {statistics.median(f) / statistics.median(b):.2f} | {min(paired):.2f}-"
                     f"{max(paired):.2f} | {gap:.4f} | {'yes' if gap <= tolerance else 'no'} |")
    L += ["", "Step FLOPs and kernel rates: " + "; ".join(
        f"{r['method']} {r['step_flops'] / 1e12:.2f} TFLOP per step, "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in r["kernel_rate"].items()) for r in results)]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="lora,slim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--tolerance", type=float, default=0.05, help="largest allowed |loss_bf16 - loss_fp32| (nats)")
    ap.add_argument("--force", action="store_true", help="run bf16 even where the CPU emulates it")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    precisions = tuple(args.precisions.split(","))
    if set(precisions) - set(PRECISIONS):
        ap.error(f"--precisions: choose from {', '.join(PRECISIONS)}")
    meta = cpu_flags()
    torch.set_num_threads(1)
    meta["linear_ms"] = linear_check()
    if "bf16" in precisions and not meta["native_bf16"] and not args.force:
        print(f"this CPU ({meta['cpu']}, {meta['capability']}) has no AVX512-BF16 or AMX: bf16 matmuls are "
              f"emulated (one linear's forward and backward: fp32 {meta['linear_ms']['fp32']:.1f} ms, bf16 "
              f"{meta['linear_ms']['bf16']:.1f} ms); the steps run in fp32 only (--force runs bf16 too)",
              file=sys.stderr)
        precisions = tuple(p for p in precisions if p != "bf16")
    started = time.perf_counter()
    results = [measure(m, args.steps, precisions) for m in args.methods.split(",")]
    meta.update(command="python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                wall_s=time.perf_counter() - started, load_avg_end=os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "train_step.md").write_text(report(meta, results, args.tolerance))
    print(f"wrote {args.out / 'train_step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
