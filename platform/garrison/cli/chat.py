"""`garrison chat`: talk to a model on a Garrison server, streaming the answer as it is generated."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from garrison.cli.numbers import INT32_MAX, UINT64_MAX, integer
from garrison.cli.remote import connect, connection_parent
from garrison.client import Completion, accumulate

TENANT_KEY = "tenant.key"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "chat", help="chat with a model on a server (streams the answer)", parents=[connection_parent()],
        description="Send a chat to a Garrison server with a tenant key and stream the answer. With --prompt, "
                    "one turn; without, an interactive conversation on stdin (empty line or Ctrl-D ends it).")
    parser.add_argument("--model", default="smollm2", help="model name (ListModels shows yours; default %(default)s)")
    parser.add_argument("--prompt", help="one user message; omit for an interactive chat")
    parser.add_argument("--system", help="a system message before the conversation")
    parser.add_argument("--max-tokens", type=integer(1, INT32_MAX),
                        help="most tokens per answer (default: the server's limit)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=integer(0, INT32_MAX), help="sample among the k likeliest tokens")
    parser.add_argument("--seed", type=integer(0, UINT64_MAX), help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per answer instead of streaming")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, stop=args.stop)
    with connect(args, TENANT_KEY) as client:
        turns = [args.prompt] if args.prompt is not None else _stdin_turns()
        for text in turns:
            messages.append({"role": "user", "content": text})
            completion = Completion()
            for piece in client.generate(args.model, messages=messages, **sampling):
                accumulate(completion, piece)
                if not args.json:
                    print(piece.text, end="", flush=True)
            if args.json:
                print(json.dumps({"id": completion.id, "text": completion.text, "token_ids": completion.token_ids,
                                  "finish_reason": completion.finish_reason,
                                  "prompt_tokens": completion.usage.prompt_tokens if completion.usage else None,
                                  "output_tokens": completion.usage.output_tokens if completion.usage else None}))
            else:
                print()
            messages.append({"role": "assistant", "content": completion.text})
    return 0


def _stdin_turns():  # type: ignore[no-untyped-def]
    while True:
        if sys.stdin.isatty():
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")
