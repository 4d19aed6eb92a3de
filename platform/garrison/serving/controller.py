"""The controller: starts every configured replica's engine core and keeps it running.

An engine core (garrison_workers.engine_core) per replica. In the cluster form the cores are named Ray actors,
`core/<model>/<index>` in the deployment's Ray namespace: gateways find them by name and stream from them, and the
cores outlive the controller and every gateway (detached). A controller that starts again adopts the cores it finds
under those names. With `garrison serve` on one machine the controller runs in the server's process and the cores
either in Ray actors of the local instance, or (a model with `on_ray: false`) in this process.

Supervision of a core: the controller keeps one `watch` call pending on each core actor; Ray answers it with an
error the moment the actor dies (its process, or its node), and the controller starts the core again with a
backoff. Inside a core, its worker groups are supervised by the core itself.

The controller resolves each model's weights: it holds the key-encryption key, opens the store entry (importing
it first when `import_from` says so) and hands the unwrapped data key to the core in memory. Cores run on the head
node, which takes no slot of the ranks: a worker node lost with its ranks leaves the core to fail just those
requests, naming the rank and node, and to restart the group.

What the controller sees it exports (garrison controller, on telemetry.prometheus_listen): each model's replicas by
state, `garrison_replicas{model, state}` (a core's own state, which a poll kept pending like the watch brings back:
serving, restarting a worker group, unplaceable, draining; `restarting` while the core itself is lost or not
started yet), and `garrison_replica_restarts_total{model}`, the cores it started again after losing them.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.model_refs import resolve_model, resolve_source
from garrison.router.replica import CoreLink, LocalCore, RayCore
from garrison.serving.config import ModelDeploymentConfig, ServeConfig
from garrison.weight_store.importer import import_model
from garrison.weight_store.keys import FileKeyProvider, KeyProvider, create_kek_file, provider_from_options
from garrison.weight_store.store import Store
from garrison_workers.engine_core import CoreSpec, EngineCore, GroupSpec, ReplicaState
from garrison_workers.loader import ModelLocation
from garrison_workers.placement import GroupPlacement, on_head_node

log = logging.getLogger(__name__)

BOOTSTRAP_KEK_FILE = "kek.key"
CORE_PREFIX = "core/"
CORE_CONCURRENCY = 64  # calls a core actor serves at once: every gateway's poll waits in one
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
WATCH_S = 0.5
STATUS_CLIENT = "controller"  # the client name the controller polls each core's status under (it sends no request)


def core_name(model: str, index: int) -> str:
    return f"{CORE_PREFIX}{model}/{index}"


def ray_namespace(config: ServeConfig) -> str:
    """A cluster's cores live under the configured namespace; one machine's under a namespace of its own, so that
    servers sharing a Ray instance (tests) never adopt each other's cores."""
    return config.ray_namespace if config.ray_address is not None else f"garrison-{uuid.uuid4().hex[:8]}"


def needs_ray(config: ServeConfig) -> bool:
    return config.ray_address is not None or any(
        m.on_ray or any(g.tp * g.ep > 1 for g in m.groups) for m in config.models)


def ray_ranks(config: ServeConfig) -> int:
    """Worker ranks (Ray actors, one CPU slot each) the models ask for: a local Ray instance advertises at least
    this many slots, so that every group can be placed on one machine (its ranks then share its cores)."""
    return sum(m.replicas * sum(g.tp * g.ep for g in m.groups) for m in config.models)


def key_provider(config: ServeConfig) -> KeyProvider | None:
    """The configured KEK provider; with `bootstrap` and none configured, <data_dir>/kek.key (made once)."""
    provider = provider_from_options(_text(config.kek_file), config.kek_env, _text(config.kek_secret_dir))
    if provider is None and config.bootstrap:
        path = config.data_dir / BOOTSTRAP_KEK_FILE
        provider = FileKeyProvider(path) if path.exists() else create_kek_file(path)
    return provider


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def model_location(model: ModelDeploymentConfig, store: Store, provider: KeyProvider | None) -> ModelLocation:
    """Where `model` loads from: its store entry (imported now if it should be and is not yet), or a path."""
    if model.import_from is not None and not store.has(model.source):
        log.info("model %s: importing %s into the encrypted store %s", model.name, model.import_from, store.root)
        import_model(resolve_source(model.import_from), store, model.source, provider, progress=False)
    return resolve_model(model.source, store, provider)


def core_spec(model: ModelDeploymentConfig, index: int, location: ModelLocation, config: ServeConfig) -> CoreSpec:
    return CoreSpec(core_name(model.name, index), model.name, location,
                    tuple(GroupSpec(g.role, g.tp, g.ep, GroupPlacement(g.placement, g.resource)) for g in model.groups),
                    model.engine, on_ray=model.on_ray,
                    max_queued_per_tenant=config.gateway.max_queued_per_tenant)


@dataclass(slots=True)
class _Core:
    spec: CoreSpec
    link: CoreLink
    handle: Any  # the Ray actor, or the EngineCore in this process
    watch: Any = None  # the pending `watch` call of a Ray core
    backoff_s: float = FIRST_BACKOFF_S
    next_attempt: float = 0.0
    status_call: Any = None  # the pending `poll` that brings back a Ray core's own status
    state: ReplicaState = ReplicaState.SERVING  # a Ray core's, as last seen; RESTARTING while the core is lost

    def current_state(self) -> ReplicaState:
        return self.handle.status.state if isinstance(self.handle, EngineCore) else self.state


class Controller:
    def __init__(self, config: ServeConfig, namespace: str, detached: bool) -> None:
        """`detached`: the cores outlive this process (the cluster form); else they stop with it."""
        self.config, self.namespace, self.detached = config, namespace, detached
        self._cores: dict[str, _Core] = {}
        self._restarts: Counter[str] = Counter()  # model -> cores started again after they were lost
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="controller", daemon=True)

    def start(self) -> None:
        """Start (or adopt) every replica's core and wait until each has built its engine."""
        store, provider = Store(self.config.resolved_store_dir), key_provider(self.config)
        try:
            for model in self.config.models:
                location = model_location(model, store, provider)
                for index in range(model.replicas):
                    log.info("model %s: starting replica %d/%d", model.name, index + 1, model.replicas)
                    self._launch(core_spec(model, index, location, self.config))
            self._retire_others()
        except BaseException:
            self.stop(stop_cores=True)
            raise
        self._thread.start()

    def _retire_others(self) -> None:
        """Cores of this namespace that the configuration no longer has (a model removed, fewer replicas): drained
        the way a gateway is, then stopped."""
        if self.config.ray_address is None:
            return
        import ray

        for name in set(find_cores(self.namespace)) - set(self._cores):
            log.info("core %s is not in the configuration: draining it (%g s at most)", name,
                     self.config.gateway.drain_seconds)
            self._retire(ray.get_actor(name, namespace=self.namespace), name)

    def core(self, name: str) -> Any:
        """A core's handle: its Ray actor, or the EngineCore in this process (for fault injection and tests)."""
        with self._lock:
            return self._cores[name].handle

    def links(self) -> dict[str, CoreLink]:
        """Every core this controller runs, by name (what an in-process gateway streams from)."""
        with self._lock:
            return {name: core.link for name, core in self._cores.items()}

    def replica_rows(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        """Each model's replicas by state (Telemetry.observe_load's rows: garrison.replicas); a replica whose core is
        not registered yet (still starting) counts as restarting, as a gateway counts it."""
        with self._lock:
            cores = list(self._cores.values())
        rows: list[tuple[dict[str, str], dict[str, float]]] = []
        for model in self.config.models:
            states = Counter(core.current_state() for core in cores if core.spec.model == model.name)
            states[ReplicaState.RESTARTING] += max(0, model.replicas - sum(states.values()))
            rows += [({"model": model.name, "state": state.value}, {"replicas": states[state]})
                     for state in ReplicaState]
        return rows

    def restart_rows(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        """Each model's cores started again after they were lost (Telemetry.observe_restarts' rows)."""
        with self._lock:
            return [({"model": model.name}, {"replica_restarts": self._restarts[model.name]})
                    for model in self.config.models]

    def stop(self, stop_cores: bool) -> None:
        """Stop supervising; with `stop_cores`, stop the cores too (else they go on serving the gateways)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(30)
        if stop_cores:
            for core in list(self._cores.values()):
                _stop(core)
            self._cores.clear()

    def _launch(self, spec: CoreSpec) -> None:
        """Start (or adopt) a core and wait until it has built its engine; raise what building it raised."""
        if not self._ray(spec):
            core = EngineCore(spec)
            self._register(_Core(spec, LocalCore(core), core))
            return

        actor = self._actor(spec)
        if not self._built(actor, spec):
            # A core of that name built from another configuration (engine settings, groups, a re-imported model):
            # the rollout of the new one. Its requests finish first, then it is replaced; replicas go one by one.
            log.info("core %s runs an older configuration: draining it (%g s at most) and starting it again",
                     spec.name, self.config.gateway.drain_seconds)
            self._retire(actor, spec.name)
            actor = self._actor(spec)
            self._built(actor, spec)
        self._register(_Core(spec, RayCore(actor), actor, actor.watch.remote()))

    @staticmethod
    def _built(actor: Any, spec: CoreSpec) -> bool:
        """Wait until the core has built its engine; whether it was built from `spec`."""
        import ray

        try:
            return ray.get(actor.serves.remote(spec))
        except ray.exceptions.RayError as err:  # the core could not build its engine: say why, as it said
            raise _cause(err) from None

    def _actor(self, spec: CoreSpec) -> Any:
        """The core named `spec.name`: the one running (adopted, whatever it was built from), else a new one."""
        import ray

        return ray.remote(EngineCore).options(
            name=spec.name, namespace=self.namespace, lifetime="detached" if self.detached else None,
            max_concurrency=CORE_CONCURRENCY, num_cpus=0, max_restarts=0, get_if_exists=True,
            scheduling_strategy=on_head_node()).remote(spec)

    def _retire(self, actor: Any, name: str) -> None:
        """Drain a core the way a gateway drains (no new requests, those running finish), then stop it."""
        import ray

        try:
            ray.get(actor.drain.remote(self.config.gateway.drain_seconds))
        finally:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30  # Ray releases a killed actor's name once its death is recorded
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                return
            time.sleep(0.1)

    def _ray(self, spec: CoreSpec) -> bool:
        return spec.on_ray or any(g.tp * g.ep > 1 for g in spec.groups) or self.config.ray_address is not None

    def _register(self, core: _Core) -> None:
        with self._lock:
            self._cores[core.spec.name] = core

    # -- supervision ------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.wait(WATCH_S):
            for core in list(self._cores.values()):
                try:
                    self._check(core)
                except Exception:  # never let supervision stop
                    log.exception("core %s: supervision failed; trying again", core.spec.name)

    def _check(self, core: _Core) -> None:
        if core.watch is None:
            return
        import ray

        ready, _ = ray.wait([core.watch], timeout=0)
        if not ready:
            self._follow_status(core)
            return
        core.state = ReplicaState.RESTARTING
        if self._stopping.is_set() or time.monotonic() < core.next_attempt:
            return
        log.error("core %s was lost; starting it again", core.spec.name)
        try:
            self._launch(core.spec)
        except Exception as err:
            core.next_attempt = time.monotonic() + core.backoff_s
            log.error("core %s could not be started (%s: %s); next attempt in %g s", core.spec.name,
                      type(err).__name__, err, core.backoff_s)
            core.backoff_s = min(2 * core.backoff_s, MAX_BACKOFF_S)
            return
        with self._lock:
            self._restarts[core.spec.model] += 1

    def _follow_status(self, core: _Core) -> None:
        """A live core's own state (a worker group restarting, unplaceable, draining), from one `poll` kept
        pending: it answers at once (timeout 0), and the next goes out when it has."""
        import ray

        if core.status_call is not None:
            ready, _ = ray.wait([core.status_call], timeout=0)
            if not ready:
                return
            try:
                core.state = ray.get(core.status_call).status.state
            except ray.exceptions.RayError:  # the core is gone: its watch says so
                return
        core.status_call = core.handle.poll.remote(STATUS_CLIENT, 0.0)


def _cause(err: BaseException) -> BaseException:
    """The error an actor's constructor raised, out of Ray's wrapping (ActorDiedError(RayTaskError(cause)))."""
    for inner in (err, *(err.args[:1] if err.args else ())):
        cause = getattr(inner, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return err


def _stop(core: _Core) -> None:
    if isinstance(core.handle, EngineCore):
        core.handle.shutdown()
        return
    import ray

    try:
        ray.get(core.handle.shutdown.remote(), timeout=60)
    except Exception:  # already gone, or stuck: it is killed either way
        pass
    ray.kill(core.handle, no_restart=True)


def find_cores(namespace: str) -> dict[str, CoreLink]:
    """The cores of a cluster, by name, as the Ray cluster knows them now (what a gateway streams from)."""
    import ray

    links: dict[str, CoreLink] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(CORE_PREFIX):
            try:
                links[entry["name"]] = RayCore(ray.get_actor(entry["name"], namespace=namespace))
            except ValueError:  # gone between the listing and the lookup
                continue
    return links
