"""Engine settings, shared by the engine loop, the model runner and every worker rank."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what `dtype` may be, besides "auto"
KERNEL_DTYPES = (*MODEL_DTYPES, torch.int8)  # what `kernel_dtype` may be, besides None (int8: a8_mm's activations)


@dataclass(slots=True, frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30  # sizes the cache when num_kv_blocks is None
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context, capped by what the KV cache holds
    enable_prefix_caching: bool = True
    kv_transfer_checksum: bool = False  # debug mode: hash every KV transfer shard and verify on arrival
    # How KV moves from prefill to decode groups: "ray", Ray's object store (any engines, across nodes);
    # "torch", torch.distributed point-to-point between Ray worker groups (gloo on CPU, NCCL on GPU).
    kv_transport: Literal["ray", "torch"] = "ray"
    attention_key_block: int = 1024  # longer global contexts are attended blockwise (bounded memory)
    # Schedule and send a step while the one before it runs (its tokens fill in on the ranks), so a decode step
    # does not wait for the round trip to the ranks and back. Applies to a colocated replica whose ranks are Ray
    # actors; a disaggregated replica's groups and an engine in this process run one step after the other.
    async_scheduling: bool = True
    # Decode steps (no prefill chunk in the step) run the model as one torch.compile'd graph (see
    # garrison_workers.compiled): fewer, fused op calls; SmolLM2 int4 on CPU 1.2-1.7x the tokens per second at one
    # request, 1.1-1.3x at 32. Compiling costs tens of seconds at start-up, on every rank (less with inductor's cache
    # on disk); dense models only.
    compile_decode: bool = False
    worker_threads: int | None = None  # torch threads per Ray rank; None: the node's cores / ranks, at most 4
    # "auto": float32, with a quantized checkpoint's low-bit matmuls fed low-precision activations, which its
    # kernels are fast with (kernel_dtype int8; norms, attention, the residual stream and the KV cache stay
    # float32). LLMEngine.from_path resolves it (into dtype and kernel_dtype) before anything is sized from it.
    dtype: torch.dtype | Literal["auto"] = torch.float32
    # Activations of the quantized matmuls; None: `dtype`. int8: rounded per block of 32 by a8_mm (llama.cpp's
    # arithmetic, the fastest on CPUs with AVX512-VNNI; bfloat16 where it cannot run); bfloat16: PyTorch's packed
    # kernels, half int8's rounding error at about half its speed (a small model may answer differently).
    kernel_dtype: torch.dtype | None = field(default=None, metadata={"dtypes": KERNEL_DTYPES})
    device: str = "cpu"
    # Where the KV cache lives: None, on `device`; "cpu" with a GPU device, in pinned host memory, for contexts
    # whose KV does not fit beside the weights. Each step then writes its new K/V to the host, and attention
    # copies to the GPU only the keys it reads (a decode row's, a local window, or one key block of a long
    # context at a time), so GPU memory stays bounded by the step, not the context.
    kv_cache_device: str | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.dtype not in ("auto", *MODEL_DTYPES):
            raise ValueError(f"dtype must be 'auto', float32, bfloat16 or float16, not {self.dtype}")
        if self.kernel_dtype not in (None, *KERNEL_DTYPES):
            raise ValueError(f"kernel_dtype must be float32, bfloat16, float16 or int8, not {self.kernel_dtype}")
        if self.kv_transport not in ("ray", "torch"):
            raise ValueError(f"kv_transport must be 'ray' or 'torch', not {self.kv_transport!r}")
        if self.kv_cache_device not in (None, "cpu", self.device):
            raise ValueError(f"kv_cache_device must be the engine's device ({self.device!r}) or 'cpu' (host "
                             f"memory), not {self.kv_cache_device!r}")

    @property
    def kv_device(self) -> str:
        return self.kv_cache_device or self.device
