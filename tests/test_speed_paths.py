"""The fast paths compute what the plain ones compute: dense, grouped (`_grouped_mm`) and loop dispatch agree
in values and gradients, the hot path reads nothing back to the host, cached masked factors follow the
weights, and generation with the KV cache gives what generation without it gives, for every method."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import slim_peft as sp
from slim_peft.adapters.methods.mixlora.layer import MixLoraFFN, select_experts
from slim_peft.adapters.methods.slim.layer import SlimLinear, SlimRouter
from slim_peft.adapters.modules.dare import (
    dare_delta,
    dare_mixture,
    drop_keep_mask,
    drop_rescale_mask,
    exact_dare_mixture,
)
from slim_peft.adapters.modules.dropout import LoraDropout
from slim_peft.adapters.modules.experts import (
    choose_dispatch,
    dense_gates,
    dense_mixture,
    expert_rows_loop,
    grouped_mixture,
    grouped_mixture_loop,
    grouped_mm_available,
    grouped_mm_fits,
    grouped_rows,
    mix_experts,
)

VOCAB = 128


def tiny_llama(seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def randomize(model: sp.AdapterModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values back to the host: `.item()`, `bool(t)`, `int(t)` (all
    `_local_scalar_dense`) and `.tolist()` (patched, it bypasses the dispatcher)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(monkeypatch):
    mode = HostReads()
    tolist = torch.Tensor.tolist

    def counted(t):
        mode.count += 1
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with mode:
        yield mode
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)


# --- dispatch paths ----------------------------------------------------------------------------------------

def problem(E: int, r: int, d_in: int, d_out: int, T: int, K: int, num_identity: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(E, r, d_in, generator=g) * 0.3).requires_grad_()
    B = (torch.randn(E, d_out, r, generator=g) * 0.3).requires_grad_()
    x = torch.randn(T, d_in, generator=g).requires_grad_()
    idx = torch.rand(T, E + num_identity, generator=g).topk(K, dim=-1).indices  # distinct ids, as top-k gives
    idx[0] = E + num_identity - 1 if num_identity else idx[0]  # a row whose picks are all identity
    w = torch.rand(T, K, generator=g).requires_grad_()
    out = torch.randn(T, d_out, generator=g).requires_grad_()
    return x, A, B, idx, w, out


PATHS = {
    "dense": lambda x, A, B, idx, w, out: dense_mixture(x, A, B, dense_gates(idx, w, A.shape[0]), out),
    "grouped": grouped_mixture,
    "loop": grouped_mixture_loop,
}


@pytest.mark.parametrize("shape", [
    dict(E=8, r=16, d_in=64, d_out=96, T=50, K=2, num_identity=2),  # SLIM's 8 + 2, top-2
    dict(E=4, r=8, d_in=32, d_out=16, T=33, K=1, num_identity=0),  # MixLoRA's pairs: one expert per row
    dict(E=16, r=4, d_in=24, d_out=40, T=7, K=3, num_identity=1),  # most experts get no row
    dict(E=3, r=2, d_in=6, d_out=5, T=9, K=2, num_identity=2),  # unaligned: grouped falls back to the loop
])
def test_dense_grouped_and_loop_agree_in_values_and_gradients(shape):
    results = {}
    for name, f in PATHS.items():
        x, A, B, idx, w, out = problem(**shape)
        y = f(x, A, B, idx, w, out)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[name] = [y.detach(), x.grad, A.grad, B.grad, w.grad, out.grad]
    for name in ("grouped", "loop"):
        for got, want in zip(results[name], results["dense"], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_grouped_path_uses_grouped_mm_on_cpu():
    assert grouped_mm_available("cpu", torch.float32), "torch._grouped_mm is missing: grouped dispatch syncs"


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_grouped_mm_probe_does_not_depend_on_the_first_callers_grad_mode(context):
    # The answer is cached per process; evaluation is often the first caller.
    grouped_mm_available.cache_clear()
    try:
        with context():
            assert grouped_mm_available("cpu", torch.float32)
    finally:
        grouped_mm_available.cache_clear()


def test_identity_picks_add_exactly_nothing():
    x, A, B, idx, w, out = problem(E=8, r=16, d_in=64, d_out=96, T=20, K=2, num_identity=2)
    idx = torch.full_like(idx, 9)  # every pick an identity expert
    for f in PATHS.values():
        assert torch.equal(f(x, A, B, idx, w, out), out)


def test_auto_rule():
    assert choose_dispatch(8, 16, 2) == "dense"  # SLIM default
    assert choose_dispatch(8, 32, 2) == "grouped"  # larger total rank
    assert choose_dispatch(16, 16, 2) == "grouped"  # more experts
    assert choose_dispatch(8, 16, 1) == "grouped"  # one expert per row (MixLoRA pairs)
    assert choose_dispatch(8, 64, 2, "dense") == "dense"


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_dispatch_reads_nothing_back_to_the_host(monkeypatch, dispatch):
    x, A, B, idx, w, out = problem(E=8, r=16, d_in=64, d_out=96, T=40, K=2, num_identity=2)
    mix_experts(x, A, B, idx, w, dispatch, out)  # first call probes _grouped_mm once
    with host_reads(monkeypatch) as reads:
        y = mix_experts(x, A, B, idx, w, dispatch, out)
        y.sum().backward()
    assert reads.count == 0


def test_the_loop_fallback_is_the_one_that_syncs(monkeypatch):
    x, A, B, idx, w, out = problem(E=8, r=16, d_in=64, d_out=96, T=40, K=2, num_identity=2)
    with host_reads(monkeypatch) as reads:
        grouped_mixture_loop(x, A, B, idx, w, out)
    assert reads.count > 0  # the detector does see a sync


# --- MixLoRA's FFN: sorted pairs, shared frozen projections ---------------------------------------------------

def mixlora_ffn_reference(ffn: MixLoraFFN, x: torch.Tensor) -> torch.Tensor:
    """MixLoRA as its paper writes it: each selected expert is a whole FFN (frozen W + its LoRA on gate, up and
    down), outputs summed with the routing weights; a Python loop over tokens and experts."""
    idx, weights = select_experts(ffn.router(x), ffn.cfg.top_k, ffn.cfg.top_p)

    def proj(name, e, v):
        p = getattr(ffn, name)
        bank = p.experts
        return p.base_layer(v) + p.scaling * (v @ bank.lora_A[e].t()) @ bank.lora_B[e].t()
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for e, w in zip(idx[t].tolist(), weights[t], strict=True):
            if w > 0:
                act = ffn.act_fn(proj("gate_proj", e, x[t])) * proj("up_proj", e, x[t])
                y = y + w * proj("down_proj", e, act)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("top_p", [None, 0.6])
def test_mixlora_ffn_equals_the_per_expert_ffns_in_both_dispatch_paths(top_p):
    model = sp.get_adapter_model(tiny_llama(hidden=32), sp.MixLoraConfig(r=4, num_experts=4, top_p=top_p))
    randomize(model)
    model.eval()  # no LoRA dropout
    ffn = next(m for m in model.modules() if isinstance(m, MixLoraFFN))
    x = torch.randn(9, 32)
    with torch.no_grad():
        want = mixlora_ffn_reference(ffn, x)
    grads = {}
    for dispatch in ("grouped", "dense"):
        ffn.cfg.dispatch = dispatch
        with torch.no_grad():  # the in-place inference path
            torch.testing.assert_close(ffn(x), want, atol=1e-5, rtol=1e-4)
        xg = x.clone().requires_grad_()
        got = ffn(xg)
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-4)
        got.square().sum().backward()
        grads[dispatch] = [xg.grad] + [p.grad.clone() for p in ffn.parameters() if p.requires_grad]
        ffn.zero_grad()
    for a, b in zip(grads["grouped"], grads["dense"], strict=True):
        # the two paths sum in different orders; where a gradient element is a near-cancellation of large terms,
        # fp32 rounding is relative to the tensor's scale, not the element's (both are equally far from float64)
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-4)


def test_mixlora_ffn_reads_nothing_back_to_the_host(monkeypatch):
    model = sp.get_adapter_model(tiny_llama(hidden=32), sp.MixLoraConfig(r=4, num_experts=4))
    randomize(model)
    ffn = next(m for m in model.modules() if isinstance(m, MixLoraFFN))
    x = torch.randn(20, 32, requires_grad=True)
    ffn(x)  # first call probes _grouped_mm once
    with host_reads(monkeypatch) as reads:
        ffn(x).sum().backward()
    assert reads.count == 0


def test_expert_rows_loop_equals_grouped_mm():
    x, A, B, idx, w, _ = problem(E=8, r=16, d_in=64, d_out=96, T=30, K=1, num_identity=0)
    expert, order = torch.sort(idx.reshape(-1), stable=True)
    offsets = torch.searchsorted(expert, torch.arange(8), right=True).to(torch.int32)
    xs, ws = x[order], w.reshape(-1)[order]
    assert grouped_mm_fits(xs, A, B)
    torch.testing.assert_close(expert_rows_loop(xs, A, B, offsets, ws), grouped_rows(xs, A, B, offsets, ws),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("routing", ["block", "linear"])
def test_slim_routing_and_layers_read_nothing_back_after_initialisation(monkeypatch, routing):
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4, routing=routing, target_modules="all-linear"))
    randomize(model)
    ids = torch.randint(0, VOCAB, (2, 12))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # initialises the clusters (one host read, once)
    layers = [m for m in model.modules() if isinstance(m, SlimLinear | SlimRouter)]
    h = torch.randn(2, 12, 32)
    with host_reads(monkeypatch) as reads:
        for train in (True, False):
            model.train(train)
            for m in layers:
                if isinstance(m, SlimRouter) and m.router.weight.shape[1] == 32:
                    m.current = m.route(h.reshape(-1, 32), torch.ones(24, dtype=torch.bool))
            outs = [m(h).sum() for m in layers if isinstance(m, SlimLinear) and m.base_layer.in_features == 32]
            torch.stack(outs).sum().backward()
    assert reads.count == 0


# --- cached masked factors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("merge_form", ["fast", "exact"])
def test_cached_masked_factors_follow_weight_updates(merge_form):
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4, mask_ratio=0.5, merge_form=merge_form))
    randomize(model)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        first = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, first)  # served from the cache
        for m in model.modules():
            if isinstance(m, SlimLinear):
                m.experts.lora_B.mul_(2.0)  # an in-place update (as an optimizer step)
        cached = model(input_ids=ids).logits
    fresh = model(input_ids=ids).logits.detach()  # autograd on: no cache
    assert not torch.equal(cached, first)
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=0)


# --- generation with the KV cache, every method --------------------------------------------------------------

METHOD_CONFIGS = {
    "lora": sp.LoraConfig(r=4),
    "dora": sp.DoraConfig(r=4),
    "slim": sp.SlimConfig(r=4),
    "slim-linear-routing": sp.SlimConfig(r=4, routing="linear", target_modules="all-linear"),
    "mixlora": sp.MixLoraConfig(r=4, num_experts=4),
    "mixlora-dynamic": sp.MixLoraConfig(r=4, num_experts=4, top_p=0.8),
    "loramoe": sp.LoraMoeConfig(r=4, num_experts=4),
    "mola": sp.MolaConfig(r=4, experts_per_layer="2,4"),
    "ilora": sp.ILoraConfig(r=4),
}


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_generation_with_kv_cache_matches_generation_without(name):
    cfg = copy.deepcopy(METHOD_CONFIGS[name])
    assert cfg.method in sp.METHODS
    model = sp.get_adapter_model(tiny_llama(), cfg)
    randomize(model)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)  # SLIM: initialise the clusters
    model.eval()
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
              do_sample=False, pad_token_id=0)
    cached = model.generate(**kw, use_cache=True)
    uncached = model.generate(**kw, use_cache=False)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # the last step's logits, incremental vs full
        full = model(input_ids=cached[:, :-1], attention_mask=torch.ones_like(cached[:, :-1])).logits[:, -1]
        out = model(input_ids=cached[:, :-2], attention_mask=torch.ones_like(cached[:, :-2]), use_cache=True)
        step = model(input_ids=cached[:, -2:-1], attention_mask=torch.ones_like(cached[:, :-1]),
                     past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_logits_match_cpu():
    for cfg in (sp.SlimConfig(r=4), sp.SlimConfig(r=16, dispatch="grouped"), sp.MixLoraConfig(r=4, num_experts=4)):
        model = sp.get_adapter_model(tiny_llama(), cfg)
        randomize(model)
        ids = torch.randint(0, VOCAB, (2, 12))
        model.train()
        with torch.no_grad():
            model(input_ids=ids, labels=ids)
        model.eval()
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            got = model.cuda()(input_ids=ids.cuda()).logits.cpu()
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lora_dropout_keeps_1_minus_p_and_rescales_like_nn_dropout(p):
    drop = LoraDropout(p).train()
    x = torch.rand(1000, 1000) + 1.0  # no zeros, so a zero output means dropped
    y = drop(x)
    kept = y != 0
    n = x.numel()
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5  # 5 standard errors
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert not torch.equal(drop(x) != 0, kept)  # a fresh mask per call
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)  # reproducible from the global RNG (resume restores it)
    # neighbouring elements share a 64-bit draw but not a mask bit: no correlation between them
    k = kept.reshape(-1, 4).float()
    corr = torch.corrcoef(k.t())
    assert (corr - torch.eye(4)).abs().max() < 0.01
    assert drop.eval()(x) is x  # eval: identity
    assert isinstance(drop, nn.Dropout)  # DoRA's "recompute W x on dropout(x)" rule still sees a dropout


def test_lora_dropout_gradient_is_its_mask():
    drop = LoraDropout(0.3).train()
    x = torch.randn(64, 48, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(y != 0, 1 / 0.7, 0.0))


def test_every_adapter_family_uses_the_fast_dropout():
    for cfg in (sp.LoraConfig(r=4), sp.DoraConfig(r=4), sp.SlimConfig(r=4), sp.MixLoraConfig(r=4),
                sp.LoraMoeConfig(r=4), sp.MolaConfig(r=4, experts_per_layer=[2, 2]), sp.ILoraConfig(r=4)):
        model = sp.get_adapter_model(tiny_llama(), cfg)
        drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        assert drops and all(isinstance(m, LoraDropout) for m in drops), cfg.method


@pytest.mark.parametrize("scale", [2.0, 1.0])  # mask ratio 0.5 with and without the rescale
def test_exact_dare_equals_the_dense_reference_in_values_and_gradients(scale):
    x, A, B, idx, w, _ = problem(E=4, r=8, d_in=62, d_out=96, T=30, K=2, num_identity=2)
    keep = drop_keep_mask((4, 96, 62), 0.5)
    assert keep.dtype == torch.bool and 0.3 < keep.float().mean().item() < 0.7
    want = exact_dare_mixture(x, A, B, dense_gates(idx, w, 4), keep.float() * scale)
    got = dare_mixture(x, A, B, keep, scale, idx, w)  # autograd on: DareRows
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # row 0 picked only identity experts
    grads = [torch.autograd.grad(y.square().sum(), (x, A, B, w)) for y in (want, got)]
    for g_want, g_got in zip(*grads, strict=True):
        torch.testing.assert_close(g_got, g_want, atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # evaluation: the same values, from the updates formed once (as SlimLinear caches)
        delta = dare_delta(A, B, keep, scale)
        torch.testing.assert_close(dare_mixture(x, A, B, keep, scale, idx, w, delta), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(delta, torch.bmm(B, A) * keep * scale)


def test_exact_dare_with_every_pick_on_identity_experts_adds_nothing():
    x, A, B, _, w, _ = problem(E=4, r=8, d_in=64, d_out=96, T=10, K=2, num_identity=2)
    idx = torch.full((10, 2), 4)  # every pick an identity expert
    y = dare_mixture(x, A, B, drop_keep_mask((4, 96, 64), 0.5), 2.0, idx, w)
    assert torch.equal(y, torch.zeros(10, 96))
    gx, gA = torch.autograd.grad(y.sum(), (x, A), allow_unused=True)
    assert gx is None or not gx.any()
    assert gA is None or not gA.any()


def test_training_dare_mask_is_dare():
    p = 0.3
    mask = drop_rescale_mask((8, 300, 400), p)  # global RNG: the 16-bit draw
    assert torch.equal(mask.unique(), torch.tensor([0.0, 1 / (1 - p)]))
    assert abs((mask > 0).float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / mask.numel()) ** 0.5
    assert set(drop_rescale_mask((8, 30, 40), p, rescale=False).unique().tolist()) == {0.0, 1.0}
    g = torch.Generator().manual_seed(0)
    fixed = (torch.rand(8, 30, 40, generator=torch.Generator().manual_seed(0)) >= p).float() / (1 - p)
    assert torch.equal(drop_rescale_mask((8, 30, 40), p, generator=g), fixed)  # seeded: the float draw, as before
