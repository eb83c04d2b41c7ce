"""The row formats people already have, parsed into one shape: a conversation (system / user / assistant
messages) or a plain text, with optional `task` and `sample_type` fields.

Formats (detected from the fields, or named by `data_format`):
- "messages":          {"messages": [{"role", "content"}, ...]}  (TRL, OpenAI; multi-turn)
- "prompt_completion": {"prompt": str | messages, "completion": str | messages}
- "alpaca":            {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- "sharegpt":          {"conversations": [{"from": human|gpt|system, "value"}, ...]}
- "text":              {"text": str}  (language modelling: loss on every token)
- "multiple_choice":   {"question", "choices", "label"}  (our task schema: read by `tasks.files`)

A conversation is valid when an optional system message comes first, user and assistant turns then alternate
starting with the user, it ends with an assistant turn, and no assistant turn is empty. A bad row is a
`DataError` that names its source, line and field, and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slim_peft.errors import DataError

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "text", "multiple_choice")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
# the fields that identify a format, in the order they are tried
SIGNATURES = (("messages", ("messages",)), ("sharegpt", ("conversations",)),
              ("prompt_completion", ("prompt", "completion")), ("alpaca", ("instruction", "output")),
              ("multiple_choice", ("question", "choices", "label")), ("text", ("text",)))


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Row:
    """One training row: `messages` (a conversation) or `text` (plain language modelling)."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    task: str | None = None
    sample_type: int | None = None


def detect_format(row: dict[str, Any], where: str) -> str:
    """The format whose identifying fields the row has (`SIGNATURES`)."""
    for name, fields in SIGNATURES:
        if all(f in row for f in fields):
            return name
    raise DataError(f"{where}: a row with fields {sorted(row)} matches no known format; give one of: "
                    + "; ".join(f"{n} ({', '.join(f)})" for n, f in SIGNATURES)
                    + ", or set data_format")


def parse_row(row: Any, where: str, data_format: str | None = None) -> Row:
    """`row` (one JSON object; `where` = "file:line" for the messages) as a `Row`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    fmt = data_format or detect_format(row, where)
    if fmt not in FORMATS:
        raise DataError(f"data_format {fmt!r} is not one of {FORMATS}")
    if fmt == "multiple_choice":
        raise DataError(f"{where}: multiple-choice rows (question, choices, label) are read as a task file: "
                        f"pass the file in `tasks`, not as instruction data")
    extra = {"task": _optional_str(row, "task", where), "sample_type": _optional_int(row, "sample_type", where)}
    if fmt == "text":
        text = _string(row, "text", where)
        if not text.strip():
            raise DataError(f"{where}: field 'text' is empty")
        return Row(text=text, **extra)
    messages = PARSERS[fmt](row, where)
    check_conversation(messages, where)
    return Row(messages=tuple(messages), **extra)


def check_conversation(messages: list[Message], where: str) -> None:
    """System first (optional), then user / assistant alternating from the user, ending with the assistant;
    no assistant turn empty."""
    if not messages:
        raise DataError(f"{where}: the conversation is empty")
    body = messages[1:] if messages[0].role == "system" else messages
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise DataError(f"{where}: message {i + len(messages) - len(body)} has role {m.role!r} where "
                            f"{expected!r} is expected (an optional system message first, then user and "
                            f"assistant turns alternating, starting with the user)")
        if m.role == "assistant" and not m.content.strip():
            raise DataError(f"{where}: message {i + len(messages) - len(body)} is an empty assistant turn: "
                            f"drop the row or write the answer")
    if not body or body[-1].role != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn (nothing to learn from)")


def _messages(value: Any, where: str, field: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f"{where}: {field}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = roles.get(m[role_key]) if roles else m[role_key]
        if role not in ROLES:
            known = sorted(roles) if roles else list(ROLES)
            raise DataError(f"{where}: {field}[{i}].{role_key} is {m[role_key]!r}, not one of {known}")
        if not isinstance(m[content_key], str):
            raise DataError(f"{where}: {field}[{i}].{content_key} must be a string")
        out.append(Message(role, m[content_key]))
    return out


def _from_messages(row: dict[str, Any], where: str) -> list[Message]:
    return _messages(row["messages"], where, "messages")


def _from_sharegpt(row: dict[str, Any], where: str) -> list[Message]:
    return _messages(row["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)


def _from_prompt_completion(row: dict[str, Any], where: str) -> list[Message]:
    prompt, completion = row["prompt"], row["completion"]
    first = [Message("user", prompt)] if isinstance(prompt, str) else _messages(prompt, where, "prompt")
    last = [Message("assistant", completion)] if isinstance(completion, str) else \
        _messages(completion, where, "completion")
    return first + last


def _from_alpaca(row: dict[str, Any], where: str) -> list[Message]:
    instruction, output = _string(row, "instruction", where), _string(row, "output", where)
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string")
    messages = [Message("system", _string(row, "system", where))] if row.get("system") else []
    for i, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair of strings")
        messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return messages + [Message("user", user), Message("assistant", output)]


PARSERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "prompt_completion": _from_prompt_completion,
           "alpaca": _from_alpaca}


def _string(row: dict[str, Any], field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _optional_str(row: dict[str, Any], field: str, where: str) -> str | None:
    return None if row.get(field) is None else _string(row, field, where)


def _optional_int(row: dict[str, Any], field: str, where: str) -> int | None:
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: field {field!r} must be an integer (0 world knowledge, 1 downstream)")
    return value
