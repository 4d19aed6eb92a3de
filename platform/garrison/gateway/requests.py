"""Turn a `GenerateRequest` / `TokenizeRequest` into prompt token ids and sampling parameters.

Everything a client can get wrong is refused here with InvalidArgumentError naming the field, before
the request takes a quota slot or a queue position.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from garrison.gateway.render import ChatRenderer
from garrison.router.router import Deployment
from garrison.tenancy.errors import InvalidArgumentError
from garrison.tenancy.records import Quota
from garrison.v1 import inference_pb2 as pb
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.tokenizer import ChatTemplate

CHAT_ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 4096
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 100.0


async def prompt_token_ids(request: pb.GenerateRequest | pb.TokenizeRequest, deployment: Deployment,
                           renderer: ChatRenderer) -> list[int]:
    """The prompt as token ids. Rendering a chat and tokenizing a long text run off the event loop (the renderer's
    processes, a thread): neither may hold up the gateway's other calls."""
    text_field = "prompt" if isinstance(request, pb.GenerateRequest) else "text"
    text = getattr(request, text_field)
    ids = list(request.token_ids) if isinstance(request, pb.GenerateRequest) else []
    given = [name for name, present in ((text_field, bool(text)), ("messages", bool(request.messages)),
                                        ("token_ids", bool(ids))) if present]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise InvalidArgumentError(f"set exactly one of {text_field}, messages and token_ids (got {what})")
    if ids:
        return _checked_ids(ids, deployment)
    tokenizer = deployment.tokenizer
    if tokenizer is None:
        raise InvalidArgumentError(f"model {deployment.name!r} has no tokenizer: send token_ids")
    if text:
        return await asyncio.to_thread(tokenizer.encode, text)
    chat = await renderer.render(_chat_template(deployment), _chat_messages(request.messages))
    return await asyncio.to_thread(tokenizer.encode, chat, add_special_tokens=False)


def _checked_ids(ids: list[int], deployment: Deployment) -> list[int]:
    # Within the tokenizer's vocabulary too: a model's embedding may have rows no token names, and such an id
    # could never be turned back into text.
    vocab = deployment.model_config.vocab_size
    if deployment.tokenizer is not None:
        vocab = min(vocab, deployment.tokenizer.vocab_size)
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise InvalidArgumentError(f"token_ids: {bad} is outside model {deployment.name!r}'s vocabulary "
                                   f"(0..{vocab - 1})")
    return ids


def _chat_messages(messages: Sequence[pb.ChatMessage]) -> list[dict[str, str]]:
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgumentError(f"messages: at most {MAX_MESSAGES} messages, got {len(messages)}")
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidArgumentError(f"messages[{index}].role is {message.role!r}; use one of {', '.join(CHAT_ROLES)}")
    return [{"role": m.role, "content": m.content} for m in messages]


def _chat_template(deployment: Deployment) -> ChatTemplate:
    assert deployment.tokenizer is not None
    template = deployment.tokenizer.chat_template
    if template is None:
        raise InvalidArgumentError(f"model {deployment.name!r} has no chat template; send a plain text prompt "
                                   "instead of chat messages")
    return template


def sampling_params(request: pb.GenerateRequest, deployment: Deployment, quota: Quota,
                    num_prompt_tokens: int) -> SamplingParams:
    room = deployment.max_model_len - num_prompt_tokens
    if room < 1:
        raise InvalidArgumentError(
            f"the prompt has {num_prompt_tokens} tokens but model {deployment.name!r} holds at most "
            f"{deployment.max_model_len - 1} with room to generate: shorten the prompt")
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be >= 1 (or unset), got {max_tokens}")
        if max_tokens > room:
            raise InvalidArgumentError(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds model "
                f"{deployment.name!r}'s context of {deployment.max_model_len}: ask for at most {room}")
    else:  # as much as fits, within the tenant's per-request limit
        max_tokens = min(room, quota.max_new_tokens or room)
    temperature = request.temperature if request.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidArgumentError(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], got {temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
    top_k = request.top_k if request.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidArgumentError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    stop = tuple(request.stop)
    if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidArgumentError(f"stop: at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=min(top_k, deployment.model_config.vocab_size),
                          seed=request.seed if request.HasField("seed") else None, stop=stop,
                          logprobs=request.logprobs)
