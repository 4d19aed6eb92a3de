"""Picks each sequence's next token from its logits: greedy, or temperature → top-k → top-p → draw.

Each sequence draws from its own seeded generator, so a seeded request gets the same tokens whatever
else shares its batch. Log-probabilities are those of the model's raw distribution (before
temperature and filtering), as vLLM reports them.
"""

from __future__ import annotations

import torch

from garrison_workers.engine.sequence import Sequence


def sample(logits_NV: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float | None]]:
    logprobs_NV = torch.log_softmax(logits_NV, dim=-1) if any(s.params.logprobs for s in seqs) else None
    tokens = logits_NV.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[row] = _draw(logits_NV[row], seq)
    logprobs: list[float | None] = [
        float(logprobs_NV[row, token]) if logprobs_NV is not None and seq.params.logprobs else None
        for row, (seq, token) in enumerate(zip(seqs, tokens))]
    return tokens, logprobs


def _draw(logits_V: torch.Tensor, seq: Sequence) -> int:
    params = seq.params
    scaled_V = logits_V / params.temperature
    if 0 < params.top_k < scaled_V.numel():
        kth = torch.topk(scaled_V, params.top_k).values[-1]
        scaled_V = scaled_V.masked_fill(scaled_V < kth, float("-inf"))
    probs_V = torch.softmax(scaled_V, dim=-1)
    if params.top_p < 1.0:
        probs_V = _top_p(probs_V, params.top_p)
    return int(torch.multinomial(probs_V, 1, generator=seq.generator))


def _top_p(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p` (always at least one)."""
    sorted_V, order_V = torch.sort(probs_V, descending=True)
    mass_before_V = torch.cumsum(sorted_V, dim=0) - sorted_V
    sorted_V = sorted_V.masked_fill(mass_before_V >= top_p, 0.0)
    return torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)
