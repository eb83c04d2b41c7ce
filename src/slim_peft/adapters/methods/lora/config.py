"""The LoraConfig dataclass: every coefficient of the method and its default
(the paper's, or ours where the paper is silent)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import AdapterConfig


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al. 2021): y = W x + b + s B A dropout(x)."""

    method: str = "lora"
