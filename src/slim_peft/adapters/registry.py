"""The one table of methods. Every module that needs to know what a method is or does asks here.

A method is a folder under `methods/` that builds a `MethodSpec` (its config class, how to inject its
layers, its auxiliary losses, its merge rule, its model class for methods that change the training step)
and is named on one line of `methods/__init__.py`. Nothing else lists method names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slim_peft.errors import ConfigError, closest

from .config import AdapterConfig
from .context import ForwardContext

AuxLosses = dict[str, tuple[torch.Tensor, float]]
AuxFn = Callable[[nn.Module, AdapterConfig, ForwardContext], AuxLosses]


def no_aux(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> AuxLosses:
    return {}


@dataclass(frozen=True)
class MethodSpec:
    """One method: what differs between methods, reached by every other module through `METHODS`.

    - `inject(model, cfg, ctx)` replaces the target linears in place;
    - `aux_losses(model, cfg, ctx)` returns name -> (unweighted value, weight) after a forward;
    - `merge_refusal`: why `merge_and_unload` is impossible, or None when it folds into the base weights;
    - `model_class`: an `AdapterModel` subclass for methods that change the training step (I-LoRA), whose
      `training_state` / `load_training_state` / `after_optimizer_step` / `start_task` hooks the trainer calls;
    - `sparse_routing`: top-k routing leaves some experts without gradient in a step (DDP must then look for
      unused parameters);
    - `moe_peft_type`: the `peft_type` the MoE-PEFT interop writes, or None when that layout has no such method.
    """

    name: str
    config_class: type[AdapterConfig]
    peft_type: str
    inject: Callable[[nn.Module, AdapterConfig, ForwardContext], None]
    aux_losses: AuxFn = no_aux
    merge_refusal: str | None = None
    model_class: type | None = None
    sparse_routing: bool = False
    moe_peft_type: str | None = None


METHODS: dict[str, MethodSpec] = {}  # filled by `methods/__init__.py`, one line per method


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the table (a second method of the same name is an error)."""
    if spec.name in METHODS:
        raise ConfigError(f"method {spec.name!r} is registered twice")
    default = spec.config_class.__dataclass_fields__["method"].default
    if default != spec.name:
        raise ConfigError(f"{spec.config_class.__name__}.method defaults to {default!r}, not {spec.name!r}")
    METHODS[spec.name] = spec
    return spec


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered method `name`; an unknown name is a ConfigError naming the closest one."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}{closest(name, METHODS)}; choose one of {method_names()}")
    return METHODS[name]


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Build the config of ``d["method"]`` from a dict (e.g. a YAML section); unknown keys are an error."""
    d = dict(d)
    method = d.pop("method", None)
    if method is None:
        raise ConfigError(f"config has no 'method' key: choose one of {method_names()}")
    cls = get_method(method).config_class
    valid = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in valid:
            raise ConfigError(f"unknown key {key!r} for method {method!r}{closest(key, valid)}; "
                              f"valid keys: {sorted(valid - {'method'})}")
    return cls(**d)
