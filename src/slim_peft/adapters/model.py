"""AdapterModel: injects a method's layers into a transformers causal LM, adds the auxiliary losses to the
task loss, and saves, loads and merges adapters in PEFT's layout.

Saved layout: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module path>.<param>` (PEFT's). LoRA and DoRA adapters load in stock
`peft.PeftModel.from_pretrained`; every method records its own `peft_type` and our full config under the
key `slim_peft`, with a fingerprint of the base model that `from_pretrained` checks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from slim_peft.data.batching import packed_attention_mask
from slim_peft.errors import AdapterError

from .card import CARD_NAME, model_card
from .config import AdapterConfig
from .context import ForwardContext
from .io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, base_fingerprint, check_base_model, read_adapter_config
from .modules.statistics import commit_pending, full_tensor
from .registry import MethodSpec, get_method
from .targeting import find_targets

# The cache field of transformers' model outputs: `cache` in transformers 5 (where `past_key_values` is an alias
# that logs a deprecation warning on every use), `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def causal_lm_output(loss: torch.Tensor | None, logits: torch.Tensor, source: Any) -> CausalLMOutputWithPast:
    """An output with ``loss`` and ``logits`` that passes on ``source``'s cache, under the installed field name."""
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(source, CACHE_FIELD, None)})


class AdapterModel(nn.Module):
    """A transformers causal LM with adapter layers injected and the base weights frozen.

    `forward` returns a `CausalLMOutputWithPast` whose `loss` is the task loss plus the weighted auxiliary
    losses of the method. With `labels`, logits are computed only where a label is supervised (the 49k-word
    LM head dominates the cost of a small model); with `logits_mask` ([B, S] bool), only at those positions,
    returned flattened in row-major order.
    """

    # transformers' Trainer: the loss is a mean over this micro-batch's supervised tokens (it scales it for
    # gradient accumulation itself; no `num_items_in_batch` is passed in)
    accepts_loss_kwargs = False
    supports_packing = True  # data.PackingCollator batches (a method with per-row state may say False)

    def __init__(self, base_model: nn.Module, adapter_config: AdapterConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.adapter_config = adapter_config
        self.method: MethodSpec = get_method(adapter_config.method)
        self.ctx = ForwardContext()
        self._base_keys = set(base_model.state_dict().keys())
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.method.inject(base_model, adapter_config, self.ctx)
        self._last_aux: dict[str, torch.Tensor] = {}
        self.card_sections: dict[str, str] = {}  # title -> markdown, added to the model card (README.md)
        self.model_tags: list[str] = []  # the card's extra tags (TRL adds its own, as on transformers models)
        if adapter_config.base_model_name_or_path is None:
            adapter_config.base_model_name_or_path = getattr(base_model.config, "name_or_path", None)

    # --- forward -------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.base_model.config

    @property
    def generation_config(self):
        return getattr(self.base_model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, sample_type: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None, sequence_ids: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        self.ctx.begin(attention_mask, sample_type, sequence_ids=sequence_ids)
        if sequence_ids is not None:  # a packed batch (data.PackingCollator): each example attends to itself
            attention_mask = packed_attention_mask(
                sequence_ids, getattr(self.base_model.config, "_attn_implementation", None),
                self.base_model.get_input_embeddings().weight.dtype)
        if labels is None and logits_mask is None:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            self._collect_aux()
            return out
        kwargs.setdefault("use_cache", False)
        decoder = self.base_model.get_decoder()
        dec = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = dec.last_hidden_state
        head = self.base_model.get_output_embeddings()
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            keep = targets != -100
            logits = head(hidden[:, :-1][keep]).float()
            loss = F.cross_entropy(logits, targets[keep]) if logits.shape[0] else hidden.sum() * 0.0
            aux = self._collect_aux()
            for value, weight in aux.values():
                if weight:
                    loss = loss + weight * value
        else:
            self._collect_aux()
        if logits_mask is not None:
            logits = head(hidden[logits_mask.bool()]).float()
        return causal_lm_output(loss, logits, dec)

    def _collect_aux(self) -> dict[str, tuple[torch.Tensor, float]]:
        aux = self.method.aux_losses(self.base_model, self.adapter_config, self.ctx)
        self._last_aux = {k: v for k, (v, _) in aux.items()}
        return aux

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses of the last forward (name -> scalar tensor)."""
        return dict(self._last_aux)

    # --- the trainer's hooks (a method that changes the training step overrides them) -----------------------
    def after_optimizer_step(self) -> None:
        """Called after each optimizer step, in every process (the trainer does; in a loop of your own, call
        it after `optimizer.step()`): applies what this step's forward passes accumulated (SLIM's clusters,
        once, all-reduced under DDP: `modules/statistics.py`). Methods with more (I-LoRA's EMA) extend it."""
        modules = self.__dict__.get("_pending_modules")
        if modules is None:
            modules = [m for m in self.base_model.modules() if hasattr(m, "apply_pending")]
            self.__dict__["_pending_modules"] = modules
        commit_pending(modules, self.device)

    def start_task(self, task_id: int | None = None) -> int:
        """Begin the next task of a sequence (the continual runner calls it between stages): every adapter
        module with an `on_task_boundary` hook runs it (SLIM keeps the finished task's clusters); methods with
        task-aware training state (the replay buffers) also keep the id."""
        for module in self.base_model.modules():
            if hasattr(module, "on_task_boundary"):
                module.on_task_boundary()
        return 0 if task_id is None else task_id

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Training state outside the adapter weights that a checkpoint must hold to continue exactly, as
        (tensors, JSON-able metadata); None when the method has none (every method but I-LoRA)."""
        return None

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of `training_state`."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        **kwargs: Any) -> None:
        """Checkpoint every decoder layer of the base model, non-reentrant unless asked otherwise: the recompute
        then runs with autograd on, so tensors the adapters hand out of a layer (router logits for the
        balance losses) keep their graph, and the adapters' statistics skip it (`modules/statistics.py`).
        transformers' Trainer calls this when `gradient_checkpointing=True`."""
        ckpt = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """The older name of `activation_checkpointing_enable` (transformers before 5.2x)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def generate(self, *args: Any, **kwargs: Any):
        self.ctx.begin(kwargs.get("attention_mask"), None, collect_aux=False)
        return self.base_model.generate(*args, **kwargs)

    # --- parameters and statistics -------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def routing_stats(self) -> dict[str, Any]:
        """Per routed site: tokens seen, share of routing weight on identity experts, load per expert,
        accumulated since the last `reset_routing_stats()`; plus the mean identity share."""
        sites = {name: m.stats() for name, m in self.base_model.named_modules()
                 if hasattr(m, "stats") and hasattr(m, "reset_stats")}  # every method's routers
        shares = [s["identity_share"] for s in sites.values() if "identity_share" in s]
        return {"sites": sites, "mean_identity_share": sum(shares) / len(shares) if shares else None}

    def reset_routing_stats(self) -> None:
        for m in self.base_model.modules():
            if hasattr(m, "reset_stats"):
                m.reset_stats()

    def force_routing(self, weights: list[float] | None) -> None:
        """Give every token these expert weights at every SLIM site (None: learned routing). Used for
        analysis: all weight on identity experts is the base model."""
        for m in self.base_model.modules():
            if hasattr(m, "forced"):  # SLIM's routers
                m.forced = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    # --- save / load / merge -------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter parameters and persistent buffers, with PEFT's key prefix. Under FSDP the sharded
        parameters are gathered whole, so every process must call it (the trainer does)."""
        out = {}
        for k, v in self.base_model.state_dict().items():
            if ".base_layer." in k or k in self._base_keys:
                continue
            out[PREFIX + k] = full_tensor(v.detach()).contiguous()
        return out

    def _config_json(self) -> dict[str, Any]:
        cfg = self.adapter_config
        d: dict[str, Any] = {
            "peft_type": self.method.peft_type,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": cfg.base_model_name_or_path,
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in find_targets_after_injection(self)}),
            "slim_peft": {"config": cfg.to_dict(), "base_model": base_fingerprint(self.base_model)},
        }
        if self.method.peft_type == "LORA":  # LoRA and DoRA: the fields stock PEFT reads
            use_dora = any(getattr(m, "use_dora", False) for m in self.base_model.modules())
            d.update(use_dora=use_dora, bias="none", fan_in_fan_out=False,
                     init_lora_weights=True, inference_mode=True, use_rslora=False, modules_to_save=None)
        return d

    def save_pretrained(self, save_directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write adapter_config.json + adapter_model.safetensors atomically (temp dir, then rename).
        `state_dict`: `adapter_state_dict()` already gathered (under FSDP every process gathers, one saves)."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.write_adapter_files(tmp, state_dict)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_adapter_files(self, directory: str | os.PathLike,
                            state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """adapter_config.json, adapter_model.safetensors and README.md into an existing `directory` (a
        checkpoint of another trainer), each written to a temporary file and renamed into place."""
        directory = Path(directory)
        state = self.adapter_state_dict() if state_dict is None else state_dict
        weights = directory / f".{WEIGHTS_NAME}.tmp"
        save_file({k: v.cpu() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
        os.replace(weights, directory / WEIGHTS_NAME)
        config = directory / f".{CONFIG_NAME}.tmp"
        config.write_text(json.dumps(self._config_json(), indent=2, sort_keys=True))
        os.replace(config, directory / CONFIG_NAME)
        self.write_model_card(directory)

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags for the model card (transformers' `PreTrainedModel.add_model_tags`, which TRL calls)."""
        for tag in [tags] if isinstance(tags, str) else tags:
            if tag not in self.model_tags:
                self.model_tags.append(tag)

    def write_model_card(self, directory: str | os.PathLike) -> None:
        """README.md in `directory` (an adapter directory): base, method, config, parameters, `card_sections`."""
        (Path(directory) / CARD_NAME).write_text(model_card(self._config_json(), *self.num_parameters(),
                                                            self.card_sections, self.model_tags))

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_dir: str | os.PathLike) -> AdapterModel:
        """Load an adapter saved by `save_pretrained` (or a plain PEFT LoRA/DoRA adapter) onto `base_model`.
        Refuses an adapter trained on a base of another architecture or shape, naming the mismatch."""
        adapter_dir = Path(adapter_dir)
        raw, cfg = read_adapter_config(adapter_dir)
        check_base_model(base_model, raw.get("slim_peft", {}).get("base_model"), adapter_dir)
        weights = adapter_dir / WEIGHTS_NAME
        if not weights.is_file():
            raise AdapterError(f"{adapter_dir} holds no {WEIGHTS_NAME} (only safetensors weights are loaded)")
        model = get_adapter_model(base_model, cfg)
        model.load_adapter_state_dict(load_file(str(weights)), source=str(adapter_dir))
        return model

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise AdapterError(f"adapter weights in {source} do not fit this model: "
                               f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                               f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise AdapterError(f"adapter tensor {k} in {source} has shape {tuple(v.shape)}, this model "
                                   f"needs {tuple(expected[k].shape)}: the adapter was made for another base")
        stripped = {k[len(PREFIX):]: v for k, v in state.items()}
        self.base_model.load_state_dict(stripped, strict=False)
        for m in self.base_model.modules():  # host mirrors of loaded buffers
            if hasattr(m, "_ready"):
                m._ready = False

    def merge_and_unload(self) -> nn.Module:
        """The base model with the adapter folded into its weights (LoRA, DoRA); refuses routed methods."""
        if self.method.merge_refusal:
            raise AdapterError(f"merge_and_unload is not possible for {self.adapter_config.method}: "
                               f"{self.method.merge_refusal}")
        model = self.base_model
        for name, module in list(model.named_modules()):
            if hasattr(module, "merged") and hasattr(module, "base_layer"):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.merged())
        return model


def find_targets_after_injection(model: AdapterModel) -> list[str]:
    return [n for n, m in model.base_model.named_modules() if hasattr(m, "base_layer")]


def get_adapter_model(model: nn.Module, config: AdapterConfig) -> AdapterModel:
    """Inject `config`'s adapter into `model` (in place; base weights frozen) and wrap it."""
    spec = get_method(config.method)
    find_targets(model, config.target_modules)  # clear error before anything is changed
    cls = spec.model_class or AdapterModel
    return cls(model, config)


def selected_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    positions: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits (fp32) at the True entries of `positions` ([B, S] bool), flattened in row-major
    order, for an AdapterModel, a PEFT model or a plain transformers causal LM. The attention mask may be
    2D (padding) or a custom 4D additive mask (the evaluator's token trees, with their `position_ids`)."""
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    if isinstance(model, AdapterModel):
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_mask=positions, **kwargs).logits
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
    return model.get_output_embeddings()(hidden[positions.bool()]).float()
