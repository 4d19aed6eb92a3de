"""The quantized kernels' GPU paths, for a machine with CUDA (skipped elsewhere): FP8 through torch._scaled_mm
(per-token activation scales, per-channel weight scales) and int4 through tinygemm, each against the same
weights dequantized, then a quantized tiny Llama 4 on the GPU against the CPU engine.

    ops/gpu/check_quant.sh      # on a GPU machine with a CUDA build of torch
"""

from __future__ import annotations

import pytest
import torch

from conftest import greedy_with_logprobs, save_tiny_llama4_compressed
from garrison_workers.engine.llm_engine import EngineConfig, LLMEngine
from garrison_workers.quant.codec import dequantize, quantize_rtn
from garrison_workers.quant.kernels import Int4CUDA, ScaledMMFp8, make_kernel, quantize_fp8_per_token

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_scaled_mm_fp8_matches_its_arithmetic() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda")
    scale = w.abs().amax(-1, keepdim=True) / 448
    q = (w / scale).to(torch.float8_e4m3fn)
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    kernel = make_kernel("fp8_dynamic", q, scale, None, torch.bfloat16)
    if torch.cuda.get_device_capability() >= (8, 9):
        assert isinstance(kernel, ScaledMMFp8)
    x_q, x_scale = quantize_fp8_per_token(x)
    expected = (x_q.float() * x_scale) @ (q.float() * scale).t()
    got = kernel(x).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-2  # bf16 output rounding


def test_tinygemm_int4_matches_dequantized() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 1024)
    payload, scale, zero = quantize_rtn(w, "int4", 128)
    reference = dequantize("int4", payload, scale, zero).cuda()
    kernel = make_kernel("int4", payload.cuda(), scale.cuda(), zero.cuda(), torch.bfloat16)
    assert isinstance(kernel, Int4CUDA)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ reference.t()
    assert ((kernel(x).float() - expected).abs().max() / expected.abs().max()).item() < 2e-2


@pytest.mark.parametrize("scheme", ["fp8-channel-dynamic", "int4-group-sym"])
def test_quantized_tiny_llama4_on_gpu_matches_cpu(tmp_path, scheme: str) -> None:
    model_dir = save_tiny_llama4_compressed(tmp_path / "m", scheme, seed=3)
    prompt = torch.randint(3, 512, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    cpu = LLMEngine.from_path(model_dir, EngineConfig(block_size=4, num_kv_blocks=64, dtype=torch.bfloat16))
    gpu = LLMEngine.from_path(model_dir, EngineConfig(block_size=4, num_kv_blocks=64, dtype=torch.bfloat16,
                                                      device="cuda"))
    _, expected = greedy_with_logprobs(cpu, prompt, 4)
    _, got = greedy_with_logprobs(gpu, prompt, 4)
    assert (got - expected).abs().max().item() < 0.5  # bf16 on two devices: rounding, not arithmetic
