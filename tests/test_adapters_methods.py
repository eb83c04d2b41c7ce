"""The adapter methods (adapters/methods) against plain references: LoRA and DoRA (merging, stock peft in and
out), MixLoRA (+ its dynamic top-p form), LoRAMoE, MoLA and I-LoRA; then every method: training lowers the loss,
save / load gives identical logits, generation, the saved peft_type, merge refusal."""

from __future__ import annotations

import copy
import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, batch, greedy, host_reads, logits, randomize, tiny_llama, tiny_qwen2, train_steps

import slim_peft as sp
from slim_peft.adapters import FFN_PROJ
from slim_peft.adapters.methods.ilora.layer import ILoraLinear
from slim_peft.adapters.methods.ilora.model import consistency_loss
from slim_peft.adapters.methods.loramoe.layer import LoraMoeLinear, localized_balance_loss
from slim_peft.adapters.methods.mixlora.layer import MixLoraFFN, mixlora_balance_loss, select_experts
from slim_peft.adapters.methods.mola.layer import MolaLinear, experts_per_layer
from slim_peft.adapters.replay import ReplayBuffer, ReplayExample

# the mixture-of-experts methods run on models and batches with a padding token: id 0, its embedding row zero
padded_llama = partial(tiny_llama, pad_token_id=0)
padded_qwen2 = partial(tiny_qwen2, pad_token_id=0)
padded_batch = partial(batch, b=4, low=1, pad_token_id=0, prompt=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: intra-op threads only add synchronisation (and stall badly when the
    machine's cores are busy), so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hand_ce(model, data) -> torch.Tensor:
    """Token-mean cross-entropy of the supervised positions, from full logits."""
    out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    return F.cross_entropy(out[:, :-1].reshape(-1, VOCAB).float(), data["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def randomize_lora_b(model: sp.AdapterModel, std: float = 0.05) -> None:
    """B starts at zero; give it values so that every adapter changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


# --- LoRA / DoRA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("config_cls", [sp.LoraConfig, sp.DoraConfig])
def test_lora_starts_at_base_and_merges(config_cls):
    base = tiny_llama()
    data = batch()
    ref = logits(base, data)
    model = sp.get_adapter_model(copy.deepcopy(base), config_cls(r=4, lora_alpha=8, lora_dropout=0.0))
    assert torch.equal(logits(model, data), ref)
    train_steps(model)
    adapted = logits(model, data)
    assert (adapted - ref).abs().max() > 1e-3  # training changed something
    merged = model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, data), adapted, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config_cls", [sp.LoraConfig, sp.DoraConfig])
def test_stock_peft_loads_our_adapter(tmp_path, config_cls):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    data = batch()
    model = sp.get_adapter_model(copy.deepcopy(base), config_cls(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    train_steps(model)
    ours = logits(model, data)
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(theirs, data), ours, atol=1e-5, rtol=0)


def test_we_load_a_stock_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    data = batch()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                   target_modules=["k_proj", "up_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    ours = sp.AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert ours.adapter_config.method == "dora"
    torch.testing.assert_close(logits(ours, data), logits(pm, data), atol=1e-5, rtol=0)


# --- MixLoRA -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_mixlora_one_expert_top1_equals_lora_on_ffn(dispatch):
    lora = sp.get_adapter_model(padded_llama(), sp.LoraConfig(r=4, lora_dropout=0.0, target_modules=FFN_PROJ))
    randomize_lora_b(lora)
    mix = sp.get_adapter_model(padded_llama(), sp.MixLoraConfig(
        r=4, lora_dropout=0.0, target_modules=FFN_PROJ, num_experts=1, top_k=1, dispatch=dispatch))
    with torch.no_grad():
        for layer in range(2):
            ffn = mix.base_model.model.layers[layer].mlp
            assert isinstance(ffn, MixLoraFFN)
            plain = lora.base_model.model.layers[layer].mlp
            for proj in FFN_PROJ:
                bank = getattr(ffn, proj).experts
                bank.lora_A[0].copy_(getattr(plain, proj).lora_A.weight)
                bank.lora_B[0].copy_(getattr(plain, proj).lora_B.weight)
    data = padded_batch()
    ref, got = logits(lora, data), logits(mix, data)
    assert not torch.allclose(ref, logits(sp.get_adapter_model(padded_llama(), sp.LoraConfig(
        r=4, target_modules=FFN_PROJ)), data), atol=1e-3)  # the LoRA update is not negligible
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_mixlora_balance_loss_equals_hand_computed_value():
    # router probabilities given as log-probabilities, so softmax returns them exactly
    l1 = torch.tensor([[0.8, 0.2], [0.4, 0.6]]).log()
    l2 = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()
    m2 = torch.tensor([True, False])  # the last token of layer 2 is padding
    # top-1: choices e0, e1, e0 -> F = [2/3, 1/3]; P = [(0.8+0.4+0.9)/3, (0.2+0.6+0.1)/3] = [0.7, 0.3]
    got = mixlora_balance_loss([l1, l2], [None, m2], num_experts=2, top_k=1)
    assert got.item() == pytest.approx(2 * (2 / 3 * 0.7 + 1 / 3 * 0.3), abs=1e-6)
    # top-2 of 3 experts: selections {0,1}, {1,2} -> F summed over slots = [1/2, 1, 1/2]; P = [.3, .45, .25]
    l3 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()
    got = mixlora_balance_loss([l3], [None], num_experts=3, top_k=2)
    assert got.item() == pytest.approx(3 * (0.5 * 0.3 + 1.0 * 0.45 + 0.5 * 0.25), abs=1e-6)
    # top-p 0.75: row 1 keeps {0, 1} (0.5 + 0.3 >= 0.75), row 2 keeps {1, 2} -> same F as top-2 here
    got = mixlora_balance_loss([l3], [None], num_experts=3, top_k=2, top_p=0.75)
    assert got.item() == pytest.approx(2.175, abs=1e-6)


def test_mixlora_balance_loss_is_computed_once_over_all_layers_and_added_to_the_loss():
    cfg = sp.MixLoraConfig(r=4, num_experts=4, top_k=2, lora_dropout=0.0, router_aux_loss_coef=0.01)
    model = sp.get_adapter_model(padded_llama(), cfg)
    data = padded_batch()
    out = model(**data)
    ctx = model.ctx
    assert len(ctx.router_logits) == 2  # one per layer, concatenated by the loss
    expected = mixlora_balance_loss(ctx.router_logits, ctx.router_masks, 4, 2)
    assert model.aux_losses()["balance"].item() == pytest.approx(expected.item(), abs=1e-7)
    with torch.no_grad():
        ce = hand_ce(model, data)
    assert out.loss.item() == pytest.approx(ce.item() + 0.01 * expected.item(), abs=1e-5)


def reference_mixlora_ffn(ffn: MixLoraFFN, h: torch.Tensor, top_p: float | None, top_k: int) -> torch.Tensor:
    """Loop over tokens and experts: sum_e w_e E_e(h) with each expert a full FFN + its LoRA (test only)."""
    probs = torch.softmax(ffn.router(h), dim=-1)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        p_sorted, order = probs[t].sort(descending=True)
        if top_p is not None:
            n = int(((p_sorted.cumsum(0) - p_sorted) < top_p).sum())
            chosen, weights = order[:n], p_sorted[:n]
        else:
            chosen, weights = order[:top_k], p_sorted[:top_k] / p_sorted[:top_k].sum()
        for e, w in zip(chosen.tolist(), weights, strict=True):
            def lin(proj, x, e=e):
                bank = proj.experts
                return proj.base_layer(x) + proj.scaling * (bank.lora_B[e] @ (bank.lora_A[e] @ x))
            a = ffn.act_fn(lin(ffn.gate_proj, h[t])) * lin(ffn.up_proj, h[t])
            out[t] += w * lin(ffn.down_proj, a)
    return out


@pytest.mark.parametrize("top_p", [None, 0.8])
def test_mixlora_ffn_matches_a_per_token_reference(top_p):
    cfg = sp.MixLoraConfig(r=4, num_experts=4, top_k=2, top_p=top_p, lora_dropout=0.0, router_init_std=0.5)
    model = sp.get_adapter_model(padded_llama(), cfg)
    randomize_lora_b(model)
    ffn = model.base_model.model.layers[0].mlp
    h = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ffn(h), reference_mixlora_ffn(ffn, h, top_p, 2), atol=1e-5, rtol=1e-5)
    if top_p is not None:
        assert 1.0 <= ffn.router.stats()["mean_active_experts"] <= 4.0


def test_mixlora_saved_keys_and_generation_with_cache(tmp_path):
    model = sp.get_adapter_model(padded_llama(), sp.MixLoraConfig(r=4, num_experts=4, top_k=2))
    keys = set(model.adapter_state_dict())
    p = "base_model.model.model.layers.0."
    assert {p + "mlp.router.weight", p + "mlp.gate_proj.experts.lora_A", p + "mlp.down_proj.experts.lora_B",
            p + "self_attn.q_proj.lora_A.weight", p + "self_attn.o_proj.lora_B.weight"} <= keys
    assert not any("base_layer" in k for k in keys)
    randomize_lora_b(model)
    model.eval()
    ids = padded_batch()["input_ids"][:2, :6]
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    stats = model.routing_stats()["sites"]
    assert "model.layers.0.mlp.router" in stats and stats["model.layers.0.mlp.router"]["tokens"] > 0


def test_mixlora_works_on_qwen2(tmp_path):
    model = sp.get_adapter_model(padded_qwen2(), sp.MixLoraConfig(r=4, num_experts=4, top_k=2))
    losses = train_steps(model, steps=10, data=padded_batch())
    assert losses[-1] < losses[0] - 0.18, losses  # about half of the 0.37 it reaches
    data = padded_batch()
    model.save_pretrained(tmp_path / "a")
    loaded = sp.AdapterModel.from_pretrained(padded_qwen2(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(loaded, data), logits(model, data), atol=0, rtol=0)
    prompt = data["input_ids"][:1, :5]
    out = loaded.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 10)
    assert torch.equal(out, greedy(loaded, prompt, 5))


def mixlora_ffn_reference(ffn: MixLoraFFN, x: torch.Tensor) -> torch.Tensor:
    """MixLoRA by its definition: each selected expert is a whole FFN (frozen W + its LoRA on gate, up and
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


# --- LoRAMoE -------------------------------------------------------------------------------------------

def test_loramoe_balance_loss_equals_hand_computed_value():
    gates = torch.tensor([[[0.7, 0.3], [0.6, 0.4]],
                          [[0.2, 0.8], [0.5, 0.5]]])
    mask = torch.tensor([[True, True], [True, False]])  # sample 1's second token is padding
    types = torch.tensor([0, 1])  # sample 0 world knowledge (expert 0's group), sample 1 downstream
    # Q = [[1.3, 0.2], [0.7, 0.8]]; I = [[1.1, 0.9], [0.9, 1.1]]; Z = [1.43, 0.18, 0.63, 0.88]
    z = torch.tensor([1.43, 0.18, 0.63, 0.88], dtype=torch.float64)
    mean = z.mean().item()
    var = ((z - z.mean()) ** 2).sum().item() / 3  # the unbiased variance (n - 1 = 3), as torch.var computes it
    assert mean == pytest.approx(0.78) and var == pytest.approx(0.815 / 3)
    paper = localized_balance_loss(gates, mask, types, delta=0.1, form="paper")
    code = localized_balance_loss(gates, mask, types, delta=0.1, form="code")
    assert paper.item() == pytest.approx(0.815 / 3 / 0.78, abs=1e-6)
    assert code.item() == pytest.approx(0.815 / 3 / 0.78 ** 2, abs=1e-6)
    # no types given: every sample counts as downstream (I = 0.9 for expert 0, 1.1 for expert 1)
    z = torch.tensor([1.3 * 0.9, 0.2 * 0.9, 0.7 * 1.1, 0.8 * 1.1])
    assert localized_balance_loss(gates, mask, None, 0.1).item() == pytest.approx(
        (z.var() / z.mean()).item(), abs=1e-6)


def test_loramoe_balance_loss_in_the_model_sums_over_linears_and_layers():
    cfg = sp.LoraMoeConfig(r=4, num_experts=4, lora_dropout=0.0, lbc_alpha=0.1, lbc_weight=0.1)
    model = sp.get_adapter_model(padded_llama(), cfg)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0]))
             for m in model.modules() if isinstance(m, LoraMoeLinear)]
    data = padded_batch()
    types = torch.tensor([0, 1, 1, 0])
    out = model(**data, sample_type=types)
    for h in hooks:
        h.remove()
    assert len(inputs) == 6  # gate, up, down in 2 layers
    expected = sum(localized_balance_loss(torch.softmax(mod.router(x.reshape(-1, x.shape[-1])), -1).view(
        4, 12, 4), data["attention_mask"].bool(), types, 0.1) for mod, x in inputs.items())
    lbc = model.aux_losses()["lbc"]
    assert lbc.item() == pytest.approx(expected.item(), rel=1e-5) and lbc.item() > 0
    with torch.no_grad():
        ce = hand_ce(model, data)
    assert out.loss.item() == pytest.approx(ce.item() + 0.1 * lbc.item(), abs=1e-5)


def test_loramoe_balance_loss_is_zero_when_its_weight_is_zero():
    cfg = sp.LoraMoeConfig(r=4, num_experts=4, lora_dropout=0.0, lbc_weight=0.0)
    model = sp.get_adapter_model(padded_llama(), cfg)
    randomize_lora_b(model)
    data = padded_batch()
    out = model(**data, sample_type=torch.tensor([0, 1, 1, 0]))
    with torch.no_grad():
        ce = hand_ce(model, data)
    assert out.loss.item() == pytest.approx(ce.item(), abs=1e-6)


def test_loramoe_gradients_reach_every_expert():
    cfg = sp.LoraMoeConfig(r=4, num_experts=4, lora_dropout=0.0)
    model = sp.get_adapter_model(padded_llama(), cfg)
    randomize_lora_b(model)
    model.train()
    model(**padded_batch()).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, LoraMoeLinear)]
    assert len(layers) == 6
    for layer in layers:
        for g in (layer.experts.lora_A.grad, layer.experts.lora_B.grad):
            assert (g.flatten(1).abs().sum(1) > 0).all()  # every expert of every linear
        assert (layer.router.weight.grad.abs().sum(1) > 0).all()


# --- MoLA ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, counts", [("2,4", [2, 2, 4, 4]), ([1, 2, 3, 5], [1, 2, 3, 5]),
                                          ("2,4,6,8", [2, 4, 6, 8]), ("3", [3, 3, 3, 3])])
def test_mola_creates_the_configured_number_of_experts_in_each_layer(spec, counts):
    cfg = sp.MolaConfig(r=2, experts_per_layer=spec, top_k=1)
    model = sp.get_adapter_model(padded_llama(layers=4), cfg)
    found: dict[int, set[int]] = {}
    for name, m in model.base_model.named_modules():
        if isinstance(m, MolaLinear):
            layer = int(name.split("layers.")[1].split(".")[0])
            found.setdefault(layer, set()).add(m.experts.num_experts)
            assert m.router.weight.shape[0] == m.experts.lora_B.shape[0] == m.experts.num_experts
    assert [found[i] for i in range(4)] == [{c} for c in counts]
    assert sum(isinstance(m, MolaLinear) for m in model.modules()) == 4 * 7  # all seven projections


def test_mola_allocation_over_unequal_groups_and_errors():
    counts = experts_per_layer([2, 4, 6, 8], 30)  # SmolLM2's 30 layers
    assert counts[0] == 2 and counts[-1] == 8 and sorted(counts) == counts
    assert [counts.count(c) for c in (2, 4, 6, 8)] == [8, 7, 8, 7]
    with pytest.raises(sp.ConfigError, match="experts_per_layer has 4 entries"):
        sp.get_adapter_model(padded_llama(layers=2), sp.MolaConfig(experts_per_layer="2,4,6,8"))


def test_mola_balance_loss_is_off_by_default_and_optional():
    data = padded_batch()
    model = sp.get_adapter_model(padded_llama(), sp.MolaConfig(r=2, experts_per_layer="2,4"))
    model(**data)
    assert "balance" not in model.aux_losses()
    model = sp.get_adapter_model(padded_llama(), sp.MolaConfig(r=2, experts_per_layer="2,4",
                                                             router_aux_loss_coef=0.001))
    model(**data)
    value = model.aux_losses()["balance"].item()
    assert 7 * 2 * 0.5 < value < 7 * 2 * 2.0  # 14 linears, each about 1 when balanced (f sums to 1)


# --- I-LoRA --------------------------------------------------------------------------------------------

def ilora_layers(model) -> list[ILoraLinear]:
    return [m for m in model.modules() if isinstance(m, ILoraLinear)]


def test_ilora_slow_weights_follow_the_ema_formula():
    cfg = sp.ILoraConfig(r=4, lora_dropout=0.0, ema_alpha=0.6, consistency_weight=1.0)
    model = sp.get_adapter_model(padded_llama(), cfg)
    layer = ilora_layers(model)[0]
    expected_a, expected_b = layer.slow_lora_A.clone(), layer.slow_lora_B.clone()
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    data = padded_batch()
    for step in range(5):
        model(**data).loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()
        a = min(1 - 1 / (step + 1), 0.6)  # 0, 0.5, 0.6, 0.6, 0.6
        expected_a = a * expected_a + (1 - a) * layer.lora_A.weight.detach()
        expected_b = a * expected_b + (1 - a) * layer.lora_B.weight.detach()
        torch.testing.assert_close(layer.slow_lora_A, expected_a, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(layer.slow_lora_B, expected_b, atol=1e-7, rtol=1e-6)
    assert int(layer.ema_step) == 5
    assert not torch.allclose(layer.slow_lora_B, layer.lora_B.weight)  # the slow learner lags


def test_replay_buffer_keeps_its_capacity_and_samples_uniformly():
    buf = ReplayBuffer(capacity=8, seed=0)
    ids = torch.arange(50).view(25, 2)
    buf.add_batch(ids, None, ids.clone(), task=0)
    assert len(buf) == 8 and buf.seen == 25
    kept = [int(ex.input_ids[0]) // 2 for ex in buf.examples]
    assert len(set(kept)) == 8 and max(kept) >= 8  # later examples replaced earlier ones
    # over many fills, each of 25 offered examples is held with probability 8/25
    hits = torch.zeros(25)
    for seed in range(400):
        b = ReplayBuffer(8, seed=seed)
        for i in range(25):
            b.add(ReplayExample(torch.tensor([i]), torch.tensor([i]), 0))
        for ex in b.examples:
            hits[int(ex.input_ids[0])] += 1
    assert ((hits / 400 - 8 / 25).abs() < 0.08).all()


def test_ilora_replay_mixes_half_of_the_loss():
    cfg = sp.ILoraConfig(r=4, lora_dropout=0.0, consistency_weight=0.0, replay_capacity=6)
    model = sp.get_adapter_model(padded_llama(), cfg)
    model.train()
    first, second = padded_batch(seed=1), padded_batch(seed=2)
    out = model(**first)
    assert model.last_replay is None  # nothing stored before the first step
    with torch.no_grad():
        assert out.loss.item() == pytest.approx(hand_ce(model, first).item(), abs=1e-6)
    out = model(**second)
    replay = model.last_replay
    assert replay["input_ids"].shape[0] == 4  # same size as the current batch, from the first batch
    assert len(model.replay) == 6  # capacity kept: 8 offered
    aux = model.aux_losses()
    with torch.no_grad():
        cur, rep = hand_ce(model, second), hand_ce(model, replay)
    assert out.loss.item() == pytest.approx((cur.item() + rep.item()) / 2, abs=1e-6)
    assert aux["replay_ce"].item() == pytest.approx(rep.item(), abs=1e-6)


def test_ilora_consistency_loss_penalises_only_where_fast_is_below_slow():
    fast = (torch.tensor([[[1.0, 2.0], [0.0, 5.0]]]),)
    slow = (torch.tensor([[[3.0, 1.0], [9.0, 9.0]]]),)
    # token 0: (1 - 3)^2 = 4, (2 - 2)^2 = 0; token 1 is padding
    assert consistency_loss(fast, slow, torch.tensor([[1, 0]])).item() == pytest.approx(2.0)
    assert consistency_loss(fast, slow, None).item() == pytest.approx((4 + 0 + 81 + 16) / 4)


def test_ilora_previous_tasks_rule_replays_only_earlier_tasks():
    cfg = sp.ILoraConfig(r=4, lora_dropout=0.0, replay_from="previous_tasks")
    model = sp.get_adapter_model(padded_llama(), cfg)
    model.train()
    model(**padded_batch(seed=1))
    model(**padded_batch(seed=2))
    assert model.last_replay is None  # first task: no replay
    assert model.start_task() == 1
    task1 = padded_batch(seed=3)
    out = model(**task1)
    assert model.last_replay is not None and "consistency" in model.aux_losses()
    out.loss.backward()
    stored = {tuple(ex.input_ids.tolist()) for ex in model.replay.examples if ex.task == 0}
    replayed = model.last_replay["input_ids"] * model.last_replay["attention_mask"]
    for row, m in zip(replayed, model.last_replay["attention_mask"], strict=True):
        assert tuple(row[m.bool()].tolist()) in stored


def test_ilora_evaluates_and_merges_with_the_slow_learner():
    cfg = sp.ILoraConfig(r=4, lora_dropout=0.0, ema_alpha=0.9)
    model = sp.get_adapter_model(padded_llama(), cfg)
    train_steps(model, steps=6, data=padded_batch())
    data = padded_batch()
    evaluated = logits(model, data)
    with model.use_learner("slow"):
        slow = logits(model, data)
    with model.use_learner("fast"):
        fast = logits(model, data)
    torch.testing.assert_close(evaluated, slow, atol=0, rtol=0)
    assert not torch.allclose(slow, fast, atol=1e-4)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, data), slow, atol=1e-5, rtol=1e-5)


# --- every method: training, save/load, generation, peft_type, merge refusal ---------------------------

METHOD_CONFIGS = {
    "mixlora": lambda: sp.MixLoraConfig(r=4, num_experts=4, top_k=2),
    "mixlora-dynamic": lambda: sp.MixLoraConfig(r=4, num_experts=4, top_p=0.8),
    "loramoe": lambda: sp.LoraMoeConfig(r=4, num_experts=4),
    "mola": lambda: sp.MolaConfig(r=4, experts_per_layer="2,4"),
    "ilora": lambda: sp.ILoraConfig(r=8, target_modules="all-linear"),  # attention-only r=4 learns too slowly
}
# how far the loss must fall in 20 steps: about half of what each method reaches (0.41, 0.50, 0.60, 0.48, 0.35)
LOSS_DROP = {"mixlora": 0.2, "mixlora-dynamic": 0.25, "loramoe": 0.3, "mola": 0.24, "ilora": 0.17}
PEFT_TYPES = {"mixlora": "MIXLORA", "loramoe": "LORAMOE", "mola": "MOLA", "ilora": "ILORA"}


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_training_lowers_the_loss_and_save_load_gives_identical_logits(name, tmp_path):
    cfg = METHOD_CONFIGS[name]()
    model = sp.get_adapter_model(padded_llama(), cfg)
    data = padded_batch()
    base_logits = logits(padded_llama(), data)
    losses = train_steps(model, steps=20, lr=1e-2, data=data)
    assert losses[-1] < losses[0] - LOSS_DROP[name], losses
    assert all(math.isfinite(v) for v in losses)
    trained = logits(model, data)
    assert not torch.allclose(trained, base_logits, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == PEFT_TYPES[cfg.method]
    loaded = sp.AdapterModel.from_pretrained(padded_llama(), tmp_path / "adapter").eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded, data), trained, atol=0, rtol=0)
    ids, mask = data["input_ids"][:2, :6], data["attention_mask"][:2, :6]
    with torch.no_grad():
        out = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, use_cache=True)
    assert out.shape == (2, 11)
    eos = loaded.base_model.config.eos_token_id  # min_new_tokens keeps it out
    assert torch.equal(out, greedy(loaded, ids, 5, banned=(eos,)))
    if cfg.method == "ilora":
        merged = loaded.merge_and_unload()  # allowed: folds the slow learner, which it evaluates with
        torch.testing.assert_close(logits(merged, data), trained, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(sp.AdapterError, match="depends on the input and cannot be folded"):
            loaded.merge_and_unload()
