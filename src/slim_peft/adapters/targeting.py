"""Which linears of a model an adapter replaces (PEFT's suffix rule) and how it replaces them."""

from __future__ import annotations

import re

from torch import nn

from slim_peft.errors import TargetModuleError, closest


def linear_names(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules of a causal LM, without its output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Full names of the linears matched by `target_modules` (suffix match on the module path, as PEFT)."""
    names = linear_names(model)
    if target_modules == "all-linear":
        found = names
    else:
        found = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        wanted = target_modules if isinstance(target_modules, str) else ", ".join(target_modules)
        hint = closest(target_modules[0], suffixes) if isinstance(target_modules, list) else ""
        raise TargetModuleError(
            f"{type(model).__name__} has no linear module matching target_modules [{wanted}]{hint}; "
            f"its linear layers are named: {suffixes}. Set target_modules to some of these or 'all-linear'.")
    return found


def layer_index(name: str) -> int:
    """Decoder layer number in a module path such as 'model.layers.7.mlp.up_proj' (0 if none)."""
    m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", "." + name)
    return int(m.group(1)) if m else 0


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
