"""Train an `AdapterModel` (any method) with transformers' `Trainer`, or a subclass of it such as TRL's
`SFTTrainer`, with their usual arguments (bf16, gradient accumulation, gradient checkpointing, save/eval steps).

What the glue does:
- `SlimPeftCallback` calls `model.after_optimizer_step()` after every optimizer step: SLIM's cluster statistics
  move once per step, and I-LoRA's slow learner follows the fast one.
- `AdapterTrainerMixin` makes checkpoints hold only the adapter: adapter_config.json, adapter_model.safetensors
  (with SLIM's cluster buffers), README.md and the method's training state (I-LoRA's replay buffer), instead of
  the base model's whole state dict. It also loads them back on `resume_from_checkpoint`.
- The auxiliary losses are already part of `AdapterModel`'s loss. The model declares `accepts_loss_kwargs =
  False`, so the Trainer scales the loss for gradient accumulation itself.

Usage::

    from transformers import TrainingArguments
    from slim_peft.integrations.hf_trainer import SlimPeftTrainer

    model = sp.get_adapter_model(base, sp.SlimConfig())
    trainer = SlimPeftTrainer(model=model, args=TrainingArguments("out", bf16=True, gradient_checkpointing=True,
                              remove_unused_columns=False), train_dataset=rows, data_collator=collator)
    trainer.train()                       # out/checkpoint-*/adapter_model.safetensors: the adapter only
    sp.AdapterModel.from_pretrained(base2, "out/checkpoint-500")

With TRL, mix it into the trainer class: ``class SlimSFT(AdapterTrainerMixin, SFTTrainer): ...``, and pass
``callbacks=[SlimPeftCallback()]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from slim_peft.adapters import AdapterModel
from slim_peft.adapters.io import WEIGHTS_NAME
from slim_peft.training.checkpoint import load_method_state, save_method_state


class SlimPeftCallback(TrainerCallback):
    """`model.after_optimizer_step()` after each optimizer step, in every process."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        target = getattr(model, "module", model)  # a DDP wrapper's module
        if hasattr(target, "after_optimizer_step"):
            target.after_optimizer_step()


class AdapterTrainerMixin:
    """For a `transformers.Trainer` subclass: checkpoints and the final save hold the adapter only."""

    def _adapter_model(self) -> AdapterModel | None:
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        return model if isinstance(model, AdapterModel) else None

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """transformers' own `compute_loss` (the model's loss, auxiliary losses included) for an AdapterModel,
        also under a subclass that computes its loss another way (TRL's SFTTrainer scores tokens with a fused
        LM head on the backbone, which would skip the adapters' auxiliary losses; its token-accuracy and
        entropy metrics are not logged then)."""
        if self._adapter_model() is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        inputs = {k: v for k, v in inputs.items() if k != "fused_lm_head"}
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)  # type: ignore[arg-type]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """6 N T, N all parameters (our `num_parameters()` is a (trainable, total) pair, not transformers' int)."""
        model = self._adapter_model()
        if model is None or "input_ids" not in inputs:
            return super().floating_point_ops(inputs)  # type: ignore[misc]
        return 6 * inputs["input_ids"].numel() * model.num_parameters()[1]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        gathered = model.adapter_state_dict()  # every process gathers (FSDP), one writes
        if not args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.write_adapter_files(output_dir, gathered)
        save_method_state(model, Path(output_dir))
        tokenizer = getattr(self, "processing_class", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        adapter = self._adapter_model() if model is None else getattr(model, "module", model)
        if not isinstance(adapter, AdapterModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        path = Path(resume_from_checkpoint)
        adapter.load_adapter_state_dict(load_file(str(path / WEIGHTS_NAME)), source=str(path))
        load_method_state(adapter, path)
        return None


class SlimPeftTrainer(AdapterTrainerMixin, Trainer):
    """`transformers.Trainer` for an `AdapterModel`: adapter-only checkpoints and `SlimPeftCallback`."""

    def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
        callbacks = list(callbacks or [])
        if not any(isinstance(c, SlimPeftCallback) for c in callbacks):
            callbacks.append(SlimPeftCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
