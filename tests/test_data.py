"""Training data (slim_peft.data): encoding with the loss on the answer (and end of turn) only, the collator's
right padding, and the seeded, restorable, shardable batch order."""

from __future__ import annotations

import pytest
from conftest import make_tiny_tokenizer

from slim_peft.data import (
    IGNORE_INDEX,
    Collator,
    SeededBatchOrder,
    TokenizedExample,
    encode_example,
    end_of_turn_text,
    shard,
)
from slim_peft.errors import DataError

# ------------------------------------------------------------------------------------------------ encoding


def test_encode_labels_only_the_answer_and_end_of_turn():
    tok = make_tiny_tokenizer()
    assert end_of_turn_text(tok) == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "which? A. yes B. no"}], tokenize=False,
                                     add_generation_prompt=True)
    ex, cut = encode_example(tok, prompt, "B", max_seq_length=256, sample_type=1)
    assert not cut
    supervised = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "B<|im_end|>"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == (IGNORE_INDEX,) * n_prompt
    short, cut = encode_example(tok, prompt, "B", max_seq_length=8)
    assert cut and len(short) == 8 and short.labels[-2:] == ex.labels[-2:]  # prompt cut from the left


# ------------------------------------------------------------------------------------------------ batching


def test_collator_pads_right_and_carries_sample_type():
    a = TokenizedExample((5, 6, 7), (IGNORE_INDEX, 7, 2), 0)
    b = TokenizedExample((5, 6), (IGNORE_INDEX, 2), 1)
    batch = Collator(pad_token_id=0)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 7, 2], [IGNORE_INDEX, 2, IGNORE_INDEX]]
    assert batch["sample_type"].tolist() == [0, 1]


def test_batch_order_is_seeded_restorable_and_sharded():
    lengths = list(range(5, 45))
    a = SeededBatchOrder(lengths, batch_size=8, seed=3)
    b = SeededBatchOrder(lengths, batch_size=8, seed=3)
    assert a.batches_per_epoch == 5
    assert a.epoch_batches(0) == b.epoch_batches(0)  # a pure function of (seed, epoch)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert a.batch_at(1, 3) == b.epoch_batches(1)[3]  # any position can be restored directly
    flat = sorted(i for batch in a.epoch_batches(0) for i in batch)
    assert flat == sorted(set(flat)) and len(flat) == 40
    assert shard(a.batch_at(0, 0), 0, 2) + shard(a.batch_at(0, 0), 1, 2) == a.batch_at(0, 0)
    g = SeededBatchOrder(lengths, batch_size=8, seed=3, group_by_length=True)
    spreads = [max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in g.epoch_batches(0)]
    assert max(spreads) <= 7  # sorted within the mega-batch: neighbours in length
    with pytest.raises(DataError, match="fewer than one batch"):
        SeededBatchOrder([3, 4], batch_size=8, seed=0)
