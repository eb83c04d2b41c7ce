"""SLIM: Soft LoRA and Identity Mixture (Han et al. 2024, arXiv 2410.07739).

Per mixture site: N_L LoRA experts (a stacked `LoraExpertBank` per adapted linear) and N_I identity experts.
An identity expert has no parameters and adds nothing: y = (W + sum_{i in LoRA} w_i s B_i' A_i') x + b, the
weight routed to identity experts is weight taken from the adapters. Identity experts therefore cost no
FLOPs: they exist only as router outputs (expert ids >= N_L), which the dispatch drops; in inference on the CPU a
token whose top-K are all identity experts skips the LoRA matmuls altogether (`SlimRouter.lora_rows`).

Routing: router logits z = R h (fp32); the distance d of h to the sliding clusters
of the training distribution lowers the LoRA logits, z_i <- z_i - gamma d (weight yielding); top-K, softmax
over the kept logits. `routing="block"`: one router and cluster state per decoder FFN, on the FFN input,
shared by its adapted projections; `routing="linear"`: one per adapted linear.

Dynamic merging: the selected experts' low-rank factors are masked, B rows and A columns each
dropped with probability q = 1 - sqrt(1 - p) and rescaled by 1 / (1 - p), so B' A' is an unbiased DARE-style
drop-and-rescale of B A that never forms B A; `merge_form="exact"` applies DARE's elementwise mask to s B A
(forms every masked B_e A_e per forward, then applies it to its own tokens only: K dense products per token).

Decisions where the paper is silent or garbled (all config fields, see SlimConfig):
- distance "calibrated" (default): d = rho / tau - 1, tau a running mean of rho over training tokens;
  "max": d = rho - 1 (paper-literal). rho = max over channels |h - c_k| / sqrt(v_k + 1e-6), k the nearest
  centre (Euclidean).
- clusters are initialised from the first training batch (distinct valid tokens drawn with a seed of their
  own as centres, the batch's per-channel variance; the global batch under DDP); until then (an untrained
  adapter), d = 0: no yielding.
- the clusters, tau and the routing counters move once per optimizer step from the sums of that step's first
  forwards (`modules/statistics.py`), so a gradient-checkpointing recompute routes exactly as the first forward
  did (same state; dropout and merge masks are the same because checkpointing restores the RNG) and counts
  nothing twice; under DDP the sums are all-reduced once per step, outside the forward.
- in a task sequence (`slim-peft continual`) the sliding clusters follow the latest task, so an earlier task's
  tokens may look far and route to identity: `clusters_across_tasks="keep"` copies each finished task's
  clusters at the boundary (`AdapterModel.start_task` -> `on_task_boundary`) and d becomes the smallest over the
  sliding clusters and every kept task's (`modules/clusters.py: KeptClusters`); "slide" (default) keeps none.
- the router sees the hidden state itself, not a detached copy: its gradient flows into earlier layers, as in
  every routed method here (MixLoRA, LoRAMoE, MoLA and their reference code; the SLIM paper is silent). Only
  the cluster distance is a no-grad statistic. Routing (logits, distance, top-k, softmax) runs in fp32 with
  autocast off, whatever the model's dtype and autocast state.

Speed: routing, cluster moves and dispatch stay on the device (no `.item()`/`.tolist()` per layer;
the one host read is the clusters' one-time initialisation). The nearest centre comes from one matmul
(||c||^2 - 2 h.c), |h - c_k| is computed once and reused for rho and the variance update, the LoRA scaling
rides on the routing weights and the mixture accumulates into the base output (addmm / index_add), so no
extra pass over the T x d_out output. In eval without autograd the masked factors are cached.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slim_peft.errors import ConfigError

from ...config import FFN_PROJ, AdapterConfig
from ...context import ForwardContext
from ...modules.caching import DerivedCache
from ...modules.clusters import KeptClusters, SlidingClusters
from ...modules.dare import (
    ReplayableKeepMask,
    dare_delta,
    dare_mixture,
    drop_keep_mask,
    exact_form_bytes,
    factor_masks,
    masked_factors,
)
from ...modules.dropout import adapter_dropout
from ...modules.experts import LoraExpertBank, mix_experts
from ...modules.routing import LinearRouter, fp32_routing, switch_balance_loss, top_k_routing
from ...modules.statistics import in_backward
from ...targeting import find_targets, set_module
from .config import SlimConfig


class SlimRouter(nn.Module):
    """Router of one mixture site: logits, weight yielding against the sliding clusters, top-K.

    `route(h, mask)` returns (expert ids T x K, weights T x K); ids >= num_lora_experts are identity experts.
    It also accumulates routing statistics (weight per expert over valid tokens) on the device.
    """

    def __init__(self, in_features: int, cfg: SlimConfig, device: torch.device | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_lora = cfg.num_lora_experts
        num_experts = cfg.num_lora_experts + cfg.num_identity_experts
        self.router = LinearRouter(in_features, num_experts, cfg.router_init_std, device=device)
        self.clusters = SlidingClusters(cfg.num_clusters, in_features, cfg.cluster_momentum, device=device,
                                        seed=seed)
        self.kept = KeptClusters(cfg.max_tasks, cfg.num_clusters, in_features, device=device) \
            if cfg.clusters_across_tasks == "keep" else None
        self.register_buffer("stat_weight", torch.zeros(num_experts, device=device), persistent=False)
        self.register_buffer("stat_tokens", torch.zeros((), device=device), persistent=False)
        is_lora = (torch.arange(num_experts, device=device) < self.num_lora).float()
        self.register_buffer("yield_sign", is_lora, persistent=False)  # 1 for LoRA experts, 0 for identity
        self.forced: torch.Tensor | None = None  # E weights given to every token (analysis and tests)
        self.current: tuple[torch.Tensor, torch.Tensor] | None = None  # last routing (block mode)
        self.current_rows: torch.Tensor | None = None  # rows of `current` with a LoRA pick (None: every row)
        self.last_logits: torch.Tensor | None = None

    def distance(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """d(h) from the clusters' current state; in training (not in a checkpointed recompute) this forward's
        sums are added to the clusters' pending update."""
        clusters = self.clusters
        if self.training and not clusters.ready():
            clusters.initialize(h.detach(), w)
        if not clusters.ready():
            return h.new_zeros(h.shape[0])
        with torch.no_grad():
            k = clusters.nearest(h)
            dev = clusters.deviation(h, k)
            rho = clusters.rho_from(dev, k)
            if self.training and not in_backward():
                clusters.accumulate(h, w, k, rho, dev)
        calibrated = self.cfg.distance == "calibrated"
        d = rho / clusters.tau - 1 if calibrated else rho - 1
        if self.kept is not None and self.kept.kept():
            d = torch.minimum(d, self.kept.distance(h, calibrated))
        return d.clamp(min=0) if self.cfg.yield_clamp else d

    def on_task_boundary(self) -> None:
        """A task of a sequence ended: keep its clusters (`clusters_across_tasks="keep"`)."""
        if self.kept is not None and self.clusters.ready():
            self.kept.keep(self.clusters)

    def route(self, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with fp32_routing(h.device):
            idx, weights = self._route(h.reshape(-1, h.shape[-1]).float(), mask)
        self.current_rows = self.lora_rows(idx, weights)
        return idx, weights

    def lora_rows(self, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """In inference on the CPU: the rows whose top-K picks include a LoRA expert with a non-zero weight, so
        that the layers skip the rest (a token routed to identity experts only costs no LoRA matmul); None means
        every row (training, autograd, accelerators, or no row to skip). It reads one count back to the host per
        routing, free on a CPU; on an accelerator that read would stall the queue at every layer, so there the
        dense path runs."""
        if self.training or torch.is_grad_enabled() or idx.device.type != "cpu":
            return None
        uses_lora = ((idx < self.num_lora) & (weights != 0)).any(dim=-1)
        if int(uses_lora.sum()) == idx.shape[0]:
            return None
        return uses_lora.nonzero().squeeze(1)

    def _route(self, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        w = mask.float() if mask is not None else h.new_ones(h.shape[0])
        if self.forced is not None:
            E = self.forced.numel()
            idx = torch.arange(E, device=h.device).expand(h.shape[0], E)
            weights = self.forced.to(h.device).expand(h.shape[0], E)
            self.last_logits = None
        else:
            logits = self.router(h)
            if self.cfg.yield_strength > 0:
                d = self.distance(h.detach(), w)
                # z_i <- z_i - gamma d for LoRA experts (eq. 9, reconstructed); identity logits unchanged
                logits = logits - (self.cfg.yield_strength * d)[:, None] * self.yield_sign
            self.last_logits = logits
            idx, weights = top_k_routing(logits, self.cfg.top_k)
        if not in_backward():  # a checkpointed recompute must not count its tokens twice
            with torch.no_grad():
                counted = weights if mask is None else weights * w[:, None]
                self.stat_weight.index_add_(0, idx.reshape(-1), counted.reshape(-1))
                self.stat_tokens += h.shape[0] if mask is None else w.sum()
        return idx, weights

    def stats(self) -> dict:
        tokens = float(self.stat_tokens)
        load = (self.stat_weight / max(tokens, 1.0)).tolist()
        return {"tokens": int(tokens), "identity_share": float(sum(load[self.num_lora:])), "expert_load": load}

    def reset_stats(self) -> None:
        self.stat_weight.zero_()
        self.stat_tokens.zero_()


class SlimLinear(nn.Module):
    """A frozen linear plus SLIM's mixture of LoRA and identity experts.

    y = W x + b + s sum_{i selected, i < N_L} w_i B_i' A_i' dropout(x), with B_i', A_i' the masked factors of
    dynamic merging (the identity experts' weight w_i multiplies a zero update and is skipped).
    """

    def __init__(self, base_layer: nn.Linear, cfg: SlimConfig, ctx: ForwardContext, name: str,
                 router: SlimRouter | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.cfg = cfg
        self.ctx = ctx
        self.scaling = cfg.scaling
        device = base_layer.weight.device
        self.lora_dropout = adapter_dropout(cfg.lora_dropout)
        self.experts = LoraExpertBank(cfg.num_lora_experts, base_layer.in_features, base_layer.out_features,
                                      cfg.r, device=device)
        self.mask_seed = site_seed(cfg.merge_seed, name)
        if router is None:  # routing="linear": a router of its own, on its own input
            self.slim_router = SlimRouter(base_layer.in_features, cfg, device=device, seed=self.mask_seed)
        self._shared_router = [router]  # a list, so the shared router is not registered twice
        self._fixed_masks: tuple[torch.Tensor, ...] | None = None
        self._factor_cache = DerivedCache()  # masked factors or dense DARE weights, in inference
        self.cache_exact_delta = True  # set by `check_exact_form_memory`
        self._l1_cache = DerivedCache()

    @property
    def router(self) -> SlimRouter:
        return self._shared_router[0] or self.slim_router

    def _draw_masks(self, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """Fresh masks from `generator`, or from the device's global RNG (training: restored on resume)."""
        cfg, A = self.cfg, self.experts.lora_A
        E, _, d_in = A.shape
        d_out = self.experts.lora_B.shape[1]
        if cfg.merge_form == "exact":  # (keep,) or, for a training draw, (keep, its replayable record)
            if generator is None:
                record, keep = ReplayableKeepMask.draw((E, d_out, d_in), cfg.mask_ratio, A.device)
                return keep, record
            return (drop_keep_mask((E, d_out, d_in), cfg.mask_ratio, generator, A.device),)
        return factor_masks(E, d_in, d_out, cfg.mask_ratio, cfg.rescale, generator, A.device)

    def masks(self) -> tuple[torch.Tensor, ...] | None:
        """Dynamic-merging masks for this forward: new in training, per `eval_mask` in eval."""
        cfg = self.cfg
        if cfg.mask_ratio == 0 or (not self.training and cfg.eval_mask == "none"):
            return None
        if self.training or cfg.eval_mask == "resample":
            return self._draw_masks(None)
        if self._fixed_masks is None or self._fixed_masks[0].device != self.experts.lora_A.device:
            self._fixed_masks = self._draw_masks(torch.Generator().manual_seed(self.mask_seed))
        return self._fixed_masks

    def factors(self, masks: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B'): the bank's factors with the fast masks applied. Cached in eval (`_eval_cached`) with B'
        stored expert-rank-major, so that the dense path's (E r) x d_out view of it needs no copy per call (per
        decoded token)."""
        A, B = self.experts.lora_A, self.experts.lora_B

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            return (A, B) if masks is None else masked_factors(A, B, *masks)

        def for_cache() -> tuple[torch.Tensor, torch.Tensor]:
            Am, Bm = build()
            return Am.contiguous(), Bm.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (E, r, d_out)

        return self._eval_cached(masks, build, for_cache)

    @property
    def dare_scale(self) -> float:
        """The exact form's rescale 1 / (1 - p) (1 without `rescale`)."""
        return 1.0 / (1.0 - self.cfg.mask_ratio) if self.cfg.rescale else 1.0

    def dare_delta(self, keep: torch.Tensor) -> torch.Tensor:
        """The exact form's masked updates (`dare_delta`), cached in eval like `factors`: forming E dense
        d_out x d_in products per forward would dominate evaluation."""
        def build() -> torch.Tensor:
            return dare_delta(self.experts.lora_A, self.experts.lora_B, keep, self.dare_scale)

        if not self.cache_exact_delta:  # a model whose updates would not fit in memory all at once
            return build()
        return self._eval_cached((keep,), build, build)

    def _eval_cached(self, masks: tuple[torch.Tensor, ...] | None, build: Callable[[], Any],
                     for_cache: Callable[[], Any]) -> Any:
        """`build()` in training, with autograd or with resampled eval masks; otherwise (generation,
        evaluation) `for_cache()`, kept while the factors' versions and the fixed masks are unchanged."""
        if self.training or torch.is_grad_enabled() or (masks is not None and self.cfg.eval_mask != "fixed"):
            return build()
        return self._factor_cache.get((self.experts.lora_A, self.experts.lora_B), for_cache,
                                      None if masks is None else id(masks[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        xt = x.reshape(-1, x.shape[-1])
        router = self.router
        if self._shared_router[0] is None:
            router.current = router.route(xt, self.ctx.flat_mask(xt.shape[0]))
        idx, weights = router.current
        rows = router.current_rows
        if rows is not None and self.cfg.merge_form == "fast":
            return self._forward_rows(result, xt, idx, weights, rows)
        A = self.experts.lora_A
        x_drop = self.lora_dropout(xt.to(A.dtype))
        weights = weights * self.scaling  # s rides on the T x K weights, not on the T x d_out output
        out = result.reshape(-1, result.shape[-1])
        masks = self.masks()
        if masks is not None and self.cfg.merge_form == "exact":  # a boolean keep mask (+ its replay record)
            with fp32_routing(x.device):  # fp32, autocast off: the form exists to be the exact reference
                delta = None if torch.is_grad_enabled() else self.dare_delta(masks[0])
                replay = masks[1] if len(masks) > 1 else None
                y = out + dare_mixture(x_drop.float(), A, self.experts.lora_B, masks[0], self.dare_scale, idx,
                                       weights, delta, replay).to(out.dtype)
        else:
            y = mix_experts(x_drop, *self.factors(masks), idx, weights, self.cfg.dispatch, out=out)
        if self.ctx.collect_aux:
            self.ctx.add_aux("l1", self.l1())
        return y.view(result.shape)

    def _forward_rows(self, result: torch.Tensor, xt: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                      rows: torch.Tensor) -> torch.Tensor:
        """Inference where only `rows` have a LoRA pick (`SlimRouter.lora_rows`): the mixture of those rows
        alone, added into the base output; with no such row, the base output itself."""
        out = result.reshape(-1, result.shape[-1])
        if rows.numel():
            A = self.experts.lora_A
            y = mix_experts(self.lora_dropout(xt.index_select(0, rows).to(A.dtype)), *self.factors(self.masks()),
                            idx.index_select(0, rows), weights.index_select(0, rows) * self.scaling,
                            self.cfg.dispatch)
            out.index_add_(0, rows, y.to(out.dtype))
        if self.ctx.collect_aux:
            self.ctx.add_aux("l1", self.l1())
        return out.view(result.shape)

    def l1(self) -> torch.Tensor:
        """This bank's L1 term (`l1_penalty`), computed in the layer's forward, where FSDP has the factors
        unsharded (read from outside it, a sharded factor would give a DTensor loss). Without autograd the
        value is reused while the factors are unchanged."""
        if torch.is_grad_enabled():
            return l1_penalty([self.experts])
        return self._l1_cache.get((self.experts.lora_A, self.experts.lora_B), lambda: l1_penalty([self.experts]))


def site_seed(merge_seed: int, name: str) -> int:
    """The seed of one site's fixed eval masks and cluster initialisation: from `merge_seed` and the module
    path, so that every site (and every process) has its own, fixed one."""
    return merge_seed * 1_000_003 + zlib.crc32(name.encode())


def _route_block(router: SlimRouter, ctx: ForwardContext):
    def hook(module: nn.Module, args: tuple) -> None:
        h = args[0]
        router.current = router.route(h, ctx.flat_mask(h.reshape(-1, h.shape[-1]).shape[0]))
    return hook


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (an accelerator's free memory, or the host's available RAM); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_exact_form_memory(layers: list[SlimLinear], available: int | None) -> None:
    """Refuse `merge_form="exact"` where one projection's training peak (`exact_form_bytes`) exceeds the free
    memory, naming the memory it needs; evaluation caches the dense updates only while all of them together
    take at most a quarter of it."""
    if not layers or available is None:
        return
    sizes = [exact_form_bytes(m.experts.num_experts, m.base_layer.in_features, m.base_layer.out_features)
             for m in layers]
    need = max(sizes)
    if need > available:
        raise ConfigError(f"merge_form='exact' needs about {need / 2**30:.1f} GiB per adapted projection in "
                          f"training (E x d_out x d_in fp32 updates and keep masks), more than the "
                          f"{available / 2**30:.1f} GiB free on this device; use merge_form='fast' (the same "
                          f"expected update, never formed) or fewer experts")
    cache = sum(s * 4 // 5 for s in sizes) <= available // 4  # the cached fp32 updates of every projection
    for m in layers:
        m.cache_exact_delta = cache


def inject_slim(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> None:
    """Replace each target linear with a SlimLinear; with routing="block", FFN projections of one decoder
    layer share one router registered on their parent module as `slim_router` (a forward pre-hook routes
    the FFN input before the projections run)."""
    assert isinstance(cfg, SlimConfig)
    hidden = model.config.hidden_size
    layers: list[SlimLinear] = []
    for name in find_targets(model, cfg.target_modules):
        base = model.get_submodule(name)
        parent_name, _, short = name.rpartition(".")
        router = None
        if cfg.routing == "block" and short in FFN_PROJ:
            parent = model.get_submodule(parent_name)
            if not hasattr(parent, "slim_router"):
                parent.slim_router = SlimRouter(hidden, cfg, device=base.weight.device,
                                                seed=site_seed(cfg.merge_seed, f"{parent_name}.slim_router"))
                parent.register_forward_pre_hook(_route_block(parent.slim_router, ctx))
            router = parent.slim_router
        layer = SlimLinear(base, cfg, ctx, name, router)
        set_module(model, name, layer)
        layers.append(layer)
    if cfg.merge_form == "exact" and cfg.mask_ratio > 0 and layers:
        check_exact_form_memory(layers, available_memory(layers[0].experts.lora_A.device))


def routers(model: nn.Module) -> dict[str, SlimRouter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SlimRouter)}


def l1_penalty(banks: list[LoraExpertBank]) -> torch.Tensor:
    """sum over banks and experts of mean|A_e| + mean|B_e| (one fused reduction per factor)."""
    total = []
    for b in banks:
        for W in (b.lora_A, b.lora_B):
            total.append(torch.linalg.vector_norm(W, ord=1, dim=(1, 2)).sum() / (W.shape[1] * W.shape[2]))
    return torch.stack(total).sum()


def slim_aux_losses(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext
                    ) -> dict[str, tuple[torch.Tensor, float]]:
    """L1 on the adapters: sum over sites, projections and LoRA experts of mean|B| + mean|A| (each adapted
    projection adds its term in its forward, `SlimLinear.l1`); optional balancing."""
    assert isinstance(cfg, SlimConfig)
    out = {"l1": (ctx.aux["l1"], cfg.l1_weight)} if "l1" in ctx.aux else {}
    if cfg.balance_loss_weight > 0:
        losses = []
        for r in routers(model).values():
            if r.last_logits is not None and r.current is not None:
                mask = ctx.flat_mask(r.last_logits.shape[0])
                losses.append(switch_balance_loss(r.last_logits, r.current[0], r.last_logits.shape[1], mask))
        if losses:
            out["balance"] = (torch.stack(losses).mean(), cfg.balance_loss_weight)
    return out
