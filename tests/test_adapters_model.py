"""AdapterModel (adapters/model.py, adapters/io.py): save / load round trips, the base-model fingerprint, merge
refusal, generation (with and without the KV cache, against a plain greedy loop), the decoder cache in the
outputs, selected logits and the loss on supervised positions."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from conftest import VOCAB, batch, greedy, logits, method_configs, randomize, tiny_llama, tiny_qwen2, train_steps

import slim_peft as sp
from slim_peft.adapters.model import CACHE_FIELD

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


# --- merge ----------------------------------------------------------------------------------------------


def test_merge_refused_for_slim():
    model = sp.get_adapter_model(tiny_llama(), sp.SlimConfig(r=4))
    with pytest.raises(sp.AdapterError, match="not possible for slim.*depends on the input"):
        model.merge_and_unload()


# --- generation -------------------------------------------------------------------------------------------


def test_qwen2_slim_and_lora_and_generation():
    base = tiny_qwen2()
    data = batch()
    ref = logits(base, data)
    # the loss drop after 10 steps: about half of what each reaches (LoRA 0.31, SLIM 0.24)
    for cfg, margin in ((sp.LoraConfig(r=4), 0.15), (sp.SlimConfig(r=4), 0.12)):
        model = sp.get_adapter_model(copy.deepcopy(base), cfg)
        assert torch.equal(logits(model, data), ref)  # zero-initialised B
        losses = train_steps(model, steps=10)
        assert losses[-1] < losses[0] - margin, (cfg.method, losses)
        prompt = data["input_ids"][:1]
        out = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
        assert out.shape == (1, data["input_ids"].shape[1] + 5)
        assert torch.equal(out, greedy(model, prompt, 5))


METHOD_CONFIGS = method_configs(r=4)


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


@pytest.mark.parametrize("cfg", [sp.LoraConfig(r=4), sp.ILoraConfig(r=4, replay_capacity=4)], ids=["lora", "ilora"])
def test_outputs_pass_the_cache_on_without_deprecation_warnings(monkeypatch, cfg):
    """Our outputs carry the decoder's cache under the installed transformers' field name; transformers 5
    logs a deprecation warning whenever the old name `past_key_values` is used."""
    warned: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: warned.append(str(msg)))
    model = sp.get_adapter_model(tiny_llama(), cfg)
    model.train()
    for seed in (1, 2):  # I-LoRA: the second step replays the first batch and builds its own output
        data = batch(seed=seed)
        out = model(**data, use_cache=True)
    assert torch.isfinite(out.loss)
    cache = getattr(out, CACHE_FIELD)
    assert cache is not None
    assert cache.get_seq_length() == data["input_ids"].shape[1]  # the current batch's keys, not the replayed
    assert not [w for w in warned if "deprecated" in w], warned


# --- logits and loss ------------------------------------------------------------------------------------


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
