"""What `garrison serve` runs, from flags and an optional YAML file (`--config FILE`).

Without a file: the embedded default — a local Ray instance, SQLite under the data directory, the
bundled SmolLM2 model on one replica, gRPC on 127.0.0.1:50051. Every field of the file is optional;
unknown keys are refused so a typo never silently falls back to a default, and every problem is
reported with its place (`config.models[1].groups[0].tp: must be an integer >= 1, got '2'`).
`garrison serve --check --config FILE` validates a file (and that its ports are free, its files readable and
its models resolvable; `--static` skips those, for a file rendered elsewhere) without starting anything.
Example:

    listen: 0.0.0.0:50051
    insecure: false                        # plaintext gRPC off loopback needs true (or tls below)
    data_dir: /var/lib/garrison            # created 0700; refused when group- or world-writable
    database_url: postgresql+psycopg://garrison@db/garrison   # or $GARRISON_DATABASE_URL
    ray_address: auto                      # the Ray head a KubeRay pod sees; omit for a local instance
    tls: {cert: server.crt, key: server.key, client_ca: ca.crt}   # client_ca turns on mTLS
    telemetry: {prometheus_listen: 0.0.0.0:9464, otlp_endpoint: http://otel-collector:4317}
    admin_key_file: /etc/garrison/admin/admin.key   # e.g. a mounted Secret; see below
    gateway: {max_concurrent_rpcs: 1024, max_queued_per_tenant: 256, drain_seconds: 30,
              health_listen: 0.0.0.0:50053}   # gRPC health only, plaintext: for Kubernetes' probes
    models:
      - name: scout
        source: /models/llama4-scout       # a path (has a '/', starts with '.' or '~', or ends in .gguf),
                                           # else a name: of the weight store, or bundled (smollm2)
        engine: {kv_cache_bytes: 68719476736, max_num_seqs: 256, max_num_batched_tokens: 8192, kv_transport: torch,
                 device: cuda, dtype: bfloat16}   # kv_cache_device: cpu keeps the KV cache in host memory
        groups:                            # one replica = these groups; prefill+decode disaggregates
          - {role: prefill, tp: 4, ep: 2}
          - {role: decode, tp: 2, ep: 4}
        replicas: 2

Settings:
- `listen` (HOST:PORT, default 127.0.0.1:50051). Plaintext gRPC (no `tls`) on an address that is not
  loopback is refused unless `insecure: true` says the network itself is trusted.
- `data_dir`, `database_url` (default SQLite in the data dir), `ray_address` (a cluster: `ray://HOST:10001`,
  or `auto` on a Ray node; none: a local instance), `cluster_lost_seconds` (a gateway or controller that cannot
  reach the cluster this long exits with status 1, for its supervisor to start it again; default 60),
  `ray_namespace` (a cluster's engine cores are found there by
  name; default `garrison`), `store_dir`, and the
  store's key-encryption key: at most one of `kek_file`, `kek_env`, `kek_secret_dir`.
- `tls`: `cert` and `key` (PEM), `client_ca` (clients must then present a certificate it signed).
- `telemetry`: `prometheus_listen` (HOST:PORT; a bare `:PORT` binds 127.0.0.1), `otlp_endpoint`,
  `service_name`.
- `admin_key_file`: a file holding an admin key's secret (`gk_...`, made offline by `garrison keys
  new-secret`). At start, when no key with that secret exists, the server creates it (hash stored,
  creation audited), so a platform team gets its first admin key without exec-ing into a pod. A key
  revoked since is not brought back: put a new secret in the file.
- `gateway`: `max_concurrent_rpcs` (RPCs in progress at once, all tenants), `max_queued_per_tenant`
  (a tenant's requests waiting for a slot; beyond it RESOURCE_EXHAUSTED), `drain_seconds` (how long
  in-flight streams may finish at shutdown), `health_listen` (HOST:PORT or null, the default: none): a second,
  plaintext port that serves the gRPC health service and nothing else, with the main port's health states
  (`""`, `garrison.v1.Inference`, `garrison.v1.Inference/<model>`, NOT_SERVING while draining). Kubernetes' gRPC
  probes cannot speak TLS; with `tls` on they probe this port. It may listen off loopback without `insecure`:
  it carries no request, key or model name that the main port's health does not already tell anyone.
- `controller`: `health_listen` (HOST:PORT of the gRPC health service `garrison controller` answers probes on).
- `max_request_bytes`: larger requests are refused with INVALID_ARGUMENT.
- `models[]`: `name` (unique), `source`, `import_from` (import this path or bundled name into the
  store under `source` first), `groups[]` (`role` both | prefill | decode, `tp`, `ep`, `placement` pack |
  spread, `resource`: a custom Ray resource that reserves nodes for the group), `replicas`,
  `on_ray`, and `engine`: every field of `garrison_workers.engine.config.EngineConfig` (block_size,
  kv_cache_bytes, num_kv_blocks, max_num_seqs, max_num_batched_tokens, max_model_len,
  enable_prefix_caching, kv_transfer_checksum, kv_transport, attention_key_block, async_scheduling, compile_decode,
  worker_threads, dtype as a name, device, kv_cache_device), with the engine's own defaults.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from garrison.paths import default_data_dir
from garrison.serving.settings import Builder, ConfigError, Problem, self_check, setting
from garrison.tenancy.records import MODEL_NAME
from garrison.tenancy.store import database_url
from garrison_workers.engine.config import EngineConfig

__all__ = ["ConfigError", "ControllerConfig", "DEFAULT_LISTEN", "EngineConfig", "GatewayConfig", "GroupConfig",
           "ModelDeploymentConfig", "Problem", "ServeConfig", "TLSConfig", "TelemetryConfig", "load", "parse_address"]

DEFAULT_LISTEN = "127.0.0.1:50051"
DEVICE = re.compile(r"cpu|cuda(:\d+)?")
Role = Literal["both", "prefill", "decode"]
Placement = Literal["pack", "spread"]


@dataclass(slots=True, frozen=True)
class GroupConfig:
    role: Role = "both"
    tp: int = 1
    ep: int = 1
    # "pack": the group's ranks on as few nodes as possible (one NVLink domain when they fit); "spread": one per node.
    placement: Placement = "pack"
    # A custom Ray resource each rank takes one unit of: the nodes that advertise it (a KubeRay worker group's
    # pods, say) are the only ones the group runs on. None: any node with a free CPU slot (or GPU).
    resource: str | None = None

    def __post_init__(self) -> None:
        self_check(self)


# The embedded default's engine: SmolLM2 on a CPU, beside everything else on the machine.
EMBEDDED_ENGINE = EngineConfig(kv_cache_bytes=512 << 20, max_num_seqs=32)


@dataclass(slots=True, frozen=True)
class ModelDeploymentConfig:
    name: str
    source: str = setting(ref=True)
    groups: tuple[GroupConfig, ...] = (GroupConfig(),)
    replicas: int = 1
    engine: EngineConfig = EngineConfig()
    # Run even a single-rank group in its own Ray actor, as on a cluster; False keeps it in this process.
    on_ray: bool = True
    # When `source` names no model of the weight store yet, import this (a path or bundled name) into the
    # store under that name first: the server then loads it encrypted, like every stored model.
    import_from: str | None = setting(None, ref=True)

    def __post_init__(self) -> None:
        self_check(self)

    @staticmethod
    def relations(v: Mapping[str, Any]) -> list[Problem]:
        problems = []
        if isinstance(v["name"], str) and not MODEL_NAME.fullmatch(v["name"]):
            problems.append(Problem("name", f"must be 1-255 printable characters without spaces, got {v['name']!r}"))
        groups = v["groups"]
        if isinstance(groups, tuple) and all(isinstance(g, GroupConfig) for g in groups):
            roles = sorted(g.role for g in groups)
            if roles != ["both"] and (roles.count("prefill") != 1 or roles.count("decode") < 1 or "both" in roles):
                problems.append(Problem("groups", f"must be one 'both' group, or one 'prefill' and one or more "
                                                  f"'decode' groups; got {roles}"))
        if isinstance(v["engine"], EngineConfig) and not DEVICE.fullmatch(v["engine"].device):
            problems.append(Problem("engine.device", f"must be cpu, cuda or cuda:N, got {v['engine'].device!r}"))
        return problems

    @property
    def disaggregated(self) -> bool:
        return any(g.role == "prefill" for g in self.groups)


@dataclass(slots=True, frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate signed by this CA (mTLS)

    def __post_init__(self) -> None:
        self_check(self)


@dataclass(slots=True, frozen=True)
class TelemetryConfig:
    prometheus_listen: str | None = None  # "host:port" serving /metrics (":port" binds 127.0.0.1); None: off
    otlp_endpoint: str | None = None  # an OTLP/gRPC collector for traces and metrics; None: off
    service_name: str = "garrison"

    def __post_init__(self) -> None:
        self_check(self)

    @staticmethod
    def relations(v: Mapping[str, Any]) -> list[Problem]:
        listen = v["prometheus_listen"]
        return _address_problems("prometheus_listen", listen) if isinstance(listen, str) else []


@dataclass(slots=True, frozen=True)
class GatewayConfig:
    """Load bounds of the gRPC gateway (see the module docstring)."""

    max_concurrent_rpcs: int = 1024
    max_queued_per_tenant: int = setting(256, min=0)
    drain_seconds: float = 30.0
    # HOST:PORT of a plaintext port serving only gRPC health (the same states as the main port), for probes that
    # cannot speak TLS (Kubernetes'); None: none.
    health_listen: str | None = None

    def __post_init__(self) -> None:
        self_check(self)

    @staticmethod
    def relations(v: Mapping[str, Any]) -> list[Problem]:
        listen = v["health_listen"]
        return _address_problems("health_listen", listen) if isinstance(listen, str) else []


@dataclass(slots=True, frozen=True)
class ControllerConfig:
    """`garrison controller`: the process that starts, watches and restarts the engines of a cluster."""

    health_listen: str = "127.0.0.1:50052"  # gRPC health (its probes), HOST:PORT

    def __post_init__(self) -> None:
        self_check(self)

    @staticmethod
    def relations(v: Mapping[str, Any]) -> list[Problem]:
        listen = v["health_listen"]
        return _address_problems("health_listen", listen) if isinstance(listen, str) else []


EMBEDDED_MODELS = (ModelDeploymentConfig("smollm2", "smollm2", import_from="smollm2", engine=EMBEDDED_ENGINE),)


@dataclass(slots=True, frozen=True)
class ServeConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    listen: str = DEFAULT_LISTEN
    # Plaintext gRPC on an address other than loopback: only with this set (a network trusted as it is).
    insecure: bool = False
    database_url: str | None = setting(None, url=True)  # None: sqlite under data_dir
    ray_address: str | None = None  # None: a local Ray instance
    # A process of a cluster (gateway, controller) that cannot reach it this long exits (status 1) for its
    # supervisor to start it again: a Ray driver does not reconnect to a new head. 60 s is Ray's own window for
    # reconnecting to a restarted GCS (gcs_rpc_server_reconnect_timeout_s).
    cluster_lost_seconds: float = setting(60.0, min=1)
    # The Ray namespace of a cluster's engine cores (core/<model>/<index>): gateways and the controller of one
    # deployment share it. A local instance's cores get a namespace of their own.
    ray_namespace: str = "garrison"
    tls: TLSConfig | None = None
    telemetry: TelemetryConfig = TelemetryConfig()
    gateway: GatewayConfig = GatewayConfig()
    controller: ControllerConfig = field(default_factory=lambda: ControllerConfig())
    models: tuple[ModelDeploymentConfig, ...] = EMBEDDED_MODELS
    max_request_bytes: int = 4 << 20  # larger requests are refused with INVALID_ARGUMENT
    store_dir: Path | None = None  # the encrypted weight store; None: <data_dir>/store
    # The key-encryption key of the store: at most one of these; none: $GARRISON_KEK_FILE,
    # $GARRISON_KEK_SECRET_DIR or $GARRISON_KEK; with `bootstrap`, <data_dir>/kek.key.
    kek_file: Path | None = None
    kek_env: str | None = None
    kek_secret_dir: Path | None = None
    # An admin key's secret (gk_...) the server makes sure exists at start (see the module docstring).
    admin_key_file: Path | None = None
    # The embedded default's first-start conveniences: a KEK in <data_dir>/kek.key when no other is
    # configured, and a tenant "default" granted every model with its key in <data_dir>/tenant.key.
    # Off whenever a config file is given (an operator then provides keys and creates tenants).
    bootstrap: bool = True

    def __post_init__(self) -> None:
        self_check(self)

    @staticmethod
    def relations(v: Mapping[str, Any]) -> list[Problem]:
        return _exposure_problems(v) + _model_name_problems(v["models"]) + _kek_problems(v) + _health_port_problems(v)

    @property
    def resolved_store_dir(self) -> Path:
        return self.store_dir or self.data_dir / "store"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or database_url(self.data_dir)


def _exposure_problems(v: Mapping[str, Any]) -> list[Problem]:
    listen = v["listen"]
    if not isinstance(listen, str):
        return []
    problems = _address_problems("listen", listen)
    if problems or v["tls"] is not None or v["insecure"] is not False or is_loopback(parse_address(listen)[0]):
        return problems
    return [Problem("listen", f"plaintext gRPC on {listen}, which other machines can reach: configure tls "
                              f"(garrison certs makes the files), listen on 127.0.0.1, or set insecure: true if the "
                              f"network itself is trusted")]


def _model_name_problems(models: Any) -> list[Problem]:
    first: dict[str, int] = {}
    problems = []
    for i, model in enumerate(models if isinstance(models, tuple) else ()):
        if not isinstance(model, ModelDeploymentConfig):
            continue
        if model.name in first:
            problems.append(Problem(f"models[{i}].name", f"duplicate model name {model.name!r} (models"
                                                         f"[{first[model.name]}] has it too): names must differ"))
        first.setdefault(model.name, i)
    return problems


def _health_port_problems(v: Mapping[str, Any]) -> list[Problem]:
    """The gateway's health port cannot be its gRPC port: one of the two servers would fail to bind."""
    gateway, listen = v["gateway"], v["listen"]
    if not isinstance(gateway, GatewayConfig) or gateway.health_listen is None or not isinstance(listen, str):
        return []
    try:
        (host, port), (health_host, health_port) = parse_address(listen), parse_address(gateway.health_listen)
    except ValueError:  # reported with the address itself
        return []
    wildcard = {"", "0.0.0.0", "::"}
    if port != 0 and port == health_port and (host == health_host or {host, health_host} & wildcard):
        return [Problem("gateway.health_listen", f"{gateway.health_listen} is the gRPC port itself (listen "
                                                 f"{listen}): give the health service a port of its own")]
    return []


def _kek_problems(v: Mapping[str, Any]) -> list[Problem]:
    given = [name for name in ("kek_file", "kek_env", "kek_secret_dir") if v[name] is not None]
    return [Problem(given[1], f"give at most one of kek_file, kek_env, kek_secret_dir (got {', '.join(given)})")] \
        if len(given) > 1 else []


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT ([::1]:PORT for IPv6); ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port from 0 to 65535, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost, or "" (every interface)
        return False


def _address_problems(name: str, address: str) -> list[Problem]:
    try:
        parse_address(address)
    except ValueError as err:
        return [Problem(name, str(err))]
    return []


def load(path: Path | None, data_dir: Path | None = None, listen: str | None = None,
         insecure: bool | None = None) -> ServeConfig:
    """The embedded default, or a YAML file; flags override both. ConfigError lists every problem."""
    raw = _read(path) if path is not None else {}
    if os.environ.get("GARRISON_DATABASE_URL") and "database_url" not in raw:  # e.g. from a Kubernetes Secret
        raw["database_url"] = os.environ["GARRISON_DATABASE_URL"]
    if data_dir is not None:  # a flag's path is relative to where the command runs, not to the file
        raw["data_dir"] = str(Path(data_dir).expanduser().resolve())
    for name, value in (("listen", listen), ("insecure", insecure)):
        if value is not None:
            raw[name] = value
    builder = Builder(path.resolve().parent if path is not None else Path.cwd())
    config = builder.build(ServeConfig, raw, "config")
    if builder.problems or config is None:
        raise ConfigError.listing(builder.problems, str(path) if path is not None else "the configuration")
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings may not repeat a key (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} on line {key_node.start_mark.line + 1}: each setting "
                                  f"may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path}: {err.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level")
    raw.setdefault("bootstrap", False)
    return raw
