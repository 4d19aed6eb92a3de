"""Where a step's model work runs: in this process, or on every rank of a worker group.

The engine (scheduler, block manager, sampler) stays in one process and sees only this interface.
"""

from __future__ import annotations

from typing import Protocol

import torch

from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.model_runner import ModelRunner, SeqChunk
from garrison_workers.errors import LayoutError
from garrison_workers.model import CausalLM


class Executor(Protocol):
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run one step; logits `[N, V]` of the chunks with `needs_logits`, in order.

        Raises WorkerLostError when a rank died; the executor is then unusable until `restart()`.
        """
        ...

    def restart(self) -> None: ...

    def resident_weight_bytes(self) -> list[int]:
        """Parameter bytes held by each rank."""
        ...

    def set_expert_placement(self, layer: int, placement: list[int]) -> None: ...

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens each expert has processed so far, per MoE layer."""
        ...

    def shutdown(self) -> None: ...


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class LocalExecutor:
    """One process, one device: the model runner called directly."""

    def __init__(self, model: CausalLM, num_blocks: int, config: EngineConfig) -> None:
        self.model, self.num_blocks, self.config = model, num_blocks, config
        self.runner = ModelRunner(model, num_blocks, config)

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        logits = self.runner.run(chunks)
        assert logits is not None
        return logits

    def restart(self) -> None:
        self.runner = ModelRunner(self.model, self.num_blocks, self.config)  # a fresh, empty KV cache

    def resident_weight_bytes(self) -> list[int]:
        return [parameter_bytes(self.model)]

    def set_expert_placement(self, layer: int, placement: list[int]) -> None:
        raise LayoutError("expert placement applies to expert-parallel groups (ep > 1); this engine runs in one process")

    def expert_load(self) -> dict[int, list[int]]:
        return {}

    def shutdown(self) -> None:
        pass
