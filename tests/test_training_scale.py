"""Scale-correct training on CPU: gradient checkpointing gives the gradients and statistics of the plain forward
(every method), routing is fp32 under bf16 autocast, every method trains in bf16 (a bf16 or fp16 base with fp32
adapters, and accelerate's bf16 autocast), SLIM's exact merge form under autocast and its memory rules."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import batch, method_configs, randomize, tiny_llama

import slim_peft as sp
from slim_peft.adapters.methods.slim.layer import SlimLinear, check_exact_form_memory, routers
from slim_peft.adapters.modules.clusters import SlidingClusters
from slim_peft.adapters.modules.routing import StatsRouter, top_k_routing, top_p_routing
from slim_peft.errors import ConfigError

CASES = sorted(method_configs())


def _model(name: str, base=None, **fields):
    cfg = dataclasses.replace(method_configs(r=4, lora_dropout=0.1)[name], **fields)
    torch.manual_seed(0)
    model = sp.get_adapter_model(copy.deepcopy(base if base is not None else tiny_llama()), cfg)
    randomize(model)  # B != 0: every factor gets a gradient from step 1
    return model


def _train(model, gradient_checkpointing: bool, steps: int = 3):
    """`steps` SGD steps on one padded batch: the gradients of every step, the buffers at the end, and how many
    times the first decoder layer's FFN ran (a checkpointed run recomputes it in backward)."""
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    layer_calls = []
    model.base_model.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    model.train()
    data = batch(b=3, s=12)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
    torch.manual_seed(123)  # dropout and SLIM's merge masks
    grads = []
    for _ in range(steps):
        model(**data).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()
    buffers = {n: b.clone() for n, b in model.base_model.named_buffers() if ".base_layer." not in n}
    return grads, buffers, len(layer_calls)


@pytest.mark.parametrize("name", CASES)
def test_gradient_checkpointing_gives_the_same_gradients_and_statistics(name):
    """Parameter gradients of every step and the statistics after the steps (SLIM's clusters and tau, every
    router's load counters) equal those without checkpointing. Before the fix, SLIM's recompute routed with
    clusters the first forward had already moved, and every router counted each token twice."""
    plain_grads, plain_buffers, plain_calls = _train(_model(name), False)
    ckpt_grads, ckpt_buffers, ckpt_calls = _train(_model(name), True)
    assert ckpt_calls > plain_calls  # the layers were recomputed
    for step, (a, b) in enumerate(zip(plain_grads, ckpt_grads, strict=True)):
        assert a.keys() == b.keys() and a, step
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=f"step {step + 1}: {k}")
    assert plain_buffers.keys() == ckpt_buffers.keys()
    for k in plain_buffers:
        torch.testing.assert_close(ckpt_buffers[k], plain_buffers[k], rtol=1e-5, atol=1e-7, msg=k)
    if name.startswith("slim"):
        assert any(k.endswith("clusters.centres") for k in plain_buffers)


def test_cluster_statistics_move_once_per_optimizer_step():
    """Forwards only accumulate (the state a forward reads never changes under it); `after_optimizer_step`
    applies the step's sums."""
    model = _model("slim")
    model.train()
    data = batch(b=4, s=12)
    model(**{k: v[:2] for k, v in data.items()}).loss.backward()  # initialises the clusters
    site = next(iter(routers(model.base_model).values())).clusters
    before = (site.centres.clone(), site.variances.clone(), site.tau.clone())
    model(**{k: v[2:] for k, v in data.items()}).loss.backward()
    assert all(torch.equal(x, y) for x, y in zip(before, (site.centres, site.variances, site.tau), strict=True))
    model.after_optimizer_step()
    assert not torch.equal(site.centres, before[0]) and not torch.equal(site.tau, before[2])
    assert site.pending_sums() is None


def test_a_loop_that_never_commits_is_warned(monkeypatch):
    from slim_peft.adapters.modules import clusters as clusters_module

    monkeypatch.setattr(clusters_module, "UNCOMMITTED_WARNING", 3)
    model = _model("slim")
    model.train()
    data = batch()
    with pytest.warns(UserWarning, match=r"after_optimizer_step\(\) after each optimizer.step\(\)"):
        for _ in range(3):
            model(**data)


def test_two_accumulated_micro_batches_make_one_momentum_step_over_both():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 8, generator=g)
    w = (torch.rand(40, generator=g) > 0.2).float()

    def clusters():
        c = SlidingClusters(3, 8, momentum=0.3, seed=1)
        c.initialize(h, w)
        return c

    def sums(c, rows):
        k = c.nearest(h[rows])
        c.accumulate(h[rows], w[rows], k, c.rho(h[rows], k))

    split, whole = clusters(), clusters()
    sums(split, slice(0, 15))
    sums(split, slice(15, 40))
    split.apply_pending(split.pending_sums())
    sums(whole, slice(0, 40))
    whole.apply_pending(whole.pending_sums())
    for name in ("centres", "variances", "tau"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=1e-6, atol=1e-6)
    assert not torch.equal(split.centres, clusters().centres)


# --- mixed precision -----------------------------------------------------------------------------------


def _routing_inputs(width: int = 1024, tokens: int = 2048, experts: int = 8):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, width, generator=g)
    return h, experts


def test_routers_route_in_fp32_under_bf16_autocast():
    """The same top-k / top-p choices and weights under CPU bf16 autocast as in fp32, on a fixed batch wide
    enough that bf16 logits would flip near-ties (without the fix, about 1% of the top-2 picks here)."""
    h, E = _routing_inputs()
    router = StatsRouter(h.shape[1], E, "normal", 0.02)
    ref = router(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = router(h)
    assert under.dtype == torch.float32
    assert torch.equal(under, ref)
    for select in (lambda z: top_k_routing(z, 2), lambda z: top_p_routing(z, 0.8)):
        (i0, w0), (i1, w1) = select(ref), select(under)
        assert torch.equal(i0, i1) and torch.equal(w0, w1)


def test_slim_routing_and_cluster_distance_in_fp32_under_bf16_autocast():
    h, _ = _routing_inputs(width=512, tokens=1024)
    cfg = sp.SlimConfig(num_clusters=8)
    from slim_peft.adapters.methods.slim.layer import SlimRouter

    router = SlimRouter(h.shape[1], cfg, seed=3)
    router.train()
    router.route(h, None)  # initialises the clusters
    router.clusters.apply_pending(router.clusters.pending_sums())
    router.eval()
    ref_k = router.clusters.nearest(h)
    idx, w = router.route(h, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_a, w_a = router.route(h, None)
    assert torch.equal(idx, idx_a) and torch.equal(w, w_a)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the unguarded distance would run its matmul in bf16
        bf16_k = torch.addmm(router.clusters.centres.square().sum(1), h, router.clusters.centres.t(),
                             alpha=-2.0).argmin(-1)
    assert torch.equal(router.clusters.nearest(h), ref_k)
    assert (bf16_k != ref_k).any()  # the test's batch is one where bf16 would change the nearest centre


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_every_method_trains_on_a_half_precision_base_with_fp32_adapters(name, base_dtype):
    base = tiny_llama().to(base_dtype)
    cfg = method_configs(r=4)[name]
    model = sp.get_adapter_model(base, cfg)
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    assert all(b.dtype == torch.float32 for n, b in model.base_model.named_buffers()
               if b.is_floating_point() and ".base_layer." not in n and "rotary" not in n)
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    data = batch()
    for _ in range(3):
        loss = model(**data).loss
        assert math.isfinite(loss.item())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()


@pytest.mark.parametrize("name", CASES + ["slim-exact"])
def test_every_method_trains_with_the_trainers_bf16_autocast_and_checkpointing(name, tmp_path):
    """`TrainingArguments(bf16=True, gradient_checkpointing=True)`: accelerate's CPU bf16 autocast, 3 steps."""
    from test_training import tiny_examples

    from slim_peft.training import Trainer, TrainingArguments, read_metrics

    cfg = sp.SlimConfig(r=4, merge_form="exact") if name == "slim-exact" else method_configs(r=4)[name]
    model = sp.get_adapter_model(tiny_llama(vocab_size=64, pad_token_id=0), cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             logging_steps=1, save_steps=0, bf16=True, gradient_checkpointing=True,
                             disable_tqdm=True, learning_rate=1e-3)
    dtypes = set()
    model.base_model.get_decoder().layers[0].self_attn.register_forward_hook(
        lambda mod, args, out: dtypes.add(out[0].dtype))
    Trainer(model, args, tiny_examples(16)).train()
    assert torch.bfloat16 in dtypes  # autocast was on
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(native, monkeypatch, tmp_path):
    import warnings

    from test_training import tiny_examples

    import slim_peft.training.trainer as trainer_module
    from slim_peft.training import Trainer, TrainingArguments

    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    model = sp.get_adapter_model(tiny_llama(vocab_size=64, pad_token_id=0), sp.LoraConfig(r=4))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, bf16=True, disable_tqdm=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model, args, tiny_examples(4))._make_accelerator()
    assert any("emulated" in str(w.message) for w in caught) is (not native)


# --- SLIM's exact merge form ------------------------------------------------------------------------------


def test_exact_form_under_autocast_equals_its_fp32_mixture():
    """The exact form runs in fp32 with autocast off: its adapter delta under bf16 autocast equals fp32's."""
    model = _model("slim-linear-routing", merge_form="exact", mask_ratio=0.5)  # a layer with its own router
    model.eval()
    layer = next(m for m in model.base_model.modules() if isinstance(m, SlimLinear))
    x = torch.randn(16, layer.base_layer.in_features)
    base_out = layer.base_layer(x)
    with torch.no_grad():
        ref = layer(x) - base_out
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = layer(x).float() - layer.base_layer(x).float()
    torch.testing.assert_close(under, ref, atol=3e-2, rtol=1e-2)  # bf16 rounding of the base output only


def test_exact_form_backward_redraws_its_masks_instead_of_keeping_them():
    """Training with the exact form saves no E x d_out x d_in boolean mask for backward, and its gradients
    equal those computed with the mask kept."""
    from slim_peft.adapters.modules.dare import DareRows, ReplayableKeepMask

    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, 16, generator=g).requires_grad_()
    B = torch.randn(3, 24, 4, generator=g).requires_grad_()
    xs = torch.randn(10, 16, generator=g).requires_grad_()
    bounds = [0, 4, 4, 10]
    record, keep = ReplayableKeepMask.draw((3, 24, 16), 0.5, torch.device("cpu"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = DareRows.apply(xs, A, B, keep, 2.0, bounds, record)
    assert not any(t.dtype == torch.bool for t in saved)
    torch.rand(100)  # the global RNG moves on; the replay must not depend on it
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (xs, A, B)]
    for t in (xs, A, B):
        t.grad = None
    DareRows.apply(xs, A, B, keep, 2.0, bounds, None).square().sum().backward()
    for got, t in zip(grads, (xs, A, B), strict=True):
        torch.testing.assert_close(got, t.grad)
    assert torch.equal(record.replay(), keep)


def test_exact_form_refuses_a_device_without_the_memory_it_needs():
    model = _model("slim", merge_form="exact")
    layers = [m for m in model.base_model.modules() if isinstance(m, SlimLinear)]
    need = max(m.experts.num_experts * m.base_layer.in_features * m.base_layer.out_features * 5 for m in layers)
    with pytest.raises(ConfigError, match=r"merge_form='exact' needs about .* GiB .*merge_form='fast'"):
        check_exact_form_memory(layers, need - 1)
    check_exact_form_memory(layers, need * 4 * len(layers))
    assert all(m.cache_exact_delta for m in layers)
    check_exact_form_memory(layers, need)  # fits in training, too large to cache every update in eval
    assert not any(m.cache_exact_delta for m in layers)


# --- collectives under DDP ----------------------------------------------------------------------------------


def test_collectives_run_in_the_first_forward_and_at_commit_never_in_a_recompute(monkeypatch):
    """With a (simulated) 2-process group: the clusters' initialisation all-reduces in the first forward, each
    step's sums in one all-reduce at `after_optimizer_step`; nothing runs inside backward (a checkpointed
    recompute), where the processes' collective order is not under our control."""
    import torch.distributed as dist

    calls = []

    def all_reduce(t, *args, **kwargs):
        calls.append(("backward" if torch._C._current_graph_task_id() != -1 else phase[0], t.numel()))
        return None

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    phase = ["forward"]
    model = _model("slim", mask_ratio=0.0)
    model.activation_checkpointing_enable()
    model.train()
    data = batch()
    for _ in range(2):
        phase[0] = "forward"
        model(**data).loss.backward()
        phase[0] = "commit"
        model.after_optimizer_step()
    sites = len(routers(model.base_model))
    assert not [c for c in calls if c[0] == "backward"]
    assert sum(1 for c in calls if c[0] == "commit") == 2  # one collective per step for every site together
    assert sum(1 for c in calls if c[0] == "forward") == 5 * sites  # initialisation only, in the first forward


def test_the_grouped_mm_probe_does_not_disturb_a_checkpointed_autocast_forward():
    """The first `_grouped_mm` probe of a process used to run inside the forward that needed it: under
    gradient checkpointing its own saved tensors made the recompute's count differ (CheckpointError)."""
    from slim_peft.adapters.modules.experts import grouped_mm_available

    grouped_mm_available.cache_clear()
    model = _model("mixlora")
    model.activation_checkpointing_enable()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch()).loss
    loss.backward()
    assert math.isfinite(loss.item())


def test_every_router_passes_gradient_to_its_input():
    """One choice for every routed method: the router sees the hidden state itself (not detached), so the
    routing gradient reaches earlier layers (SLIM detached it before, unlike MixLoRA, LoRAMoE and MoLA)."""
    from slim_peft.adapters.methods.slim.layer import SlimRouter

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g)
    probe = torch.randn(64, 2, generator=g)
    slim = SlimRouter(32, sp.SlimConfig(num_lora_experts=3, num_identity_experts=1, top_k=2), seed=0).train()
    stats = StatsRouter(32, 4, "normal", 0.02)
    for route in (lambda x: slim.route(x, None)[1], lambda x: top_k_routing(stats(x), 2)[1]):
        x = h.clone().requires_grad_()
        (route(x) * probe).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_train_step_benchmark_counts_every_frozen_linear_and_the_adapters():
    """benchmarks/train_step.py's floor: 2 x (2 x frozen linears x positions + 3 x adapter parameters x positions
    + 2 x head x supervised positions), counted by hand on a 2-layer Llama with LoRA on its FFN."""
    from conftest import load_benchmark

    train_step = load_benchmark("train_step")
    model = sp.get_adapter_model(tiny_llama(vocab_size=64), sp.LoraConfig(r=4, target_modules=["gate_proj", "up_proj",
                                                                                               "down_proj"]))
    labels = torch.full((2, 5), -100)
    labels[:, -2:] = 3  # 4 supervised positions
    step = [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5), "labels": labels}]
    # per layer: q 32x32, k and v 32x16 (2 KV heads of 8), o 32x32, gate and up 32x64, down 64x32
    frozen = 2 * (1024 + 512 + 512 + 1024 + 3 * 2048)
    adapter = 2 * (2 * 4 * (32 + 64) + 4 * (64 + 32))  # per layer: gate and up 4 x (32 + 64) each, down 4 x 96
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter
    expected = 2 * (2 * frozen * 10 + 3 * adapter * 10 + 2 * 64 * 32 * 4)
    assert train_step.matmul_flops(model, [step]) == expected
