"""The flat key space of a training job (`slim-peft train --config cfg.yaml --key value`): the data keys
(`DataArguments`), YAML loading, `--key value` overrides, type coercion to each field's annotation, and the
split of one flat mapping into TrainingArguments, DataArguments and the method's config. Unknown keys are
an error naming the closest valid key."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slim_peft.adapters import config_from_dict, get_method
from slim_peft.errors import CLIError, ConfigError, closest

from .args import TrainingArguments


@dataclass
class DataArguments:
    """What `train` trains on and which model it adapts (the keys beside TrainingArguments and the method's)."""

    model_name_or_path: str = "smollm2-135m"
    method: str = "slim"
    tasks: list[str] | str = "openbookqa,social_iqa,boolq"  # task names or JSONL files (question/choices/label)
    # instruction / chat / text rows (files, save_to_disk dirs, embedded names, Hub ids; "a.jsonl,b.csv*0.5"):
    # when set, training reads these instead of `tasks`
    data: str | None = None
    data_format: str | None = None  # detected from the fields when unset
    data_split: str = "train"  # split of a Hub id or a saved DatasetDict
    data_subset: str | None = None  # subset (config name) of a Hub id
    train_split: str = "train"  # "train" / "test" (hash-based halves) or "full" (the whole file)
    max_train_samples: int | None = None  # per task, first N of the split
    eval_tasks: list[str] | str | None = None  # evaluated every eval_steps (test split) and at the end
    eval_protocol: str = "letter"
    eval_limit: int | None = 100

    def __post_init__(self) -> None:
        self.tasks = [] if self.data else as_list(self.tasks)
        if not self.tasks and not self.data:
            raise ConfigError("tasks is empty: name at least one task or JSONL file, or set data")
        self.eval_tasks = as_list(self.eval_tasks) if self.eval_tasks else []
        if self.train_split not in ("train", "test", "full"):
            raise ConfigError(f"train_split must be 'train', 'test' or 'full', got {self.train_split!r}")
        if self.eval_protocol not in ("loglik", "letter", "generate", "open"):
            raise ConfigError(f"eval_protocol must be loglik, letter, generate or open, got {self.eval_protocol!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be >= 1, got {self.max_train_samples}")
        get_method(self.method)  # an unknown method names the closest one


ALIASES = {"resume": "resume_from_checkpoint", "overwrite": "overwrite_output_dir", "model": "model_name_or_path",
           "output": "output_dir", "lr": "learning_rate"}
FLAG_DEFAULTS = {"resume_from_checkpoint": "latest"}  # a bare --resume means the latest checkpoint


def as_list(value: Any) -> list[str]:
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
    method = str(flat.get("method", DataArguments.method))
    groups = {"training": _field_types(TrainingArguments), "data": _field_types(DataArguments),
              "adapter": _field_types(get_method(method).config_class)}
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


def write_effective_config(path: Path, targs: Any, data: DataArguments, adapter: Any, comment: str = "") -> None:
    """A YAML that `slim-peft train --config` reads back: data keys, the method's config, training arguments
    (without run-specific ones: output_dir, resume)."""
    import yaml

    skip = {"output_dir", "resume_from_checkpoint", "overwrite_output_dir"}
    d: dict[str, Any] = {k: v for k, v in dataclasses.asdict(data).items()}
    d.update({k: v for k, v in adapter.to_dict().items() if k != "base_model_name_or_path"})
    d.update({k: v for k, v in targs.to_dict().items() if k not in skip})
    header = "# slim-peft train --config config.yaml --output_dir NEW_DIR reproduces this training\n" + comment
    path.write_text(header + yaml.safe_dump(d, sort_keys=False))
