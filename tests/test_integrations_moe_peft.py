"""integrations/moe_peft.py: MoE-PEFT / the `mixlora` package's adapter layout in and out, with the same logits;
what their layout cannot hold is refused; weights are read without unpickling code."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import batch, logits, randomize, tiny_llama

import slim_peft as sp
from slim_peft.adapters import FFN_PROJ
from slim_peft.integrations.moe_peft import load_moe_peft, save_moe_peft


def tokens(seed: int = 1) -> dict[str, torch.Tensor]:
    """2 rows of 10 random ids, no padding, no labels."""
    return batch(seed, b=2, s=10, padding=0, labels=False)


def moe_peft_mixlora_dir(path: Path, base_dir: Path, hidden: int = 32, ffn: int = 64, layers: int = 2,
                         E: int = 4, r: int = 4) -> Path:
    """A MixLoRA adapter written directly in MoE-PEFT's layout (keys and config as its trainer saves them)."""
    g = torch.Generator().manual_seed(3)
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, 16), "v_proj": (hidden, 16), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, ffn), "up_proj": (hidden, ffn), "down_proj": (ffn, hidden)}
    w: dict[str, torch.Tensor] = {}
    for i in range(layers):
        w[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(E, hidden, generator=g)
        for proj, (d_in, d_out) in dims.items():
            module = "mlp" if proj in FFN_PROJ else "self_attn"
            sites = [f".experts.{e}" for e in range(E)] if module == "mlp" else [""]
            for site in sites:
                key = f"mixlora.layers.{i}.{module}.{proj}{site}"
                w[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * 0.3
                w[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.3
    cfg = {"bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir),
           "r": r, "lora_alpha": 8, "lora_dropout": 0.05, "routing_strategy": "mixlora", "num_experts": E,
           "top_k": 2, "router_aux_loss_coef": 0.01, "act_fn": "silu", "target_modules": list(dims)}
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(w, path / "adapter_model.bin")
    return path


def run_mixlora_package(adapter_dir: Path, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the `mixlora` package's MixLoraModelForCausalLM on this adapter, in eval mode. Its expert
    LoRAs live in plain dicts (not registered modules), so `model.eval()` misses their dropout: set it."""
    mixlora = pytest.importorskip("mixlora", reason="the `mixlora` package is not installed (CI installs it)")
    model, _ = mixlora.MixLoraModelForCausalLM.from_pretrained(str(adapter_dir))
    model.eval()
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return logits(model, data)


def test_imported_moe_peft_mixlora_matches_the_mixlora_package(tmp_path):
    pytest.importorskip("mixlora", reason="the `mixlora` package is not installed (CI installs it)")
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapter = moe_peft_mixlora_dir(tmp_path / "mixlora", tmp_path / "base")
    data = tokens()
    ours = load_moe_peft(copy.deepcopy(base), adapter).eval()
    assert isinstance(ours.adapter_config, sp.MixLoraConfig) and ours.adapter_config.num_experts == 4
    theirs = run_mixlora_package(adapter, data)
    torch.testing.assert_close(logits(ours, data), theirs, atol=1e-4, rtol=0)
    assert (theirs - logits(base, data)).abs().max() > 1e-2  # the adapter does change the output


def test_our_mixlora_exported_runs_the_same_in_the_mixlora_package(tmp_path):
    pytest.importorskip("mixlora", reason="the `mixlora` package is not installed (CI installs it)")
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    data = tokens()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.MixLoraConfig(r=4, lora_alpha=8, num_experts=4))
    randomize(model)
    model.eval()
    save_moe_peft(model, tmp_path / "out", base_model_name_or_path=str(tmp_path / "base"))
    torch.testing.assert_close(run_mixlora_package(tmp_path / "out", data), logits(model, data), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg", [
    sp.MixLoraConfig(r=4, num_experts=4),
    sp.MixLoraConfig(r=4, num_experts=4, top_p=0.8, target_modules=["q_proj", "gate_proj", "down_proj"]),
    sp.LoraMoeConfig(r=4, num_experts=4, lbc_alpha=0.2),
    sp.MolaConfig(r=4, experts_per_layer=[3], top_k=2),
    sp.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
], ids=["mixlora", "mixlora-dynamic", "loramoe", "mola", "lora"])
def test_export_import_round_trip(tmp_path, cfg):
    base = tiny_llama()
    data = tokens()
    model = sp.get_adapter_model(copy.deepcopy(base), cfg)
    randomize(model)
    model.eval()
    ref = logits(model, data)
    save_moe_peft(model, tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == {"mixlora": "MIXLORA", "loramoe": "LORAMOE", "mola": "MOLA", "lora": "LORA"}[cfg.method]
    weights = torch.load(tmp_path / "ad" / "adapter_model.bin", weights_only=True)
    prefix = {"mixlora": "mixlora.", "loramoe": "loramoe.", "mola": "mola.", "lora": "base_model.model.model."}
    assert all(k.startswith(prefix[cfg.method]) for k in weights)
    loaded = load_moe_peft(copy.deepcopy(base), tmp_path / "ad").eval()
    assert loaded.adapter_config.to_dict() == model.adapter_config.to_dict()
    assert torch.equal(logits(loaded, data), ref)


def test_what_their_layout_cannot_hold_is_refused(tmp_path):
    base = tiny_llama(layers=4)
    mola = sp.get_adapter_model(copy.deepcopy(base), sp.MolaConfig(r=4, experts_per_layer="2,4"))
    with pytest.raises(sp.AdapterError, match="one expert count for every layer"):
        save_moe_peft(mola, tmp_path / "mola")
    moe = sp.get_adapter_model(copy.deepcopy(base), sp.LoraMoeConfig(r=4, num_experts=2,
                                                                      target_modules=["q_proj", "up_proj"]))
    with pytest.raises(sp.AdapterError, match="attention projections"):
        save_moe_peft(moe, tmp_path / "moe")
    slim = sp.get_adapter_model(copy.deepcopy(base), sp.SlimConfig(r=4))
    with pytest.raises(sp.AdapterError, match="no MoE-PEFT layout"):
        save_moe_peft(slim, tmp_path / "slim")


def test_weights_are_read_without_unpickling_code(tmp_path):
    base = tiny_llama()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.MixLoraConfig(r=4, num_experts=2))
    save_moe_peft(model, tmp_path / "ad")
    weights = torch.load(tmp_path / "ad" / "adapter_model.bin", weights_only=True)
    weights["payload"] = Path("/not/a/tensor")  # an arbitrary object: refused by weights_only
    torch.save(weights, tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(sp.AdapterError, match="weights_only"):
        load_moe_peft(copy.deepcopy(base), tmp_path / "ad")


def test_wrong_keys_and_other_base_are_named(tmp_path):
    base = tiny_llama()
    model = sp.get_adapter_model(copy.deepcopy(base), sp.MixLoraConfig(r=4, num_experts=2))
    save_moe_peft(model, tmp_path / "ad")
    with pytest.raises(sp.AdapterError, match="num_hidden_layers: adapter 2 vs model 3"):
        load_moe_peft(tiny_llama(layers=3), tmp_path / "ad")
    weights = torch.load(tmp_path / "ad" / "adapter_model.bin", weights_only=True)
    weights.pop("mixlora.layers.1.mlp.moe_gate.weight")
    torch.save(weights, tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(sp.AdapterError, match=r"lacks 1 tensors.*layers.1.mlp.router.weight"):
        load_moe_peft(copy.deepcopy(base), tmp_path / "ad")
