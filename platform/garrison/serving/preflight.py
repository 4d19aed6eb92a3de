"""What `garrison serve` checks about its surroundings before it starts anything (Ray above all).

A valid file can still name a port another process holds, a TLS file that is not there, or a model
that does not resolve; each would otherwise surface minutes later, after Ray and the first models came
up. `problems(config)` finds them all at once, each with the place of the setting that names it;
`garrison serve --check` prints them, and a server refuses to start while any remains.
"""

from __future__ import annotations

import socket
from pathlib import Path

from garrison.model_refs import model_exists
from garrison.paths import private_dir_problem
from garrison.pem import pem_problem
from garrison.serving.config import ServeConfig, parse_address
from garrison.serving.settings import Problem
from garrison.tenancy.keys import read_key_file
from garrison.weight_store.store import Store
from garrison_workers.errors import GarrisonError


def problems(config: ServeConfig, *, models: bool = True) -> list[Problem]:
    """Every problem of the surroundings; `models` False skips resolving the models' sources."""
    found = _port_problems(config) + _file_problems(config)
    if models:
        found += _model_problems(config)
    return found


def _port_problems(config: ServeConfig) -> list[Problem]:
    addresses = [("config.listen", config.listen)]
    if config.telemetry.prometheus_listen:
        addresses.append(("config.telemetry.prometheus_listen", config.telemetry.prometheus_listen))
    if config.gateway.health_listen:
        addresses.append(("config.gateway.health_listen", config.gateway.health_listen))
    found = []
    for place, address in addresses:
        problem = port_problem(address)
        if problem:
            found.append(Problem(place, problem))
    return found


def port_problem(address: str) -> str | None:
    """Why nothing could listen on HOST:PORT now (None: it could; port 0 always can)."""
    host, port = parse_address(address)
    if port == 0:
        return None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        return f"cannot resolve {host!r}: {err.strerror}"
    with socket.socket(family, kind, proto) as probe:
        # Like the servers that will bind it (and so past TIME_WAIT), but without SO_REUSEPORT: a listener
        # there, whatever its options, makes this bind fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as err:
            return f"cannot listen on {address}: {err.strerror} (another process holds the port?)"
    return None


def _file_problems(config: ServeConfig) -> list[Problem]:
    found = []
    if config.data_dir.exists() and (problem := private_dir_problem(config.data_dir)):
        found.append(Problem("config.data_dir", problem))
    if config.kek_file is not None and not _readable(config.kek_file):
        found.append(Problem("config.kek_file", f"cannot read {config.kek_file}"))
    if config.tls is not None:  # gRPC aborts the process on a PEM file it cannot parse
        pems = [("cert", config.tls.cert, "certificate"), ("key", config.tls.key, "private key"),
                ("client_ca", config.tls.client_ca, "certificate")]
        found += [Problem(f"config.tls.{name}", problem) for name, path, kind in pems
                  if path is not None and (problem := pem_problem(path, kind))]
    if config.admin_key_file is not None:
        try:
            read_key_file(config.admin_key_file)
        except GarrisonError as err:
            found.append(Problem("config.admin_key_file", str(err)))
    return found


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False


def _model_problems(config: ServeConfig) -> list[Problem]:
    store = Store(config.resolved_store_dir)
    found = []
    for i, model in enumerate(config.models):
        if model.import_from is not None and not store.has(model.source):
            place, ref = f"config.models[{i}].import_from", model.import_from
        else:
            place, ref = f"config.models[{i}].source", model.source
        problem = model_exists(ref, store if place.endswith("source") else None)
        if problem:
            found.append(Problem(place, problem))
    return found
