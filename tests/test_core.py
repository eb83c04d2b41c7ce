"""Core library: configs, AdapterModel, LoRA/DoRA and SLIM against plain references."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import slim_peft as sp
from slim_peft.adapters.methods.slim.layer import SlimLinear, routers
from slim_peft.adapters.model import CACHE_FIELD
from slim_peft.adapters.modules.dare import drop_rescale_mask, exact_dare_mixture, factor_masks, masked_factors
from slim_peft.adapters.modules.experts import dense_gates, dense_mixture, grouped_mixture

VOCAB = 128


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(cfg).eval()


def batch(seed: int = 1, b: int = 2, s: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0  # right padding in the second row
    labels = ids.clone()
    labels[:, : s // 2] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_steps(model: sp.AdapterModel, steps: int = 5, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    data = batch()
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


SLIM_NO_MERGE = dict(r=4, mask_ratio=0.0)


# --- configs --------------------------------------------------------------------------------------------

def test_config_from_dict_rejects_unknown_key_by_name():
    with pytest.raises(sp.ConfigError, match=r"unknown key 'lora_alpah'.*did you mean 'lora_alpha'"):
        sp.config_from_dict({"method": "slim", "lora_alpah": 16})
    with pytest.raises(sp.ConfigError, match="unknown method 'slm'.*'slim'"):
        sp.config_from_dict({"method": "slm"})
    cfg = sp.config_from_dict({"method": "slim", "r": 8, "top_k": 3})
    assert isinstance(cfg, sp.SlimConfig) and cfg.r == 8 and cfg.top_k == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(top_k=11), "top_k=11 must be between 1"),
    (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
    (dict(target_modules="everything"), "target_modules must be a list"),
])
def test_config_out_of_range(kwargs, match):
    with pytest.raises(sp.ConfigError, match=match):
        sp.SlimConfig(**kwargs)


def test_missing_target_modules_names_the_available_ones():
    with pytest.raises(sp.TargetModuleError, match=r"no linear module matching.*\['down_proj', 'gate_proj'"):
        sp.get_adapter_model(tiny_llama(), sp.LoraConfig(target_modules=["c_attn"]))


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


# --- SLIM ---------------------------------------------------------------------------------------------

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
    base = tiny_llama()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4, merge_form="exact"))
    losses = train_steps(model, steps=10)
    assert losses[-1] < losses[0]


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
    for kw in (dict(routing="linear"), dict(distance="max", yield_clamp=True), dict(target_modules="all-linear")):
        model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4, **kw))
        losses = train_steps(model, steps=8)
        assert losses[-1] < losses[0], kw
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


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_slim_trains_with_each_dispatch(dispatch):
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4, dispatch=dispatch))
    losses = train_steps(model, steps=10)
    assert losses[-1] < losses[0]


# --- save / load --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [sp.LoraConfig(r=4), sp.DoraConfig(r=4), sp.SlimConfig(r=4),
                                 sp.SlimConfig(r=4, routing="linear", target_modules="all-linear")])
def test_save_load_round_trip(tmp_path, cfg):
    base = tiny_llama()
    data = batch()
    model = sp.get_adapter_model(copy.deepcopy(base), cfg)
    train_steps(model, steps=3)
    ref = logits(model, data)
    model.save_pretrained(tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["slim_peft"]["config"]["method"] == cfg.method
    loaded = sp.AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    assert torch.equal(logits(loaded, data), ref)


def test_load_onto_another_base_fails_clearly(tmp_path):
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4))
    model.save_pretrained(tmp_path / "ad")
    with pytest.raises(sp.AdapterError, match=r"another base model.*hidden_size: adapter 32 vs model 48"):
        sp.AdapterModel.from_pretrained(tiny_llama(hidden=48), tmp_path / "ad")
    with pytest.raises(sp.AdapterError, match=r"model_type: adapter 'llama' vs model 'qwen2'"):
        sp.AdapterModel.from_pretrained(tiny_qwen2(), tmp_path / "ad")
    with pytest.raises(sp.AdapterError, match="num_hidden_layers: adapter 2 vs model 3"):
        sp.AdapterModel.from_pretrained(tiny_llama(layers=3), tmp_path / "ad")


def test_merge_refused_for_slim():
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4))
    with pytest.raises(sp.AdapterError, match="not possible for slim.*depends on the input"):
        model.merge_and_unload()


def test_qwen2_slim_and_lora_and_generation():
    base = tiny_qwen2()
    data = batch()
    ref = logits(base, data)
    for cfg in (sp.LoraConfig(r=4), sp.SlimConfig(r=4)):
        model = sp.get_adapter_model(copy.deepcopy(base), cfg)
        assert torch.equal(logits(model, data), ref)  # zero-initialised B
        losses = train_steps(model, steps=10)
        assert losses[-1] < losses[0]
        out = model.generate(input_ids=data["input_ids"][:1], max_new_tokens=5, do_sample=False)
        assert out.shape == (1, data["input_ids"].shape[1] + 5)


@pytest.mark.parametrize("cfg", [sp.LoraConfig(r=4), sp.ILoraConfig(r=4, replay_capacity=4)], ids=["lora", "ilora"])
def test_outputs_pass_the_cache_on_without_deprecation_warnings(monkeypatch, cfg):
    """Our outputs carry the decoder's cache under the installed transformers' field name; transformers 5
    logs a deprecation warning whenever the old name `past_key_values` is used."""
    warned: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: warned.append(str(msg)))
    model = sp.get_adapter_model(tiny_llama(), cfg)
    model.train()
    for seed in (1, 2):  # I-LoRA: the second step replays the first batch and builds its own output
        out = model(**batch(seed=seed), use_cache=True)
    assert out.loss is not None
    assert getattr(out, CACHE_FIELD) is not None
    assert not [w for w in warned if "deprecated" in w], warned


def test_selected_logits_matches_full_logits():
    base = tiny_llama()
    data = batch()
    positions = data["attention_mask"].bool()
    positions[:, :3] = False
    full = logits(base, data)[positions]
    torch.testing.assert_close(sp.selected_logits(base, data["input_ids"], data["attention_mask"], positions),
                               full, atol=1e-5, rtol=0)
    model = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4))
    model.eval()
    with torch.no_grad():
        got = sp.selected_logits(model, data["input_ids"], data["attention_mask"], positions)
    torch.testing.assert_close(got, logits(model, data)[positions], atol=1e-5, rtol=0)


def test_loss_only_on_supervised_positions_matches_hf_loss():
    base = tiny_llama()
    data = batch()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.LoraConfig(r=4))
    model.eval()
    with torch.no_grad():
        ours = model(**data).loss
        theirs = base(**data).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
