"""Training data: tokenised examples (loss on the answer only), instruction and chat rows (schemas.py, chat.py),
batching and a resumable seeded order."""

from slim_peft.errors import DataError

from .batching import Collator, PackingCollator, SeededBatchOrder, dataset_fingerprint, packed_attention_mask, shard
from .chat import build_row_examples, encode_conversation, encode_row
from .demo import DEMO_DATA
from .encode import IGNORE_INDEX, TokenizedExample, build_task_examples, encode_example, end_of_turn_text
from .load import load_dataset
from .schemas import FORMATS, Message, Row, detect_format, parse_row
from .sources import (
    EMBEDDED_DATA,
    DataSource,
    EmbeddedData,
    SourcedRow,
    held_out_split,
    parse_sources,
    read_source,
    read_sources,
    related_tasks,
    train_and_held_out,
)

__all__ = [
    "DEMO_DATA", "EMBEDDED_DATA", "FORMATS", "IGNORE_INDEX", "Collator", "DataError", "DataSource", "EmbeddedData",
    "Message", "PackingCollator", "Row",
    "SeededBatchOrder", "SourcedRow", "TokenizedExample", "build_row_examples", "build_task_examples",
    "dataset_fingerprint", "detect_format", "encode_conversation", "encode_example", "encode_row",
    "end_of_turn_text", "held_out_split", "load_dataset", "packed_attention_mask", "parse_row", "parse_sources",
    "read_source", "read_sources", "related_tasks", "shard", "train_and_held_out",
]
