"""What every adapter configuration shares: the base dataclass, the common target lists and validation.

Field names follow PEFT's spelling (`r`, `lora_alpha`, `lora_dropout`, `target_modules`) so that users'
habits carry over. Each method's dataclass lives in its folder (`methods/<name>/config.py`) and names
itself in its `method` field's default; `registry.config_from_dict` builds one from a dict and rejects
unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slim_peft.errors import ConfigError

ATTENTION_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN_PROJ = ["gate_proj", "up_proj", "down_proj"]
ALL_PROJ = ATTENTION_PROJ + FFN_PROJ


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `cond`."""
    if not cond:
        raise ConfigError(msg)


@dataclass
class AdapterConfig:
    """Fields shared by every method. `target_modules` is a list of module-name suffixes or "all-linear".

    A subclass sets `method` to its registry name as the field's default; the value may not be changed.
    """

    method: str = ""
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    base_model_name_or_path: str | None = None

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r (LoRA's scaling)."""
        return self.lora_alpha / self.r

    def __post_init__(self) -> None:
        own = type(self).__dataclass_fields__["method"].default
        check(bool(own), f"{type(self).__name__} is the shared base; use one method's config (e.g. LoraConfig)")
        if not self.method:
            self.method = own
        check(self.method == own, f"{type(self).__name__} has method={own!r}, got {self.method!r}")
        check(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            check(self.target_modules == "all-linear",
                  f"target_modules must be a list of module names or 'all-linear', got {self.target_modules!r}")
        else:
            self.target_modules = list(self.target_modules)
            check(len(self.target_modules) > 0, "target_modules is empty: name at least one module, "
                  "e.g. ['gate_proj', 'up_proj', 'down_proj'], or use 'all-linear'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
