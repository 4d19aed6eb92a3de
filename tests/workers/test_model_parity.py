"""Garrison's engine against transformers (fp32, eager attention): logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import NEW_TOKENS, greedy_with_logprobs, hf_reference, save_tiny_llama, save_tiny_llama4
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine


LLAMA4_VARIANTS = {
    "interleave1-top1-qknorm": dict(interleave_moe_layer_step=1, num_experts_per_tok=1, use_qk_norm=True),
    "interleave2-top2-noqknorm": dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False,
                                      attention_chunk_size=8, floor_scale=4),
    "top2-kv1-llama3rope": dict(num_experts_per_tok=2, num_key_value_heads=1, num_hidden_layers=5,
                                rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=64)),
}


def check_parity(model_dir: Path, prompt: list[int], engine_config: EngineConfig) -> None:
    engine = LLMEngine.from_path(model_dir, engine_config)
    tokens, logprobs = greedy_with_logprobs(engine, prompt, NEW_TOKENS)
    hf_logits, hf_tokens = hf_reference(model_dir, prompt, NEW_TOKENS, tokens)
    hf_logprobs = torch.log_softmax(hf_logits, dim=-1)
    assert logprobs.shape == hf_logprobs.shape
    diff = (logprobs - hf_logprobs).abs().max().item()
    assert diff < 1e-4, f"max-abs log-probability difference {diff}"
    assert tokens == hf_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("variant", sorted(LLAMA4_VARIANTS))
@pytest.mark.parametrize("key_block", [4096, 16], ids=["one-key-block", "blockwise"])
def test_llama4_matches_transformers(tmp_path: Path, variant: str, key_block: int) -> None:
    model_dir = save_tiny_llama4(tmp_path, seed=len(variant), **LLAMA4_VARIANTS[variant])
    prompt = torch.randint(3, 512, (41,), generator=torch.Generator().manual_seed(7)).tolist()
    # A 41-token prompt against chunk 8/16 and floor 4/8: local windows and temperature tuning both bite;
    # a 12-token step budget splits the prompt into chunked-prefill steps; a 16-key block sends the
    # global layers' later chunks through the blockwise online-softmax path.
    check_parity(model_dir, prompt, EngineConfig(block_size=4, max_num_batched_tokens=12, num_kv_blocks=64,
                                                 attention_key_block=key_block))


def test_dense_llama_matches_transformers(tmp_path: Path) -> None:
    model_dir = save_tiny_llama(tmp_path)
    prompt = torch.randint(3, 320, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    check_parity(model_dir, prompt, EngineConfig(block_size=8, num_kv_blocks=32))
