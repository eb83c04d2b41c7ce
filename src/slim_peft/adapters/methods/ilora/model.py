"""I-LoRA's training step: experience replay (`adapters/replay.py`) plus the consistency loss, and the slow
learner's EMA move."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...config import AdapterConfig
from ...replay import ReplayModel
from .config import ILoraConfig
from .layer import ILoraLinear, ema_coefficient


def consistency_loss(fast: tuple[torch.Tensor, ...], slow: tuple[torch.Tensor, ...],
                     mask: torch.Tensor | None) -> torch.Tensor:
    """L_cons = mean over layers, valid tokens and channels of (H_fast - max(H_fast, H_slow))^2."""
    per_layer = []
    for hf, hs in zip(fast, slow, strict=True):
        sq = (hf - torch.maximum(hf, hs.detach())).float() ** 2  # B x S x C
        if mask is None:
            per_layer.append(sq.mean())
        else:
            m = mask.to(sq.dtype).unsqueeze(-1)
            per_layer.append((sq * m).sum() / (m.sum() * sq.shape[-1]).clamp(min=1))
    return torch.stack(per_layer).mean()


class ILoraModel(ReplayModel):
    """`ReplayModel` whose replay batch also carries the consistency loss towards the slow learner, and whose
    `after_optimizer_step` moves the slow learner (module docstring of the package for the rules)."""

    def __init__(self, base_model: nn.Module, adapter_config: AdapterConfig) -> None:
        assert isinstance(adapter_config, ILoraConfig)
        super().__init__(base_model, adapter_config)

    def ilora_layers(self) -> list[ILoraLinear]:
        return [m for m in self.base_model.modules() if isinstance(m, ILoraLinear)]

    def after_optimizer_step(self) -> None:
        """Move the slow learner towards the fast one (every layer shares the step count)."""
        super().after_optimizer_step()
        layers = self.ilora_layers()
        a = ema_coefficient(int(layers[0].ema_step), self.adapter_config.ema_alpha)
        for layer in layers:
            layer.ema_update(a)

    @contextlib.contextmanager
    def use_learner(self, learner: str | None) -> Iterator[None]:
        """Force every layer to the "fast" or "slow" learner inside the block."""
        layers = self.ilora_layers()
        previous = [layer.learner for layer in layers]
        for layer in layers:
            layer.learner = learner
        try:
            yield
        finally:
            for layer, old in zip(layers, previous, strict=True):
                layer.learner = old

    def replay_terms(self, replay: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """CE of the fast learner on the replay batch, and gamma L_cons against the slow learner's states."""
        with self.use_learner("fast"):
            replay_ce, h_fast = self.replay_pass(replay)
        with torch.no_grad(), self.use_learner("slow"):
            _, h_slow = self.replay_pass(replay)
        cons = consistency_loss(h_fast, h_slow, replay["attention_mask"])
        aux = {"replay_ce": replay_ce.detach(), "consistency": cons.detach()}
        return replay_ce, self.adapter_config.consistency_weight * cons, aux
