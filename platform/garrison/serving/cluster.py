"""Cluster bring-up: turn each configured model into running replicas (worker groups on Ray).

Models come from the encrypted weight store (imported on first start when `import_from` says so),
or from a plain path. One replica is one `both` group, or one `prefill` group plus its `decode` groups
joined by a `DisaggregatedEngine`. Groups with more than one rank are always Ray actors; a single-rank group is
one too unless the model says `on_ray: false` (tests and the CPU quick path keep it in-process).
"""

from __future__ import annotations

import logging
from pathlib import Path

from garrison.model_refs import resolve_model, resolve_source
from garrison.router.replica import Engine, Replica
from garrison.router.router import Deployment
from garrison.serving.config import GroupConfig, ModelDeploymentConfig, ServeConfig
from garrison.weight_store.importer import import_model
from garrison.weight_store.keys import FileKeyProvider, KeyProvider, create_kek_file, provider_from_options
from garrison.weight_store.store import Store
from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.llm_engine import LLMEngine
from garrison_workers.loader import ModelLocation
from garrison_workers.parallel.dims import ParallelDims

log = logging.getLogger(__name__)
BOOTSTRAP_KEK_FILE = "kek.key"


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


def start_deployments(config: ServeConfig) -> list[Deployment]:
    """Every configured model's replicas (Ray, when needed, is already connected: see GarrisonServer.start)."""
    store, provider = Store(config.resolved_store_dir), key_provider(config)
    deployments: list[Deployment] = []
    try:
        for model in config.models:
            deployments.append(start_deployment(model, model_location(model, store, provider)))
    except BaseException:
        for deployment in deployments:
            for replica in deployment.replicas:
                replica.stop()
        raise
    return deployments


def start_deployment(model: ModelDeploymentConfig, path: ModelLocation) -> Deployment:
    settings = model.engine
    replicas: list[Replica] = []
    for index in range(model.replicas):
        log.info("model %s: starting replica %d/%d", model.name, index + 1, model.replicas)
        replicas.append(Replica(f"{model.name}-{index}", _engine(path, model, settings)).start())
    first = replicas[0].engine
    decoders = first.decoders if isinstance(first, DisaggregatedEngine) else [first]
    probe = decoders[0]
    return Deployment(model.name, probe.model_config, probe.tokenizer, replicas, settings.max_num_seqs,
                      min(d.max_model_len for d in decoders))


def _engine(path: ModelLocation, model: ModelDeploymentConfig, settings: EngineConfig) -> Engine:
    def group(g: GroupConfig) -> LLMEngine:
        dims = ParallelDims(tp=g.tp, ep=g.ep)
        on_ray = model.on_ray or dims.world_size > 1
        return LLMEngine.from_path(path, settings, dims, role=g.role, on_ray=on_ray)  # type: ignore[arg-type]

    if not model.disaggregated:
        return group(model.groups[0])
    prefill = group(next(g for g in model.groups if g.role == "prefill"))
    return DisaggregatedEngine(prefill, [group(g) for g in model.groups if g.role == "decode"])
