"""I-LoRA's training step: experience replay plus the consistency loss, and the slow learner's EMA move."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...config import AdapterConfig
from ...model import AdapterModel, causal_lm_output
from .config import ILoraConfig
from .layer import ILoraLinear, ema_coefficient
from .replay import ReplayBuffer, collate_replay


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


class ILoraModel(AdapterModel):
    """AdapterModel whose training forward adds experience replay and the consistency loss, and whose
    `after_optimizer_step` moves the slow learner (module docstring for the rules)."""

    supports_packing = False  # the replay buffer stores whole rows

    def __init__(self, base_model: nn.Module, adapter_config: AdapterConfig) -> None:
        super().__init__(base_model, adapter_config)
        assert isinstance(adapter_config, ILoraConfig)
        self.replay = ReplayBuffer(adapter_config.replay_capacity)
        self.task_id = 0
        self.last_replay: dict[str, torch.Tensor] | None = None

    def ilora_layers(self) -> list[ILoraLinear]:
        return [m for m in self.base_model.modules() if isinstance(m, ILoraLinear)]

    def start_task(self, task_id: int | None = None) -> int:
        """Begin the next task of a sequence (or `task_id`); examples added from now carry this id."""
        self.task_id = self.task_id + 1 if task_id is None else task_id
        return self.task_id

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The replay buffer (examples, reservoir count, generator) and the task id: training state a
        checkpoint needs to continue exactly, beside the adapter weights (the trainer's method hook)."""
        tensors, meta = self.replay.state()
        return tensors, {**meta, "task_id": self.task_id}

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.replay.load_state(tensors, meta)
        self.task_id = int(meta.get("task_id", 0))

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

    def _draw_replay(self, n: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        before = self.task_id if self.adapter_config.replay_from == "previous_tasks" else None
        pool = self.replay.eligible(before)
        if not pool:
            return None
        return collate_replay(self.replay.sample(n, pool), device)

    def _replay_pass(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(CE, decoder layer outputs) of the active learner on a replay batch."""
        self.ctx.begin(batch["attention_mask"], None)
        decoder = self.base_model.get_decoder()
        dec = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True, use_cache=False)
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logits = self.base_model.get_output_embeddings()(dec.last_hidden_state[:, :-1][keep]).float()
        ce = F.cross_entropy(logits, targets[keep]) if logits.shape[0] else logits.sum() * 0.0
        return ce, tuple(dec.hidden_states[1:])

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        if not (self.training and labels is not None and input_ids is not None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   **kwargs)
        replay = self._draw_replay(input_ids.shape[0], input_ids.device)
        self.replay.add_batch(input_ids, attention_mask, labels, self.task_id)
        self.last_replay = replay
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if replay is None:
            return out
        with self.use_learner("fast"):
            replay_ce, h_fast = self._replay_pass(replay)
        with torch.no_grad(), self.use_learner("slow"):
            _, h_slow = self._replay_pass(replay)
        cons = consistency_loss(h_fast, h_slow, replay["attention_mask"])
        loss = (out.loss + replay_ce) / 2 + self.adapter_config.consistency_weight * cons
        self._last_aux = {"replay_ce": replay_ce.detach(), "consistency": cons.detach()}
        return causal_lm_output(loss, out.logits, out)
