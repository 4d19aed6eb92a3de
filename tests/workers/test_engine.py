"""Continuous batching: batch invariance, arrival while others run, cancellation, preemption, prefix caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llama4
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams


def mixed_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 90, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    """Add request i after i steps, so requests join a batch that is already decoding."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
            tokens[f"r{i}"] = []
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def alone(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    [done] = engine.generate([prompt], params)
    return done.token_ids


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory) -> LLMEngine:
    model_dir = save_tiny_llama4(tmp_path_factory.mktemp("tiny"), seed=3, num_experts_per_tok=2)
    return LLMEngine.from_path(model_dir, EngineConfig(block_size=8, num_kv_blocks=512, max_num_batched_tokens=64))


@pytest.fixture(scope="module")
def short_key_block_engine(tmp_path_factory) -> LLMEngine:
    """Rows of a batch straddle a 32-key block: short ones decode in the padded batch, the others blockwise."""
    model_dir = save_tiny_llama4(tmp_path_factory.mktemp("tiny"), seed=3, num_experts_per_tok=2)
    return LLMEngine.from_path(model_dir, EngineConfig(block_size=8, num_kv_blocks=512, max_num_batched_tokens=64,
                                                       attention_key_block=32))


def assert_all_blocks_free(engine: LLMEngine) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.num_active_requests == 0


@pytest.mark.parametrize("which", ["tiny_engine", "short_key_block_engine", "smollm2_engine"])
def test_batch_invariance(request, which: str) -> None:
    engine = request.getfixturevalue(which)
    prompts = mixed_prompts(16, engine.model_config.vocab_size, seed=11)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    together = run_staggered(engine, prompts, params)
    for i, prompt in enumerate(prompts):
        assert together[f"r{i}"] == alone(engine, prompt, params), f"request {i} changed when batched"
    assert_all_blocks_free(engine)


def test_seeded_sampling_is_batch_invariant(tiny_engine: LLMEngine) -> None:
    prompts = mixed_prompts(6, 512, seed=5)
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    together = run_staggered(tiny_engine, prompts, params)
    for i, prompt in enumerate(prompts):
        assert together[f"r{i}"] == alone(tiny_engine, prompt, params)


def test_cancel_frees_all_blocks_while_others_continue(tiny_engine: LLMEngine) -> None:
    prompts = mixed_prompts(4, 512, seed=2)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        tiny_engine.add_request(f"c{i}", prompt, params)
    for _ in range(5):
        tiny_engine.step()
    victim = tiny_engine._seqs["c1"]
    held = len(victim.block_table)
    free_before = tiny_engine.block_manager.num_free_blocks
    assert held > 0
    assert tiny_engine.abort_request("c1")
    assert tiny_engine.block_manager.num_free_blocks == free_before + held
    assert not tiny_engine.abort_request("c1")
    finished = set()
    while tiny_engine.has_unfinished_requests():
        finished |= {o.request_id for o in tiny_engine.step() if o.finished}
    assert finished == {"c0", "c2", "c3"}
    assert_all_blocks_free(tiny_engine)


def test_preemption_keeps_tokens(tmp_path: Path) -> None:
    model_dir = save_tiny_llama4(tmp_path, seed=4)
    prompts = mixed_prompts(8, 512, seed=9)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    roomy = LLMEngine.from_path(model_dir, EngineConfig(block_size=4, num_kv_blocks=1024))
    # 40 blocks of 4 tokens cannot hold 8 sequences of up to ~110 tokens: the scheduler must preempt.
    tight = LLMEngine.from_path(model_dir, EngineConfig(block_size=4, num_kv_blocks=40, max_num_batched_tokens=32))
    preemptions = 0
    schedule = tight.scheduler.schedule

    def counting():
        nonlocal preemptions
        batch = schedule()
        preemptions += len(batch.preempted)
        return batch

    tight.scheduler.schedule = counting
    got = {c.request_id: c.token_ids for c in tight.generate(prompts, params)}
    assert preemptions > 0
    assert list(got.values()) == [alone(roomy, p, params) for p in prompts]
    assert_all_blocks_free(tight)


def test_prefix_cache_is_shared_only_within_a_salt(tiny_engine: LLMEngine) -> None:
    prompt = mixed_prompts(1, 512, seed=21)[0] * 2  # long enough for several full blocks
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    def cached(request_id: str, salt: bytes) -> tuple[int, list[int]]:
        tiny_engine.add_request(request_id, prompt, params, salt=salt)
        tokens, hits = [], 0
        while tiny_engine.has_unfinished_requests():
            for out in tiny_engine.step():
                tokens += out.new_token_ids
                hits = out.num_cached_prompt_tokens
        return hits, tokens

    first_hits, first = cached("tenant-a-1", b"tenant-a")
    again_hits, again = cached("tenant-a-2", b"tenant-a")
    other_hits, other = cached("tenant-b-1", b"tenant-b")
    assert first_hits == 0 and other_hits == 0
    assert again_hits == (len(prompt) - 1) // 8 * 8
    assert first == again == other
    assert_all_blocks_free(tiny_engine)


def test_kv_cache_device_is_the_engine_device_or_host_memory() -> None:
    assert EngineConfig(device="cuda", kv_cache_device="cpu").kv_device == "cpu"  # built, not run: no GPU needed
    assert EngineConfig().kv_device == "cpu"
    with pytest.raises(ValueError, match="kv_cache_device must be the engine's device"):
        EngineConfig(device="cpu", kv_cache_device="cuda")
