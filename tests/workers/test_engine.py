"""Continuous batching: batch invariance, arrival while others run, cancellation, preemption, prefix caching."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny_llama, save_tiny_llama4
from garrison_workers.engine.executor import LocalExecutor
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import SequenceError


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


def fresh_twin(engine: LLMEngine) -> LLMEngine:
    """The same weights in a new engine with its own empty KV cache and prefix caching off: what it computes
    cannot come from blocks that the engine under test has published."""
    config = replace(engine.config, enable_prefix_caching=False)
    executor = LocalExecutor(engine.executor.model, engine.num_blocks, config)
    return LLMEngine(executor, engine.model_config, engine.tokenizer, config, engine.num_blocks)


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


# SmolLM2's run (~40 s) is with the slow checks, which CI runs; the tiny models' stay in make test
@pytest.mark.parametrize("which", ["tiny_engine", "short_key_block_engine",
                                   pytest.param("smollm2_engine", marks=pytest.mark.slow)])
def test_batch_invariance(request, which: str) -> None:
    engine = request.getfixturevalue(which)
    prompts = mixed_prompts(16, engine.model_config.vocab_size, seed=11)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    together = run_staggered(engine, prompts, params)
    twin = fresh_twin(engine)
    for i, prompt in enumerate(prompts):
        assert together[f"r{i}"] == alone(twin, prompt, params), f"request {i} changed when batched"
    assert_all_blocks_free(engine)


def test_seeded_sampling_is_batch_invariant(tiny_engine: LLMEngine) -> None:
    prompts = mixed_prompts(6, 512, seed=5)
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    together = run_staggered(tiny_engine, prompts, params)
    twin = fresh_twin(tiny_engine)
    for i, prompt in enumerate(prompts):
        assert together[f"r{i}"] == alone(twin, prompt, params)


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


POISON = 7  # the token whose embedding row is NaN in `poisoned_model`


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory) -> Path:
    """A tiny Llama whose embedding of one token is NaN (untied from the LM head): any sequence that holds the
    token gets NaN hidden states, as a model's overflow would give it; the others are unaffected."""
    path = save_tiny_llama(tmp_path_factory.mktemp("poisoned"), seed=5, tie_word_embeddings=False)
    [file] = path.glob("*.safetensors")
    tensors = load_file(file)
    tensors["model.embed_tokens.weight"][POISON] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def test_a_sequence_with_nan_logits_fails_alone(poisoned_model: Path) -> None:
    """The poisoned sequence is admitted first, so its K/V (NaN) sit in the first blocks of the cache; the others
    decode in the same padded batch and must get exactly the tokens they get without it."""
    config = EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=64)
    engine = LLMEngine.from_path(poisoned_model, config)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    # Short prompts of different lengths: rows padded in the decode batch, and the poisoned blocks never reused.
    healthy = [[t for t in prompt if t != POISON][:n] for prompt, n in zip(mixed_prompts(4, 320, seed=1), (3, 5, 8, 13))]
    expected = [alone(fresh_twin(engine), prompt, params) for prompt in healthy]
    engine.add_request("poisoned", [POISON, 5, 9], params)  # its K/V in slot 0 on
    for i, prompt in enumerate(healthy):
        engine.add_request(f"h{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"h{i}": [] for i in range(len(healthy))}
    failures = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "poisoned":
                failures.append(out)
            else:
                assert out.error is None, out.error
                tokens[out.request_id] += out.new_token_ids
    assert [f.finish_reason for f in failures] == ["error"] and isinstance(failures[0].error, SequenceError)
    assert "NaN" in str(failures[0].error)
    assert list(tokens.values()) == expected
    assert_all_blocks_free(engine)
