"""Adapter configurations: one dataclass per method, JSON (de)serialisation and validation.

Field names follow PEFT's spelling (`r`, `lora_alpha`, `lora_dropout`, `target_modules`) so that users'
habits carry over. Every coefficient of every method is a field here with the default of
``shared/docs/method.md``; `config_from_dict` rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN_PROJ = ["gate_proj", "up_proj", "down_proj"]
ALL_PROJ = ATTENTION_PROJ + FFN_PROJ


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class AdapterConfig:
    """Fields shared by every method. `target_modules` is a list of module-name suffixes or "all-linear"."""

    method: str = ""
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    base_model_name_or_path: str | None = None

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r (method.md notation)."""
        return self.lora_alpha / self.r

    def __post_init__(self) -> None:
        if not self.method:
            self.method = METHOD_NAMES[type(self)]
        _check(self.method == METHOD_NAMES[type(self)],
               f"{type(self).__name__} has method={METHOD_NAMES[type(self)]!r}, got {self.method!r}")
        _check(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        _check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str):
            _check(self.target_modules == "all-linear",
                   f"target_modules must be a list of module names or 'all-linear', got {self.target_modules!r}")
        else:
            self.target_modules = list(self.target_modules)
            _check(len(self.target_modules) > 0, "target_modules is empty: name at least one module, "
                   "e.g. ['gate_proj', 'up_proj', 'down_proj'], or use 'all-linear'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021): y = W x + b + s B A dropout(x)."""


@dataclass
class DoraConfig(AdapterConfig):
    """DoRA (Liu et al. 2024): W' = m (W + s B A) / ||W + s B A||_c, norm detached (section 4.3)."""


@dataclass
class SlimConfig(AdapterConfig):
    """SLIM (Han et al. 2024): LoRA + identity experts, weight yielding, dynamic merging.

    See method.md "SLIM" items 1-9; every decision there is a field here so that it can be ablated.
    """

    target_modules: list[str] | str = field(default_factory=lambda: list(FFN_PROJ))
    num_lora_experts: int = 8
    num_identity_experts: int = 2
    top_k: int = 2
    routing: str = "block"  # "block": one router per decoder FFN; "linear": one per adapted linear
    router_init_std: float = 0.02
    # sliding clusters and weight yielding (items 3-5)
    num_clusters: int = 8
    cluster_momentum: float = 0.1
    distance: str = "calibrated"  # "calibrated": rho / tau - 1; "max": rho - 1 (paper-literal)
    yield_strength: float = 1.0  # gamma; 0 disables weight yielding
    yield_clamp: bool = False  # use max(d, 0)
    # dynamic merging (item 7)
    mask_ratio: float = 0.5  # p; 0 disables dynamic merging
    merge_form: str = "fast"  # "fast": row/column masks of B and A; "exact": elementwise DARE on s B A
    rescale: bool = True
    eval_mask: str = "fixed"  # "fixed" (from merge_seed), "resample" or "none"
    merge_seed: int = 0
    # losses (item 8)
    l1_weight: float = 1e-3
    balance_loss_weight: float = 0.0  # optional switch-style load balancing, off (paper names none)
    dispatch: str = "auto"  # "dense", "grouped" or "auto" (see layers/experts.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_lora_experts + self.num_identity_experts
        _check(self.num_lora_experts >= 1, f"num_lora_experts must be >= 1, got {self.num_lora_experts}")
        _check(self.num_identity_experts >= 0,
               f"num_identity_experts must be >= 0, got {self.num_identity_experts}")
        _check(1 <= self.top_k <= n, f"top_k={self.top_k} must be between 1 and the number of experts "
               f"({self.num_lora_experts} LoRA + {self.num_identity_experts} identity = {n})")
        _check(self.routing in ("block", "linear"), f"routing must be 'block' or 'linear', got {self.routing!r}")
        _check(self.num_clusters >= 1, f"num_clusters must be >= 1, got {self.num_clusters}")
        _check(0.0 < self.cluster_momentum <= 1.0,
               f"cluster_momentum must be in (0, 1], got {self.cluster_momentum}")
        _check(self.distance in ("calibrated", "max"),
               f"distance must be 'calibrated' or 'max', got {self.distance!r}")
        _check(self.yield_strength >= 0, f"yield_strength must be >= 0, got {self.yield_strength}")
        _check(0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        _check(self.merge_form in ("fast", "exact"), f"merge_form must be 'fast' or 'exact', got {self.merge_form!r}")
        _check(self.eval_mask in ("fixed", "resample", "none"),
               f"eval_mask must be 'fixed', 'resample' or 'none', got {self.eval_mask!r}")
        _check(self.l1_weight >= 0 and self.balance_loss_weight >= 0, "loss weights must be >= 0")
        _check(self.dispatch in ("auto", "dense", "grouped"),
               f"dispatch must be 'auto', 'dense' or 'grouped', got {self.dispatch!r}")


@dataclass
class MixLoraConfig(AdapterConfig):
    """MixLoRA (Li et al. 2024): FFN-level LoRA experts sharing the frozen FFN, top-k (or top-p) router,
    plain LoRA on the attention projections, load-balancing loss over all layers."""

    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_PROJ))
    num_experts: int = 8
    top_k: int = 2
    top_p: float | None = None  # MixLoRA-Dynamic when set (paper: 0.8)
    router_aux_loss_coef: float = 0.01
    router_init_std: float = 0.02
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        _check(1 <= self.top_k <= self.num_experts,
               f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        _check(self.top_p is None or 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.router_aux_loss_coef >= 0, "router_aux_loss_coef must be >= 0")
        _check(self.dispatch in ("auto", "dense", "grouped"),
               f"dispatch must be 'auto', 'dense' or 'grouped', got {self.dispatch!r}")


@dataclass
class LoraMoeConfig(AdapterConfig):
    """LoRAMoE (Dou et al. 2023): dense router over LoRA experts per FFN linear, localized balancing
    constraint (experts in two groups; samples typed world-knowledge 0 / downstream 1)."""

    target_modules: list[str] | str = field(default_factory=lambda: list(FFN_PROJ))
    num_experts: int = 8
    lbc_alpha: float = 0.1  # delta: importance weight 1 +/- delta
    lbc_weight: float = 0.1  # beta: weight of L_lbc in the total loss
    lbc_form: str = "paper"  # "paper": Var/Mean; "code": Var/Mean^2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.num_experts >= 2, f"LoRAMoE needs num_experts >= 2 (two groups), got {self.num_experts}")
        _check(0 <= self.lbc_alpha < 1, f"lbc_alpha must be in [0, 1), got {self.lbc_alpha}")
        _check(self.lbc_weight >= 0, f"lbc_weight must be >= 0, got {self.lbc_weight}")
        _check(self.lbc_form in ("paper", "code"), f"lbc_form must be 'paper' or 'code', got {self.lbc_form!r}")


@dataclass
class MolaConfig(AdapterConfig):
    """MoLA (Gao et al. 2024): per-linear top-k routing, number of experts growing with depth."""

    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_PROJ))
    experts_per_layer: list[int] | str = "2,4,6,8"  # group sizes over equal layer groups, or one per layer
    top_k: int = 2
    router_aux_loss_coef: float = 0.0  # official code: off; 0.001 when on
    router_init: str = "kaiming"  # "kaiming" (official code, MoE-PEFT) or "normal": N(0, router_init_std)
    router_init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.experts_per_layer, str):
            try:
                self.experts_per_layer = [int(v) for v in self.experts_per_layer.split(",")]
            except ValueError as e:
                raise ConfigError(f"experts_per_layer must look like '2,4,6,8', got {self.experts_per_layer!r}") from e
        self.experts_per_layer = list(self.experts_per_layer)
        _check(len(self.experts_per_layer) > 0 and all(n >= 1 for n in self.experts_per_layer),
               f"experts_per_layer must be positive integers, got {self.experts_per_layer}")
        _check(1 <= self.top_k <= min(self.experts_per_layer),
               f"top_k={self.top_k} must be between 1 and the smallest expert count {min(self.experts_per_layer)}")
        _check(self.router_init in ("kaiming", "normal"),
               f"router_init must be 'kaiming' or 'normal', got {self.router_init!r}")


@dataclass
class ILoraConfig(AdapterConfig):
    """I-LoRA (Ren et al. 2024): fast LoRA + slow EMA LoRA, replay buffer, consistency loss."""

    r: int = 8
    lora_dropout: float = 0.1
    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION_PROJ))
    ema_alpha: float = 0.99
    replay_capacity: int = 500
    consistency_weight: float = 1.0
    eval_with: str = "slow"  # "slow" (paper) or "fast"
    replay_from: str = "seen"  # "seen": examples of any earlier step; "previous_tasks": paper

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.ema_alpha <= 1, f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        _check(self.replay_capacity >= 1, f"replay_capacity must be >= 1, got {self.replay_capacity}")
        _check(self.consistency_weight >= 0, "consistency_weight must be >= 0")
        _check(self.eval_with in ("slow", "fast"), f"eval_with must be 'slow' or 'fast', got {self.eval_with!r}")
        _check(self.replay_from in ("seen", "previous_tasks"),
               f"replay_from must be 'seen' or 'previous_tasks', got {self.replay_from!r}")


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    "lora": LoraConfig,
    "dora": DoraConfig,
    "slim": SlimConfig,
    "mixlora": MixLoraConfig,
    "loramoe": LoraMoeConfig,
    "mola": MolaConfig,
    "ilora": ILoraConfig,
}
METHOD_NAMES: dict[type, str] = {cls: name for name, cls in CONFIG_CLASSES.items()}


def closest(name: str, options: list[str] | set[str]) -> str:
    """' (did you mean X?)' for the closest option, or ''."""
    match = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build the config of ``d["method"]`` from a dict (e.g. a YAML section); unknown keys are an error."""
    d = dict(d)
    method = d.pop("method", None)
    if method is None:
        raise ConfigError(f"config has no 'method' key: choose one of {sorted(CONFIG_CLASSES)}")
    if method not in CONFIG_CLASSES:
        raise ConfigError(f"unknown method {method!r}{closest(method, CONFIG_CLASSES)}; "
                          f"choose one of {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[method]
    valid = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} for method {method!r}{closest(key, valid)}; "
                              f"valid keys: {sorted(valid - {'method'})}")
    return cls(**d)
