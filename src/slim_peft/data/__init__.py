"""Training data: tokenised examples (loss on the answer only), instruction and chat rows (schemas.py, chat.py),
batching and a resumable seeded order."""

from slim_peft.errors import DataError

from .batching import Collator, SeededBatchOrder, dataset_fingerprint, shard
from .chat import encode_conversation, encode_row
from .encode import IGNORE_INDEX, TokenizedExample, build_task_examples, encode_example, end_of_turn_text
from .schemas import FORMATS, Message, Row, detect_format, parse_row

__all__ = [
    "FORMATS", "IGNORE_INDEX", "Collator", "DataError", "Message", "Row", "SeededBatchOrder", "TokenizedExample",
    "build_task_examples", "dataset_fingerprint", "detect_format", "encode_conversation", "encode_example",
    "encode_row", "end_of_turn_text", "parse_row", "shard",
]
