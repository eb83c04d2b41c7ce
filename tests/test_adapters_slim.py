"""SLIM (adapters/methods/slim): identity experts, the one-expert LoRA limit, DARE merge masks in training and
evaluation, the exact merge form, sliding clusters, routing modes and weight yielding, auxiliary losses, the
dispatch paths inside the layer and its cached masked factors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, batch, host_reads, logits, randomize, tiny_llama, train_steps

import slim_peft as sp
from slim_peft.adapters.methods.slim.layer import SlimLinear, SlimRouter, routers

# --- identity experts, the LoRA limit ------------------------------------------------------------------


def test_slim_all_weight_on_identity_is_the_base_model_exactly():
    base = tiny_llama()
    data = batch()
    ref = logits(base, data)
    cfg = sp.SlimConfig(r=4, num_lora_experts=3, num_identity_experts=2, top_k=2)
    model = sp.get_adapter_model(copy.deepcopy(base), cfg)
    train_steps(model)  # non-zero experts, trained clusters
    assert not torch.equal(logits(model, data), ref)
    model.force_routing([0.0, 0.0, 0.0, 0.5, 0.5])
    assert torch.equal(logits(model, data), ref)
    model.train()  # also under training-mode masks and dropout
    with torch.no_grad():
        assert torch.equal(model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits, ref)


class IdentityWhere(torch.nn.Module):
    """Router logits that send a token to the identity experts only (both top-2 picks) where `rule(h)` holds,
    and to LoRA experts elsewhere."""

    def __init__(self, num_lora: int, num_experts: int, rule) -> None:
        super().__init__()
        self.num_lora, self.num_experts, self.rule = num_lora, num_experts, rule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(h.shape[0], self.num_experts) + torch.arange(self.num_experts) * 1e-3  # no ties
        z[:, self.num_lora:] += 10.0 * self.rule(h).float()[:, None] - 5.0
        return z


def identity_routed_slim(rule):
    cfg = sp.SlimConfig(r=4, num_lora_experts=3, num_identity_experts=2, top_k=2, target_modules="all-linear",
                        routing="linear")
    model = sp.get_adapter_model(tiny_llama(), cfg)
    randomize(model)
    for r in routers(model).values():
        r.router = IdentityWhere(3, 5, rule)
    return model.eval()


def test_tokens_routed_to_identity_only_skip_the_lora_matmuls_in_inference(monkeypatch):
    import slim_peft.adapters.methods.slim.layer as slim_layer

    model = identity_routed_slim(lambda h: h[:, 0] > 0)  # about half the tokens of every layer
    data = batch()
    with torch.enable_grad():  # with autograd every row takes the dense path: the reference
        ref = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.detach()
    assert all(r.current_rows is None for r in routers(model).values())
    got = logits(model, data)
    rows = [r.current_rows for r in routers(model).values()]
    T = data["input_ids"].numel()
    assert all(x is not None and 0 < x.numel() < T for x in rows)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, logits(tiny_llama(), data))  # the LoRA rows still count

    everything = identity_routed_slim(lambda h: torch.ones(h.shape[0], dtype=torch.bool))
    calls = []
    real = slim_layer.mix_experts
    monkeypatch.setattr(slim_layer, "mix_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(logits(everything, data), logits(tiny_llama(), data))
    ids = data["input_ids"][:1, :5]
    with torch.no_grad():
        out = everything.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, tiny_llama().generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    assert calls == []  # no LoRA matmul ran, in the prefill or at any decoded token
    forced = identity_routed_slim(lambda h: h[:, 0] > 0)
    forced.force_routing([0.0, 0.0, 0.0, 0.5, 0.5])  # LoRA ids picked with weight 0 count as identity
    assert torch.equal(logits(forced, data), logits(tiny_llama(), data)) and calls == []
    everything.train()
    with torch.no_grad():
        everything(input_ids=ids)
    assert calls and all(r.current_rows is None for r in routers(everything).values())  # training: dense


def test_inference_routing_caches_equal_the_plain_routing_and_follow_the_clusters():
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4, yield_strength=2.0))
    randomize(model)
    train_steps(model, steps=2)  # clusters initialised and moved
    model.eval()
    r = next(iter(routers(model).values()))
    h = torch.randn(40, 32)
    with torch.enable_grad():  # autograd: nothing cached, the reference
        ref = r.route(h, None)
    with torch.no_grad():
        got = r.route(h, None)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    with torch.no_grad():  # the cached ||c||^2 and 1 / sqrt(v + eps) follow a change of the clusters
        r.clusters.variances.mul_(0.01)
        r.clusters.centres.add_(0.3)
        moved = r.route(h, None)
    with torch.enable_grad():
        ref_moved = r.route(h, None)
    assert torch.equal(moved[0], ref_moved[0]) and torch.equal(moved[1], ref_moved[1])
    assert not torch.equal(moved[1], got[1])


def test_slim_with_one_expert_equals_lora():
    base = tiny_llama()
    data = batch()
    ffn = ["gate_proj", "up_proj", "down_proj"]
    lora = sp.get_adapter_model(copy.deepcopy(base), sp.LoraConfig(r=4, lora_dropout=0.0, target_modules=ffn))
    train_steps(lora)
    slim = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(
        r=4, lora_dropout=0.0, num_lora_experts=1, num_identity_experts=0, top_k=1, yield_strength=0.0,
        mask_ratio=0.0))
    lora_layers = dict(lora.base_model.named_modules())
    with torch.no_grad():
        for name, m in slim.base_model.named_modules():
            if isinstance(m, SlimLinear):
                m.experts.lora_A.copy_(lora_layers[name].lora_A.weight[None])
                m.experts.lora_B.copy_(lora_layers[name].lora_B.weight[None])
    torch.testing.assert_close(logits(slim, data), logits(lora, data), atol=1e-5, rtol=0)


# --- DARE merge masks ------------------------------------------------------------------------------------


def test_mask_ratio_zero_leaves_the_update_unchanged():
    base = tiny_llama()
    data = batch()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4, lora_dropout=0.0, mask_ratio=0.0))
    train_steps(model, steps=3)
    ref = logits(model, data)
    model.train()  # training mode draws masks when p > 0; with p = 0 it must not
    with torch.no_grad():
        for m in model.base_model.modules():
            if isinstance(m, SlimLinear):
                assert m.masks() is None
    model.eval()
    torch.testing.assert_close(logits(model, data), ref, atol=0, rtol=0)


def test_eval_masks_fixed_resample_none():
    base = tiny_llama()
    data = batch()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4, mask_ratio=0.5))
    train_steps(model, steps=3)
    a, b = logits(model, data), logits(model, data)
    assert torch.equal(a, b)  # fixed masks: reproducible evaluation
    model.adapter_config.eval_mask = "resample"
    assert not torch.equal(logits(model, data), a)
    model.adapter_config.eval_mask = "none"
    unmasked = logits(model, data)
    model.adapter_config.mask_ratio = 0.0
    torch.testing.assert_close(logits(model, data), unmasked, atol=0, rtol=0)


def test_exact_merge_form_trains_and_differs_from_fast():
    """The exact DARE form starts where the fast form starts (B = 0: both are the base model), learns by a
    margin a broken gradient would miss, and follows its own trajectory (other masks)."""
    base = tiny_llama()
    runs = {}
    for form in ("exact", "fast"):
        torch.manual_seed(0)
        model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4, merge_form=form))
        torch.manual_seed(1)
        runs[form] = train_steps(model, steps=10)
    exact, fast = runs["exact"], runs["fast"]
    assert exact[0] == pytest.approx(fast[0], abs=1e-6)
    assert exact[-1] < exact[0] - 0.2  # measured here: a drop of 0.44 in 10 steps
    assert max(abs(a - b) for a, b in zip(exact[1:], fast[1:], strict=True)) > 1e-4


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


# --- clusters and routing ----------------------------------------------------------------------------------


def test_sliding_clusters_move_in_training_only_and_survive_save_load(tmp_path):
    base = tiny_llama()
    data = batch()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4))
    site = next(iter(routers(model.base_model).values())).clusters
    assert not bool(site.initialized)
    train_steps(model, steps=1)
    assert bool(site.initialized)
    c1, v1, t1 = site.centres.clone(), site.variances.clone(), site.tau.clone()
    train_steps(model, steps=1)
    assert not torch.equal(site.centres, c1) and not torch.equal(site.variances, v1)
    assert not torch.equal(site.tau, t1)
    c2 = site.centres.clone()
    logits(model, data)  # eval mode: frozen
    assert torch.equal(site.centres, c2)
    ref = logits(model, data)
    model.save_pretrained(tmp_path / "a")
    loaded = sp.AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    site2 = next(iter(routers(loaded.base_model).values())).clusters
    assert torch.equal(site2.centres, c2) and torch.equal(site2.tau, site.tau)
    assert torch.equal(logits(loaded, data), ref)


def test_routing_linear_mode_and_yield_clamp_and_max_distance():
    base = tiny_llama()
    # each mode's loss drop after 8 steps must be at least about half of what it reaches (0.27, 0.24, 0.36)
    for kw, margin in ((dict(routing="linear"), 0.13), (dict(distance="max", yield_clamp=True), 0.12),
                       (dict(target_modules="all-linear"), 0.18)):
        model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4, **kw))
        losses = train_steps(model, steps=8)
        assert losses[-1] < losses[0] - margin, (kw, losses)
        stats = model.routing_stats()
        assert stats["sites"] and 0.0 <= stats["mean_identity_share"] <= 1.0


def test_weight_yielding_moves_far_tokens_to_identity_experts():
    base = tiny_llama()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4, yield_strength=50.0))
    train_steps(model, steps=3)
    router = next(iter(routers(model.base_model).values()))
    h = torch.randn(64, 32)
    router.eval()
    near = router.clusters.centres[torch.arange(64) % router.clusters.centres.shape[0]]
    far = near + 100 * h
    router.reset_stats()
    router.route(far, None)
    far_share = router.stats()["identity_share"]
    router.reset_stats()
    router.route(near, None)
    assert far_share > 0.99 > router.stats()["identity_share"]


def test_aux_losses_are_in_the_loss_and_reach_the_router():
    base = tiny_llama()
    data = batch()
    cfg = sp.SlimConfig(r=4, l1_weight=0.5, balance_loss_weight=0.3, lora_dropout=0.0, mask_ratio=0.0)
    model = sp.get_adapter_model(copy.deepcopy(base), cfg)
    model.eval()  # deterministic
    out = model(**data)
    aux = model.aux_losses()
    assert set(aux) == {"l1", "balance"}
    model.adapter_config.l1_weight = 0.0
    model.adapter_config.balance_loss_weight = 0.0
    ce = model(**data).loss
    torch.testing.assert_close(out.loss, ce + 0.5 * aux["l1"] + 0.3 * aux["balance"])
    model.adapter_config.balance_loss_weight = 0.3
    model.zero_grad()
    model(**data)
    model.aux_losses()["balance"].backward()
    router = next(iter(routers(model.base_model).values())).router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# --- dispatch inside the layer ----------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_slim_trains_with_each_dispatch(dispatch):
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4, dispatch=dispatch))
    losses = train_steps(model, steps=10)
    assert losses[-1] < losses[0] - 0.18, losses  # about half of the 0.36 both paths reach


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


def test_kept_clusters_distance_is_the_smallest_over_tasks_by_a_plain_loop():
    from slim_peft.adapters.modules.clusters import EPS, KeptClusters, SlidingClusters

    torch.manual_seed(0)
    d, C = 6, 3
    kept = KeptClusters(max_tasks=4, num_clusters=C, dim=d)
    tasks = []
    for _ in range(3):
        clusters = SlidingClusters(C, d, momentum=0.1)
        clusters.centres.copy_(torch.randn(C, d))
        clusters.variances.copy_(torch.rand(C, d) + 0.1)
        clusters.tau.fill_(float(torch.rand(()) + 0.5))
        kept.keep(clusters)
        tasks.append((clusters.centres.clone(), clusters.variances.clone(), float(clusters.tau)))
    h = torch.randn(10, d)
    for calibrated in (True, False):
        expected = []
        for x in h:
            best = float("inf")
            for c, v, tau in tasks:
                k = int(((x - c) ** 2).sum(1).argmin())
                rho = float(((x - c[k]).abs() / torch.sqrt(v[k] + EPS)).max())
                best = min(best, rho / tau - 1 if calibrated else rho - 1)
            expected.append(best)
        torch.testing.assert_close(kept.distance(h, calibrated), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert kept.kept() == 3 and int(kept.count) == 3
    kept.keep(SlidingClusters(C, d, momentum=0.1))
    with pytest.raises(ValueError, match="at most 4 tasks"):
        kept.keep(SlidingClusters(C, d, momentum=0.1))
    restored = KeptClusters(max_tasks=4, num_clusters=C, dim=d)
    restored.load_state_dict(kept.state_dict())
    assert restored.kept() == 4  # the host count follows the loaded buffer
