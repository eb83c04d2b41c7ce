"""Experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning", arXiv 1902.10486),
shared by the replay methods (ER, I-LoRA): a reservoir buffer of training examples with its (safetensors-able)
state, and `ReplayModel`, the training step that mixes a replay batch into every step.

Training step (`ReplayModel.forward` in training mode with labels; the trainer only calls `model(**batch)`):
1. draw a replay batch of the same size as the current one from the buffer (rule below);
2. add the current batch to the buffer (reservoir sampling, `replay_capacity` examples, CPU token tensors);
3. loss = (CE(current) + CE(replay)) / 2 + the method's extra term on the replay batch (`replay_terms`: none
   for ER, I-LoRA's consistency loss). With nothing to replay, loss = CE(current).

Replay rule (`replay_from` of the method's config):
- "seen": any example added at an earlier step, of any task so far (replay starts at the second step; the
  current batch never replays itself);
- "previous_tasks": only examples of tasks before the current one (the continual setting: no replay during
  the first task). `start_task()` between tasks (the continual runner calls it) moves the task id.
When fewer eligible examples than the batch size are stored, the replay batch is drawn with replacement.
The buffer and the task id are training state (`training_state`): checkpointed, not saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import AdapterConfig
from .model import AdapterModel, causal_lm_output


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

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able metadata) that restore the buffer exactly: the stored examples, how many were
        offered, and the sampling generator (tensors go to safetensors; nothing is pickled)."""
        tensors: dict[str, torch.Tensor] = {"generator": self.generator.get_state()}
        for i, ex in enumerate(self.examples):
            tensors[f"example.{i}.input_ids"] = ex.input_ids.contiguous()
            tensors[f"example.{i}.labels"] = ex.labels.contiguous()
        return tensors, {"seen": self.seen, "tasks": [ex.task for ex in self.examples]}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of `state`."""
        self.examples = [ReplayExample(tensors[f"example.{i}.input_ids"], tensors[f"example.{i}.labels"], task)
                         for i, task in enumerate(meta["tasks"])]
        self.seen = int(meta["seen"])
        self.generator.set_state(tensors["generator"])


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


class ReplayModel(AdapterModel):
    """AdapterModel whose training forward mixes in a replay batch (module docstring). The config must have
    `replay_capacity` and `replay_from`; subclasses add terms on the replay batch by overriding `replay_terms`."""

    supports_packing = False  # the replay buffer stores whole rows

    def __init__(self, base_model: nn.Module, adapter_config: AdapterConfig) -> None:
        super().__init__(base_model, adapter_config)
        self.replay = ReplayBuffer(adapter_config.replay_capacity)
        self.task_id = 0
        self.last_replay: dict[str, torch.Tensor] | None = None

    def start_task(self, task_id: int | None = None) -> int:
        """Begin the next task of a sequence (or `task_id`); examples added from now carry this id."""
        super().start_task(task_id)
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

    def _draw_replay(self, n: int, device: torch.device) -> dict[str, torch.Tensor] | None:
        before = self.task_id if self.adapter_config.replay_from == "previous_tasks" else None
        pool = self.replay.eligible(before)
        if not pool:
            return None
        return collate_replay(self.replay.sample(n, pool), device)

    def replay_pass(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(CE, decoder layer outputs) of the adapted model on a replay batch."""
        self.ctx.begin(batch["attention_mask"], None)
        decoder = self.base_model.get_decoder()
        dec = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True, use_cache=False)
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        logits = self.base_model.get_output_embeddings()(dec.last_hidden_state[:, :-1][keep]).float()
        ce = F.cross_entropy(logits, targets[keep]) if logits.shape[0] else logits.sum() * 0.0
        return ce, tuple(dec.hidden_states[1:])

    def replay_terms(self, replay: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(CE on the replay batch, an extra loss term or None, auxiliary values to log)."""
        ce, _ = self.replay_pass(replay)
        return ce, None, {"replay_ce": ce.detach()}

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
        replay_ce, extra, aux = self.replay_terms(replay)
        loss = (out.loss + replay_ce) / 2 + (extra if extra is not None else 0.0)
        self._last_aux = aux
        return causal_lm_output(loss, out.logits, out)
