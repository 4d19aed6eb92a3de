"""Quantized models in the encrypted store: kept quantized (payloads and scales are records like any tensor),
an EP rank reading only its experts, and `models import --quantize` with the error it costs.

The error of round-to-nearest at import, measured on the tiny Llama 4 (random weights, initializer 0.15,
fp32 compute) and asserted below with headroom: int8 (a scale per output channel) moves the weights by
0.6% RMS and the first step's log-probabilities by up to 0.11; int4 (a scale and zero per group of 64
inputs: 16 levels over each group's range) by 9% RMS and the log-probabilities by up to 1.0. A random
tiny model has no redundancy to absorb it, so greedy tokens
may differ after a few steps; real models lose far less (SmolLM2's own Q4_1 file is the 4-bit case the
SmolLM2 tests check against transformers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import greedy_with_logprobs, save_tiny_llama4, save_tiny_llama4_compressed
from garrison.weight_store.importer import import_model
from garrison.weight_store.keys import FileKeyProvider, create_kek_file
from garrison.weight_store.store import Store
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import WeightStoreError
from garrison_workers.loader import build_model, open_model_files
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.quant.codec import dequantize
from garrison_workers.weights.encrypted_source import EncryptedSource
from garrison_workers.weights.store_format import MANIFEST_FILE, Manifest, is_expert_tensor

ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=16, num_kv_blocks=128)
PROMPT = torch.randint(3, 512, (23,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def kek(tmp_path_factory) -> FileKeyProvider:
    return create_kek_file(tmp_path_factory.mktemp("keys") / "kek")


def test_smollm2_q4_1_stays_quantized_in_the_store(tmp_path: Path, smollm2_path: Path, kek) -> None:
    store = Store(tmp_path / "store")
    summary = import_model(smollm2_path, store, "smollm2", kek, progress=False)
    assert summary.stored_bytes <= 120e6, f"{summary.stored_bytes / 1e6:.0f} MB"
    engine = LLMEngine.from_path(store.open("smollm2", kek), EngineConfig(kv_cache_bytes=64 << 20,
                                                                          max_num_batched_tokens=512))
    direct = LLMEngine.from_path(smollm2_path, EngineConfig(kv_cache_bytes=64 << 20, max_num_batched_tokens=512))
    prompt = engine.tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    [ours], [theirs] = engine.generate([prompt], params), direct.generate([prompt], params)
    assert ours.token_ids == theirs.token_ids


def test_quantized_experts_are_read_by_their_ep_rank_only(tmp_path: Path, kek) -> None:
    model_dir = save_tiny_llama4_compressed(tmp_path / "m", "int4-group-asym", seed=2)
    store = Store(tmp_path / "store")
    import_model(model_dir, store, "tiny", kek, progress=False, record_bytes=8 << 10)
    manifest = Manifest.from_bytes((store.model_dir("tiny") / MANIFEST_FILE).read_bytes(), store.model_dir("tiny"))
    expert = [t for t in manifest.tensors if is_expert_tensor(t.name)]
    assert {t.name.rsplit(".", 1)[1] for t in expert} == {
        "gate_up_proj_int4", "gate_up_proj_scale", "gate_up_proj_zero", "down_proj_int4", "down_proj_scale",
        "down_proj_zero"}
    non_expert = sum(t.stored_bytes for t in manifest.tensors if not is_expert_tensor(t.name))

    def rank_reads(rank: int, dims: ParallelDims) -> int:
        source = EncryptedSource(store.open("tiny", kek))
        build_model(open_model_files(store.open("tiny", kek)).config, source, par=ParallelContext(dims, rank))
        return source.bytes_read

    for rank in (0, 1):  # four experts: 0-1 on rank 0, 2-3 on rank 1
        own = sum(r.stored_length for t in expert for r in t.records() if r.row_start in range(2 * rank, 2 * rank + 2))
        assert rank_reads(rank, ParallelDims(ep=2)) == non_expert + own
    stored = LLMEngine.from_path(store.open("tiny", kek), ENGINE)
    direct = LLMEngine.from_path(model_dir, ENGINE)
    assert greedy_with_logprobs(stored, PROMPT, 16)[0] == greedy_with_logprobs(direct, PROMPT, 16)[0]


@pytest.mark.parametrize("kind, weight_error, logprob_error", [("int8", 0.01, 0.25), ("int4", 0.12, 1.5)])
def test_import_quantize_costs_a_bounded_error(tmp_path: Path, kek, kind: str, weight_error: float,
                                               logprob_error: float) -> None:
    model_dir = save_tiny_llama4(tmp_path / "m", seed=4, intermediate_size=64, intermediate_size_mlp=128)
    store = Store(tmp_path / "store")
    summary = import_model(model_dir, store, "q", kek, progress=False, quantize=kind)
    source = EncryptedSource(store.open("q", kek))
    float_source = open_model_files(model_dir).source
    name = "model.layers.0.self_attn.q_proj.weight"
    zero = source.read(f"{name}_zero") if f"{name}_zero" in set(source.names()) else None
    w = dequantize(kind, source.read(f"{name}_{kind}"), source.read(f"{name}_scale"), zero)
    exact = float_source.read(name)
    relative = ((w - exact).norm() / exact.norm()).item()
    assert relative < weight_error
    quantized = LLMEngine.from_path(store.open("q", kek), ENGINE)
    reference = LLMEngine.from_path(model_dir, ENGINE)
    _, got = greedy_with_logprobs(quantized, PROMPT, 1)
    _, expected = greedy_with_logprobs(reference, PROMPT, 1)
    print(f"{kind}: weight RMS error {relative:.4f}, log-prob max error {(got - expected).abs().max().item():.4f}")
    assert (got - expected).abs().max().item() < logprob_error
    float_bytes = import_model(model_dir, store, "f", kek, progress=False).stored_bytes
    assert summary.stored_bytes < float_bytes * (0.45 if kind == "int8" else 0.35)


def test_import_quantize_refuses_an_already_quantized_model(tmp_path: Path, kek) -> None:
    model_dir = save_tiny_llama4_compressed(tmp_path / "m", "fp8-tensor")
    with pytest.raises(WeightStoreError, match="already quantized"):
        import_model(model_dir, Store(tmp_path / "store"), "x", kek, progress=False, quantize="int4")
