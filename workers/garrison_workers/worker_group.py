"""A worker group: one model replica as `tp × ep` Ray actors in one placement group.

The group is the engine's executor for a parallel replica. It ships each step to every rank and
returns rank 0's sampled tokens. If any rank dies the step fails at once with the rank named (Ray resolves a
dead actor's pending call with an error), the surviving ranks are killed (they would otherwise wait
in a collective), and the group stays failed until `restart()`. Each rank also holds one call that never
answers (`Worker.watch`, a concurrency group of its own): `lost()` sees a rank's death the moment Ray resolves
that call, with no traffic and whatever the rank is busy with.

A group that cannot be placed is refused quickly and with the numbers: at once when the cluster has too few
slots in all (`LayoutError`: the operator must act), within `PLACEMENT_WAIT_S` when they exist but are taken
(`UnplaceableError`: retry when capacity returns). Nothing waits minutes for a placement that may never come.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray
from ray.exceptions import AuthenticationError, GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.model_runner import SeqChunk
from garrison_workers.errors import GarrisonError, LayoutError, UnavailableError, UnplaceableError, WorkerLostError
from garrison_workers.faults import Fault
from garrison_workers.kv_transfer import KVRoute
from garrison_workers.loader import ModelLocation
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.placement import RAY_STRATEGY, GroupPlacement, alive_nodes, capacity, ranks_per_node
from garrison_workers.worker import StepBytes, Worker

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 600.0
STEP_TIMEOUT_S = 600.0
PLACEMENT_WAIT_S = 20.0  # for slots that exist but are taken, before this attempt is given up (and retried later)
_POLL_S = 0.2
INLINE_STEP_INTS = 10_000  # token ids and block-table entries of a step: at most ~50 KB pickled
RAY_NICENESS_ENV = "RAY_worker_niceness"
CLIENT_SERVER_TRIES = 3
_CLIENT_SERVER_FAILED = "Initialization failure from server"  # Ray client: the per-client server did not start
_WorkerActor = ray.remote(concurrency_groups={"watch": 1})(Worker)


def ensure_ray(address: str | None = None, min_cpus: int = 1) -> bool:
    """Connect to `address`, or start a local Ray instance if none is running in this process.
    True when this call connected (so the caller may `ray.shutdown()` when done).

    A local instance advertises at least `min_cpus` CPU slots: on a small machine a tp × ep group
    still gets one slot per rank (the ranks then share the cores).
    """
    if ray.is_initialized():
        return False
    if address:
        for attempt in range(1, CLIENT_SERVER_TRIES + 1):
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
                break
            except ConnectionAbortedError as err:
                if _CLIENT_SERVER_FAILED not in str(err):
                    raise UnavailableError(_unreachable(address, err)) from err
                # The Ray client server starts a server process per client; Ray's proxier now and then loses one
                # as it starts (ray-project/ray#63202, a fork race; seen once in CI). Ray has cleaned up, and a
                # new connection gets a new server.
                if attempt == CLIENT_SERVER_TRIES:
                    raise UnavailableError(
                        f"the Ray client server at {address} failed {attempt} times to start a server for this "
                        f"process ({_last_line(err)}); its log is ray_client_server.err on the Ray head") from err
                log.warning("the Ray client server at %s failed to start a server for this process (%s); trying "
                            "again (%d of %d)", address, _last_line(err), attempt + 1, CLIENT_SERVER_TRIES)
            except ConnectionError as err:
                raise UnavailableError(_unreachable(address, err)) from err
            except AuthenticationError as err:  # refused here before any connection: token mode, but no token
                raise UnavailableError(f"cannot attach to the Ray cluster at {address}: {err}") from err
    else:
        start_local_ray(max(os.cpu_count() or 1, min_cpus))
    return True


def _last_line(err: Exception) -> str:
    """The last line of an error whose text is a server's traceback: what went wrong, without the stack."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _unreachable(address: str, err: ConnectionError) -> str:
    """What to check when Ray would not let this process attach: Ray's own words are "connection timeout" for a
    Ray client whose token the head refused, the same as for a port nobody answers on."""
    causes, cause = [], err.__cause__ or err.__context__
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    # Through the GCS, Ray raises the AuthenticationError inside a retry loop and hands on only its traceback, as
    # the text of a RuntimeError: the status code's name is what survives.
    if any(isinstance(c, AuthenticationError) or "InvalidAuthToken" in str(c) for c in causes):
        return (f"the Ray cluster at {address} refused this process's token: give it the cluster's token in "
                "RAY_AUTH_TOKEN, with RAY_AUTH_MODE=token (the chart: the ray.auth Secret)")
    return (f"cannot attach to the Ray cluster at {address} ({_last_line(err)}): check that the address is right "
            "and reachable from here, and, if the cluster uses token authentication, that RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN hold its token (the chart: the ray.auth Secret)")


def start_local_ray(num_cpus: int | None = None) -> None:
    """A Ray instance of this process's own, with `num_cpus` slots (None: one per core)."""
    # Ray starts its workers at nice 15 (worker_niceness), under the raylet, the GCS and this process; a rank is
    # the workload itself: at 15, any wake-up elsewhere on the node stalls its threads (a SmolLM2 decode step at
    # one sequence took 82 ms in a rank against 64 ms in this process; at 0, 69 ms). `ray start` needs the same
    # variable (the chart sets it).
    os.environ.setdefault(RAY_NICENESS_ENV, "0")
    # "local" and not None: with no address Ray joins whatever cluster `ray start` last left on this machine
    # (its /tmp/ray/ray_current_cluster file), which is not what a local instance means.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)


class WorkerGroup:
    def __init__(self, model_path: ModelLocation, dims: ParallelDims, num_blocks: int, config: EngineConfig,
                 name: str = "group-0", placement: GroupPlacement = GroupPlacement()) -> None:
        self.model_path, self.dims, self.name, self.placement = model_path, dims, name, placement
        self.num_blocks, self.config = num_blocks, config
        self.actors: list[Any] = []
        self._pg: Any = None
        self.failure: WorkerLostError | None = None
        self._weight_bytes: list[int] = []
        self._watches: list[Any] = []  # one pending `watch` call per rank
        self.nodes: list[str] = []  # per rank: the node it runs on ("<ip> (<node id>)")
        self._lock = threading.Lock()  # the engine's thread and a supervisor may both find a rank lost
        self.generation = 0  # counts starts: a KV channel joined before a restart does not reach the new ranks

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "WorkerGroup":
        ensure_ray(min_cpus=self.dims.world_size)
        gpu = self.config.device.startswith("cuda")
        bundle = self.placement.bundle(gpu)
        self._pg = self._place(bundle)
        # Ranks of one node share its cores: more intra-op threads than cores only adds contention.
        threads = self.config.worker_threads or min(4, max(1, (os.cpu_count() or 1) // self.dims.world_size))
        self.actors = [
            _WorkerActor.options(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, resources=self._extra(),
                                 scheduling_strategy=PlacementGroupSchedulingStrategy(
                                     self._pg, placement_group_bundle_index=r)
                                 ).remote(r, self.dims, self.model_path, self.num_blocks, self.config, threads)
            for r in range(self.dims.world_size)]
        self._watches = [actor.watch.remote() for actor in self.actors]
        self.failure = None
        self.generation += 1
        try:
            self.nodes = self._call_all("node", timeout=STARTUP_TIMEOUT_S)
            self._check_niceness()
            host, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=STARTUP_TIMEOUT_S)
            self._weight_bytes = self._call_all("setup", host, port, timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        return self

    def _check_niceness(self) -> None:
        niceness = max(self._call_all("niceness", timeout=STARTUP_TIMEOUT_S))
        if niceness > 0:
            log.warning("worker group %s: its ranks run at nice %d (Ray's worker_niceness): whatever else runs on "
                        "their nodes pre-empts them, which costs steps their speed; start Ray with %s=0 (the Helm "
                        "chart does)", self.name, niceness, RAY_NICENESS_ENV)

    def _extra(self) -> dict[str, float]:
        return {self.placement.resource: 1.0} if self.placement.resource is not None else {}

    def _place(self, bundle: dict[str, float]) -> Any:
        """A placement group of one bundle per rank, or a refusal that says why, in seconds rather than minutes."""
        ranks, strategy = self.dims.world_size, self.placement.strategy
        nodes = alive_nodes()
        if capacity(nodes, bundle, strategy) < ranks:
            raise LayoutError(f"worker group {self.name}: {ranks} ranks of {bundle} ({strategy}) do not fit the Ray "
                              f"cluster's nodes even when idle (each holds "
                              f"{', '.join(map(str, ranks_per_node(nodes, bundle))) or 'nothing: no nodes'}): add "
                              f"nodes, or lower tp × ep")
        total = ray.cluster_resources()
        pg = placement_group([bundle] * ranks, strategy=RAY_STRATEGY[strategy])
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_WAIT_S)
        except GetTimeoutError:
            remove_placement_group(pg)
            free = ray.available_resources()
            raise UnplaceableError(f"worker group {self.name}: {ranks} ranks need "
                                   f"{', '.join(f'{ranks * n:g} {r}' for r, n in bundle.items())}; the cluster has "
                                   f"{', '.join(f'{free.get(r, 0.0):g} of {total.get(r, 0.0):g} {r}' for r in bundle)} "
                                   f"free, not enough where the ranks fit (waited {PLACEMENT_WAIT_S:g} s)") from None
        return pg

    def restart(self) -> None:
        self.shutdown()
        self.start()

    def shutdown(self) -> None:
        with self._lock:
            actors, self.actors, self._watches = self.actors, [], []
            pg, self._pg = self._pg, None
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if pg is not None:
            remove_placement_group(pg)

    def lost(self) -> WorkerLostError | None:
        """The group's failure, if a rank has died (seen at once, without a call to the ranks); None while whole."""
        if self.failure is None and self._watches:
            ready, _ = ray.wait(list(self._watches), num_returns=1, timeout=0)
            if ready:
                self._mark_lost(self._watches.index(ready[0]), "died")
        return self.failure

    def kill_rank(self, rank: int) -> None:
        """Fault injection: kill one rank's process, as a crash or a lost GPU would."""
        ray.kill(self.actors[rank], no_restart=True)

    def inject_fault(self, rank: int, point: str, fault: Fault | None) -> None:
        """Fault injection: arm (None: disarm) `fault` at `point` (faults.POINTS) of one rank."""
        ray.get(self.actors[rank].inject_fault.remote(point, fault), timeout=STEP_TIMEOUT_S)

    # -- Executor ---------------------------------------------------------------------------------

    @property
    def overlaps(self) -> bool:
        return True  # rank 0 keeps what it sampled and sends it to the other ranks (Worker._fill_in)

    def submit(self, chunks: list[SeqChunk]) -> "PendingStep":
        # A step this small travels inside the call itself (Ray inlines arguments up to 100 KB); one in the object
        # store costs the raylet a round trip each step. A bigger one (a long prompt's chunk, long block tables) is
        # put there once, for every rank to read.
        size = sum(len(chunk.token_ids) + len(chunk.block_table) for chunk in chunks)
        return PendingStep(self, self._start_all("execute", chunks if size <= INLINE_STEP_INTS else ray.put(chunks)))

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

    def returned_bytes(self) -> StepBytes:
        """What the group's steps returned to the engine core so far (rank 0's sampled tokens)."""
        return self._call_all("returned_bytes", timeout=STEP_TIMEOUT_S)[0]

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
        raise self._mark_lost(rank, what)

    def _mark_lost(self, rank: int, what: str) -> WorkerLostError:
        with self._lock:
            if self.failure is not None:
                return self.failure
            ep_rank, tp_rank = self.dims.coords(rank)
            where = f" on node {self.nodes[rank]}" if rank < len(self.nodes) else ""
            self.failure = WorkerLostError(
                f"worker group {self.name}: rank {rank} (ep {ep_rank}, tp {tp_rank}){where} {what}; its in-flight "
                "requests failed; the group is restarted to serve again")
        log.error("%s", self.failure)
        self.shutdown()
        return self.failure


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
