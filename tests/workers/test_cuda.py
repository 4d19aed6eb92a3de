"""The GPU paths, for a machine with CUDA (skipped elsewhere): the engine on a GPU against transformers on the
CPU, with the KV cache on the GPU and in host memory, and a disaggregated handover into a GPU engine.

    .venv/bin/python -m pytest -q tests/workers/test_cuda.py    # on a GPU machine with a CUDA build of torch

NCCL point-to-point (kv_transport "torch" on GPU) needs two GPUs: NCCL refuses two ranks on one device.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llama4
from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.engine.sequence import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
# A 16-key block sends the 41-token prompt's later chunks, and every decode row, through the blockwise path.
CPU = EngineConfig(block_size=4, max_num_batched_tokens=12, num_kv_blocks=64, attention_key_block=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama4(tmp_path_factory.mktemp("tiny"), seed=5, num_experts_per_tok=2,
                            attention_chunk_size=8, floor_scale=4)


def prompt() -> list[int]:
    return torch.randint(3, 512, (41,), generator=torch.Generator().manual_seed(7)).tolist()


def transformers_greedy(path: Path, tokens: list[int], new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(tokens):].tolist()


@pytest.mark.parametrize("kv_cache_device", [None, "cpu"], ids=["kv-on-gpu", "kv-in-host-memory"])
def test_gpu_engine_matches_transformers(tiny: Path, kv_cache_device: str | None) -> None:
    engine = LLMEngine.from_path(tiny, replace(CPU, device="cuda", kv_cache_device=kv_cache_device))
    assert engine.executor.runner.kv_caches[0][0].device.type == ("cpu" if kv_cache_device else "cuda")
    [done] = engine.generate([prompt()], PARAMS)
    assert done.token_ids == transformers_greedy(tiny, prompt(), PARAMS.max_tokens)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_handover_from_a_cpu_prefill_into_a_gpu_decode_engine_with_host_kv(tiny: Path) -> None:
    expected = LLMEngine.from_path(tiny, CPU).generate([prompt()], PARAMS)[0].token_ids
    engine = DisaggregatedEngine(LLMEngine.from_path(tiny, CPU, role="prefill"),
                                 [LLMEngine.from_path(tiny, replace(CPU, device="cuda", kv_cache_device="cpu"),
                                                      role="decode")], import_slice_tokens=8)
    engine.add_request("r", prompt(), PARAMS)
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            tokens += out.new_token_ids
    assert tokens == expected
