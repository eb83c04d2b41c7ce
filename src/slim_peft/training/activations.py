"""The activations autograd saves in one training forward: a closed form per decoder layer and per adapter module
(`estimate_activations`), and the measurement that checks it (`measure_activation_bytes`).

Nothing is calibrated at run time: the terms are read off the forward code of transformers' Llama-style decoder
layer and of each method's layers (which tensors autograd saves, at which dtype).

Activation closed form, in bytes. T = micro_batch x seq_len tokens, N = supervised positions (B (S - 1) x the
supervised share), b = bytes of the base dtype, m = bytes per element of a dropout mask (4 on the CPU, where
`LoraDropout` multiplies by fp32 noise; 1 elsewhere, nn.Dropout's boolean mask; 0 without dropout). Dimensions: d
hidden, f intermediate, H heads, H_kv KV heads, h head_dim, V vocabulary, L layers. Per token and decoder layer:

    norms      2 (4 d + 4)               RMSNorm's fp32 copy of its input and its rsqrt, twice
    attention  b h (2 H + 2 H') + 4 H    q, k, v and the output for SDPA, its fp32 log-sum-exp; H' = H when the
                                         batch has padding (transformers then repeats k and v for SDPA), else H_kv
    FFN        3 b f                     the gate output (SiLU's input), SiLU's output and the up output

plus the adapter's layers (per adapted linear with d_in i, d_out o, rank r, E experts, K picks per token):

    LoRA       m i + 4 i + 4 r           the dropout mask, the fp32 dropped input (A's input), A's output
    DoRA       LoRA + 8 o; fixed 4 o i   W x and B A x in fp32; the fp32 copy of W that W x on dropout(x) saves
    dense mix  m i + 4 i + 8 E r + 4 (E + 1) + 8 K; fixed 4 E r o (+ 4 E r i + 4 E (i + o) with SLIM's masks)
                                         input, u = A x and the gated u, the gates and their ids; the copy of B
    grouped    m i + K (16 + 4 i + 8 r + 4 + 4 o); fixed 4 (E + 1) r (i + o) (+ 4 E (i + o) with masks)
                                         gathered rows, u, weights, the rows that index_add saves; bank copies
    routers    4 i + 12 K (top-k ids and weights) or 4 E (dense softmax), on an fp32 copy of the input
    MixLoRA    the FFN's 3 b f per token becomes 3 b f per (token, expert) pair, plus per pair the expert LoRA
               rows (m i + 4 i + 4 + 4 r on gate/up, m f + 4 f + 8 r + 4 on down) and the mixing (2 b f + b + b d);
               fixed: the grouped banks' copies 4 E r (i + o); the balance loss keeps 4 E + 4 per token and layer

and, once per micro-batch: the final norm T (4 d + 4), the LM head's fp32 log-softmax N (4 V + 8), RoPE's cos and
sin 2 S h b, the padding mask B S^2 b. I-LoRA runs a replay batch of the same size through the fast learner too
(twice everything per token) and its consistency loss keeps L T (2 b d + 4 d + 4).

With gradient checkpointing each layer keeps only its input (b d per token) until backward, which recomputes one
layer at a time: L T b d + the largest layer's full activations + the once-per-batch terms.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slim_peft.adapters import AdapterConfig, AdapterModel
from slim_peft.adapters.methods.ilora.model import ILoraModel
from slim_peft.adapters.methods.lora.layer import LoraLinear
from slim_peft.adapters.methods.loramoe.layer import LoraMoeLinear
from slim_peft.adapters.methods.mixlora.layer import ExpertProjection, MixLoraFFN
from slim_peft.adapters.methods.mola.layer import MolaLinear
from slim_peft.adapters.methods.slim.layer import SlimLinear, SlimRouter
from slim_peft.adapters.modules.experts import choose_dispatch
from slim_peft.adapters.targeting import layer_index

from .trainer import enable_gradient_checkpointing

# --- sizes ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dims:
    """The decoder dimensions the closed forms read."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Dims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)


@dataclass(frozen=True)
class Workload:
    """One micro-batch: B rows of S tokens in the base dtype, on `device` ("cuda" or "cpu": the dropout mask's
    size), a share of supervised positions, and whether rows are padded (a padding mask reaches SDPA)."""

    micro_batch: int
    seq_len: int
    dtype_bytes: int = 2
    device: str = "cuda"
    supervised: float = 1.0
    padded: bool = True

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def supervised_rows(self) -> int:
        return round(self.supervised * self.micro_batch * (self.seq_len - 1))

    def mask_bytes(self, p: float) -> int:
        """m: bytes per element of the adapters' dropout mask."""
        return 0 if p == 0 else 4 if self.device == "cpu" else 1


@dataclass(frozen=True)
class Cost:
    """Saved bytes of one module: per token of the micro-batch, fixed (weight-sized copies), and per token kept
    outside the decoder layers (auxiliary losses computed after the forward)."""

    per_token: int = 0
    fixed: int = 0
    held_per_token: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.per_token + other.per_token, self.fixed + other.fixed,
                    self.held_per_token + other.held_per_token)


# --- activations: closed forms per module -----------------------------------------------------------------------

def base_layer_bytes_per_token(dims: Dims, w: Workload) -> int:
    """2 (4 d + 4) + b h (2 H + 2 H') + 4 H + 3 b f (module docstring)."""
    kv = dims.heads if w.padded else dims.kv_heads
    b = w.dtype_bytes
    return 2 * (4 * dims.hidden + 4) + b * dims.head_dim * (2 * dims.heads + 2 * kv) + 4 * dims.heads \
        + 3 * b * dims.intermediate


def _io(module: nn.Module) -> tuple[int, int]:
    base = module.base_layer
    return base.in_features, base.out_features


def _lora_cost(mod: LoraLinear, cfg: AdapterConfig, dims: Dims, w: Workload) -> Cost:
    """LoRA: m i + 4 i + 4 r; DoRA adds 8 o per token and 4 o i + 12 o fixed (4 o i only with dropout)."""
    i, o = _io(mod)
    p = cfg.lora_dropout
    cost = Cost(w.mask_bytes(p) * i + 4 * i + 4 * mod.lora_A.out_features)
    if mod.use_dora:
        cost += Cost(8 * o, 12 * o + (4 * o * i if p > 0 else 0))
    return cost


def _dense_mix(E: int, r: int, i: int, o: int, K: int | None) -> Cost:
    """x (4 i), u and the gated u (8 E r), the T x (E + 1) gates and their ids (8 K) when built from top-k picks
    (K None: dense softmax gates, already saved by the router); B's (E r) x o copy."""
    gates = 0 if K is None else 4 * (E + 1) + 8 * K
    return Cost(4 * i + 8 * E * r + gates, 4 * E * r * o)


def _grouped_mix(E: int, r: int, i: int, o: int, K: int) -> Cost:
    """Per pick: token and order ids (16), gathered rows (4 i), u before and after weighting (8 r), the weight (4),
    the output rows index_add saves (4 o); the banks copied for _grouped_mm with a zero expert."""
    return Cost(K * (16 + 4 * i + 8 * r + 4 + 4 * o), 4 * (E + 1) * r * (i + o))


def _slim_cost(mod: SlimLinear, cfg: Any, dims: Dims, w: Workload) -> Cost:
    i, o = _io(mod)
    E, r, K = cfg.num_lora_experts, cfg.r, cfg.top_k
    drop = Cost(w.mask_bytes(cfg.lora_dropout) * i)
    masked = cfg.mask_ratio > 0
    if masked and cfg.merge_form == "exact":  # DareRows: gathered rows, output rows, weights; masks: exact_merge_memory
        return drop + Cost(K * (16 + 4 * i + 8 * o + 4))
    masks = Cost(0, 4 * E * (i + o)) if masked else Cost()
    if choose_dispatch(E, r, K, cfg.dispatch) == "dense":
        return drop + masks + _dense_mix(E, r, i, o, K) + Cost(0, 4 * E * r * i if masked else 0)  # masked A
    return drop + masks + _grouped_mix(E, r, i, o, K)


def _slim_router_cost(mod: SlimRouter, cfg: Any, dims: Dims, w: Workload) -> Cost:
    return Cost(4 * mod.router.weight.shape[1] + 12 * cfg.top_k)


def _mola_cost(mod: MolaLinear, cfg: Any, dims: Dims, w: Workload) -> Cost:
    i, o = _io(mod)
    E, r, K = mod.experts.num_experts, cfg.r, cfg.top_k
    cost = Cost(w.mask_bytes(cfg.lora_dropout) * i + 4 * i + 12 * K)  # dropout mask, router input, top-k
    if cfg.router_aux_loss_coef > 0:
        cost += Cost(4 * E + 4)
    if choose_dispatch(E, r, K) == "dense":
        return cost + _dense_mix(E, r, i, o, K)
    return cost + _grouped_mix(E, r, i, o, K)


def _loramoe_cost(mod: LoraMoeLinear, cfg: Any, dims: Dims, w: Workload) -> Cost:
    i, o = _io(mod)
    E = mod.experts.num_experts
    route = Cost(4 * i + 4 * E + 4)  # router input, softmax gates, the balance loss's token mask
    return route + Cost(w.mask_bytes(cfg.lora_dropout) * i) + _dense_mix(E, cfg.r, i, o, None)


def _mixlora_cost(mod: MixLoraFFN, cfg: Any, dims: Dims, w: Workload) -> Cost:
    """The whole MoE FFN (router, pairs, expert LoRA rows, mixing), less the plain FFN the base term counts."""
    E, r, d, f, b = cfg.num_experts, cfg.r, dims.hidden, dims.intermediate, w.dtype_bytes
    K = min(E, math.ceil(cfg.top_p * E)) if cfg.top_p is not None else cfg.top_k  # top-p: all experts near uniform
    m = w.mask_bytes(cfg.lora_dropout)
    route = 4 * d + (14 * E if cfg.top_p is not None else 12 * K)  # probs, sorted ids, keep masks / top-k ids, weights
    cost = Cost(route + 16 * K + 3 * b * f * (K - 1) + K * (2 * b * f + b), held_per_token=4 * E + 4)
    for name in ("gate_proj", "up_proj"):
        if isinstance(getattr(mod, name), ExpertProjection):
            cost += Cost(K * (m * d + 4 * d + 4 + 4 * r), 4 * E * r * (d + f))
    if isinstance(mod.down_proj, ExpertProjection):
        cost += Cost(K * (m * f + 4 * f + 8 * r + 4 + b * d), 4 * E * r * (f + d))
    return cost


CostFn = Callable[[Any, Any, Dims, Workload], Cost]
MODULE_COSTS: list[tuple[type, CostFn]] = [  # the first matching type; I-LoRA's layer trains as a LoraLinear
    (MixLoraFFN, _mixlora_cost), (SlimLinear, _slim_cost), (SlimRouter, _slim_router_cost),
    (MolaLinear, _mola_cost), (LoraMoeLinear, _loramoe_cost), (LoraLinear, _lora_cost),
]


def _module_cost(module: nn.Module, cfg: AdapterConfig, dims: Dims, w: Workload) -> Cost | None:
    for cls, fn in MODULE_COSTS:
        if isinstance(module, cls):
            return fn(module, cfg, dims, w)
    return None


@dataclass(frozen=True)
class ActivationEstimate:
    """Closed-form saved bytes of one training forward (module docstring): `per_layer` full activations of each
    decoder layer, `head` the final norm and LM head, `shared` RoPE tables and the padding mask, `held` what the
    auxiliary losses keep, `layer_inputs` the hidden states checkpointing keeps, `passes` forwards with autograd
    per step (2 for I-LoRA's replay), `reused` the part of `held` that checkpointing keeps anyway (I-LoRA's
    consistency loss reads the layer outputs, which are the next layers' checkpointed inputs)."""

    per_layer: tuple[int, ...]
    head: int
    shared: int
    held: int
    layer_inputs: int
    passes: int = 1
    reused: int = 0

    @property
    def full(self) -> int:
        return self.passes * (sum(self.per_layer) + self.head) + self.shared + self.held

    @property
    def checkpointed(self) -> int:
        return self.passes * (self.layer_inputs + self.head) + self.shared + self.held - self.reused \
            + max(self.per_layer)


def estimate_activations(model: AdapterModel, w: Workload) -> ActivationEstimate:
    """The closed form of the module docstring for an injected model (meta or real)."""
    dims = Dims.of(model.config)
    cfg = model.adapter_config
    layers = [Cost(base_layer_bytes_per_token(dims, w)) for _ in range(dims.layers)]
    held = 0
    for name, module in model.base_model.named_modules():
        cost = _module_cost(module, cfg, dims, w)
        if cost is not None:
            layers[layer_index(name)] += cost
            held += cost.held_per_token * w.tokens
    T, S, b = w.tokens, w.seq_len, w.dtype_bytes
    head = T * (4 * dims.hidden + 4) + w.micro_batch * (S - 1) + w.supervised_rows * (4 * dims.vocab + 8)
    shared = 2 * S * dims.head_dim * b + (w.micro_batch * S * S * b if w.padded else 0)
    passes, reused, inputs = 1, 0, dims.layers * T * b * dims.hidden
    if isinstance(model, ILoraModel):  # replay batch through the fast learner + the consistency loss
        passes, reused = 2, inputs
        held += dims.layers * T * (2 * b * dims.hidden + 4 * dims.hidden + 4)
    return ActivationEstimate(tuple(c.per_token * T + c.fixed for c in layers), head, shared, held, inputs,
                              passes, reused)


# --- measurement ----------------------------------------------------------------------------------------------

def measure_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], gradient_checkpointing: bool) -> int:
    """Bytes autograd holds for backward after one training forward of `model` (an AdapterModel) on `batch`:
    every tensor saved for backward, counted once per storage, parameters and buffers excluded, counted while still
    held when the forward ends (a branch of the graph the forward dropped frees what it saved).

    With `gradient_checkpointing`, what checkpointing holds (each layer's inputs, recorded as the layers hand them
    to the checkpoint function, plus what is saved outside the checkpointed layers) plus the peak of the recompute:
    the saved bytes of the largest layer call in a forward without checkpointing, which is what backward's
    recompute of that layer saves (the recompute's own saves go to checkpoint's hooks, which hide them from ours)."""
    was_training = model.training
    model.train()
    try:
        full = _saved_by_layer_call(model, batch)
        if not gradient_checkpointing:
            return sum(full.values())
        recompute = max(v for k, v in full.items() if k >= 0)
        with _checkpointing(model) as storages:
            _saved_by_layer_call(model, batch, storages)
        return storages.total + recompute
    finally:
        model.train(was_training)


class _Storages:
    """The storages a forward keeps for backward, by data_ptr: weak references to the tensors kept on each, its
    bytes and the layer call that first kept it. Parameters and buffers are left out; a storage counts while one
    of its tensors is alive (its address may be reused once they are all freed)."""

    def __init__(self, model: nn.Module) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.entries: dict[int, tuple[list[weakref.ref], int, int]] = {}
        self.final: dict[int, int] = {}

    def add(self, t: torch.Tensor, call: int) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.skip or not storage.nbytes():
            return
        entry = self.entries.get(ptr)
        if entry is not None and any(r() is not None for r in entry[0]):
            entry[0].append(weakref.ref(t))
        else:
            self.entries[ptr] = ([weakref.ref(t)], storage.nbytes(), call)

    def freeze(self) -> None:
        """Bytes by layer call of the storages alive now (call at the end of the forward)."""
        by_call: dict[int, int] = defaultdict(int)
        for refs, nbytes, call in self.entries.values():
            if any(r() is not None for r in refs):
                by_call[call] += nbytes
        self.final = dict(by_call)

    @property
    def total(self) -> int:
        return sum(self.final.values())


def _saved_by_layer_call(model: nn.Module, batch: dict[str, torch.Tensor], storages: _Storages | None = None
                         ) -> dict[int, int]:
    """Saved bytes of one forward by call of a decoder layer, numbered from 0 in call order (a replay pass calls
    each layer again), -1 outside the layers. `storages`: where to record (it may hold the checkpoint inputs)."""
    storages = _Storages(model) if storages is None else storages
    current = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.add(t, current[0])
        return t

    with _layer_tracker(model, current), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    storages.freeze()
    del out
    return storages.final


@contextlib.contextmanager
def _layer_tracker(model: nn.Module, current: list[int]) -> Iterator[None]:
    """Keep `current[0]` at the number of the decoder layer call running (-1 outside)."""
    calls = [0]

    def enter(module: nn.Module, args: Any) -> None:
        current[0] = calls[0]
        calls[0] += 1

    layers = _decoder_layers(model)
    handles = [layer.register_forward_pre_hook(enter) for layer in layers]
    handles += [layer.register_forward_hook(lambda module, args, out: current.__setitem__(0, -1)) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _checkpointing(model: nn.Module) -> Iterator[_Storages]:
    """Non-reentrant gradient checkpointing (as the trainer enables it) on the decoder layers, each layer's
    checkpoint inputs recorded into the yielded `_Storages`; the model's setting is restored afterwards."""
    base = getattr(model, "base_model", model)
    # transformers 5 names it activation checkpointing (the old names warn); 4.x only has the old names
    new_api = hasattr(base, "activation_checkpointing_enable")
    was_on = base.is_activation_checkpointing if new_api else base.is_gradient_checkpointing
    enable_gradient_checkpointing(model)
    storages = _Storages(model)
    layers = _decoder_layers(model)
    originals = [layer._gradient_checkpointing_func for layer in layers]

    def recording(func: Callable) -> Callable:
        def run(fn: Callable, *args: Any, **kwargs: Any) -> Any:
            for t in _tensors((args, kwargs, getattr(fn, "keywords", {}))):
                storages.add(t, -1)
            return func(fn, *args, **kwargs)
        return run

    for layer, func in zip(layers, originals, strict=True):
        layer._gradient_checkpointing_func = recording(func)
    try:
        yield storages
    finally:
        for layer, func in zip(layers, originals, strict=True):
            layer._gradient_checkpointing_func = func
        if not was_on:
            base.activation_checkpointing_disable() if new_api else base.gradient_checkpointing_disable()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "base_model", model)
    return list(base.get_decoder().layers)
