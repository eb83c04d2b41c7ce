"""Interop with MoE-PEFT (TUDB-Labs) and its `mixlora` package: load their MixLoRA, LoRAMoE, MoLA and LoRA
adapters into this library's classes, and export ours to their layout.

Their layout: `adapter_config.json` (MoE-PEFT's `export()`: peft_type, r, lora_alpha, lora_dropout,
target_modules, routing_strategy, num_experts, top_k / top_p, ...) + `adapter_model.bin` (a `torch.save`d
dict of tensors, read here with `torch.load(weights_only=True)`, never plain unpickling). Keys, per decoder
layer i, with prefix P = "mixlora" / "loramoe" / "mola" (MoE-PEFT `init_lora_layer_weight`):

    MixLoRA  P.layers.{i}.mlp.moe_gate.weight                       E x hidden (one router per FFN)
             P.layers.{i}.mlp.{proj}.experts.{e}.lora_{A,B}.weight  FFN projections (experts)
             P.layers.{i}.self_attn.{proj}.lora_{A,B}.weight        attention projections (plain LoRA)
    LoRAMoE  P.layers.{i}.mlp.{proj}.moe_gate.weight                E x d_in (one router per linear)
             P.layers.{i}.mlp.{proj}.experts.{e}.lora_{A,B}.weight
    MoLA     P.layers.{i}.{self_attn,mlp}.{proj}.moe_gate.weight     as LoRAMoE, on every target
             P.layers.{i}.{self_attn,mlp}.{proj}.experts.{e}.lora_{A,B}.weight
    LoRA     base_model.model.model.layers.{i}.{module}.{proj}.lora_{A,B}.weight (PEFT's keys)

Ours stack the experts of a linear (`experts.lora_A`: E x r x d_in, `experts.lora_B`: E x d_out x r) and
name routers `router.weight`; the maths is the same, so a converted adapter gives the same
logits. What their format cannot express is refused with the reason: DoRA or rsLoRA inside a mixture,
MixLoRA-Switch, top-p temperature, LoRAMoE on attention projections (MoE-PEFT gives those a plain LoRA),
MoLA with a layer-dependent expert count (MoE-PEFT has one count). Our own settings that their config has
no field for (LoRAMoE's balancing constraint, MoLA's router init, ...) travel under the extra key
"slim_peft", which their loaders ignore.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slim_peft.adapters import (
    ATTENTION_PROJ,
    AdapterConfig,
    AdapterModel,
    LoraConfig,
    LoraMoeConfig,
    MixLoraConfig,
    MolaConfig,
    get_adapter_model,
    get_method,
)
from slim_peft.adapters import config_from_dict as _config_from_dict
from slim_peft.adapters.io import PREFIX, base_fingerprint, check_base_model
from slim_peft.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = {"MIXLORA": "mixlora", "LORAMOE": "loramoe", "MOLA": "mola", "LORA": "base_model.model.model"}
_EXPERT_KEY = re.compile(r"^(?P<site>.+)\.experts\.(?P<e>\d+)\.lora_(?P<ab>[AB])\.weight$")


# --- configs ------------------------------------------------------------------------------------------------

def _refuse(path: Any, why: str) -> AdapterError:
    return AdapterError(f"{path}: {why}")


def config_from_moe_peft(raw: dict[str, Any], source: Any = "adapter_config.json") -> AdapterConfig:
    """Our config for a MoE-PEFT / mixlora `adapter_config.json` dict (refuses what we cannot run)."""
    peft_type = raw.get("peft_type")
    if peft_type not in KEY_PREFIX:
        raise _refuse(source, f"peft_type {peft_type!r} is not one of {sorted(KEY_PREFIX)}")
    if raw.get("use_dora") or raw.get("use_rslora"):
        raise _refuse(source, "DoRA / rsLoRA adapters in MoE-PEFT's layout are not supported (use PEFT's "
                              "layout for a plain DoRA adapter)")
    if "expert_lora" in raw:
        raise _refuse(source, "a separate `expert_lora` rank/alpha for the experts is not supported")
    targets = raw["target_modules"]
    if isinstance(targets, dict):
        targets = [k for k, v in targets.items() if v]
    common: dict[str, Any] = {"r": int(raw["r"]), "lora_alpha": float(raw["lora_alpha"]),
                              "lora_dropout": float(raw.get("lora_dropout", 0.0)), "target_modules": list(targets),
                              "base_model_name_or_path": raw.get("base_model_name_or_path")}
    extra = dict(raw.get("slim_peft", {}).get("config", {}))
    extra.pop("method", None)
    if peft_type == "LORA":
        return LoraConfig(**common)
    strategy = raw.get("routing_strategy")
    if peft_type == "MIXLORA":
        if strategy not in ("mixlora", "mixlora-dynamic"):
            raise _refuse(source, f"MixLoRA routing_strategy {strategy!r} is not supported (only 'mixlora' "
                                  f"and 'mixlora-dynamic')")
        if float(raw.get("temperature", 0.0) or 0.0) > 0:
            raise _refuse(source, "MixLoRA-Dynamic with temperature > 0 is not supported")
        if float(raw.get("jitter_noise", 0.0) or 0.0) > 0:
            warnings.warn(f"{source}: jitter_noise is not implemented (it only affects training)", stacklevel=3)
        fields = {**extra, **common, "num_experts": int(raw["num_experts"]),
                  "top_k": int(raw.get("top_k", 2)),
                  "top_p": float(raw.get("top_p", 0.8)) if strategy == "mixlora-dynamic" else None,
                  "router_aux_loss_coef": float(raw.get("router_aux_loss_coef", 0.001)),
                  "router_init_std": float(raw.get("router_init_range", 0.02))}
        return _build("mixlora", fields, source)
    if peft_type == "LORAMOE":
        if any(t in ATTENTION_PROJ for t in common["target_modules"]):
            raise _refuse(source, "this LoRAMoE adapter targets attention projections, which MoE-PEFT runs as "
                                  "plain LoRA; our LoRAMoE puts a mixture on every target")
        return _build("loramoe", {**extra, **common, "num_experts": int(raw["num_experts"])}, source)
    fields = {**extra, **common, "experts_per_layer": [int(raw["num_experts"])], "top_k": int(raw.get("top_k", 2)),
              "router_aux_loss_coef": float(raw.get("router_aux_loss_coef", 0.001))
              if raw.get("router_loss", False) else 0.0}
    return _build("mola", fields, source)


def _build(method: str, fields: dict[str, Any], source: Any) -> AdapterConfig:
    try:
        return _config_from_dict({"method": method, **fields})
    except ValueError as e:
        raise _refuse(source, f"cannot build a {method} config: {e}") from e


def config_to_moe_peft(cfg: AdapterConfig, base_model_name_or_path: str | None = None,
                       act_fn: str | None = None) -> dict[str, Any]:
    """MoE-PEFT's `adapter_config.json` dict for our config (their `export()` plus base model and task).
    `act_fn`: the FFN activation, written for MixLoRA (the `mixlora` package needs it)."""
    peft_type = get_method(cfg.method).moe_peft_type  # the registry says which methods have this layout
    if peft_type is None:
        raise AdapterError(f"method {cfg.method!r} has no MoE-PEFT layout (MixLoRA, LoRAMoE, MoLA and LoRA do)")
    if isinstance(cfg.target_modules, str):
        raise AdapterError("export needs explicit target_modules (MoE-PEFT has no 'all-linear')")
    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    d: dict[str, Any] = {"bias": "none", "peft_type": peft_type, "task_type": "CAUSAL_LM",
                         "base_model_name_or_path": base_model_name_or_path or cfg.base_model_name_or_path,
                         "r": cfg.r, "lora_alpha": alpha, "lora_dropout": float(cfg.lora_dropout),
                         "target_modules": list(cfg.target_modules)}
    if isinstance(cfg, MixLoraConfig):
        d.update(routing_strategy="mixlora" if cfg.top_p is None else "mixlora-dynamic",
                 num_experts=cfg.num_experts, router_aux_loss_coef=float(cfg.router_aux_loss_coef),
                 router_init_range=float(cfg.router_init_std), jitter_noise=0.0, router_loss=True)
        if act_fn is not None:
            d["act_fn"] = act_fn
        d.update(top_k=cfg.top_k) if cfg.top_p is None else d.update(top_p=cfg.top_p, temperature=0.0)
    elif isinstance(cfg, LoraMoeConfig):
        if any(t in ATTENTION_PROJ for t in cfg.target_modules):
            raise AdapterError("MoE-PEFT runs LoRAMoE on attention projections as plain LoRA: export a LoRAMoE "
                               "adapter whose target_modules are FFN projections only")
        d.update(routing_strategy="loramoe", num_experts=cfg.num_experts)
    elif isinstance(cfg, MolaConfig):
        counts = set(cfg.experts_per_layer)
        if len(counts) != 1:
            raise AdapterError(f"MoE-PEFT's MoLA has one expert count for every layer; this adapter has "
                               f"{cfg.experts_per_layer}")
        d.update(routing_strategy="mola", num_experts=counts.pop(), top_k=cfg.top_k,
                 router_aux_loss_coef=float(cfg.router_aux_loss_coef) or 0.001,
                 router_loss=cfg.router_aux_loss_coef > 0)
    return d


# --- weights ------------------------------------------------------------------------------------------------

def _ours_to_theirs_site(site: str, prefix: str) -> str:
    """'model.layers.3.mlp.router' -> 'mixlora.layers.3.mlp' style site names (decoder at `model.layers`)."""
    if not site.startswith("model."):
        raise AdapterError(f"{site}: only decoders at `model.layers` (Llama, Qwen2, Mistral) are supported")
    return prefix + site[len("model"):]


def state_to_moe_peft(model: AdapterModel) -> dict[str, torch.Tensor]:
    """Our adapter weights as MoE-PEFT's flat dict (one contiguous tensor per expert factor)."""
    cfg = model.adapter_config
    prefix = KEY_PREFIX[get_method(cfg.method).moe_peft_type]
    out: dict[str, torch.Tensor] = {}
    for key, value in model.adapter_state_dict().items():
        name = key[len(PREFIX):]
        if name.endswith(".experts.lora_A") or name.endswith(".experts.lora_B"):
            site, ab = name[: -len(".experts.lora_A")], name[-1]
            for e in range(value.shape[0]):
                out[f"{_ours_to_theirs_site(site, prefix)}.experts.{e}.lora_{ab}.weight"] = value[e].clone()
        elif name.endswith(".router.weight"):
            site = _ours_to_theirs_site(name[: -len(".router.weight")], prefix)
            out[f"{site}.moe_gate.weight"] = value.clone()
        elif name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight"):
            out[_ours_to_theirs_site(name, prefix)] = value.clone()
        else:
            raise AdapterError(f"adapter tensor {name} has no place in MoE-PEFT's layout")
    return out


def state_from_moe_peft(weights: dict[str, torch.Tensor], cfg: AdapterConfig, model: AdapterModel,
                        source: Any) -> dict[str, torch.Tensor]:
    """MoE-PEFT's flat dict as our adapter state dict (experts stacked), checked against `model`."""
    prefix = KEY_PREFIX[get_method(cfg.method).moe_peft_type]
    expected = model.adapter_state_dict()
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in weights.items():
        if not key.startswith(prefix + "."):
            raise _refuse(source, f"unexpected tensor {key!r} (keys of this adapter start with {prefix!r})")
        name = "model" + key[len(prefix):]
        m = _EXPERT_KEY.match(name)
        if m:
            experts.setdefault((m["site"], m["ab"]), {})[int(m["e"])] = value
        elif name.endswith(".moe_gate.weight"):
            out[PREFIX + name[: -len(".moe_gate.weight")] + ".router.weight"] = value
        else:
            out[PREFIX + name] = value
    for (site, ab), per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise _refuse(source, f"{site}: expert ids {sorted(per_expert)} are not 0..E-1")
        out[f"{PREFIX}{site}.experts.lora_{ab}"] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    missing = sorted(set(expected) - set(out))
    if missing:
        raise _refuse(source, f"the adapter lacks {len(missing)} tensors this model needs, e.g. {missing[:2]}")
    return {k: v.to(expected[k].dtype) if k in expected else v for k, v in out.items()}


# --- load / save --------------------------------------------------------------------------------------------

def load_moe_peft(base_model: nn.Module, adapter_dir: str | os.PathLike) -> AdapterModel:
    """Load a MoE-PEFT / mixlora adapter directory (adapter_config.json + adapter_model.bin) onto
    `base_model` (injected in place, as `get_adapter_model`). Weights are read with
    `torch.load(weights_only=True)`."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{adapter_dir} must hold {CONFIG_NAME} and {WEIGHTS_NAME} (MoE-PEFT's layout)")
    raw = json.loads(cfg_path.read_text())
    cfg = config_from_moe_peft(raw, cfg_path)
    act = getattr(base_model.config, "hidden_act", None)
    if raw.get("act_fn") not in (None, act):
        raise _refuse(cfg_path, f"act_fn {raw['act_fn']!r} differs from the model's FFN activation {act!r}")
    check_base_model(base_model, raw.get("slim_peft", {}).get("base_model"), adapter_dir)
    try:
        weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but tensors and plain containers
        raise _refuse(weights_path, f"is not a plain dict of tensors (read with weights_only=True): {e}") from e
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise _refuse(weights_path, "is not a dict of tensors")
    model = get_adapter_model(base_model, cfg)
    model.load_adapter_state_dict(state_from_moe_peft(weights, cfg, model, weights_path), source=str(adapter_dir))
    return model


def save_moe_peft(model: AdapterModel, save_directory: str | os.PathLike,
                  base_model_name_or_path: str | None = None) -> None:
    """Write `model`'s adapter in MoE-PEFT's layout (loadable by MoE-PEFT and `mixlora`), atomically.
    `base_model_name_or_path` overrides the recorded base (their loaders pass it to `from_pretrained`)."""
    act = getattr(model.base_model.config, "hidden_act", None)
    raw = config_to_moe_peft(model.adapter_config, base_model_name_or_path, act if isinstance(act, str) else None)
    raw["slim_peft"] = {"config": model.adapter_config.to_dict(), "base_model": base_fingerprint(model.base_model)}
    weights = state_to_moe_peft(model)
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True))
        torch.save(weights, tmp / WEIGHTS_NAME)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["config_from_moe_peft", "config_to_moe_peft", "load_moe_peft", "save_moe_peft",
           "state_from_moe_peft", "state_to_moe_peft"]
