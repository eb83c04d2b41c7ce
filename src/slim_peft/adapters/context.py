"""The per-forward context that the adapter layers and the model share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardContext:
    """State one forward pass shares between the adapter layers and the model.

    `token_mask` ([B, S] bool, True for real tokens) lets routers ignore padding; `sample_type` ([B]) is
    LoRAMoE's per-sample type; in a packed batch `sequence_ids` ([B, S], each token's example, -1 on padding)
    and `sample_type` has one entry per example; layers append router logits and add per-forward losses to `aux` (unless
    `collect_aux` is off: generation, where no loss is read).
    """

    token_mask: torch.Tensor | None = None
    sample_type: torch.Tensor | None = None
    sequence_ids: torch.Tensor | None = None
    router_logits: list[torch.Tensor] = field(default_factory=list)
    router_masks: list[torch.Tensor | None] = field(default_factory=list)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    collect_aux: bool = True

    def begin(self, attention_mask: torch.Tensor | None, sample_type: torch.Tensor | None,
              collect_aux: bool = True, sequence_ids: torch.Tensor | None = None) -> None:
        self.token_mask = attention_mask.bool() if attention_mask is not None else None
        self.sample_type = sample_type
        self.sequence_ids = sequence_ids
        self.collect_aux = collect_aux
        self.router_logits.clear()
        self.router_masks.clear()
        self.aux.clear()

    def flat_mask(self, num_tokens: int) -> torch.Tensor | None:
        """Token mask flattened to [T] when it describes these tokens (not during cached decoding)."""
        if self.token_mask is None or self.token_mask.numel() != num_tokens:
            return None
        return self.token_mask.reshape(-1)

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        if not self.collect_aux:
            return
        self.aux[name] = self.aux[name] + value if name in self.aux else value
