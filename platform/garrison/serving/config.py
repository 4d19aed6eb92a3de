"""What `garrison serve` runs, from flags and an optional YAML file (`--config FILE`).

Without a file: the embedded default — a local Ray instance, SQLite under the data directory, the
bundled SmolLM2 model on one replica, gRPC on 127.0.0.1:50051. Every field of the file is optional;
unknown keys are refused so a typo never silently falls back to a default. Example:

    listen: 0.0.0.0:50051
    data_dir: /var/lib/garrison
    database_url: postgresql+psycopg://garrison@db/garrison   # or $GARRISON_DATABASE_URL
    ray_address: auto                      # the Ray head a KubeRay pod sees; omit for a local instance
    tls: {cert: server.crt, key: server.key, client_ca: ca.crt}   # client_ca turns on mTLS
    telemetry: {prometheus_listen: 0.0.0.0:9464, otlp_endpoint: http://otel-collector:4317}
    models:
      - name: scout
        source: /models/llama4-scout       # a directory, a .gguf file, or a bundled name
        engine: {kv_cache_bytes: 68719476736, max_num_seqs: 256, max_num_batched_tokens: 8192, kv_transport: torch,
                 device: cuda, dtype: bfloat16}   # kv_cache_device: cpu keeps the KV cache in host memory
        groups:                            # one replica = these groups; prefill+decode disaggregates
          - {role: prefill, tp: 4, ep: 2}
          - {role: decode, tp: 2, ep: 4}
        replicas: 2
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from garrison.paths import default_data_dir
from garrison.tenancy.store import database_url
from garrison_workers.errors import GarrisonError

DEFAULT_LISTEN = "127.0.0.1:50051"


class ConfigError(GarrisonError):
    """The serve configuration is invalid."""


@dataclass(slots=True, frozen=True)
class GroupConfig:
    role: str = "both"  # "both", "prefill" or "decode"
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.role not in ("both", "prefill", "decode"):
            raise ConfigError(f"group role must be both, prefill or decode, not {self.role!r}")
        if self.tp < 1 or self.ep < 1:
            raise ConfigError(f"group tp and ep must be >= 1, got tp={self.tp} ep={self.ep}")


@dataclass(slots=True, frozen=True)
class EngineSettings:
    kv_cache_bytes: int = 512 << 20
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # How a disaggregated replica moves KV from prefill to decode: "ray" (object store; any placement)
    # or "torch" (torch.distributed point-to-point, NCCL on GPU; every group on Ray).
    kv_transport: str = "ray"
    device: str = "cpu"  # "cuda": each rank of a group takes one GPU (Ray schedules them)
    dtype: str = "float32"  # of the weights and the KV cache: float32, bfloat16 or float16
    # "cpu" with device cuda: the KV cache in pinned host memory (contexts too long for the GPU; attention
    # copies over only the keys each step reads). None: the KV cache on `device`.
    kv_cache_device: str | None = None

    def __post_init__(self) -> None:
        if self.kv_transport not in ("ray", "torch"):
            raise ConfigError(f"kv_transport must be ray or torch, not {self.kv_transport!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}")
        if self.kv_cache_device not in (None, "cpu", self.device):
            raise ConfigError(f"kv_cache_device must be cpu (host memory) or the device ({self.device}), "
                              f"not {self.kv_cache_device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True, frozen=True)
class ModelDeploymentConfig:
    name: str
    source: str
    groups: tuple[GroupConfig, ...] = (GroupConfig(),)
    replicas: int = 1
    engine: EngineSettings = EngineSettings()
    # Run even a single-rank group in its own Ray actor, as on a cluster; False keeps it in this process.
    on_ray: bool = True
    # When `source` names no model of the weight store yet, import this (a path or bundled name) into the
    # store under that name first: the server then loads it encrypted, like every stored model.
    import_from: str | None = None

    def __post_init__(self) -> None:
        roles = sorted(g.role for g in self.groups)
        if roles != ["both"] and (roles.count("prefill") != 1 or roles.count("decode") < 1 or "both" in roles):
            raise ConfigError(f"model {self.name}: groups must be one 'both' group, or one 'prefill' and one or "
                              f"more 'decode' groups; got {roles}")
        if self.replicas < 1:
            raise ConfigError(f"model {self.name}: replicas must be >= 1")

    @property
    def disaggregated(self) -> bool:
        return any(g.role == "prefill" for g in self.groups)


@dataclass(slots=True, frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate signed by this CA (mTLS)


@dataclass(slots=True, frozen=True)
class TelemetryConfig:
    prometheus_listen: str | None = None  # "host:port" serving /metrics; None: off
    otlp_endpoint: str | None = None  # an OTLP/gRPC collector for traces and metrics; None: off
    service_name: str = "garrison"


@dataclass(slots=True, frozen=True)
class ServeConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    listen: str = DEFAULT_LISTEN
    database_url: str | None = None  # None: sqlite under data_dir
    ray_address: str | None = None  # None: a local Ray instance
    tls: TLSConfig | None = None
    telemetry: TelemetryConfig = TelemetryConfig()
    models: tuple[ModelDeploymentConfig, ...] = (ModelDeploymentConfig("smollm2", "smollm2", import_from="smollm2"),)
    max_request_bytes: int = 4 << 20  # larger requests are refused with INVALID_ARGUMENT
    store_dir: Path | None = None  # the encrypted weight store; None: <data_dir>/store
    # The key-encryption key of the store: at most one of these; none: $GARRISON_KEK_FILE,
    # $GARRISON_KEK_SECRET_DIR or $GARRISON_KEK; with `bootstrap`, <data_dir>/kek.key.
    kek_file: Path | None = None
    kek_env: str | None = None
    kek_secret_dir: Path | None = None
    # The embedded default's first-start conveniences: a KEK in <data_dir>/kek.key when no other is
    # configured, and a tenant "default" granted every model with its key in <data_dir>/tenant.key.
    # Off whenever a config file is given (an operator then provides keys and creates tenants).
    bootstrap: bool = True

    @property
    def resolved_store_dir(self) -> Path:
        return self.store_dir or self.data_dir / "store"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or database_url(self.data_dir)


def load(path: Path | None, data_dir: Path | None = None, listen: str | None = None) -> ServeConfig:
    """The embedded default, or a YAML file; flags override both."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"cannot read the config file {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of settings at the top level")
        raw.setdefault("bootstrap", False)
    if os.environ.get("GARRISON_DATABASE_URL") and "database_url" not in raw:  # e.g. from a Kubernetes Secret
        raw["database_url"] = os.environ["GARRISON_DATABASE_URL"]
    if data_dir is not None:
        raw["data_dir"] = str(data_dir)
    if listen is not None:
        raw["listen"] = listen
    base = path.parent if path is not None else Path.cwd()
    return _build(ServeConfig, raw, "config", base)


_NESTED = {"tls": TLSConfig, "telemetry": TelemetryConfig, "engine": EngineSettings}


def _build(cls: type, raw: Any, where: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        here = f"{where}.{name}"
        if name in _NESTED and value is not None:
            value = _build(_NESTED[name], value, here, base)
        elif name == "models":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{here} must be a non-empty list of models")
            value = tuple(_build(ModelDeploymentConfig, m, f"{here}[{i}]", base) for i, m in enumerate(value))
        elif name == "groups":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{here} must be a non-empty list of groups")
            value = tuple(_build(GroupConfig, g, f"{here}[{i}]", base) for i, g in enumerate(value))
        elif name in ("data_dir", "store_dir", "kek_file", "kek_secret_dir", "cert", "key", "client_ca") \
                and value is not None:
            value = (base / Path(str(value)).expanduser()).resolve()
        values[name] = value
    try:
        return cls(**values)
    except TypeError as err:  # a required setting is missing
        raise ConfigError(f"{where}: {err}") from None
    except ConfigError as err:  # a value out of range: say where
        raise ConfigError(f"{where}: {err}") from None
