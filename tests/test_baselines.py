"""Baselines on the shared API: MixLoRA (+ Dynamic), LoRAMoE, MoLA, I-LoRA (issue 3)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import slim_peft as sp
from slim_peft.adapters.methods.ilora.layer import ILoraLinear
from slim_peft.adapters.methods.ilora.model import consistency_loss
from slim_peft.adapters.methods.ilora.replay import ReplayBuffer, ReplayExample
from slim_peft.adapters.methods.loramoe.layer import LoraMoeLinear, localized_balance_loss
from slim_peft.adapters.methods.mixlora.layer import MixLoraFFN, mixlora_balance_loss
from slim_peft.adapters.methods.mola.layer import MolaLinear, experts_per_layer
from slim_peft.adapters.methods.slim.layer import FFN_PROJ
from slim_peft.adapters.modules.routing import top_p_routing

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: intra-op threads only add synchronisation (and stall badly when the
    machine's cores are busy), so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def batch(seed: int = 1, b: int = 4, s: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0  # right padding in the second row
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, : s // 3] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_steps(model: sp.AdapterModel, steps: int = 20, lr: float = 1e-2, data=None) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    data = data or batch()
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model, data) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


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


# --- MixLoRA -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_mixlora_one_expert_top1_equals_lora_on_ffn(dispatch):
    lora = sp.get_adapter_model(tiny_llama(), sp.LoraConfig(r=4, lora_dropout=0.0, target_modules=FFN_PROJ))
    randomize_lora_b(lora)
    mix = sp.get_adapter_model(tiny_llama(), sp.MixLoraConfig(
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
    data = batch()
    ref, got = logits(lora, data), logits(mix, data)
    assert not torch.allclose(ref, logits(sp.get_adapter_model(tiny_llama(), sp.LoraConfig(
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
    model = sp.get_adapter_model(tiny_llama(), cfg)
    data = batch()
    out = model(**data)
    ctx = model.ctx
    assert len(ctx.router_logits) == 2  # one per layer, concatenated by the loss
    expected = mixlora_balance_loss(ctx.router_logits, ctx.router_masks, 4, 2)
    assert model.aux_losses()["balance"].item() == pytest.approx(expected.item(), abs=1e-7)
    with torch.no_grad():
        ce = hand_ce(model, data)
    assert out.loss.item() == pytest.approx(ce.item() + 0.01 * expected.item(), abs=1e-5)


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
    model = sp.get_adapter_model(tiny_llama(), cfg)
    randomize_lora_b(model)
    ffn = model.base_model.model.layers[0].mlp
    h = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ffn(h), reference_mixlora_ffn(ffn, h, top_p, 2), atol=1e-5, rtol=1e-5)
    if top_p is not None:
        assert 1.0 <= ffn.router.stats()["mean_active_experts"] <= 4.0


def test_mixlora_saved_keys_and_generation_with_cache(tmp_path):
    model = sp.get_adapter_model(tiny_llama(), sp.MixLoraConfig(r=4, num_experts=4, top_k=2))
    keys = set(model.adapter_state_dict())
    p = "base_model.model.model.layers.0."
    assert {p + "mlp.router.weight", p + "mlp.gate_proj.experts.lora_A", p + "mlp.down_proj.experts.lora_B",
            p + "self_attn.q_proj.lora_A.weight", p + "self_attn.o_proj.lora_B.weight"} <= keys
    assert not any("base_layer" in k for k in keys)
    randomize_lora_b(model)
    model.eval()
    ids = batch()["input_ids"][:2, :6]
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    stats = model.routing_stats()["sites"]
    assert "model.layers.0.mlp.router" in stats and stats["model.layers.0.mlp.router"]["tokens"] > 0


def test_mixlora_works_on_qwen2(tmp_path):
    model = sp.get_adapter_model(tiny_qwen2(), sp.MixLoraConfig(r=4, num_experts=4, top_k=2))
    losses = train_steps(model, steps=10)
    assert losses[-1] < losses[0]
    data = batch()
    model.save_pretrained(tmp_path / "a")
    loaded = sp.AdapterModel.from_pretrained(tiny_qwen2(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(loaded, data), logits(model, data), atol=0, rtol=0)
    out = loaded.generate(input_ids=data["input_ids"][:1, :5], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 10)


# --- LoRAMoE -------------------------------------------------------------------------------------------

def test_loramoe_balance_loss_equals_hand_computed_value():
    gates = torch.tensor([[[0.7, 0.3], [0.6, 0.4]],
                          [[0.2, 0.8], [0.5, 0.5]]])
    mask = torch.tensor([[True, True], [True, False]])  # sample 1's second token is padding
    types = torch.tensor([0, 1])  # sample 0 world knowledge (expert 0's group), sample 1 downstream
    # Q = [[1.3, 0.2], [0.7, 0.8]]; I = [[1.1, 0.9], [0.9, 1.1]]; Z = [1.43, 0.18, 0.63, 0.88]
    z = torch.tensor([1.43, 0.18, 0.63, 0.88], dtype=torch.float64)
    mean = z.mean().item()
    var = ((z - z.mean()) ** 2).sum().item() / 3  # unbiased, as the official cv_squared (torch.var)
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
    model = sp.get_adapter_model(tiny_llama(), cfg)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0]))
             for m in model.modules() if isinstance(m, LoraMoeLinear)]
    data = batch()
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
    model = sp.get_adapter_model(tiny_llama(), cfg)
    randomize_lora_b(model)
    data = batch()
    out = model(**data, sample_type=torch.tensor([0, 1, 1, 0]))
    with torch.no_grad():
        ce = hand_ce(model, data)
    assert out.loss.item() == pytest.approx(ce.item(), abs=1e-6)


def test_loramoe_gradients_reach_every_expert():
    cfg = sp.LoraMoeConfig(r=4, num_experts=4, lora_dropout=0.0)
    model = sp.get_adapter_model(tiny_llama(), cfg)
    randomize_lora_b(model)
    model.train()
    model(**batch()).loss.backward()
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
    model = sp.get_adapter_model(tiny_llama(layers=4), cfg)
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
        sp.get_adapter_model(tiny_llama(layers=2), sp.MolaConfig(experts_per_layer="2,4,6,8"))


def test_mola_balance_loss_is_off_by_default_and_optional():
    data = batch()
    model = sp.get_adapter_model(tiny_llama(), sp.MolaConfig(r=2, experts_per_layer="2,4"))
    model(**data)
    assert "balance" not in model.aux_losses()
    model = sp.get_adapter_model(tiny_llama(), sp.MolaConfig(r=2, experts_per_layer="2,4",
                                                             router_aux_loss_coef=0.001))
    model(**data)
    value = model.aux_losses()["balance"].item()
    assert 7 * 2 * 0.5 < value < 7 * 2 * 2.0  # 14 linears, each about 1 when balanced (f sums to 1)


# --- I-LoRA --------------------------------------------------------------------------------------------

def ilora_layers(model) -> list[ILoraLinear]:
    return [m for m in model.modules() if isinstance(m, ILoraLinear)]


def test_ilora_slow_weights_follow_the_ema_formula():
    cfg = sp.ILoraConfig(r=4, lora_dropout=0.0, ema_alpha=0.6, consistency_weight=1.0)
    model = sp.get_adapter_model(tiny_llama(), cfg)
    layer = ilora_layers(model)[0]
    expected_a, expected_b = layer.slow_lora_A.clone(), layer.slow_lora_B.clone()
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    data = batch()
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
    model = sp.get_adapter_model(tiny_llama(), cfg)
    model.train()
    first, second = batch(seed=1), batch(seed=2)
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
    model = sp.get_adapter_model(tiny_llama(), cfg)
    model.train()
    model(**batch(seed=1))
    model(**batch(seed=2))
    assert model.last_replay is None  # first task: no replay
    assert model.start_task() == 1
    task1 = batch(seed=3)
    out = model(**task1)
    assert model.last_replay is not None and "consistency" in model.aux_losses()
    out.loss.backward()
    stored = {tuple(ex.input_ids.tolist()) for ex in model.replay.examples if ex.task == 0}
    replayed = model.last_replay["input_ids"] * model.last_replay["attention_mask"]
    for row, m in zip(replayed, model.last_replay["attention_mask"], strict=True):
        assert tuple(row[m.bool()].tolist()) in stored


def test_ilora_evaluates_and_merges_with_the_slow_learner():
    cfg = sp.ILoraConfig(r=4, lora_dropout=0.0, ema_alpha=0.9)
    model = sp.get_adapter_model(tiny_llama(), cfg)
    train_steps(model, steps=6)
    data = batch()
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
PEFT_TYPES = {"mixlora": "MIXLORA", "loramoe": "LORAMOE", "mola": "MOLA", "ilora": "ILORA"}


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_training_lowers_the_loss_and_save_load_gives_identical_logits(name, tmp_path):
    cfg = METHOD_CONFIGS[name]()
    model = sp.get_adapter_model(tiny_llama(), cfg)
    data = batch()
    base_logits = logits(tiny_llama(), data)
    losses = train_steps(model, steps=20, lr=1e-2, data=data)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(math.isfinite(v) for v in losses)
    trained = logits(model, data)
    assert not torch.allclose(trained, base_logits, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == PEFT_TYPES[cfg.method]
    loaded = sp.AdapterModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(logits(loaded, data), trained, atol=0, rtol=0)
    ids, mask = data["input_ids"][:2, :6], data["attention_mask"][:2, :6]
    with torch.no_grad():
        out = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, use_cache=True)
    assert out.shape == (2, 11)
    if cfg.method == "ilora":
        loaded.merge_and_unload()  # allowed: folds the slow learner
    else:
        with pytest.raises(sp.AdapterError, match="depends on the input and cannot be folded"):
            loaded.merge_and_unload()
