"""Where a step's model work runs: in this process, or on every rank of a worker group.

The engine (scheduler, block manager, sampler) stays in one process and sees only this interface.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.model_runner import ModelRunner, SeqChunk
from garrison_workers.engine.sampler import SampledToken
from garrison_workers.errors import LayoutError, WorkerLostError
from garrison_workers.kv_transfer import InProcessTransport, KVTransport, assemble_heads
from garrison_workers.model import CausalLM


class PendingExport(Protocol):
    def done(self) -> bool: ...

    def handles(self) -> list[Any]: ...


class PendingImport(Protocol):
    def done(self) -> bool: ...

    def result(self) -> float | None:
        """The seconds the import took on the ranks, or None when the KV had not arrived yet (received over a
        channel in the background: start the slice again later); raises what the import raised."""
        ...


class StepFuture(Protocol):
    def done(self) -> bool:
        """True once `result()` would not block."""
        ...

    def result(self) -> list[SampledToken]:
        """The token sampled for each of the step's chunks with a draw, in order.

        Raises WorkerLostError when a rank died; the executor is then unusable until `restart()`.
        """
        ...


class Executor(Protocol):
    failure: WorkerLostError | None  # set once a rank is lost, until `restart()`

    @property
    def overlaps(self) -> bool:
        """Whether a step may be submitted before the last one's result is taken, its chunks `follows`-ing the
        tokens that one sampled (its ranks run in other processes, and fill those tokens in themselves)."""
        ...

    def submit(self, chunks: list[SeqChunk]) -> StepFuture:
        """Start one step; another executor's step may run while this one does (disaggregation)."""
        ...

    def export_kv(self, block_table: list[int], num_tokens: int) -> list[Any]:
        """Transfer handles, one per TP shard, for a sequence's first `num_tokens` tokens of KV."""
        ...

    def start_export_kv(self, block_table: list[int], num_tokens: int) -> "PendingExport":
        """`export_kv` without waiting: the driver keeps stepping until `done()`, then takes `handles()`."""
        ...

    def import_kv(self, block_table: list[int], num_tokens: int, handles: list[Any], start: int = 0,
                  stop: int | None = None) -> float | None:
        """Receive tokens [start, stop) (all by default) of a sequence's KV, exported by a group of any tp, into
        `block_table`; KVTransferError if bad. Returns the seconds the ranks spent on it (None: not arrived yet)."""
        ...

    def start_import_kv(self, block_table: list[int], num_tokens: int, handles: list[Any], start: int = 0,
                        stop: int | None = None) -> "PendingImport":
        """`import_kv` without waiting (ranks in other processes import while the driver goes on)."""
        ...

    def drop_kv(self, handles: list[Any]) -> None:
        """Forget what this group holds for a transfer that is over (received payloads, staged KV)."""
        ...

    def restart(self) -> None: ...

    def lost(self) -> WorkerLostError | None:
        """`failure`, or the failure of a rank found dead since, without waiting for a step; None while whole."""
        ...

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


@dataclass(slots=True)
class DoneExport:
    exported: list[Any]

    def done(self) -> bool:
        return True

    def handles(self) -> list[Any]:
        return self.exported


@dataclass(slots=True)
class DoneImport:
    seconds: float

    def done(self) -> bool:
        return True

    def result(self) -> float:
        return self.seconds


@dataclass(slots=True)
class DoneStep:
    sampled: list[SampledToken]

    def done(self) -> bool:
        return True

    def result(self) -> list[SampledToken]:
        return self.sampled


class LocalExecutor:
    """One process, one device: the model runner called directly (a step is done when submitted)."""

    def __init__(self, model: CausalLM, num_blocks: int, config: EngineConfig) -> None:
        self.model, self.num_blocks, self.config = model, num_blocks, config
        self.runner = ModelRunner(model, num_blocks, config)
        self.transport: KVTransport = InProcessTransport()
        self.failure: WorkerLostError | None = None  # one process: nothing to lose but the process itself

    @property
    def overlaps(self) -> bool:
        return False  # a step computes inside `submit`: there is no round trip to hide

    def submit(self, chunks: list[SeqChunk]) -> StepFuture:
        return DoneStep(self.runner.step(chunks))

    def export_kv(self, block_table: list[int], num_tokens: int) -> list[Any]:
        payload = self.runner.export_kv(block_table, num_tokens, 0, self.config.kv_transfer_checksum)
        return [self.transport.send(payload, None)]

    def start_export_kv(self, block_table: list[int], num_tokens: int) -> DoneExport:
        return DoneExport(self.export_kv(block_table, num_tokens))

    def import_kv(self, block_table: list[int], num_tokens: int, handles: list[Any], start: int = 0,
                  stop: int | None = None) -> float:
        began = time.perf_counter()
        payloads = self.transport.receive(handles)
        num_kv = self.model.config.num_kv_heads
        k, v = assemble_heads(payloads, num_tokens, num_kv, 0, num_kv, slice(start, stop))
        self.runner.import_kv(block_table, k, v, start)
        return time.perf_counter() - began

    def start_import_kv(self, block_table: list[int], num_tokens: int, handles: list[Any], start: int = 0,
                        stop: int | None = None) -> "DoneImport":
        return DoneImport(self.import_kv(block_table, num_tokens, handles, start, stop))

    def drop_kv(self, handles: list[Any]) -> None:
        self.transport.release(handles)

    def restart(self) -> None:
        self.runner = ModelRunner(self.model, self.num_blocks, self.config)  # a fresh, empty KV cache

    def lost(self) -> WorkerLostError | None:
        return None

    def resident_weight_bytes(self) -> list[int]:
        return [parameter_bytes(self.model)]

    def set_expert_placement(self, layer: int, placement: list[int]) -> None:
        raise LayoutError("expert placement applies to expert-parallel groups (ep > 1); this engine runs in one process")

    def expert_load(self) -> dict[int, list[int]]:
        return {}

    def shutdown(self) -> None:
        pass
