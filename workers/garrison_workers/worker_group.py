"""A worker group: one model replica as `tp × ep` Ray actors in one placement group.

The group is the engine's executor for a parallel replica. It ships each step to every rank and
returns rank 0's logits. If any rank dies the step fails at once with the rank named (Ray resolves a
dead actor's pending call with an error), the surviving ranks are killed (they would otherwise wait
in a collective), and the group stays failed until `restart()`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.model_runner import SeqChunk
from garrison_workers.errors import GarrisonError, WorkerLostError
from garrison_workers.kv_transfer import KVRoute
from garrison_workers.loader import ModelLocation
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.worker import Worker

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 600.0
STEP_TIMEOUT_S = 600.0
_POLL_S = 0.2


def ensure_ray(address: str | None = None, min_cpus: int = 1) -> bool:
    """Connect to `address`, or start a local Ray instance if none is running in this process.
    True when this call connected (so the caller may `ray.shutdown()` when done).

    A local instance advertises at least `min_cpus` CPU slots: on a small machine a tp × ep group
    still gets one slot per rank (the ranks then share the cores).
    """
    if ray.is_initialized():
        return False
    num_cpus = None if address else max(os.cpu_count() or 1, min_cpus)
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


class WorkerGroup:
    def __init__(self, model_path: ModelLocation, dims: ParallelDims, num_blocks: int, config: EngineConfig,
                 name: str = "group-0") -> None:
        self.model_path, self.dims, self.name = model_path, dims, name
        self.num_blocks, self.config = num_blocks, config
        self.actors: list[Any] = []
        self._pg: Any = None
        self.failure: WorkerLostError | None = None
        self._weight_bytes: list[int] = []
        self.generation = 0  # counts starts: a KV channel joined before a restart does not reach the new ranks

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "WorkerGroup":
        ensure_ray(min_cpus=self.dims.world_size)
        gpu = self.config.device.startswith("cuda")
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self._pg = placement_group([bundle] * self.dims.world_size, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=STARTUP_TIMEOUT_S)
        except GetTimeoutError:
            self.shutdown()
            raise GarrisonError(f"worker group {self.name}: the Ray cluster cannot place {self.dims.world_size} "
                                f"ranks of {bundle} within {STARTUP_TIMEOUT_S:.0f}s; add nodes or lower tp × ep") from None
        # Ranks of one node share its cores: more intra-op threads than cores only adds contention.
        threads = self.config.worker_threads or min(4, max(1, (os.cpu_count() or 1) // self.dims.world_size))
        remote = ray.remote(Worker)
        self.actors = [
            remote.options(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r)
                           ).remote(r, self.dims, self.model_path, self.num_blocks, self.config, threads)
            for r in range(self.dims.world_size)]
        self.failure = None
        self.generation += 1
        try:
            host, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=STARTUP_TIMEOUT_S)
            self._weight_bytes = self._call_all("setup", host, port, timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        return self

    def restart(self) -> None:
        self.shutdown()
        self.start()

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    # -- Executor ---------------------------------------------------------------------------------

    def submit(self, chunks: list[SeqChunk]) -> "PendingStep":
        chunks_ref = ray.put(chunks)  # serialized once, read by every rank
        return PendingStep(self, self._start_all("execute", chunks_ref))

    def export_kv(self, block_table: list[int], num_tokens: int) -> list[Any]:
        return self.start_export_kv(block_table, num_tokens).handles()

    def start_export_kv(self, block_table: list[int], num_tokens: int) -> "PendingExport":
        """Start exporting a sequence's KV; the ranks run it after any step already sent (calls run in order)."""
        return PendingExport(self, self._start_all("export_kv", block_table, num_tokens), "export_kv")

    def import_kv(self, block_table: list[int], num_tokens: int, handles: list[Any], start: int = 0,
                  stop: int | None = None) -> float | None:
        return self.start_import_kv(block_table, num_tokens, handles, start, stop).result()

    def start_import_kv(self, block_table: list[int], num_tokens: int, handles: list[Any], start: int = 0,
                        stop: int | None = None) -> "PendingImport":
        """Start importing; the ranks run it before any step sent after it (calls run in order)."""
        return PendingImport(self, self._start_all("import_kv", block_table, num_tokens, handles, start, stop),
                             "import_kv")

    # -- KV channels: point-to-point with another group (kv_link.TorchChannel) --------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """A free address on rank 0's host, for a process group that rank 0 hosts."""
        if self.failure is not None:
            raise self.failure
        return self._collect("rendezvous_address", [self.actors[0].rendezvous_address.remote()], STARTUP_TIMEOUT_S)[0]

    def join_kv_channel(self, channel: str, host: str, port: int, first_rank: int, size: int) -> "PendingStep":
        """Start joining a channel as its ranks `first_rank`..; the other group must join at the same time."""
        return PendingStep(self, self._start_all("join_kv_channel", channel, host, port, first_rank, size),
                           "join_kv_channel")

    def send_kv(self, block_table: list[int], num_tokens: int, route: KVRoute) -> "PendingStep":
        """Copy a sequence's KV out of its blocks and send it along `route` on the ranks' channel threads; done once
        copied (the blocks may be reused). The receiving group's `receive_kv` takes it."""
        return PendingStep(self, self._start_all("export_kv", block_table, num_tokens, route), "export_kv")

    def receive_kv(self, route: KVRoute) -> "PendingStep":
        """Start receiving a sequence's KV along `route` on the ranks' channel threads; done as soon as they have
        started. `import_kv([StagedKV(route.channel, route.tag)], ...)` then writes it, checked, into blocks."""
        return PendingStep(self, self._start_all("receive_kv", route), "receive_kv")

    def drop_kv(self, handles: list[Any]) -> None:
        """Let the ranks forget the KV staged for a transfer that is over; nothing to wait for."""
        if self.failure is None:
            self._start_all("drop_kv", handles)

    def resident_weight_bytes(self) -> list[int]:
        return list(self._weight_bytes)

    def set_expert_placement(self, layer: int, placement: list[int]) -> None:
        self._call_all("set_expert_placement", layer, placement, timeout=STARTUP_TIMEOUT_S)

    def expert_load(self) -> dict[int, list[int]]:
        """Per MoE layer, tokens per expert, summed over the ranks that own them."""
        total: dict[int, list[int]] = {}
        for per_rank in self._call_all("expert_load", timeout=STEP_TIMEOUT_S):
            for layer, counts in per_rank.items():
                total[layer] = [a + b for a, b in zip(total.get(layer, [0] * len(counts)), counts)]
        return total

    def a2a_bytes_sent(self) -> int:
        """All-to-all bytes that crossed between ranks so far, summed over ranks and MoE layers."""
        return sum(self._call_all("a2a_bytes_sent", timeout=STEP_TIMEOUT_S))

    def local_experts(self) -> list[dict[int, list[int]]]:
        return self._call_all("local_experts", timeout=STEP_TIMEOUT_S)

    def _call_all(self, method: str, *args: Any, timeout: float) -> list[Any]:
        """Call `method` on every rank; fail fast, naming the rank, if any of them dies."""
        return self._collect(method, self._start_all(method, *args), timeout)

    def _start_all(self, method: str, *args: Any) -> list[Any]:
        if self.failure is not None:
            raise self.failure
        return [getattr(actor, method).remote(*args) for actor in self.actors]

    def _collect(self, method: str, refs: list[Any], timeout: float) -> list[Any]:
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending, waited = list(refs), 0.0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
            waited += _POLL_S if not ready else 0.0
            for ref in ready:
                results[rank_of[ref]] = self._result(ref, rank_of[ref])
            if waited > timeout and pending:
                self._fail(rank_of[pending[0]], f"did not answer {method} within {timeout:.0f}s")
        return [results[rank] for rank in range(len(refs))]

    def _result(self, ref: Any, rank: int) -> Any:
        """A rank's answer; its user-facing errors (GarrisonError) pass through, anything else fails the group."""
        try:
            return ray.get(ref)
        except RayTaskError as err:
            cause = err.cause
            if isinstance(cause, GarrisonError):
                raise cause from None  # a user-facing error raised inside the rank (bad weights, bad layout)
            self._fail(rank, f"raised {type(cause).__name__}: {cause}")
        except RayActorError as err:
            self._fail(rank, f"died ({type(err).__name__})")

    def _fail(self, rank: int, what: str) -> None:
        ep_rank, tp_rank = self.dims.coords(rank)
        self.failure = WorkerLostError(
            f"worker group {self.name}: rank {rank} (ep {ep_rank}, tp {tp_rank}) {what}; its in-flight "
            "requests failed; restart the group to serve again")
        log.error("%s", self.failure)
        self.shutdown()
        raise self.failure


class PendingStep:
    """A call running on every rank of a group (a step, or one side of a KV transfer); `result()` waits for
    every rank and returns rank 0's answer (a step's logits)."""

    def __init__(self, group: WorkerGroup, refs: list[Any], method: str = "execute") -> None:
        self.group, self.refs, self.method = group, refs, method

    def done(self) -> bool:
        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(ready) == len(self.refs)

    def result(self) -> Any:
        return self.results()[0]

    def results(self) -> list[Any]:
        """Every rank's answer, in rank order."""
        return self.group._collect(self.method, self.refs, STEP_TIMEOUT_S)


class PendingImport(PendingStep):
    def result(self) -> float | None:
        """Seconds the slowest rank spent importing; None if any rank's KV had not arrived yet."""
        seconds = self.results()
        return None if None in seconds else max(seconds)


class PendingExport(PendingStep):
    def handles(self) -> list[Any]:
        """One transfer handle per TP shard (EP ranks > 0 hold copies and send none)."""
        return [h for h in self.results() if h is not None]
