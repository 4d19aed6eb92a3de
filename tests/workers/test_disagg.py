"""Disaggregated prefill and decode: same tokens as colocated, across layouts; clean failures."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from conftest import save_tiny_llama4
from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import ContextLengthError, LayoutError, WorkerLostError
from garrison_workers.faults import Fault
from garrison_workers.kv_link import TorchChannel
from garrison_workers.kv_transfer import KVPayload, KVTransferError, assemble_heads
from garrison_workers.parallel.dims import ParallelDims

CONFIG = EngineConfig(block_size=4, max_num_batched_tokens=24, num_kv_blocks=256, kv_transfer_checksum=True)
PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    return save_tiny_llama4(tmp_path_factory.mktemp("moe"), seed=8, num_experts_per_tok=2)


def prompts(vocab: int, count: int = 4) -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randint(3, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(5, 60, (count,), generator=gen)]


def run(engine, batch: list[list[int]]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, PARAMS)
        tokens[f"r{i}"] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id] += out.new_token_ids
    return tokens


def disaggregated(path: Path, prefill: ParallelDims, decode: ParallelDims) -> DisaggregatedEngine:
    return DisaggregatedEngine(LLMEngine.from_path(path, CONFIG, prefill, role="prefill"),
                               [LLMEngine.from_path(path, CONFIG, decode, role="decode")])


def shutdown(engine: DisaggregatedEngine) -> None:
    for e in (engine.prefill, *engine.decoders):
        e.shutdown()


def assert_no_blocks_held(engine: DisaggregatedEngine) -> None:
    for e in (engine.prefill, *engine.decoders):
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


@pytest.mark.parametrize("prefill, decode", [
    (ParallelDims(tp=1), ParallelDims(tp=2)),
    (ParallelDims(tp=2), ParallelDims(tp=1)),
    (ParallelDims(ep=2), ParallelDims(tp=1)),
], ids=["p-tp1_d-tp2", "p-tp2_d-tp1", "p-ep2_d-tp1"])
def test_disaggregated_matches_colocated_tiny_llama4(tiny_moe: Path, prefill: ParallelDims, decode: ParallelDims) -> None:
    batch = prompts(512)
    expected = run(LLMEngine.from_path(tiny_moe, CONFIG), batch)
    engine = disaggregated(tiny_moe, prefill, decode)
    try:
        assert run(engine, batch) == expected
        assert_no_blocks_held(engine)
    finally:
        shutdown(engine)


@pytest.mark.slow  # ~45 s of SmolLM2 on Ray; the tiny Llama 4 layouts above stay in make test (20 min)
def test_disaggregated_matches_colocated_smollm2(smollm2_path: Path) -> None:
    config = EngineConfig(block_size=16, max_num_batched_tokens=64, num_kv_blocks=64, kv_transfer_checksum=True)
    colocated = LLMEngine.from_path(smollm2_path, config)
    batch = [colocated.tokenizer.encode(t) for t in ("The capital of France is", "Once upon a time, in a land far")]
    expected = run(colocated, batch)
    engine = DisaggregatedEngine(LLMEngine.from_path(smollm2_path, config, role="prefill"),
                                 [LLMEngine.from_path(smollm2_path, config, ParallelDims(tp=3), role="decode")])
    try:
        assert run(engine, batch) == expected
    finally:
        shutdown(engine)


def test_a_prefilled_sequence_waits_for_decode_blocks_rather_than_fail(tiny_moe: Path) -> None:
    """Decode blocks for the longest sequence alone: the others prefilled meanwhile wait, their KV in the prefill
    group's blocks, and go over as decode steps free blocks (failing them, as this once did with UNAVAILABLE,
    threw their prefill away). Every request ends with the colocated engine's tokens; no block stays held."""
    batch = prompts(512, count=6)
    expected = run(LLMEngine.from_path(tiny_moe, CONFIG), batch)
    longest = max(len(p) for p in batch) + PARAMS.max_tokens
    small = replace(CONFIG, num_kv_blocks=-(-longest // CONFIG.block_size) + 1)
    assert sum(-(-(len(p) + PARAMS.max_tokens) // CONFIG.block_size) for p in batch) > small.num_kv_blocks
    engine = DisaggregatedEngine(LLMEngine.from_path(tiny_moe, CONFIG, role="prefill"),
                                 [LLMEngine.from_path(tiny_moe, small, role="decode")])
    try:
        assert run(engine, batch) == expected
        assert_no_blocks_held(engine)
        # aborted while it waits: its prefill blocks are freed, the others go on as before
        for i, prompt in enumerate(batch):
            engine.add_request(f"again{i}", prompt, PARAMS)
        tokens: dict[str, list[int]] = {}
        aborted = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.error is None, out.error
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if aborted is None and engine.waiting_for_decode:
                aborted = engine.waiting_for_decode[0]
                assert engine.abort_request(aborted) and aborted not in engine.waiting_for_decode
        assert aborted is not None
        assert aborted not in tokens or len(tokens[aborted]) < PARAMS.max_tokens
        assert {k: v for k, v in tokens.items() if k != aborted} == {
            f"again{i}": expected[f"r{i}"] for i in range(len(batch)) if f"again{i}" != aborted}
        assert_no_blocks_held(engine)
    finally:
        shutdown(engine)


def test_sequences_waiting_for_a_lost_decode_group_fail_cleanly_and_free_their_prefill_blocks(tiny_moe: Path) -> None:
    """The decode group is lost (as the replica's supervisor marks it) while prefilled sequences wait for its
    blocks: each ends with a retryable error rather than waiting on a group that is gone, and the prefill
    group's blocks come back."""
    batch = prompts(512, count=6)
    longest = max(len(p) for p in batch) + PARAMS.max_tokens
    small = replace(CONFIG, num_kv_blocks=-(-longest // CONFIG.block_size) + 1)
    engine = DisaggregatedEngine(LLMEngine.from_path(tiny_moe, CONFIG, role="prefill"),
                                 [LLMEngine.from_path(tiny_moe, small, role="decode")])
    try:
        for i, prompt in enumerate(batch):
            engine.add_request(f"r{i}", prompt, PARAMS)
        outputs = []
        while not engine.waiting_for_decode:
            outputs += engine.step()
        waiting = set(engine.waiting_for_decode)
        outputs += engine.decoders[0].fail_all(WorkerLostError("decode rank lost (test)"))
        while engine.has_unfinished_requests():
            outputs += engine.step()
        failed = {out.request_id: str(out.error) for out in outputs if out.finish_reason == "error"}
        assert waiting <= set(failed)
        assert all("no decode group of this replica is serving; retry" in failed[r] for r in waiting)
        assert engine.prefill.block_manager.num_free_blocks == engine.prefill.block_manager.num_blocks
    finally:
        shutdown(engine)


def test_streams_keep_decoding_while_a_prefill_step_is_in_flight(tiny_moe: Path) -> None:
    """A prefill group on its own Ray actor: decode steps do not wait for its chunks, and a request
    aborted while its chunk is being computed frees its blocks on both sides."""
    batch = prompts(512, count=3)
    long_prompt = batch[0] * 8  # several chunks of the 24-token budget
    expected = run(LLMEngine.from_path(tiny_moe, CONFIG), [batch[1], long_prompt])
    engine = DisaggregatedEngine(LLMEngine.from_path(tiny_moe, CONFIG, role="prefill", on_ray=True),
                                 [LLMEngine.from_path(tiny_moe, CONFIG, role="decode")])
    try:
        tokens: dict[str, list[int]] = {"r0": [], "r1": []}
        engine.add_request("r0", batch[1], PARAMS)
        while not tokens["r0"]:
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        engine.add_request("r1", long_prompt, PARAMS)
        engine.add_request("doomed", batch[2] * 6, PARAMS)
        steps_with_prefill_in_flight = 0
        aborted = False
        while engine.has_unfinished_requests():
            outputs = engine.step()
            steps_with_prefill_in_flight += engine.prefill_in_flight
            if engine.prefill_in_flight and not aborted:
                aborted = engine.abort_request("doomed")  # its chunk may be running right now
            for out in outputs:
                assert out.error is None, out.error
                assert out.request_id != "doomed" or not aborted
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert aborted and steps_with_prefill_in_flight > 0
        assert tokens["r0"] == expected["r0"] and tokens["r1"] == expected["r1"]
        assert_no_blocks_held(engine)
    finally:
        shutdown(engine)


def stream_until_error(engine: DisaggregatedEngine, kill, kill_after_steps: int) -> tuple[str, float]:
    for step in range(500):
        if step == kill_after_steps:
            killed_at = time.monotonic()
            kill()
        for out in engine.step():
            if out.finish_reason == "error":
                return str(out.error or ""), time.monotonic() - killed_at
    raise AssertionError("no error reached the caller")


def test_killing_decode_actor_mid_stream(tiny_moe: Path) -> None:
    engine = disaggregated(tiny_moe, ParallelDims(), ParallelDims(tp=2))
    try:
        engine.add_request("streaming", prompts(512, 1)[0], SamplingParams(max_tokens=400, ignore_eos=True))
        group = engine.decoders[0].executor
        error, latency = stream_until_error(engine, lambda: ray.kill(group.actors[1], no_restart=True), 6)
        assert "rank 1 (ep 0, tp 1)" in error and latency < 10
        assert_no_blocks_held(engine)
    finally:
        shutdown(engine)


def test_killing_prefill_actor_mid_prompt(tiny_moe: Path) -> None:
    engine = disaggregated(tiny_moe, ParallelDims(tp=2), ParallelDims())
    try:
        long_prompt = torch.randint(3, 512, (400,), generator=torch.Generator().manual_seed(2)).tolist()
        engine.add_request("long", long_prompt, PARAMS)  # 400 tokens at 24 per step: many prefill steps
        group = engine.prefill.executor
        error, latency = stream_until_error(engine, lambda: ray.kill(group.actors[0], no_restart=True), 3)
        assert "rank 0 (ep 0, tp 0)" in error and latency < 10
        assert_no_blocks_held(engine)
    finally:
        shutdown(engine)


def test_transfer_checks_refuse_partial_or_corrupt_shards() -> None:
    k = torch.randn(2, 5, 1, 4)
    good = KVPayload(5, 0, k, k.clone())
    good.checksum = good.digest()
    other = KVPayload(5, 1, k.clone(), k.clone())
    assert assemble_heads([good, other], 5, 2, 1, 1)[0].shape == (2, 5, 1, 4)
    with pytest.raises(KVTransferError, match="do not tile heads 0..2"):
        assemble_heads([good], 5, 2, 0, 2)
    short = KVPayload(5, 1, k[:, :3].clone(), k[:, :3].clone())
    with pytest.raises(KVTransferError, match="holds 3 tokens"):
        assemble_heads([good, short], 5, 2, 0, 2)
    good.k_LTKD[0, 0, 0, 0] += 1.0
    with pytest.raises(KVTransferError, match="checksum"):
        assemble_heads([good, other], 5, 2, 0, 2)


def test_prompt_too_long_for_the_decode_side_is_refused_up_front(tiny_moe: Path) -> None:
    small = EngineConfig(block_size=4, num_kv_blocks=8)
    engine = DisaggregatedEngine(LLMEngine.from_path(tiny_moe, CONFIG, role="prefill"),
                                 [LLMEngine.from_path(tiny_moe, small, role="decode")])
    with pytest.raises(ContextLengthError, match="hold at most 31"):
        engine.add_request("big", list(range(3, 60)), PARAMS)
    assert not engine.has_unfinished_requests()


# -- through the object store, a long prompt's KV is imported a slice of tokens per decode step ------------

SLICE = 8  # tokens per imported slice: the test prompts (5-59 tokens) arrive in 1 to 8 slices


def record_imports(engine: DisaggregatedEngine) -> list[tuple[int, int, int, int]]:
    """Every slice the decode engine starts importing from now on: (the sequence's first block there, its tokens,
    start, stop). A slice that had not arrived yet (over a channel) is started, and recorded, again."""
    executor, slices = engine.decoders[0].executor, []
    start_import = executor.start_import_kv

    def recording(block_table, num_tokens, handles, start=0, stop=None):
        slices.append((block_table[0], num_tokens, start, stop))
        return start_import(block_table, num_tokens, handles, start, stop)

    executor.start_import_kv = recording
    return slices


def sliced(path: Path, prefill: ParallelDims, decode: ParallelDims, on_ray: bool | None = None
           ) -> tuple[DisaggregatedEngine, list[tuple[int, int, int, int]]]:
    """An engine importing SLICE tokens per step through the object store, and its `record_imports`."""
    config = replace(CONFIG, num_kv_blocks=1024)  # room for a long stream beside the test prompts
    engine = DisaggregatedEngine(LLMEngine.from_path(path, config, prefill, role="prefill", on_ray=on_ray),
                                 [LLMEngine.from_path(path, config, decode, role="decode")], import_slice_tokens=SLICE)
    return engine, record_imports(engine)


@pytest.mark.parametrize("prefill, decode", [
    (ParallelDims(tp=1), ParallelDims(tp=2)),  # in-process export; the decode ranks import ahead of their steps
    (ParallelDims(tp=2), ParallelDims(tp=1)),  # Ray object store; each slice cut from both shards, then re-split
], ids=["p-tp1_d-tp2", "p-tp2_d-tp1"])
def test_kv_imported_slice_by_slice_gives_the_same_tokens(tiny_moe: Path, colocated_tokens: dict[str, list[int]],
                                                          prefill: ParallelDims, decode: ParallelDims) -> None:
    engine, slices = sliced(tiny_moe, prefill, decode)
    batch = prompts(512)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(batch))}
    try:
        engine.add_request("stream", batch[0], replace(PARAMS, max_tokens=3000))  # keeps the decode engine stepping
        while not tokens.setdefault("stream", []):
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
        for i, prompt in enumerate(batch):
            engine.add_request(f"r{i}", prompt, PARAMS)
        while not all(len(tokens[f"r{i}"]) == PARAMS.max_tokens for i in range(len(batch))):
            for out in engine.step():
                assert out.error is None, out.error
                tokens[out.request_id] += out.new_token_ids
        assert engine.abort_request("stream"), f"the stream ended after {len(tokens['stream'])} tokens"
        del tokens["stream"]
        assert tokens == colocated_tokens
        assert_no_blocks_held(engine)
        if decode.world_size == 1:  # a local decode engine reads each transfer's payloads once, for every slice,
            assert engine.decoders[0].executor.transport._received == {}  # and forgets them once it is over
    finally:
        shutdown(engine)
    imports: dict[int, list[tuple[int, int]]] = {}
    for first_block, _, start, stop in slices:  # transfers overlap; each one's slices run in order from token 0
        imports.setdefault(first_block, []).append((start, stop))
    ends = sorted(parts[-1][1] for parts in imports.values())
    assert ends == sorted(len(p) for p in [batch[0], *batch])  # each prompt whole, once (the stream's too)
    for parts in imports.values():  # (with nothing to decode, the rest of the oldest one is imported at once)
        assert parts[0][0] == 0 and all(start == parts[i - 1][1] for i, (start, _) in enumerate(parts) if i)
        assert all(stop - start <= SLICE for start, stop in parts[:-1])
    longest = max(len(p) for p in batch)  # arrived while the stream decoded: slice by slice, to the end
    [parts] = [parts for parts in imports.values() if parts[-1][1] == longest]
    assert len(parts) == -(-longest // SLICE) > 1 and all(stop - start <= SLICE for start, stop in parts)


# -- kv_transport "torch": a prefill worker group hands KV to a decode worker group over a channel --------

TORCH = replace(CONFIG, kv_transport="torch")


@pytest.fixture(scope="module")
def colocated_tokens(tiny_moe: Path) -> dict[str, list[int]]:
    return run(LLMEngine.from_path(tiny_moe, CONFIG), prompts(512))


def over_channel(path: Path, prefill: ParallelDims, decode: ParallelDims) -> DisaggregatedEngine:
    return DisaggregatedEngine(LLMEngine.from_path(path, TORCH, prefill, role="prefill", on_ray=True),
                               [LLMEngine.from_path(path, TORCH, decode, role="decode", on_ray=True)])


@pytest.mark.parametrize("prefill, decode", [
    (ParallelDims(tp=1), ParallelDims(tp=2)),
    (ParallelDims(tp=2), ParallelDims(tp=1)),
    (ParallelDims(tp=1), ParallelDims(ep=2)),  # both EP ranks of the decode group receive the same heads
], ids=["p-tp1_d-tp2", "p-tp2_d-tp1", "p-tp1_d-ep2"])
def test_same_tokens_as_colocated_over_a_torch_channel(tiny_moe: Path, colocated_tokens: dict[str, list[int]],
                                                       prefill: ParallelDims, decode: ParallelDims) -> None:
    engine = over_channel(tiny_moe, prefill, decode)
    try:
        assert isinstance(engine._links[engine.decoders[0]], TorchChannel)
        assert run(engine, prompts(512)) == colocated_tokens
        assert_no_blocks_held(engine)
    finally:
        shutdown(engine)


def start_stream(engine: DisaggregatedEngine, prompt: list[int]) -> dict[str, list[int]]:
    """A long request decoding, so that the decode engine keeps stepping (and imports a slice per step)."""
    tokens: dict[str, list[int]] = {"stream": []}
    engine.add_request("stream", prompt, replace(PARAMS, max_tokens=3000))
    while not tokens["stream"]:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return tokens


def end_stream(engine: DisaggregatedEngine) -> None:
    """Abort the stream, let what is in flight finish, and check that neither side holds a block."""
    assert engine.abort_request("stream")
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_blocks_held(engine)


def test_decode_steps_go_on_while_a_channel_transfer_waits_for_its_sender(
        tiny_moe: Path, colocated_tokens: dict[str, list[int]]) -> None:
    """The decode ranks receive on their channel threads: a sender that is late (by 2 s here) holds back its own
    request only, not the streams' steps; its KV is imported once it is in."""
    engine = over_channel(tiny_moe, ParallelDims(), ParallelDims())
    batch = prompts(512)
    try:
        tokens = start_stream(engine, batch[1])
        for rank in range(len(engine.prefill.executor.actors)):  # each rank's channel thread waits before it sends
            engine.prefill.executor.inject_fault(rank, "send", Fault("delay", 2.0))
        engine.add_request("r0", batch[0], PARAMS)
        tokens["r0"], streamed_during_handover, handover_s = [], 0, 0.0
        while len(tokens["r0"]) < PARAMS.max_tokens:
            began = time.monotonic()
            outputs = engine.step()
            if "r0" in engine.handovers_in_flight:
                handover_s += time.monotonic() - began
                streamed_during_handover += sum(len(out.new_token_ids) for out in outputs if out.request_id == "stream")
            for out in outputs:
                assert out.error is None, out.error
                tokens[out.request_id] += out.new_token_ids
        assert tokens["r0"] == colocated_tokens["r0"]
        assert handover_s > 1.5 and streamed_during_handover >= 20, (handover_s, streamed_during_handover)
        end_stream(engine)
    finally:
        shutdown(engine)


@pytest.mark.parametrize("transport", ["ray", "torch"])
def test_a_request_aborted_while_its_kv_is_in_transit_frees_both_sides(
        tiny_moe: Path, colocated_tokens: dict[str, list[int]], transport: str) -> None:
    """Aborted after its first import slice: no further slice is imported, both sides free its blocks, and the
    engine serves the next request."""
    # Both groups on Ray with a thread each: an engine in this process would share the two cores with them.
    config = replace(CONFIG, num_kv_blocks=1024, worker_threads=1, kv_transport=transport)
    engine = DisaggregatedEngine(LLMEngine.from_path(tiny_moe, config, role="prefill", on_ray=True),
                                 [LLMEngine.from_path(tiny_moe, config, ParallelDims(tp=2), role="decode")],
                                 import_slice_tokens=SLICE)
    imports = record_imports(engine)
    batch = prompts(512)
    doomed = batch[1] * 3  # several slices, and a length of its own
    try:
        tokens = start_stream(engine, batch[2])
        engine.add_request("doomed", doomed, PARAMS)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until its handover has started a slice
            engine.step()
            if "doomed" in engine.handovers_in_flight and any(n == len(doomed) for _, n, _, _ in imports):
                break
        assert max(stop for _, n, _, stop in imports if n == len(doomed)) < len(doomed)  # slices are left
        assert engine.abort_request("doomed") and engine.handovers_in_flight == []
        imported = len(imports)
        engine.add_request("r0", batch[0], PARAMS)
        tokens["r0"] = []
        while len(tokens["r0"]) < PARAMS.max_tokens:
            for out in engine.step():
                assert out.error is None, out.error
                tokens[out.request_id] += out.new_token_ids
        assert not [s for s in imports[imported:] if s[1] == len(doomed)]
        assert tokens["r0"] == colocated_tokens["r0"]
        end_stream(engine)
    finally:
        shutdown(engine)


def tamper(group, how: str | None) -> None:
    """Make every rank of `group` send short ("short": one token missing) or corrupted ("corrupt": changed
    after its checksum) shards from now on; None: honest again."""
    def patch(worker, how: str | None) -> None:
        runner = worker.runner
        runner.__dict__.pop("export_kv", None)
        if how is None:
            return
        honest = runner.export_kv

        def export_kv(*args, **kwargs):
            payload = honest(*args, **kwargs)
            if how == "short":
                payload.k_LTKD, payload.v_LTKD = payload.k_LTKD[:, :-1], payload.v_LTKD[:, :-1]
            else:
                payload.k_LTKD = payload.k_LTKD.clone()  # out of inference mode, so that it can be changed
                payload.k_LTKD[0, 0, 0, 0] += 1.0
            return payload

        runner.export_kv = export_kv

    ray.get([actor.__ray_call__.remote(patch, how) for actor in group.actors])


@pytest.mark.parametrize("link", ["torch-channel", "object-store-sliced"])
def test_short_or_corrupt_transfer_fails_the_request_and_frees_both_sides(
        tiny_moe: Path, colocated_tokens: dict[str, list[int]], link: str) -> None:
    """Shapes are checked on arrival (and on every slice of a sliced import), checksums on arrival (with a sliced
    import's first slice); the request fails before anything is decoded."""
    if link == "torch-channel":
        engine = over_channel(tiny_moe, ParallelDims(tp=2), ParallelDims(tp=2))  # each decode rank hears one shard
    else:
        engine, _ = sliced(tiny_moe, ParallelDims(tp=2), ParallelDims(tp=1))
    prompt = max(prompts(512), key=len)  # several slices
    try:
        for how, why in (("short", "holds .* tokens"), ("corrupt", "fails its checksum")):
            tamper(engine.prefill.executor, how)
            engine.add_request(how, prompt, PARAMS)
            outputs = []
            while engine.has_unfinished_requests():
                outputs += engine.step()
            failed = [out for out in outputs if out.finish_reason == "error"]
            assert len(failed) == 1 and re.search(f"KV transfer to the decode group failed: .*{why}", str(failed[0].error))
            assert sum(len(out.new_token_ids) for out in outputs) == 1  # the prefill's first token, then nothing
            assert_no_blocks_held(engine)
        tamper(engine.prefill.executor, None)  # a channel reopens after a failure and serves again
        assert run(engine, prompts(512)) == colocated_tokens
        assert_no_blocks_held(engine)
    finally:
        shutdown(engine)


def test_torch_transport_refuses_engines_outside_ray_groups(tiny_moe: Path) -> None:
    with pytest.raises(LayoutError, match="start both the prefill and the decode engines on Ray"):
        DisaggregatedEngine(LLMEngine.from_path(tiny_moe, TORCH, role="prefill"),
                            [LLMEngine.from_path(tiny_moe, TORCH, role="decode")])
    with pytest.raises(LayoutError, match="configure one transport for both"):
        DisaggregatedEngine(LLMEngine.from_path(tiny_moe, TORCH, role="prefill"),
                            [LLMEngine.from_path(tiny_moe, CONFIG, role="decode")])


@pytest.mark.parametrize("side, point", [("decode", "import_kv"), ("prefill", "export_kv")])
def test_rank_dying_mid_transfer_fails_that_group_only(tiny_moe: Path, colocated_tokens: dict[str, list[int]],
                                                       side: str, point: str) -> None:
    """The surviving side's sends or receives fail at once (the channel's connection closes), not after the
    timeout; the dead group's requests fail, the other group keeps serving, and a restart reopens the channel."""
    engine = over_channel(tiny_moe, ParallelDims(tp=2), ParallelDims(tp=2))
    dying, surviving = engine.decoders[0], engine.prefill
    if side == "prefill":
        dying, surviving = surviving, dying
    try:
        dying.executor.inject_fault(1, point, Fault("exit"))
        engine.add_request("r", prompts(512)[0], PARAMS)
        started, errors = time.monotonic(), []
        while engine.has_unfinished_requests():
            errors += [str(out.error) for out in engine.step() if out.error]
        assert len(errors) == 1 and time.monotonic() - started < 10
        assert re.search(r"rank 1 \(ep 0, tp 1\) on node \S+ \(\w+\) died", errors[0]), errors[0]
        assert dying.failure is not None and surviving.failure is None
        assert_no_blocks_held(engine)
        dying.restart()
        assert run(engine, prompts(512)) == colocated_tokens
    finally:
        shutdown(engine)
