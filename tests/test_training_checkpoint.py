"""Checkpoint contents without pickles: RNG streams and a method's training state (I-LoRA's replay buffer, its
generator and task id) saved as safetensors + JSON through the method hook, and an I-LoRA run resumed from a
checkpoint that ends where the uninterrupted run ends."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

import slim_peft as sp
from slim_peft.data import IGNORE_INDEX, TokenizedExample
from slim_peft.errors import ResumeError
from slim_peft.training import Trainer, TrainingArguments, list_checkpoints, seed_everything
from slim_peft.training.checkpoint import load_method_state, load_rng_state, save_method_state, save_rng_state

VOCAB = 64


def examples(n: int = 24) -> list[TokenizedExample]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = [rng.randint(3, VOCAB - 1) for _j in range(rng.randint(5, 10))]
        target = 3 + ids[0] % 4
        out.append(TokenizedExample(tuple(ids + [target, 2]), tuple([IGNORE_INDEX] * len(ids) + [target, 2]), 1))
    return out


def ilora_model(capacity: int = 10) -> sp.AdapterModel:
    seed_everything(0)
    cfg = sp.ILoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, replay_capacity=capacity)
    return sp.get_adapter_model(tiny_llama(vocab_size=VOCAB), cfg)


def args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                save_steps=3, save_total_limit=None, warmup_ratio=0.0, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def test_rng_streams_round_trip_through_safetensors_and_json(tmp_path):
    seed_everything(5)
    save_rng_state(tmp_path / "rng")
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(123)  # move every stream elsewhere
    load_rng_state(tmp_path / "rng")
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng.json", "rng.safetensors"]


def test_ilora_training_state_round_trips_through_the_method_hook(tmp_path):
    model = ilora_model(capacity=5)
    model.train()
    model.start_task(2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # 12 examples offered to a 5-slot reservoir
        ids = torch.randint(3, VOCAB, (4, 7), generator=g)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    save_method_state(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["method_state.json", "method_state.safetensors"]
    assert len(load_file(str(tmp_path / "method_state.safetensors"))) == 1 + 2 * 5  # generator + 5 examples

    fresh = ilora_model(capacity=5)
    load_method_state(fresh, tmp_path)
    assert fresh.task_id == 2 and fresh.replay.seen == model.replay.seen == 12
    for a, b in zip(fresh.replay.examples, model.replay.examples, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and a.task == b.task
    pool = list(range(5))  # the generators continue identically: the same replay draws
    assert [ex.task for ex in fresh.replay.sample(3, pool)] == [ex.task for ex in model.replay.sample(3, pool)]
    assert torch.equal(fresh.replay.generator.get_state(), model.replay.generator.get_state())


def test_methods_without_training_state_write_none(tmp_path):
    seed_everything(0)
    model = sp.get_adapter_model(tiny_llama(vocab_size=VOCAB), sp.LoraConfig(r=4, lora_dropout=0.0))
    assert model.training_state() is None
    save_method_state(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kill_at", [3])
def test_ilora_resumed_run_matches_the_uninterrupted_one(tmp_path, kill_at):
    """The replay buffer decides which examples a step replays: a resume that lost it (or its generator) would
    replay others and end with other weights."""
    data = examples()
    full = Trainer(ilora_model(), args(tmp_path / "full"), data).train()
    part = Trainer(ilora_model(), args(tmp_path / "part", max_steps=6), data)
    part.callbacks.append(lambda tr: _stop_at(tr, kill_at))
    with pytest.raises(_Stop):
        part.train()
    ckpt = list_checkpoints(tmp_path / "part")[-1]
    assert (ckpt / "method_state.json").exists() and not list(ckpt.glob("extra_state*"))
    resumed = Trainer(ilora_model(), args(tmp_path / "part", resume_from_checkpoint="latest"), data).train()
    assert resumed.global_step == full.global_step == 6
    a = load_file(f"{full.adapter_dir}/adapter_model.safetensors")
    b = load_file(f"{resumed.adapter_dir}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final_loss == full.final_loss


class _Stop(Exception):
    pass


def _stop_at(trainer: Trainer, step: int) -> None:
    if trainer.state.global_step == step:
        raise _Stop(f"stopped at step {step}")


def test_a_checkpoint_with_pickled_state_is_refused_not_unpickled(tmp_path):
    data = examples()
    Trainer(ilora_model(), args(tmp_path / "run"), data).train()  # 6 steps, a checkpoint at step 3
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    (ckpt / "extra_state.pt").write_bytes(b"not to be unpickled")  # what older checkpoints held
    with pytest.raises(ResumeError, match="no longer unpickled"):
        Trainer(ilora_model(), args(tmp_path / "run", resume_from_checkpoint="latest"), data).train()
