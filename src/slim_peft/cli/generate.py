"""``slim-peft generate``: the base model (with an adapter) replies to a prompt in its chat template, streamed
as it is decoded; ``--chat`` keeps a conversation going on standard input."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from slim_peft.adapters import AdapterModel
from slim_peft.adapters.io import read_adapter_config
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.errors import ConfigError
from slim_peft.evaluation.generation import ChatSession, generate_text
from slim_peft.experiments.setup import load_base

CHAT_HELP = "chat: one message per line; /reset forgets the conversation, /exit (or end of input) quits"


def add_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (with --chat: the first message)")
    gen.add_argument("--adapter", default=None, help="adapter directory (its base model is used by default)")
    gen.add_argument("--model", default=None, help="base model (default: the adapter's, else smollm2-135m)")
    gen.add_argument("--chat", action="store_true", help="a conversation: read messages from standard input, "
                                                         "each reply sees the earlier turns")
    gen.add_argument("--system", default=None, help="system prompt of the conversation")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="per reply (default 64; 256 with --chat)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-stream", action="store_true", help="print each reply once it is complete")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")


def _printer(stream: bool) -> Callable[[str], None] | None:
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
    return write if stream else None


def command(args: argparse.Namespace) -> int:
    """``slim-peft generate``: the base model (with an adapter) replies to a prompt, or chats."""
    if args.prompt is None and not args.chat:
        raise ConfigError("generate needs a prompt (or --chat for a conversation on standard input)")
    if args.chat and args.no_chat_template:
        raise ConfigError("--chat renders the conversation in the chat template; drop --no-chat-template")
    model_name = args.model
    if args.adapter:
        raw, _ = read_adapter_config(args.adapter)
        if model_name is None:
            model_name = raw.get("base_model_name_or_path") or EMBEDDED_MODEL
    base, tokenizer = load_base(model_name or EMBEDDED_MODEL)
    model = AdapterModel.from_pretrained(base, args.adapter) if args.adapter else base
    stream = _printer(not args.no_stream)
    if not args.chat:
        reply = generate_text(model, tokenizer, args.prompt, chat=not args.no_chat_template,
                              max_new_tokens=args.max_new_tokens or 64, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, on_text=stream)
        print("" if stream else reply)
        return 0
    try:
        session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens or 256,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return chat_loop(session, args.prompt, stream)


def chat_loop(session: ChatSession, first: str | None, stream: Callable[[str], None] | None) -> int:
    """Read messages line by line from standard input and print each reply (streamed when `stream`)."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    pending = [first] if first else []
    while True:
        if pending:
            line = pending.pop()
        else:
            if interactive:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
        message = line.strip()
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not message:
            continue
        reply = session.send(message, on_text=stream)
        print("" if stream else reply)
