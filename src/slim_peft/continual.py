"""I-LoRA (Ren et al. 2024, arXiv 2402.18865; official code which47/LLMCL `method/ILORA.py`): dual-memory
experience replay on LoRA, as method.md "I-LoRA" specifies, plus the task mechanism of sequential training.

Two LoRA adapters on the same frozen base, in one `ILoraLinear` per target (default q, k, v, o):
- fast learner: `lora_A` / `lora_B` (trained, PEFT's layout);
- slow learner: buffers `slow_lora_A` / `slow_lora_B` (saved, not trained), updated after every optimizer
  step by EMA interpolation (`ILoraModel.after_optimizer_step`):
      slow <- a slow + (1 - a) fast,   a = min(1 - 1 / (step + 1), ema_alpha)
  so step 0 copies the fast learner (a = 0). `ema_alpha` 0.99 by default; the official code uses 0.25.

Training step (`ILoraModel.forward` in training mode with labels; the trainer only calls `model(**batch)`
and `model.after_optimizer_step()`):
1. draw a replay batch of the same size as the current one from the buffer (rule below);
2. add the current batch to the buffer (reservoir sampling, `replay_capacity` examples, CPU token tensors);
3. loss = (CE(current) + CE(replay)) / 2 + gamma L_cons, gamma = `consistency_weight`, with
   L_cons = mean over layers, tokens and channels of (H_fast - max(H_fast, H_slow))^2 on the replay batch:
   H are the decoder layers' outputs (`hidden_states[1:]`; the embedding output is the same for both
   learners and would only dilute the mean), padding excluded; H_slow under no_grad, without LoRA dropout.
   Only entries where the fast state is below the slow one are penalised, as the official code does.
   With nothing to replay, loss = CE(current) (the official first task).

Replay rule (`replay_from`):
- "seen" (default): any example added at an earlier step, of any task so far. Replay starts at the second
  step; the current batch never replays itself. In single-stage training (no `start_task` call) the buffer
  holds only the current task's data: I-LoRA then regularises towards its own EMA on that task, which is
  what results must say. (The official buffer also fills with current-task data but replays only after
  the first task.)
- "previous_tasks": only examples of tasks before the current one (the paper's continual setting); no
  replay during the first task. Call `model.start_task()` between tasks.
When fewer eligible examples than the batch size are stored, the replay batch is drawn with replacement.

Evaluation: in eval mode the layers use the slow learner (`eval_with="slow"`, the paper) or the fast one.
`merge_and_unload` is allowed and folds the `eval_with` learner (slow by default) into the base weights.
The replay buffer is training state: it is not saved with the adapter (save/load keeps both learners and
the EMA step count).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import AdapterConfig, ILoraConfig
from .layers.base import ForwardContext, Method, find_targets, set_module
from .layers.lora import LoraLinear
from .model import AdapterModel, causal_lm_output


class ILoraLinear(LoraLinear):
    """LoRA with a fast learner (`lora_A`, `lora_B`: trained) and a slow learner (`slow_lora_A`,
    `slow_lora_B`: EMA buffers). `learner` forces one ("fast" / "slow"); None: fast in training mode, the
    `eval_with` learner in eval mode."""

    def __init__(self, base_layer: nn.Linear, cfg: ILoraConfig) -> None:
        super().__init__(base_layer, cfg.r, cfg.lora_alpha, cfg.lora_dropout)
        self.eval_with = cfg.eval_with
        self.learner: str | None = None
        self.register_buffer("slow_lora_A", self.lora_A.weight.detach().clone())
        self.register_buffer("slow_lora_B", self.lora_B.weight.detach().clone())
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long, device=base_layer.weight.device))

    def active_learner(self) -> str:
        return self.learner or ("fast" if self.training else self.eval_with)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_learner() == "fast":
            return super().forward(x)
        result = self.base_layer(x)
        slow = F.linear(F.linear(x.to(self.slow_lora_A.dtype), self.slow_lora_A), self.slow_lora_B)
        return result + (self.scaling * slow).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B A of the `eval_with` learner: what `merged()` (merge_and_unload) folds into W."""
        if self.eval_with == "fast":
            return super().delta_weight()
        return self.scaling * (self.slow_lora_B @ self.slow_lora_A)

    @torch.no_grad()
    def ema_update(self, a: float) -> None:
        """slow <- a slow + (1 - a) fast; step += 1."""
        self.slow_lora_A.mul_(a).add_(self.lora_A.weight.detach(), alpha=1.0 - a)
        self.slow_lora_B.mul_(a).add_(self.lora_B.weight.detach(), alpha=1.0 - a)
        self.ema_step += 1


def ema_coefficient(step: int, ema_alpha: float) -> float:
    """a = min(1 - 1 / (step + 1), ema_alpha) (official `update_ema_model`): 0 at step 0 (slow := fast)."""
    return min(1.0 - 1.0 / (step + 1), ema_alpha)


def inject_ilora(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> None:
    assert isinstance(cfg, ILoraConfig)
    for name in find_targets(model, cfg.target_modules):
        set_module(model, name, ILoraLinear(model.get_submodule(name), cfg))


@dataclass
class ReplayExample:
    input_ids: torch.Tensor  # 1-D, CPU, the example's real tokens only
    labels: torch.Tensor  # 1-D, CPU, -100 where not supervised
    task: int


class ReplayBuffer:
    """Reservoir sampling (Vitter's algorithm R): after n examples were offered, each is held with
    probability capacity / n. Examples are stored on the CPU without their padding."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.examples: list[ReplayExample] = []
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, example: ReplayExample) -> None:
        self.seen += 1
        if len(self.examples) < self.capacity:
            self.examples.append(example)
            return
        j = int(torch.randint(self.seen, (1,), generator=self.generator))
        if j < self.capacity:
            self.examples[j] = example

    def add_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  task: int) -> None:
        ids, labels = input_ids.detach().cpu(), labels.detach().cpu()
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        mask = attention_mask.detach().cpu().bool()
        for row in range(ids.shape[0]):
            keep = mask[row]
            self.add(ReplayExample(ids[row][keep].clone(), labels[row][keep].clone(), task))

    def eligible(self, before_task: int | None = None) -> list[int]:
        """Indices of stored examples; with `before_task`, only those of tasks < before_task."""
        return [i for i, ex in enumerate(self.examples) if before_task is None or ex.task < before_task]

    def sample(self, n: int, pool: list[int]) -> list[ReplayExample]:
        """n examples of `pool`, without replacement when it holds at least n, else with replacement."""
        if len(pool) >= n:
            picks = torch.randperm(len(pool), generator=self.generator)[:n]
        else:
            picks = torch.randint(len(pool), (n,), generator=self.generator)
        return [self.examples[pool[int(i)]] for i in picks]


def collate_replay(examples: list[ReplayExample], device: torch.device, pad_id: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Right-pad examples into input_ids / attention_mask / labels (labels -100 on padding)."""
    length = max(ex.input_ids.numel() for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = ex.input_ids.numel()
        ids[row, :n], labels[row, :n], mask[row, :n] = ex.input_ids, ex.labels, 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


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

    def after_optimizer_step(self) -> None:
        """Move the slow learner towards the fast one (every layer shares the step count)."""
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


ILORA_METHOD = Method(peft_type="ILORA", inject=inject_ilora, model_cls=ILoraModel)
