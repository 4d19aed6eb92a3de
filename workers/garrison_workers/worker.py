"""One rank of a worker group: holds its shard of the model and of the KV cache, runs every step.

Runs inside a Ray actor (see `worker_group`), but is a plain class so it can be read and tested as such.
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist

from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.executor import parameter_bytes
from garrison_workers.engine.model_runner import ModelRunner, SeqChunk
from garrison_workers.engine.sampler import SampledToken
from garrison_workers.faults import Fault, FaultPoints
from garrison_workers.kv_transfer import (
    KVRoute,
    KVTransferError,
    KVTransport,
    RayObjectStoreTransport,
    TorchDistributedTransport,
    assemble_heads,
)
from garrison_workers.loader import ModelLocation, build_model, open_model_files
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.parallel.moe import ParallelMoE
from garrison_workers.weights.source import load_parameter

# A collective that waits longer than this means a peer is gone; the group reports the rank lost.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


@dataclass(slots=True)
class StepBytes:
    """Bytes a rank's steps returned to the engine core (pickled, as Ray ships them), and for how many sequences."""

    steps: int = 0
    sequences: int = 0
    bytes: int = 0

    def record(self, sequences: int, size: int) -> None:
        self.steps, self.sequences, self.bytes = self.steps + 1, self.sequences + sequences, self.bytes + size


class Worker:
    def __init__(self, rank: int, dims: ParallelDims, model_path: ModelLocation, num_blocks: int, config: EngineConfig,
                 num_threads: int) -> None:
        self.rank, self.dims, self.model_path = rank, dims, model_path
        self.num_blocks, self.config = num_blocks, config
        torch.set_num_threads(num_threads)
        self.faults = FaultPoints()
        self.returned = StepBytes()
        # The last step's sampled tokens (rank 0) and how many it drew (every rank): see `_fill_in`.
        self.sampled: list[int] = []
        self.num_drawn = 0
        self.transport: KVTransport = (
            TorchDistributedTransport(torch.device(config.device), COLLECTIVE_TIMEOUT, self.faults)
            if config.kv_transport == "torch" else RayObjectStoreTransport())

    @ray.method(concurrency_group="watch")
    def watch(self) -> None:
        """Never answers while the rank lives: its driver keeps one call pending and learns of the rank's death the
        moment Ray resolves it with an error, whatever the rank is busy with (a ping would queue behind a step)."""
        threading.Event().wait()

    def inject_fault(self, point: str, fault: Fault | None) -> None:
        """Arm (or, with None, disarm) a fault at one of `faults.POINTS` of this rank."""
        self.faults.arm(point, fault)

    def node(self) -> str:
        """The node this rank runs on, as an error names it: "<ip> (<Ray node id>)"."""
        return f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"

    def niceness(self) -> int:
        """This rank's nice value: Ray starts workers at 15 unless told otherwise (see worker_group.start_local_ray)."""
        return os.getpriority(os.PRIO_PROCESS, 0)

    def rendezvous_address(self) -> tuple[str, int]:
        """An address of this host and a free port for the process group (asked of rank 0)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return socket.gethostbyname(socket.gethostname()), port

    def setup(self, host: str, port: int) -> int:
        """Join the process group, load this rank's weights, allocate its KV cache; returns weight bytes."""
        backend = "nccl" if self.config.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.dims.world_size, timeout=COLLECTIVE_TIMEOUT)
        self.par = ParallelContext.from_initialized(self.dims, self.rank)
        files = open_model_files(self.model_path)
        self.source = files.source
        self.model = build_model(files.config, files.source, self.config.dtype, self.config.device, self.par,
                                 self.config.kernel_dtype)
        self.runner = ModelRunner(self.model, self.num_blocks, self.config)
        # The rank's objects from here on live as long as the actor: keep the collector's full passes (a
        # step-long pause each) from walking them.
        gc.collect()
        gc.freeze()
        return parameter_bytes(self.model)

    def execute(self, chunks: list[SeqChunk]) -> list[SampledToken] | None:
        # Every rank runs the model; rank 0 alone computes the logits and samples: a few bytes per sequence leave
        # the group, never the logits.
        self.faults.hit("execute")
        self._fill_in(chunks)
        self.sampled, self.num_drawn = [], sum(chunk.draw is not None for chunk in chunks)  # none, if this step fails
        if self.rank == 0:
            sampled = self.runner.step(chunks)
            self.sampled = [token.token_id for token in sampled]
            self.returned.record(len(sampled), len(pickle.dumps(sampled)))
            return sampled
        self.runner.run(chunks, want_logits=False)
        return None

    def _fill_in(self, chunks: list[SeqChunk]) -> None:
        """Overlapped steps: a chunk that `follows` a draw of the previous step gets the token rank 0 sampled for it,
        sent to the other ranks (a broadcast of a few bytes per sequence; every rank decides alike, from the same
        chunks). Steps reach a rank in the order the engine sent them, so `sampled` is that previous step's."""
        following = [chunk for chunk in chunks if chunk.follows is not None]
        if not following:
            return
        sampled = self.sampled
        if self.dims.world_size > 1:
            tokens = torch.tensor(sampled if self.rank == 0 else [0] * self.num_drawn, dtype=torch.long,
                                  device=self.config.device)
            dist.broadcast(tokens, src=0)
            sampled = tokens.tolist()
        for chunk in following:
            chunk.token_ids = [sampled[chunk.follows]]

    def returned_bytes(self) -> StepBytes:
        """What this rank's steps have returned so far (rank 0: the sampled tokens; others: nothing)."""
        return self.returned

    def join_kv_channel(self, channel: str, host: str, port: int, first_rank: int, size: int) -> None:
        """Join a KV channel as its rank `first_rank` + this rank; every member joins at the same time."""
        self._channels().join(channel, host, port, first_rank + self.rank, size)

    def receive_kv(self, route: KVRoute) -> None:
        """Start receiving this rank's heads of a sequence's KV along `route`, in the background: the rank's steps
        go on; `import_kv([StagedKV(route.channel, route.tag)], ...)` writes them once they are in."""
        self._channels().start_receive(route)

    def drop_kv(self, handles: list[Any]) -> None:
        """Forget the KV staged for a transfer: imported, aborted, or failed on another rank."""
        self.transport.release(handles)

    def _channels(self) -> TorchDistributedTransport:
        if not isinstance(self.transport, TorchDistributedTransport):
            raise KVTransferError(f"KV channels need kv_transport 'torch'; this group has {self.config.kv_transport!r}")
        return self.transport

    def export_kv(self, block_table: list[int], num_tokens: int, route: KVRoute | None = None) -> Any:
        """Send this rank's KV heads (along `route` over a channel); EP ranks > 0 hold copies and send nothing."""
        self.faults.hit("export_kv")
        if self.par.ep_rank:
            return None
        head_start = self.par.tp_rank * self.model.num_local_kv_heads
        # The object store takes host memory; point-to-point sends from the cache's device (NCCL on GPU).
        device = self.config.device if route is not None else "cpu"
        payload = self.runner.export_kv(block_table, num_tokens, head_start, self.config.kv_transfer_checksum, device)
        return self.transport.send(payload, route)

    def import_kv(self, block_table: list[int], num_tokens: int, handles: list[Any], start: int = 0,
                  stop: int | None = None) -> float | None:
        """Write tokens [start, stop) of a sequence's KV (this rank's heads) into its blocks; returns the seconds
        it took here (the driver paces sliced imports by it), or None, at once, while staged KV is still arriving.
        Staged KV stays until `drop_kv` (another rank's may have been late: the slice then runs again here), or
        until it fails a check."""
        began = time.perf_counter()
        self.faults.hit("import_kv")
        try:
            payloads = self.transport.receive(handles)
            if payloads is None:
                return None
            heads = self.model.num_local_kv_heads
            k, v = assemble_heads(payloads, num_tokens, self.model.config.num_kv_heads, self.par.tp_rank * heads,
                                  heads, slice(start, stop))
            self.runner.import_kv(block_table, k, v, start)
        except KVTransferError:
            self.transport.release(handles)
            raise
        return time.perf_counter() - began

    def set_expert_placement(self, layer: int, placement: list[int]) -> None:
        prefix = f"model.layers.{layer}.feed_forward."
        moe = self.model.model.layers[layer].feed_forward
        assert isinstance(moe, ParallelMoE)
        moe.set_placement(placement, lambda name, module, param: load_parameter(self.source, name, module, param), prefix)

    def expert_load(self) -> dict[int, list[int]]:
        return {i: layer.feed_forward.expert_load_E.tolist() for i, layer in enumerate(self.model.model.layers)
                if isinstance(layer.feed_forward, ParallelMoE)}

    def a2a_bytes_sent(self) -> int:
        return sum(layer.feed_forward.a2a_bytes_sent for layer in self.model.model.layers
                   if isinstance(layer.feed_forward, ParallelMoE))

    def local_experts(self) -> dict[int, list[int]]:
        return {i: layer.feed_forward.local_expert_ids for i, layer in enumerate(self.model.model.layers)
                if isinstance(layer.feed_forward, ParallelMoE)}
