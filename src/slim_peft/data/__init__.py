"""Training data: tokenised examples (loss on the answer only), batching and a resumable seeded order."""

from slim_peft.errors import DataError

from .batching import Collator, SeededBatchOrder, dataset_fingerprint, shard
from .encode import IGNORE_INDEX, TokenizedExample, build_task_examples, encode_example, end_of_turn_text

__all__ = [
    "IGNORE_INDEX", "Collator", "DataError", "SeededBatchOrder", "TokenizedExample", "build_task_examples",
    "dataset_fingerprint", "encode_example", "end_of_turn_text", "shard",
]
