"""Building blocks (adapters/modules): the expert dispatch paths (dense, grouped with `_grouped_mm`, and the
per-expert loop) agree in values and gradients and the fast ones read nothing back to the host; routing
(top-p); DARE masks and merging, fast (masked factors) and exact (elementwise); the fast LoRA dropout."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, host_reads, randomize, tiny_llama
from torch import nn

import slim_peft as sp
from slim_peft.adapters.modules.dare import (
    dare_delta,
    dare_mixture,
    drop_keep_mask,
    drop_rescale_mask,
    exact_dare_mixture,
    factor_masks,
    masked_factors,
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
from slim_peft.adapters.modules.routing import top_p_routing

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


def test_expert_rows_loop_equals_grouped_mm():
    x, A, B, idx, w, _ = problem(E=8, r=16, d_in=64, d_out=96, T=30, K=1, num_identity=0)
    expert, order = torch.sort(idx.reshape(-1), stable=True)
    offsets = torch.searchsorted(expert, torch.arange(8), right=True).to(torch.int32)
    xs, ws = x[order], w.reshape(-1)[order]
    assert grouped_mm_fits(xs, A, B)
    torch.testing.assert_close(expert_rows_loop(xs, A, B, offsets, ws), grouped_rows(xs, A, B, offsets, ws),
                               atol=1e-5, rtol=1e-4)


def test_dense_and_grouped_dispatch_agree_in_values_and_gradients():
    torch.manual_seed(0)
    E, r, d_in, d_out, T, K = 5, 3, 8, 6, 20, 2
    A = torch.randn(E, r, d_in, requires_grad=True)
    B = torch.randn(E, d_out, r, requires_grad=True)
    x = torch.randn(T, d_in)
    idx = torch.randint(0, E + 2, (T, K))  # ids >= E are identity experts
    w = torch.rand(T, K)
    outs, grads = [], []
    for f in (lambda: dense_mixture(x, A, B, dense_gates(idx, w, E)), lambda: grouped_mixture(x, A, B, idx, w)):
        A.grad = B.grad = None
        y = f()
        (y ** 2).sum().backward()
        outs.append(y.detach())
        grads.append((A.grad.clone(), B.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for g0, g1 in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g0, g1, atol=1e-4, rtol=1e-4)


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


# --- routing ---------------------------------------------------------------------------------------------

def test_top_p_selects_the_minimal_expert_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    for p, kept in [(0.4, {1}), (0.75, {1, 3}), (0.85, {1, 3, 0}), (0.99, {0, 1, 2, 3})]:
        idx, w = top_p_routing(probs.log(), p)
        assert {int(i) for i, wi in zip(idx[0], w[0], strict=True) if wi > 0} == kept
        torch.testing.assert_close(w[w > 0].sum(), probs[0, sorted(kept)].sum())  # not renormalised
    logits = torch.randn(200, 6, generator=torch.Generator().manual_seed(0)) * 2
    for p in (0.3, 0.6, 0.8, 0.95):
        _, w = top_p_routing(logits, p)
        kept_mass = w.sum(-1)
        smallest = torch.where(w > 0, w, torch.full_like(w, 2.0)).amin(-1)
        assert (kept_mass >= p - 1e-6).all()  # reaches p
        assert (kept_mass - smallest < p).all()  # dropping the smallest kept expert falls short: minimal
        assert ((w > 0).sum(-1) >= 1).all()



# --- DARE merge masks ------------------------------------------------------------------------------------

def test_fast_masks_are_unbiased_and_exact_form_is_dare():
    torch.manual_seed(0)
    E, r, d_in, d_out, p = 2, 3, 5, 4, 0.5
    A, B = torch.randn(E, r, d_in), torch.randn(E, d_out, r)
    BA = torch.bmm(B, A)
    g = torch.Generator().manual_seed(0)
    n = 20000
    total = torch.zeros_like(BA)
    for _ in range(n):
        Am, Bm = masked_factors(A, B, *factor_masks(E, d_in, d_out, p, generator=g))
        total += torch.bmm(Bm, Am)
    mean = total / n
    # per entry, the masked product has std <= |BA| sqrt(p / (1 - p)); 5 standard errors of the mean
    tol = 5 * BA.abs() * (p / (1 - p)) ** 0.5 / n**0.5 + 1e-4
    assert ((mean - BA).abs() <= tol).all()
    Am, Bm = masked_factors(A, B, *factor_masks(E, d_in, d_out, p, generator=g))
    assert not torch.allclose(torch.bmm(Bm, Am), BA)  # a single draw does drop entries
    # mask ratio 0 keeps everything
    Am, Bm = masked_factors(A, B, *factor_masks(E, d_in, d_out, 0.0, generator=g))
    assert torch.equal(Am, A) and torch.equal(Bm, B)
    # exact form: elementwise DARE, delta' = m * delta / (1 - p)
    x, gates = torch.randn(6, d_in), torch.rand(6, E)
    mask = drop_rescale_mask((E, d_out, d_in), p, generator=g)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    want = sum(gates[:, e:e + 1] * (x @ (mask[e] * BA[e]).t()) for e in range(E))
    torch.testing.assert_close(exact_dare_mixture(x, A, B, gates, mask), want)


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


# --- LoRA dropout ----------------------------------------------------------------------------------------

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
