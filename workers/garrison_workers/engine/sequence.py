"""A request as the engine tracks it, and its sampling parameters."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum

from garrison_workers.engine.output_text import OutputText
from garrison_workers.engine.sampler import TokenDraw
from garrison_workers.errors import InvalidRequestError

MAX_SEED = (1 << 64) - 1


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` turn those filters off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # with each token, the most likely tokens and their log-probabilities

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}")
        if not isinstance(self.top_logprobs, int) or self.top_logprobs < 0:
            raise InvalidRequestError(f"top_logprobs must be an integer >= 0, got {self.top_logprobs!r}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by every generated token
    num_prompt_tokens: int
    params: SamplingParams
    salt: bytes = b""  # prefix-cache namespace: blocks are shared only between equal salts (tenants)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading full blocks already published to the prefix cache
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    finish_reason: str | None = None
    # Seeds every draw of this sequence (the request's seed, or a random one): see sampler.TokenDraw.
    seed: int = field(default=0, init=False)
    # The generated text, stop strings and what has been streamed; None without a tokenizer (token ids only).
    text: OutputText | None = None

    def __post_init__(self) -> None:
        self.seed = self.params.seed if self.params.seed is not None else int.from_bytes(os.urandom(8), "little")

    def next_draw(self) -> TokenDraw:
        """How to pick this sequence's next token."""
        p = self.params
        return TokenDraw(p.temperature, p.top_p, p.top_k, self.seed, self.num_output_tokens, p.logprobs,
                         p.top_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
