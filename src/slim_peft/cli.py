"""``slim-peft``: the command line.

    slim-peft run                        train SLIM on OBQA+SIQA+BoolQ, judge what it learned and forgot
    slim-peft train --config cfg.yaml    LLaMA-Factory-style YAML; every key also a --key value override
    slim-peft eval --tasks arc_easy,piqa [--adapter DIR]
    slim-peft generate [--adapter DIR] "prompt"
    slim-peft inspect DIR                an adapter's (or a run's) config, sizes and routing statistics
    slim-peft fetch                      prefetch the embedded model and data for offline use
    slim-peft bench speed|forgetting     run a benchmark script of the source checkout

Input errors (unknown keys, bad values, missing data files, target modules the model lacks, a checkpoint
from another configuration) print one ``error:`` line and exit with status 2; a run that fails while
training (NaN loss) exits with 1. ``SLIM_PEFT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slim_peft.config import CONFIG_CLASSES, ConfigError, closest

DEFAULT_TASKS = ("openbookqa", "social_iqa", "boolq")
# General suite of `run`: cloze probes clearly above chance for the embedded model (baseline_eval.md)
RUN_GENERAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag")


class CLIError(ValueError):
    """A user error the command line reports in one line."""


# ------------------------------------------------------------------------------------ config parsing


@dataclass
class DataArguments:
    """What `train` trains on and which model it adapts (the keys beside TrainingArguments and the method's)."""

    model_name_or_path: str = "smollm2-135m"
    method: str = "slim"
    tasks: list[str] | str = "openbookqa,social_iqa,boolq"  # task names or JSONL files (question/choices/label)
    train_split: str = "train"  # "train" / "test" (hash-based halves) or "full" (the whole file)
    max_train_samples: int | None = None  # per task, first N of the split
    eval_tasks: list[str] | str | None = None  # evaluated every eval_steps (test split) and at the end
    eval_protocol: str = "letter"
    eval_limit: int | None = 100

    def __post_init__(self) -> None:
        self.tasks = _as_list(self.tasks)
        if not self.tasks:
            raise ConfigError("tasks is empty: name at least one task or JSONL file")
        self.eval_tasks = _as_list(self.eval_tasks) if self.eval_tasks else []
        if self.train_split not in ("train", "test", "full"):
            raise ConfigError(f"train_split must be 'train', 'test' or 'full', got {self.train_split!r}")
        if self.eval_protocol not in ("loglik", "letter", "generate"):
            raise ConfigError(f"eval_protocol must be loglik, letter or generate, got {self.eval_protocol!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be >= 1, got {self.max_train_samples}")
        if self.method not in CONFIG_CLASSES:
            raise ConfigError(f"unknown method {self.method!r}{closest(self.method, CONFIG_CLASSES)}; "
                              f"choose one of {sorted(CONFIG_CLASSES)}")


ALIASES = {"resume": "resume_from_checkpoint", "overwrite": "overwrite_output_dir", "model": "model_name_or_path",
           "output": "output_dir", "lr": "learning_rate"}
FLAG_DEFAULTS = {"resume_from_checkpoint": "latest"}  # a bare --resume means the latest checkpoint


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type (YAML reads 2e-4 as a string)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            if len(options) < len(typing.get_args(hint)):
                return None
        list_opt = next((o for o in options if typing.get_origin(o) is list), None)
        if list_opt is not None and (isinstance(value, list | tuple) or (isinstance(value, str) and "," in value)):
            return coerce(key, value, list_opt)
        if list_opt is not None and str in options and isinstance(value, str):
            # one name is a one-item list; "all-linear" stays the keyword it is
            return value if value.strip() == "all-linear" else coerce(key, value, list_opt)
        errors = []
        for opt in options:
            try:
                return coerce(key, value, opt)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot read {value!r}")
    if origin is list:
        (inner,) = typing.get_args(hint) or (str,)
        items = value if isinstance(value, list | tuple) else [v for v in str(value).split(",") if v.strip()]
        return [coerce(key, v.strip() if isinstance(v, str) else v, inner) for v in items]
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    return value


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value``, ``--key=value`` and bare ``--flag`` (true) into a dict; dashes read as underscores."""
    out: dict[str, Any] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --key value")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        key = ALIASES.get(key, key)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                value = FLAG_DEFAULTS.get(key, "true")
            else:
                value = nxt
                i += 1
        out[key] = value
        i += 1
    return out


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """A YAML mapping; clear errors for a missing, malformed or non-mapping file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CLIError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        raise CLIError(f"config file {path} is empty")
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must be a mapping of key: value, got {type(data).__name__}")
    return {ALIASES.get(str(k), str(k)): v for k, v in data.items()}


def split_config(flat: dict[str, Any]) -> tuple[Any, DataArguments, Any]:
    """Split flat keys into (TrainingArguments, DataArguments, adapter config); unknown keys are an error
    that names the closest valid key."""
    from slim_peft.config import config_from_dict
    from slim_peft.train import TrainingArguments

    method = str(flat.get("method", DataArguments.method))
    if method not in CONFIG_CLASSES:
        raise ConfigError(f"unknown method {method!r}{closest(method, CONFIG_CLASSES)}; "
                          f"choose one of {sorted(CONFIG_CLASSES)}")
    groups = {"training": _field_types(TrainingArguments), "data": _field_types(DataArguments),
              "adapter": _field_types(CONFIG_CLASSES[method])}
    valid = {k for g in groups.values() for k in g}
    values: dict[str, dict[str, Any]] = {g: {} for g in groups}
    for key, value in flat.items():
        if key not in valid:
            raise ConfigError(f"unknown key {key!r}{closest(key, valid)}; valid keys are the training arguments, "
                              f"{sorted(groups['data'])} and the {method!r} method's {sorted(groups['adapter'])}")
        for name in ("data", "training", "adapter"):  # "method" lives in data and adapter
            if key in groups[name]:
                values[name][key] = coerce(key, value, groups[name][key])
    values["adapter"]["method"] = method
    values["data"]["method"] = method
    return (TrainingArguments(**values["training"]), DataArguments(**values["data"]),
            config_from_dict(values["adapter"]))


# ------------------------------------------------------------------------------------------- helpers


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(*args: Any) -> None:
    if _is_main():
        print(*args, flush=True)


def _register_tasks(names: Sequence[str]) -> list[str]:
    """Task names, registering JSONL files (a missing, empty or malformed file is a clear error)."""
    from slim_peft.tasks import get_task, register_jsonl_task

    out = []
    for name in names:
        if name.endswith(".jsonl") or os.sep in name:
            out.append(register_jsonl_task(name).name)
        else:
            get_task(name)  # unknown name: KeyError listing the known ones
            out.append(name)
    return out


def _attach_adapter(base: Any, cfg: Any, model_name: str) -> Any:
    from slim_peft.model import get_adapter_model

    try:
        return get_adapter_model(base, cfg)
    except (ValueError, KeyError) as e:
        raise CLIError(f"cannot add a {cfg.method} adapter to {model_name}: {e.args[0] if e.args else e}") from None


def _load_base(name: str) -> tuple[Any, Any]:
    from slim_peft.assets import load_base_model

    if name != "smollm2-135m" and not Path(name).expanduser().exists() and name.count("/") != 1:
        raise CLIError(f"model {name!r} is neither the embedded 'smollm2-135m', a local directory nor a "
                       f"Hugging Face id (owner/name)")
    try:
        return load_base_model(name)
    except OSError as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from None


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------- train


def train_command(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """``slim-peft train``: YAML + overrides -> train -> adapter in output_dir/adapter."""
    from slim_peft.data import build_task_examples
    from slim_peft.train import Trainer, seed_everything

    flat = load_yaml_config(args.config) if args.config else {}
    flat.update(parse_overrides(overrides))
    targs, data, adapter_cfg = split_config(flat)
    tasks = _register_tasks(data.tasks)
    eval_tasks = _register_tasks(data.eval_tasks)

    _say(f"loading {data.model_name_or_path} ...")
    base, tokenizer = _load_base(data.model_name_or_path)
    examples, counts = build_task_examples(tokenizer, tasks, split=data.train_split, limit=data.max_train_samples,
                                           max_seq_length=targs.max_seq_length)
    _say(f"training data: {len(examples)} examples ({counts})")
    seed_everything(targs.seed)
    model = _attach_adapter(base, adapter_cfg, data.model_name_or_path)
    if _is_main():
        model.print_trainable_parameters()

    eval_fn = None
    if eval_tasks:
        from slim_peft.evaluate import evaluate

        def eval_fn(m: Any) -> dict[str, float]:
            res = evaluate(m, tokenizer, eval_tasks, protocol=data.eval_protocol, split="test", limit=data.eval_limit,
                           seed=targs.seed)
            return {name: float(r["score"]) for name, r in res["tasks"].items()}

    run_config = {"model": data.model_name_or_path, "tasks": tasks, "train_split": data.train_split,
                  "max_train_samples": data.max_train_samples}
    trainer = Trainer(model, targs, examples, pad_token_id=_pad_id(tokenizer), eval_fn=eval_fn, run_config=run_config)
    out = trainer.train()
    if _is_main():
        _write_effective_config(Path(out.run_dir) / "config.yaml", targs, data, adapter_cfg)
        _say(f"done: {out.global_step} steps, final loss {out.final_loss:.4f}; adapter in {out.adapter_dir}")
        if out.metrics:
            _say("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in out.metrics.items()))
    return 0


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _write_effective_config(path: Path, targs: Any, data: DataArguments, adapter: Any, comment: str = "") -> None:
    """A YAML that `slim-peft train --config` reads back: data keys, the method's config, training arguments
    (without run-specific ones: output_dir, resume)."""
    import yaml

    skip = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir"}
    d: dict[str, Any] = {k: v for k, v in dataclasses.asdict(data).items()}
    d.update({k: v for k, v in adapter.to_dict().items() if k != "base_model_name_or_path"})
    d.update({k: v for k, v in targs.to_dict().items() if k not in skip})
    header = "# slim-peft train --config config.yaml --output_dir NEW_DIR reproduces this training\n" + comment
    path.write_text(header + yaml.safe_dump(d, sort_keys=False))


# ------------------------------------------------------------------------------------------------ run


# `run` defaults, sized to finish within 20 minutes on 2 CPU cores. Measured here (single-thread CPU time, a
# busy machine): SLIM training ~12 CPU-s per step of 8 examples (~1,100 tokens); evaluation ~0.19 CPU-s per
# question averaged over the 8 tasks. With 2 threads: ~5-7 s per step and ~0.08-0.12 s per question, so
# 80 steps + 2 x 8 x 150 questions take ~10-16 minutes (README: the wall time measured on a quiet machine).
RUN_ADAPTER: dict[str, Any] = {}  # the method's defaults: SLIM 8 LoRA (r 16) + 2 identity experts, top-2, FFN
# 2 x 4 examples per step rather than 1 x 8: the same loss (every answer has 2 tokens, so the mean of the
# micro-batch means is the batch mean; SLIM's clusters move once per micro-batch) at about half the activation
# memory (SLIM at 1 x 8 peaked at 7.3 GB RSS).
RUN_TRAINING = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 5e-4,
                "lr_scheduler_type": "cosine",
                "warmup_ratio": 0.05, "max_grad_norm": 1.0, "logging_steps": 5, "save_steps": 0,
                "max_seq_length": 320}
RUN_MAX_STEPS = 80
RUN_EVAL_LIMIT = 150


def run_command(args: argparse.Namespace) -> int:
    """``slim-peft run``: evaluate the base model, train, evaluate again, print and write the report."""
    from slim_peft.config import config_from_dict
    from slim_peft.data import build_task_examples
    from slim_peft.evaluate import evaluate, forgetting_report
    from slim_peft.report import learn_forget_table, write_run_report
    from slim_peft.train import Trainer, TrainingArguments, read_metrics, seed_everything, staged_output_dir

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    method = args.method
    if method not in CONFIG_CLASSES:
        raise ConfigError(f"unknown method {method!r}{closest(method, CONFIG_CLASSES)}; "
                          f"choose one of {sorted(CONFIG_CLASSES)}")
    adapter_cfg = config_from_dict({"method": method, **RUN_ADAPTER})
    tasks = _register_tasks(_as_list(args.tasks))
    general = _register_tasks(_as_list(args.general_tasks))
    train_limit = args.train_limit if args.train_limit is not None else args.limit
    eval_limit = args.eval_limit if args.eval_limit is not None else (args.limit or RUN_EVAL_LIMIT)
    out_dir = Path(args.output_dir or f"runs/{method}-{_timestamp()}")
    training = dict(RUN_TRAINING, max_steps=args.max_steps, seed=args.seed, output_dir=str(out_dir),
                    report_to="tensorboard" if args.tensorboard else "jsonl")
    if args.batch_size:
        training["per_device_train_batch_size"] = args.batch_size
        training["gradient_accumulation_steps"] = 1
    if args.learning_rate:
        training["learning_rate"] = args.learning_rate
    targs = TrainingArguments(**training)
    data = DataArguments(model_name_or_path=args.model, method=method, tasks=_as_list(args.tasks),
                         max_train_samples=train_limit)

    with staged_output_dir(out_dir, overwrite=args.overwrite) as run_dir:
        _write_effective_config(run_dir / "config.yaml", targs, data, adapter_cfg,
                                comment=f"# evaluation: downstream {tasks} (letter, test split), general {general} "
                                        f"(loglik, test split), at most {eval_limit} questions per task\n")
        t = time.perf_counter()
        print(f"[1/5] loading {args.model}", flush=True)
        base, tokenizer = _load_base(args.model)
        examples, counts = build_task_examples(tokenizer, tasks, split="train", limit=train_limit,
                                               max_seq_length=targs.max_seq_length)
        timings["load"] = time.perf_counter() - t

        def judge(model: Any, label: str) -> tuple[dict, dict, dict]:
            t0 = time.perf_counter()
            if hasattr(model, "reset_routing_stats"):
                model.reset_routing_stats()
            down = evaluate(model, tokenizer, tasks, protocol="letter", split="test", limit=eval_limit,
                            seed=args.seed, model_name=args.model, progress=True)
            routing = {}
            if hasattr(model, "routing_stats"):
                routing["downstream"] = model.routing_stats()
                model.reset_routing_stats()
            gen = evaluate(model, tokenizer, general, protocol="loglik", split="test", limit=eval_limit,
                           seed=args.seed, model_name=args.model, progress=True) if general else {"tasks": {}}
            if hasattr(model, "routing_stats"):
                routing["general"] = model.routing_stats()
            timings[f"eval_{label}"] = time.perf_counter() - t0
            return down, gen, routing

        print(f"[2/5] evaluating the base model: {', '.join(tasks)} (letter) and {', '.join(general)} (loglik), "
              f"{eval_limit} questions each", flush=True)
        base_down, base_gen, _ = judge(base, "before")

        print(f"[3/5] training {method} for {targs.max_steps} steps on {len(examples)} examples {counts}",
              flush=True)
        seed_everything(args.seed)
        model = _attach_adapter(base, adapter_cfg, args.model)
        model.print_trainable_parameters()
        trainable, _ = model.num_parameters() if hasattr(model, "num_parameters") else (0, 0)
        t = time.perf_counter()
        trainer = Trainer(model, targs, examples, pad_token_id=_pad_id(tokenizer),
                          run_config={"model": args.model, "tasks": tasks, "max_train_samples": train_limit})
        out = trainer.train(run_dir=run_dir)
        timings["train"] = time.perf_counter() - t

        print("[4/5] evaluating the adapted model", flush=True)
        model.eval()
        after_down, after_gen, routing = judge(model, "after")

        print("[5/5] writing the report", flush=True)
        t = time.perf_counter()
        before = _merge_results(base_down, base_gen)
        after = _merge_results(after_down, after_gen)
        report = forgetting_report(before, after)
        timings["total"] = time.perf_counter() - t_start
        results = {
            "config": {"method": method, "model": args.model, "tasks": tasks, "general_tasks": general,
                       "general_protocol": "loglik", "downstream_protocol": "letter", "eval_limit": eval_limit,
                       "train_limit": train_limit, "seed": args.seed, "adapter": adapter_cfg.to_dict(),
                       "training": targs.to_dict()},
            "training": {"steps": out.global_step, "final_loss": out.final_loss, "examples": len(examples),
                         "examples_per_task": counts, "trainable_parameters": trainable,
                         "global_batch": targs.per_device_train_batch_size * targs.gradient_accumulation_steps},
            "before": {"downstream": base_down, "general": base_gen},
            "after": {"downstream": after_down, "general": after_gen},
            "learn_forget": report,
            "routing": routing,
            "timings_s": timings,
        }
        write_run_report(run_dir, results, read_metrics(run_dir / "metrics.jsonl"))
        timings["report"] = time.perf_counter() - t

    print()
    print(learn_forget_table(report))
    print()
    print(f"{method} on {args.model}: {out.global_step} steps; wall time {timings['total'] / 60:.1f} min "
          f"(load {timings['load']:.0f} s, eval before {timings['eval_before']:.0f} s, train {timings['train']:.0f} s, "
          f"eval after {timings['eval_after']:.0f} s)")
    print(f"report: {out_dir}/summary.md (results.json, metrics.jsonl, *.png, adapter/)")
    return 0


def _merge_results(down: dict, gen: dict) -> dict:
    merged = dict(down)
    merged["tasks"] = {**down.get("tasks", {}), **gen.get("tasks", {})}
    return merged


# ---------------------------------------------------------------------------- generate, inspect, fetch


def generate_command(args: argparse.Namespace) -> int:
    """``slim-peft generate``: the base model (with an adapter) continues a prompt."""
    import torch

    model_name = args.model
    if args.adapter:
        cfg_path = Path(args.adapter) / "adapter_config.json"
        if not cfg_path.is_file():
            raise CLIError(f"{args.adapter} holds no adapter_config.json: not an adapter directory")
        if model_name is None:
            model_name = json.loads(cfg_path.read_text()).get("base_model_name_or_path") or "smollm2-135m"
    model_name = model_name or "smollm2-135m"
    base, tokenizer = _load_base(model_name)
    model = base
    if args.adapter:
        from slim_peft.model import AdapterModel

        model = AdapterModel.from_pretrained(base, args.adapter)
    model.eval()
    text = args.prompt
    if getattr(tokenizer, "chat_template", None) and not args.no_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    from slim_peft.tasks import encode_text

    ids = torch.tensor([encode_text(tokenizer, text)])
    torch.manual_seed(args.seed)
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "pad_token_id": _pad_id(tokenizer)}
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_command(args: argparse.Namespace) -> int:
    """``slim-peft inspect DIR``: config, file sizes, parameter counts, routing statistics."""
    from safetensors import safe_open

    from slim_peft.report import identity_share_per_layer

    root = Path(args.dir)
    if not root.exists():
        raise CLIError(f"{root} does not exist")
    adapter = root if (root / "adapter_config.json").is_file() else root / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"{root} is neither an adapter directory (adapter_config.json) nor a run directory "
                       f"with adapter/")
    raw = json.loads((adapter / "adapter_config.json").read_text())
    cfg = raw.get("slim_peft", {}).get("config", raw)
    info: dict[str, Any] = {"adapter_dir": str(adapter), "peft_type": raw.get("peft_type"),
                            "base_model": raw.get("base_model_name_or_path"), "config": cfg, "files": {}}
    for f in sorted(adapter.iterdir()):
        if f.is_file():
            info["files"][f.name] = f.stat().st_size
    weights = adapter / "adapter_model.safetensors"
    groups: dict[str, int] = {}
    total = 0
    if weights.is_file():
        with safe_open(str(weights), "pt") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                total += n
                kind = key.rsplit(".", 1)[0].rsplit(".", 1)[-1] if key.endswith(".weight") else key.rsplit(".", 1)[-1]
                groups[kind] = groups.get(kind, 0) + n
    info["tensor_elements"] = total
    info["tensor_elements_by_kind"] = groups
    routing = {}
    for candidate in sorted(adapter.glob("routing_stats*.json")) + [root / "results.json"]:
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            if candidate.name == "results.json":
                routing.update({f"{k} data (after training)": v for k, v in data.get("routing", {}).items()})
            else:
                routing[candidate.stem.replace("routing_stats_", "") + "ing data (during training)"] = data
    info["routing"] = {k: {"mean_identity_share": v.get("mean_identity_share"),
                           "identity_share_per_layer": identity_share_per_layer(v)} for k, v in routing.items()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter: {adapter}")
    print(f"method: {cfg.get('method', raw.get('peft_type'))}   base model: {info['base_model']}")
    print("config:")
    for k, v in cfg.items():
        print(f"  {k}: {v}")
    print("files:")
    for name, size in info["files"].items():
        print(f"  {name}: {_human(size)}")
    print(f"adapter tensors: {total:,} elements " + "(" + ", ".join(f"{k} {v:,}" for k, v in groups.items()) + ")")
    if routing:
        print("routing (share of weight on identity experts):")
        for name, v in info["routing"].items():
            share = v["mean_identity_share"]
            print(f"  {name}: mean {share if share is None else f'{share:.3f}'}")
            items = [f"{layer:>3}: {s:.2f}" for layer, s in v["identity_share_per_layer"].items()]
            for i in range(0, len(items), 10):
                print("    layer " + "  ".join(items[i:i + 10]))
    else:
        print("routing: no statistics saved (methods without routers, or an adapter saved outside the trainer)")
    return 0


def fetch_command(args: argparse.Namespace) -> int:
    from slim_peft.assets import fetch_all

    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    return 0


BENCHMARKS = {"speed": "speed.py", "forgetting": "forgetting.py"}


def bench_command(args: argparse.Namespace) -> int:
    """``slim-peft bench speed|forgetting [ARGS]``: run benchmarks/<name>.py of the source checkout."""
    root = Path(os.environ.get("SLIM_PEFT_BENCHMARKS", Path(__file__).resolve().parents[2] / "benchmarks"))
    script = root / BENCHMARKS[args.name]
    if not script.is_file():
        print(f"slim-peft bench: {script} not found. The benchmarks ship with the source repository, not with "
              f"the installed package: run this from a git checkout (pip install -e .), or set "
              f"SLIM_PEFT_BENCHMARKS to its benchmarks/ folder.", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.args])


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slim-peft", description="Fine-tune LLMs that learn more and forget less.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", allow_abbrev=False, help="train and judge SLIM on the embedded model (the main job)",
                         description="Evaluate the base model, train an adapter on the downstream tasks, evaluate "
                                     "again, print the learn/forget table and write a report directory.")
    run.add_argument("--method", default="slim", help="slim (default), lora, dora, mixlora, loramoe, mola, ilora")
    run.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="training/downstream tasks (or .jsonl files)")
    run.add_argument("--general-tasks", default=",".join(RUN_GENERAL_TASKS),
                     help="general suite scored before and after (loglik); '' for none")
    run.add_argument("--model", default="smollm2-135m", help="the embedded smollm2-135m, a local dir or an HF id")
    run.add_argument("--max-steps", type=int, default=RUN_MAX_STEPS, help=f"optimizer steps (default {RUN_MAX_STEPS})")
    run.add_argument("--limit", type=int, default=None,
                     help="at most N examples per task for training and for every evaluation (quick runs)")
    run.add_argument("--train-limit", type=int, default=None, help="examples per task for training (default all)")
    run.add_argument("--eval-limit", type=int, default=None,
                     help=f"questions per task for evaluation (default {RUN_EVAL_LIMIT})")
    run.add_argument("--batch-size", type=int, default=None,
                     help="examples per step in one micro-batch (default 8, as 2 accumulated micro-batches of 4)")
    run.add_argument("--learning-rate", type=float, default=None, help="default 5e-4 (cosine, 5%% warmup)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", default=None, help="report directory (default runs/<method>-<time>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing output dir (only once the new run has succeeded)")
    run.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs")

    train = sub.add_parser("train", allow_abbrev=False, help="train from a YAML config (+ --key value overrides)",
                           description="Train any method from a LLaMA-Factory-style YAML of training arguments "
                                       "(HF Trainer spelling), data keys and the method's keys; every key can be "
                                       "given or overridden as --key value.")
    train.add_argument("--config", default=None, help="YAML file of key: value")

    from slim_peft.evaluate import add_eval_arguments

    ev = sub.add_parser("eval", allow_abbrev=False, help="evaluate a model (with an adapter) on tasks")
    add_eval_arguments(ev)

    gen = sub.add_parser("generate", allow_abbrev=False, help="generate text with the model (and an adapter)")
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default=None, help="adapter directory (its base model is used by default)")
    gen.add_argument("--model", default=None, help="base model (default: the adapter's, else smollm2-135m)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")

    ins = sub.add_parser("inspect", allow_abbrev=False, help="an adapter's config, sizes and routing statistics")
    ins.add_argument("dir", help="adapter directory or run directory")
    ins.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("fetch", allow_abbrev=False, help="download and convert the embedded model and data")

    bench = sub.add_parser("bench", allow_abbrev=False, help="run a benchmark script (source checkout)")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's input, reported in one line."""
    from slim_peft.data import DataError
    from slim_peft.train import TrainingError

    errors: list[type[BaseException]] = [ConfigError, CLIError, DataError, TrainingError, FileNotFoundError, KeyError]
    for mod, name in (("slim_peft.tasks", "TaskFileError"), ("slim_peft.model", "AdapterError"),
                      ("slim_peft.layers.base", "TargetModuleError"), ("slim_peft.assets", "AssetError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slim-peft`` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"run": lambda: run_command(args), "train": lambda: train_command(args, rest),
                "eval": lambda: _eval(args), "generate": lambda: generate_command(args),
                "inspect": lambda: inspect_command(args), "fetch": lambda: fetch_command(args),
                "bench": lambda: bench_command(args)}
    if os.environ.get("SLIM_PEFT_DEBUG"):
        return handlers[args.command]()
    from slim_peft.train import NonFiniteLossError

    try:
        return handlers[args.command]()
    except NonFiniteLossError as e:
        _error(args.command, e)
        return 1
    except _user_errors() as e:
        _error(args.command, e)
        return 2


def _eval(args: argparse.Namespace) -> int:
    from slim_peft.evaluate import eval_command

    return eval_command(args)


def _error(command: str, e: BaseException) -> None:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    notes = getattr(e, "__notes__", [])
    print(f"slim-peft {command}: error: {msg}" + "".join(f"\n  {n}" for n in notes), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
