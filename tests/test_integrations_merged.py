"""Merged export (`slim-peft merge`, integrations/merged.py) and the model card beside every saved adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, logits, randomize, save_tiny_model, train_steps

import slim_peft as sp
from slim_peft.cli.main import main


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base"))


def saved_adapter(base_dir, tmp_path, cfg):
    base, _ = sp.load_base_model(str(base_dir))
    model = sp.get_adapter_model(base, cfg)
    randomize(model)
    if cfg.method == "ilora":
        train_steps(model, steps=3, data=batch(vocab_size=base.config.vocab_size))  # slow != fast
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("cfg", [sp.LoraConfig(r=4), sp.DoraConfig(r=4), sp.ILoraConfig(r=4)],
                         ids=["lora", "dora", "ilora"])
def test_merged_directory_loads_in_transformers_with_the_adapted_logits(base_dir, tmp_path, cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, adapter = saved_adapter(base_dir, tmp_path, cfg)
    data = batch(vocab_size=model.config.vocab_size)
    expected = logits(model, data)
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    out = tmp_path / "merged"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "generation_config.json").is_file() and AutoTokenizer.from_pretrained(out) is not None
    merged = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    torch.testing.assert_close(logits(merged, data), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(sp.load_base_model(str(base_dir))[0].eval(), data), expected, atol=1e-3)


def test_merge_in_bf16_and_never_over_an_existing_directory(base_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, adapter = saved_adapter(base_dir, tmp_path, sp.LoraConfig(r=4))
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(out), "--dtype", "bf16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    before = (out / "model.safetensors").read_bytes()
    assert main(["merge", "--adapter", str(adapter), "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("cfg", [sp.SlimConfig(r=4), sp.MixLoraConfig(r=4, num_experts=4)], ids=["slim", "mixlora"])
def test_a_routed_adapter_is_refused_with_the_reason_before_loading(base_dir, tmp_path, capsys, cfg, monkeypatch):
    _, adapter = saved_adapter(base_dir, tmp_path, cfg)
    import slim_peft.integrations.merged as merged

    monkeypatch.setattr(merged, "load_base", lambda *a: pytest.fail("the base model was loaded"))
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"a {cfg.method} adapter cannot be merged" in err and "slim-peft generate --adapter" in err
    assert "slim-peft lm-eval --adapter" in err
    assert not (tmp_path / "m").exists()


def test_every_saved_adapter_has_a_model_card(base_dir, tmp_path):
    model, adapter = saved_adapter(base_dir, tmp_path, sp.SlimConfig(r=4, num_lora_experts=3))
    card = (adapter / "README.md").read_text()
    trainable, total = model.num_parameters()
    assert card.startswith("---\nbase_model: ") and "library_name: slim-peft" in card
    assert f"{trainable:,} of {total:,}" in card
    assert "| num_lora_experts | `3` |" in card
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] in card


def test_the_trainers_adapter_card_names_the_training(tmp_path):
    from test_training import tiny_adapter_model, tiny_args, tiny_examples

    from slim_peft.training import Trainer

    model = tiny_adapter_model("lora")
    Trainer(model, tiny_args(tmp_path / "run", max_steps=3), tiny_examples(16),
            run_config={"tasks": ["toy"]}).train()
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "## Training" in card and "| optimizer steps | 3 |" in card and "| examples | 16 |" in card
    assert "| run: tasks | ['toy'] |" in card and "| learning_rate | 0.005 |" in card
