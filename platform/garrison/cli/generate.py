"""`garrison generate`: run one request through the engine on this machine and print the answer."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import InvalidRequestError
from garrison_workers.parallel.dims import ParallelDims

from garrison.cli.output import HelpFormatter
from garrison.cli.store_options import add_kek_options, add_store_option, provider_from_args, store_from_args
from garrison.model_refs import resolve_model


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "generate", help="generate text from a prompt with a local engine",
        description="Load a model (HF directory, .gguf file, a model of the encrypted store, or a bundled name "
                    "such as 'smollm2') and generate a completion on this machine. Without a GPU it runs on CPU "
                    "in float32.",
        formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True,
                        help="HF model directory, .gguf file, name of a model in the store, or bundled model name")
    add_store_option(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    source.add_argument("--token-ids", type=_token_ids, help="comma-separated prompt token ids, e.g. 1,2,3")
    parser.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 disables)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 disables)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (split attention heads, MLP widths)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (split each MoE layer's experts)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with token_ids, text, logprobs and finish_reason")
    add_kek_options(parser, title="key-encryption key, for a model of the store (one of; default from the "
                                  "environment: $GARRISON_KEK_FILE, $GARRISON_KEK_SECRET_DIR or $GARRISON_KEK)")
    parser.set_defaults(run=run)


def _token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), logprobs=True)
    torch.set_grad_enabled(False)
    # With tp × ep > 1 the replica runs as Ray actors on a local Ray instance (started if none runs).
    dims = ParallelDims(tp=args.tp, ep=args.ep)
    model = resolve_model(args.model, store_from_args(args), provider_from_args(args))
    engine = LLMEngine.from_path(model, EngineConfig(kv_cache_bytes=512 << 20), dims)
    try:
        return _generate(engine, args, params)
    finally:
        engine.shutdown()


def _generate(engine: LLMEngine, args: argparse.Namespace, params: SamplingParams) -> int:
    prompt = _prompt_ids(engine, args)
    engine.add_request("cli", prompt, params)
    result: dict[str, Any] = {"token_ids": [], "text": "", "logprobs": [], "finish_reason": None,
                              "prompt_tokens": len(prompt)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            result["token_ids"] += out.new_token_ids
            result["text"] += out.new_text
            result["logprobs"] += out.new_logprobs
            result["finish_reason"] = out.finish_reason
            if out.error is not None:
                raise out.error
            if not args.json:
                print(out.new_text, end="", flush=True)
    if args.json:
        print(json.dumps(result))
    else:
        print()
    return 0


def _prompt_ids(engine: LLMEngine, args: argparse.Namespace) -> list[int]:
    if args.token_ids is not None:
        if args.chat:
            raise InvalidRequestError("--chat needs --prompt text, not --token-ids")
        return args.token_ids
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer (tokenizer.json); pass --token-ids instead of --prompt")
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(args.prompt)
