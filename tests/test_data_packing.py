"""Packing (data.PackingCollator): several examples in one row, each with its own positions and attending only
to itself, give the same loss and gradients as the unpacked, padded batch, for every method that packs."""

from __future__ import annotations

import pytest
import torch
from conftest import method_configs, tiny_llama

import slim_peft as sp
from slim_peft.data import IGNORE_INDEX, Collator, PackingCollator, TokenizedExample, packed_attention_mask
from slim_peft.errors import ConfigError, DataError


def examples(n: int = 6, seed: int = 0, sample_types: tuple[int, ...] = (1,)) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 11, (1,), generator=g))
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
        out.append(TokenizedExample(tuple(ids), tuple(labels), sample_types[i % len(sample_types)]))
    return out


def test_rows_are_filled_first_fit_and_keep_sample_types_apart():
    exs = examples(8, sample_types=(0, 1))
    rows = PackingCollator(0, 16).rows(exs)
    assert sorted(i for r in rows for i in r) == list(range(8))
    for r in rows:
        assert sum(len(exs[i]) for i in r) <= 16
        assert len({exs[i].sample_type for i in r}) == 1
    assert len(rows) < 8  # something was packed


def test_packed_batch_layout():
    exs = examples(4)
    b = PackingCollator(0, 64)(exs)
    assert b["input_ids"].shape[0] == 1
    pos, seq = b["position_ids"][0], b["sequence_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == 4 and sorted(set(seq.tolist()) - {-1}) == [0, 1, 2, 3]
    assert b["attention_mask"].sum() == sum(len(e) for e in exs)
    mask = packed_attention_mask(b["sequence_ids"], "sdpa", torch.float32)[0, 0]
    a, c = starts[1], starts[2]  # the second example: its tokens see themselves and their past only
    assert mask[a:c, a:c].equal(torch.ones(c - a, c - a, dtype=torch.bool).tril())
    assert not mask[a:c, :a].any() and not mask[a:c, c:].any()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["lora", "dora", "slim", "mixlora", "loramoe", "mola"])
def test_packing_gives_the_unpacked_loss_and_gradients(method, attn):
    exs = examples(6, sample_types=(1, 0) if method == "loramoe" else (1,))
    losses, grads = [], []
    for collate in (Collator(0), PackingCollator(0, 32)):
        base = tiny_llama(0, attn_implementation=attn)
        model = sp.get_adapter_model(base, method_configs(r=4, lora_dropout=0.0)[method])
        model.train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # every adapter weight nonzero, so the adapters' outputs count in the loss
            for p in model.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        with torch.no_grad():  # SLIM's clusters start from the first batch's tokens: the same for both
            model(**Collator(0)(exs))
        batch = collate(exs)
        torch.manual_seed(2)  # SLIM's merge masks: the same draw for both batches
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    assert PackingCollator(0, 32)(exs)["input_ids"].shape[0] < len(exs)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=2e-5)


def test_packing_without_position_restart_would_differ():
    """The test above can fail: the same rows with one causal mask over the whole row give another loss."""
    exs = examples(6)
    model = sp.get_adapter_model(tiny_llama(0), sp.LoraConfig(r=4))
    packed = PackingCollator(0, 32)(exs)
    unpacked = model(**Collator(0)(exs)).loss
    leaky = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                  labels=packed["labels"]).loss
    assert abs(float(leaky.detach()) - float(unpacked.detach())) > 1e-3


def test_packing_refuses_ilora_and_an_example_longer_than_a_row():
    model = sp.get_adapter_model(tiny_llama(0), sp.ILoraConfig(r=4))
    with pytest.raises(ConfigError, match="packing"):
        from slim_peft.training import Trainer, TrainingArguments

        Trainer(model, TrainingArguments(output_dir="unused", max_steps=1, packing=True), examples(4))
    with pytest.raises(DataError, match="longer than max_seq_length"):
        PackingCollator(0, 5)(examples(4))
