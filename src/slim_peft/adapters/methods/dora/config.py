"""The DoraConfig dataclass: every coefficient of the method and its default
(the paper's, or ours where the paper is silent)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import AdapterConfig


@dataclass
class DoraConfig(AdapterConfig):
    """DoRA (Liu et al. 2024): W' = m (W + s B A) / ||W + s B A||_c, norm detached (section 4.3)."""

    method: str = "dora"
