"""Overlapped steps (async scheduling): the ranks of a Ray worker group get each step before the last one's tokens
are back, and fill in the tokens rank 0 sampled. What users see must not change: the same tokens, text, finish
reasons, log-probabilities and usage as steps run one at a time in this process, through stops, length limits,
preemption (a KV cache too small for the batch) and aborts; with one rank, and with tp=2 and ep=2 (where rank 0
sends the tokens to the others)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llama, save_tiny_llama4, save_word_tokenizer
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.scheduler import Scheduler
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.parallel.dims import ParallelDims

pytestmark = pytest.mark.usefixtures("local_ray")

VOCAB = 320  # the tiny dense model's; the tiny MoE's is 512, and the prompts stay within both
# 40 blocks of 4 tokens hold about 3 of these sequences at their longest: the rest wait, and running ones are
# preempted and recomputed.
CONFIG = EngineConfig(block_size=4, num_kv_blocks=40, max_num_batched_tokens=32, max_num_seqs=6)


@dataclass
class Seen:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float | None] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=3, vocab_size=VOCAB)
    return save_word_tokenizer(path, VOCAB)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    path = save_tiny_llama4(tmp_path_factory.mktemp("moe"), seed=8, num_experts_per_tok=2)
    return save_word_tokenizer(path, 512)


def requests(stop_word: str) -> list[tuple[list[int], SamplingParams]]:
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 30, (10,), generator=gen)]
    kinds = [SamplingParams(max_tokens=1),
             SamplingParams(max_tokens=24),  # the tiny model's EOS (2) may end it early
             SamplingParams(max_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=2),
             SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),
             SamplingParams(max_tokens=20, temperature=1.2, top_k=20, seed=6),
             SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop_word,))]
    return [(prompt, kinds[i % len(kinds)]) for i, prompt in enumerate(prompts)]


def run(engine: LLMEngine, batch: list[tuple[list[int], SamplingParams]], abort: str | None = None
        ) -> dict[str, Seen]:
    seen = {f"r{i}": Seen() for i in range(len(batch))}
    for i, (prompt, params) in enumerate(batch):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            s = seen[out.request_id]
            s.tokens += out.new_token_ids
            s.text += out.new_text
            s.logprobs += out.new_logprobs
            s.top += out.new_top_logprobs
            s.finish_reason, s.num_output_tokens = out.finish_reason, out.num_output_tokens
            if out.request_id == abort and len(s.tokens) == 3:
                assert engine.abort_request(abort)
                s.finish_reason = "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing left held
    return seen


def assert_same(got: dict[str, Seen], expected: dict[str, Seen]) -> None:
    """Equal tokens, text, finish reasons and usage; log-probabilities equal up to float32 rounding (a batch formed
    otherwise, or torch's threads in another process, sum in another order)."""
    assert got.keys() == expected.keys()
    for request_id, e in expected.items():
        g = got[request_id]
        assert (g.tokens, g.text, g.finish_reason, g.num_output_tokens) == (
            e.tokens, e.text, e.finish_reason, e.num_output_tokens), request_id
        assert [t for t, _ in sum(g.top, ())] == [t for t, _ in sum(e.top, ())], request_id
        close = lambda a, b: torch.testing.assert_close(torch.tensor(a, dtype=torch.float64),  # noqa: E731
                                                        torch.tensor(b, dtype=torch.float64), atol=1e-4, rtol=0)
        close([lp or 0.0 for lp in g.logprobs], [lp or 0.0 for lp in e.logprobs])
        close([v for _, v in sum(g.top, ())], [v for _, v in sum(e.top, ())])


def preemptions(monkeypatch) -> list[str]:
    """The ids of the requests the scheduler preempts from now on (in this process)."""
    preempted: list[str] = []
    original = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, seq, batch: (preempted.append(seq.request_id),
                                                                           original(self, seq, batch)))
    return preempted


def reference_run(path: Path, monkeypatch) -> tuple[list[tuple[list[int], SamplingParams]], dict[str, Seen]]:
    """The requests, and what steps one at a time in this process give for them (covering preemption)."""
    reference = LLMEngine.from_path(path, CONFIG)
    # A stop word that a greedy request reaches after a few tokens, found from the reference's own text.
    probe = reference.generate([requests("w3")[5][0]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    stop_word = probe.text.split()[4]
    batch = requests(stop_word)
    preempted = preemptions(monkeypatch)
    expected = run(reference, batch, abort="r7")
    assert preempted, "the KV cache should be too small for the batch: the test must cover preemption"
    assert expected["r5"].finish_reason == "stop" and stop_word not in expected["r5"].text
    return batch, expected


def test_overlapped_steps_give_what_steps_one_at_a_time_give(tiny: Path, monkeypatch) -> None:
    batch, expected = reference_run(tiny, monkeypatch)
    preempted = preemptions(monkeypatch)
    overlapped = LLMEngine.from_path(tiny, CONFIG, on_ray=True)
    one_at_a_time = LLMEngine.from_path(tiny, replace(CONFIG, async_scheduling=False), on_ray=True)
    try:
        assert overlapped._overlapping() and not one_at_a_time._overlapping()
        assert_same(run(overlapped, batch, abort="r7"), expected)
        assert preempted
        assert_same(run(one_at_a_time, batch, abort="r7"), expected)
        assert_same(run(overlapped, batch[:1]), {"r0": expected["r0"]})  # it serves on after going idle
    finally:
        overlapped.shutdown()
        one_at_a_time.shutdown()


@pytest.mark.parametrize("model, dims", [("dense", ParallelDims(tp=2)), ("moe", ParallelDims(ep=2))],
                         ids=["tp2", "ep2"])
def test_ranks_of_a_larger_group_get_the_tokens_rank_0_sampled(tiny: Path, tiny_moe: Path, monkeypatch, model: str,
                                                               dims: ParallelDims) -> None:
    path = tiny if model == "dense" else tiny_moe
    batch, expected = reference_run(path, monkeypatch)
    engine = LLMEngine.from_path(path, CONFIG, dims)
    try:
        assert engine._overlapping()
        assert_same(run(engine, batch, abort="r7"), expected)
    finally:
        engine.shutdown()
