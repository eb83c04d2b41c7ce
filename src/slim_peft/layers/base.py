"""What every adapter family shares: the per-forward context, the method record, and module injection."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import AdapterConfig, closest


class TargetModuleError(ValueError):
    """The model has no module matching the configured target_modules."""


@dataclass
class ForwardContext:
    """State one forward pass shares between the adapter layers and the model.

    `token_mask` ([B, S] bool, True for real tokens) lets routers ignore padding; `sample_type` ([B]) is
    LoRAMoE's per-sample type; layers append router logits and add per-forward losses to `aux`.
    """

    token_mask: torch.Tensor | None = None
    sample_type: torch.Tensor | None = None
    router_logits: list[torch.Tensor] = field(default_factory=list)
    router_masks: list[torch.Tensor | None] = field(default_factory=list)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def begin(self, attention_mask: torch.Tensor | None, sample_type: torch.Tensor | None) -> None:
        self.token_mask = attention_mask.bool() if attention_mask is not None else None
        self.sample_type = sample_type
        self.router_logits.clear()
        self.router_masks.clear()
        self.aux.clear()

    def flat_mask(self, num_tokens: int) -> torch.Tensor | None:
        """Token mask flattened to [T] when it describes these tokens (not during cached decoding)."""
        if self.token_mask is None or self.token_mask.numel() != num_tokens:
            return None
        return self.token_mask.reshape(-1)

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        self.aux[name] = self.aux[name] + value if name in self.aux else value


AuxFn = Callable[[nn.Module, AdapterConfig, ForwardContext], dict[str, tuple[torch.Tensor, float]]]


def no_aux(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> dict[str, tuple[torch.Tensor, float]]:
    return {}


@dataclass(frozen=True)
class Method:
    """One entry of `slim_peft.model.METHODS`: how to inject a method and what it adds to the loss.

    `inject(model, cfg, ctx)` replaces the target linears in place; `aux_losses(model, cfg, ctx)` returns
    name -> (unweighted value, weight) after a forward; `merge_refusal` is the reason merging is impossible,
    or None when `merge_and_unload` is allowed.
    """

    peft_type: str
    inject: Callable[[nn.Module, AdapterConfig, ForwardContext], None]
    aux_losses: AuxFn = no_aux
    merge_refusal: str | None = None
    model_cls: type | None = None  # AdapterModel subclass, for methods that change the training step


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


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (LoRA's A init), applied to the last two dims of a stacked tensor."""
    for sub in t.view(-1, *t.shape[-2:]):
        nn.init.kaiming_uniform_(sub, a=5**0.5)
    return t


class LoraDropout(nn.Dropout):
    """nn.Dropout on the adapters' input, with a cheaper mask on the CPU.

    On the CPU torch's dropout draws one random number per element with `bernoulli_`. This draws 64 random
    bits per 4 elements instead (the mask costs a quarter) and keeps element i iff its 16-bit word
    u_i < round((1 - p) 2^16), so the keep rate is 1 - p up to 2^-17; kept elements are scaled by 1 / (1 - p),
    as nn.Dropout does. A training step of the forgetting study runs 1.02x (SLIM) to 1.09x (LoRA on all 7
    projections) faster (benchmarks/results/dropout_speed.md). Other devices, eval mode and p = 0 use
    nn.Dropout itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return x * dropout_noise(x.shape, self.p, x.dtype, x.device)


def dropout_noise(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device | None,
                  scale: float | None = None) -> torch.Tensor:
    """keep * scale (default 1 / (1 - p)), keep_i = [u_i < round((1 - p) 2^16)] with u_i uniform 16-bit
    words from the global RNG (see LoraDropout)."""
    return keep_noise(shape, p, device).to(dtype).mul_(1.0 / (1.0 - p) if scale is None else scale)


def keep_noise(shape: torch.Size, p: float, device: torch.device | None) -> torch.Tensor:
    """keep_i = [u_i < round((1 - p) 2^16)] as booleans, u_i uniform 16-bit words from the global RNG (64
    random bits per 4 elements)."""
    n = shape.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    u = words.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    return u < round((1.0 - p) * 65536) - 32768


def adapter_dropout(p: float) -> nn.Module:
    """The adapters' input dropout: `LoraDropout(p)`, or nn.Identity when p = 0."""
    return LoraDropout(p) if p > 0 else nn.Identity()
