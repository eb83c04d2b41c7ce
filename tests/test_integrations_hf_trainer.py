"""`AdapterModel` inside transformers' `Trainer` (integrations/hf_trainer.py): every method trains 5 steps with
gradient accumulation and checkpointing, checkpoints hold the adapter only, logits after reload are equal, and
a resumed run ends with the uninterrupted run's adapter."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import method_configs, tiny_llama
from safetensors.torch import load_file
from test_training import VOCAB, tiny_examples

import slim_peft as sp
from slim_peft.data import Collator
from slim_peft.integrations.hf_trainer import SlimPeftTrainer

CASES = sorted(method_configs())


def _model(name: str):
    torch.manual_seed(0)
    return sp.get_adapter_model(tiny_llama(vocab_size=VOCAB, pad_token_id=0), method_configs(r=4)[name])


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=5e-3, logging_steps=1, save_steps=5, save_strategy="steps", report_to="none",
                remove_unused_columns=False, use_cpu=True, seed=0, gradient_checkpointing=True,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(model, out, **kw):
    return SlimPeftTrainer(model=model, args=_args(out, **kw), train_dataset=tiny_examples(40),
                           data_collator=Collator(0))


@pytest.mark.parametrize("name", CASES)
def test_every_method_trains_in_transformers_trainer_with_adapter_only_checkpoints(name, tmp_path):
    model = _model(name)
    steps = []
    hook = model.after_optimizer_step
    model.after_optimizer_step = lambda: steps.append(1) or hook()
    trainer = _trainer(model, tmp_path / "out")
    trainer.train()
    assert len(steps) == 5  # once per optimizer step (10 micro-batches)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    ckpt = tmp_path / "out" / "checkpoint-5"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}  # no copy of the base model
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert saved.keys() == model.adapter_state_dict().keys()
    model.eval()
    data = Collator(0)(tiny_examples(4, seed=5))
    with torch.no_grad():
        expected = model(**data).logits
        loaded = sp.AdapterModel.from_pretrained(tiny_llama(vocab_size=VOCAB, pad_token_id=0), ckpt).eval()
        torch.testing.assert_close(loaded(**data).logits, expected, rtol=0, atol=0)
    if name.startswith("slim"):  # the statistics moved once per optimizer step, not once per micro-batch
        assert any("clusters.centres" in k for k in saved)


def test_the_trainers_bf16_autocast_runs(tmp_path):
    trainer = _trainer(_model("slim"), tmp_path / "out", bf16=True)
    trainer.train()
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


@pytest.mark.parametrize("name", ["slim", "ilora"])
def test_resume_from_an_adapter_only_checkpoint_reaches_the_same_adapter(name, tmp_path):
    full = _trainer(_model(name), tmp_path / "full", max_steps=6, save_steps=3)
    full.train()
    first = _trainer(_model(name), tmp_path / "cut", max_steps=6, save_steps=3)
    first.train()
    resumed_model = _model(name)
    resumed = _trainer(resumed_model, tmp_path / "cut2", max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    a = full.model.adapter_state_dict()
    b = copy.deepcopy(resumed_model.adapter_state_dict())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_trl_sft_trainer_trains_an_adapter_model_with_adapter_only_checkpoints(tmp_path):
    """TRL's SFTTrainer with `AdapterTrainerMixin`: prompt/completion chat rows, its own tokenisation and
    completion-only labels; the loss is the AdapterModel's (auxiliary losses included)."""
    pytest.importorskip("trl")
    from conftest import save_tiny_model
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from slim_peft.integrations.hf_trainer import AdapterTrainerMixin, SlimPeftCallback

    class SlimSFTTrainer(AdapterTrainerMixin, SFTTrainer):
        pass

    base, tokenizer = sp.load_base_model(str(save_tiny_model(tmp_path / "base")))
    model = sp.get_adapter_model(base, sp.SlimConfig(r=4, num_lora_experts=3))
    rows = [{"prompt": [{"role": "user", "content": f"which {w} is blue?"}],
             "completion": [{"role": "assistant", "content": f"the {w}"}]} for w in ["red", "cat", "dog", "sun"] * 5]
    aux_seen = []
    model.register_forward_hook(lambda m, a, out: aux_seen.append(set(m.aux_losses())))
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1, save_steps=5,
                     report_to="none", use_cpu=True, gradient_checkpointing=True, disable_tqdm=True,
                     bf16=False)  # SFTConfig's default bf16 leaves model.forward wrapped in autocast afterwards
    trainer = SlimSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[SlimPeftCallback()])
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert aux_seen and all("l1" in s for s in aux_seen)  # our forward ran, with SLIM's L1
    ckpt = tmp_path / "out" / "checkpoint-5"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    card = (ckpt / "README.md").read_text()
    assert "- sft" in card or "- trl" in card  # TRL's model tags reach the card
    loaded = sp.AdapterModel.from_pretrained(sp.load_base_model(str(tmp_path / "base"))[0], ckpt).eval()
    model.eval()
    mine, theirs = model.adapter_state_dict(), loaded.adapter_state_dict()
    bad = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not bad, bad[:5]
    ids = tokenizer("which cat is blue?", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)
