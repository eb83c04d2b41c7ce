"""Plan a training run without the weights: the model built on the meta device with the method injected, and
what the run will hold in memory.

`plan(config, method)` counts the trainable parameters of the injected meta model and gives the adapter file size,
the fp32 gradients and AdamW state, the base weights in the training dtype and the activations autograd saves for
one micro-batch, with and without gradient checkpointing (the closed form is in `activations.py`, checked there
against `measure_activation_bytes`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slim_peft.adapters import AdapterConfig, AdapterModel, config_from_dict, get_adapter_model
from slim_peft.adapters.methods.slim.layer import SlimLinear
from slim_peft.adapters.modules.dare import exact_form_bytes
from slim_peft.adapters.targeting import find_targets
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.errors import ConfigError, closest

from .activations import ActivationEstimate, Workload, estimate_activations, measure_activation_bytes

__all__ = [
    "MODEL_SHAPES", "ActivationEstimate", "TrainingPlan", "Workload", "estimate_activations", "exact_merge_memory",
    "format_plan", "format_plans", "injected_meta_model", "load_model_config", "measure_activation_bytes",
    "meta_model", "plan",
]

# transformers config dicts of the models planned by name (the published config.json values that shape the model)
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                       sliding_window=131072, max_window_layers=28, bos_token_id=151643, eos_token_id=151643),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                       rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
    # SmolLM2-135M-Instruct, the embedded model (its converted config.json, without reading the weights)
    EMBEDDED_MODEL: dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
}
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ADAPTER_BYTES = 4  # adapters are trained in fp32, whatever the base dtype
ADAMW_STATE_BYTES = 8  # two fp32 moments per trainable parameter


# --- the model, without weights -----------------------------------------------------------------------------

def load_model_config(id_or_path: str) -> Any:
    """A transformers config: a name of MODEL_SHAPES, a local directory or config.json, or a Hugging Face id
    ("org/name", read from the cache or the Hub). Remote code is never run."""
    from transformers import AutoConfig

    if id_or_path in MODEL_SHAPES:
        shape = dict(MODEL_SHAPES[id_or_path])
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
        config.name_or_path = id_or_path
        return config
    path = Path(id_or_path).expanduser()
    if path.is_file():
        config = _config_from_json(path)
        config.name_or_path = str(path)
        return config
    if path.is_dir():
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} holds no usable config.json: {str(e).splitlines()[0]}") from e
    if id_or_path.startswith((".", "/", "~")) or id_or_path.endswith(".json"):
        raise ConfigError(f"no model config at {id_or_path}: the path is neither a config.json nor a directory")
    if "/" not in id_or_path:  # a Hub id is org/name; anything else is a mistyped built-in name
        raise ConfigError(f"unknown model {id_or_path!r}{closest(id_or_path, MODEL_SHAPES)}: give one of "
                          f"{sorted(MODEL_SHAPES)}, a local directory or config.json, or a Hugging Face id org/name")
    return _hub_config(id_or_path)


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        raw = json.loads(path.read_text())
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path} is not a transformers config.json with a known model_type: {e}") from e


def _hub_config(model_id: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the config of {model_id!r} from the Hugging Face Hub ({str(e).splitlines()[0]}"
                          f"). Download its config.json and pass that path, log in for a gated model (hf auth "
                          f"login), or use a built-in shape: {sorted(MODEL_SHAPES)}") from e


def meta_model(config: Any) -> nn.Module:
    """The causal LM of `config` on the meta device: shapes and dtypes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def injected_meta_model(config: Any, adapter: AdapterConfig, dtype: str = "bf16") -> AdapterModel:
    """`meta_model(config)` in `dtype` with `adapter` injected (the adapters stay fp32)."""
    return get_adapter_model(meta_model(config).to(_torch_dtype(dtype)), adapter)


def _torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}{closest(name, DTYPES)}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


# --- sizes ----------------------------------------------------------------------------------------------------

def adapter_bytes(model: AdapterModel) -> int:
    """Bytes of adapter_model.safetensors: the adapter tensors at their dtypes plus the safetensors header."""
    state = model.adapter_state_dict()
    data = sum(t.numel() * t.element_size() for t in state.values())
    return data + _safetensors_header_bytes(state)


def _safetensors_header_bytes(state: dict[str, torch.Tensor]) -> int:
    """8 bytes of length + the JSON header (names, dtypes, shapes, offsets, the "format" metadata), padded to 8."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in sorted(state.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):  # safetensors order
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES.get(t.dtype, "F32"), "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    size = len(json.dumps(header, separators=(",", ":")))
    return 8 + size + (-size) % 8


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                       torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8", torch.float64: "F64"}


def exact_merge_memory(model_or_config: Any, cfg: Any) -> int:
    """Peak extra bytes of SLIM's exact DARE form (`merge_form="exact"`) in training, whatever `cfg.merge_form`
    says: the largest adapted projection's E dense fp32 d_out x d_in masked updates together with their boolean
    keep mask, E d_out d_in (4 + 1) bytes, formed in its forward and again in its backward (one projection at a
    time: the masks are redrawn in backward from their RNG state, not kept). 0 without dynamic merging
    (mask_ratio 0). `model_or_config`: a transformers model (adapters injected or not), an AdapterModel, a
    transformers config or a name for `load_model_config`."""
    if cfg.mask_ratio == 0:
        return 0
    return max(exact_form_bytes(cfg.num_lora_experts, i, o) for _, i, o in _adapted_linears(model_or_config, cfg))


def _adapted_linears(model_or_config: Any, cfg: Any) -> list[tuple[str, int, int]]:
    """(name, d_in, d_out) of each linear `cfg.target_modules` adapts, in an injected model or a plain one."""
    model = model_or_config
    if isinstance(model, str):
        model = load_model_config(model)
    if not isinstance(model, nn.Module):
        model = meta_model(model)
    if isinstance(model, AdapterModel):
        model = model.base_model
    injected = [(n, m.base_layer) for n, m in model.named_modules() if isinstance(m, SlimLinear)]
    if injected:
        return [(n, b.in_features, b.out_features) for n, b in injected]
    return [(n, (lin := model.get_submodule(n)).in_features, lin.out_features)
            for n in find_targets(model, cfg.target_modules)]


# --- the plan ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingPlan:
    """What one training run of `method` on `model` holds in memory, in bytes (activations per micro-batch)."""

    model: str
    method: str
    dtype: str
    micro_batch: int
    seq_len: int
    device: str
    adapter_config: dict[str, Any]
    total_parameters: int
    trainable_parameters: int
    base_weight_bytes: int
    adapter_file_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activation_bytes_checkpointed: int
    exact_merge_bytes: int | None = None  # SLIM only: the exact DARE form's extra peak (`exact_merge_memory`)

    @property
    def fixed_bytes(self) -> int:
        """Base weights, adapter weights (the file's tensors), gradients and AdamW state."""
        return self.base_weight_bytes + self.adapter_file_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def peak_bytes(self) -> int:
        return self.fixed_bytes + self.activation_bytes

    @property
    def peak_bytes_checkpointed(self) -> int:
        return self.fixed_bytes + self.activation_bytes_checkpointed

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(fixed_bytes=self.fixed_bytes, peak_bytes=self.peak_bytes,
                 peak_bytes_checkpointed=self.peak_bytes_checkpointed)
        return d


def plan(config: Any, method: str, overrides: dict[str, Any] | None = None, micro_batch: int = 1,
         seq_len: int = 2048, dtype: str = "bf16", *, device: str = "cuda", supervised: float = 1.0,
         padded: bool = True) -> TrainingPlan:
    """The memory and size plan of training `method` (its default config updated by `overrides`) on `config`
    (a transformers config or a name/path for `load_model_config`), without weights."""
    name = config if isinstance(config, str) else getattr(config, "name_or_path", "") or type(config).__name__
    if isinstance(config, str):
        config = load_model_config(config)
    check_workload(micro_batch, seq_len, supervised)
    adapter = config_from_dict({**(overrides or {}), "method": method})
    model = injected_meta_model(config, adapter, dtype)
    trainable, total = model.num_parameters()
    w = Workload(micro_batch, seq_len, _torch_dtype(dtype).itemsize, device, supervised, padded)
    act = estimate_activations(model, w)
    exact = exact_merge_memory(model, adapter) if hasattr(adapter, "merge_form") else None
    extra = exact if exact is not None and adapter.merge_form == "exact" else 0
    return TrainingPlan(name, method, dtype, micro_batch, seq_len, device, adapter.to_dict(), total, trainable,
                        (total - trainable) * w.dtype_bytes, adapter_bytes(model), ADAPTER_BYTES * trainable,
                        ADAMW_STATE_BYTES * trainable, act.full + extra, act.checkpointed + extra, exact)


def check_workload(micro_batch: int, seq_len: int, supervised: float) -> None:
    if micro_batch < 1:
        raise ConfigError(f"the micro-batch must hold at least 1 row, got {micro_batch}")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2 (a token and its next), got {seq_len}")
    if not 0 <= supervised <= 1:
        raise ConfigError(f"supervised is the share of positions with a label, in [0, 1]; got {supervised}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_plan(p: TrainingPlan) -> str:
    """The plan as a two-column table."""
    rows = [
        ("trainable parameters", f"{p.trainable_parameters:,} ({100 * p.trainable_parameters / p.total_parameters:.2f}%"
                                 f" of {p.total_parameters:,})"),
        ("adapter file", f"{human_bytes(p.adapter_file_bytes)} (adapter_model.safetensors, fp32)"),
        (f"base weights ({p.dtype})", human_bytes(p.base_weight_bytes)),
        ("gradients (fp32)", human_bytes(p.gradient_bytes)),
        ("AdamW state (2 x fp32)", human_bytes(p.optimizer_bytes)),
        ("activations / micro-batch", human_bytes(p.activation_bytes)),
        ("  with gradient checkpointing", human_bytes(p.activation_bytes_checkpointed)),
        ("peak memory estimate", human_bytes(p.peak_bytes)),
        ("  with gradient checkpointing", human_bytes(p.peak_bytes_checkpointed)),
    ]
    if p.exact_merge_bytes is not None:
        rows.append(('exact DARE form (merge_form="exact")', f"+{human_bytes(p.exact_merge_bytes)}"))
    width = max(len(k) for k, _ in rows)
    head = (f"{p.method} on {p.model}: micro-batch {p.micro_batch} x {p.seq_len} tokens, {p.dtype}, "
            f"activations as on {p.device}")
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def format_plans(plans: list[TrainingPlan]) -> str:
    """Several methods' plans side by side (one row each)."""
    cols = ["method", "trainable", "adapter file", "grads+AdamW", "activations", "act. (ckpt)", "peak", "peak (ckpt)"]
    rows = [[p.method, f"{p.trainable_parameters:,}", human_bytes(p.adapter_file_bytes),
             human_bytes(p.gradient_bytes + p.optimizer_bytes), human_bytes(p.activation_bytes),
             human_bytes(p.activation_bytes_checkpointed), human_bytes(p.peak_bytes),
             human_bytes(p.peak_bytes_checkpointed)] for p in plans]
    widths = [max(len(r[c]) for r in [cols, *rows]) for c in range(len(cols))]
    first = plans[0]
    head = (f"{first.model}: micro-batch {first.micro_batch} x {first.seq_len} tokens, {first.dtype}, base weights "
            f"{human_bytes(first.base_weight_bytes)}, activations as on {first.device}")
    lines = [head, "  ".join(c.ljust(wd) for c, wd in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(wd) for v, wd in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


