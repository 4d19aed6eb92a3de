"""`garrison serve`: the whole of Garrison on one machine (controller, engine cores, gateway) until interrupted; and
`garrison gateway`: one stateless gateway of a cluster."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

from garrison.serving import config as serve_config
from garrison.serving import preflight
from garrison.serving.cluster_watch import until_stopped
from garrison.serving.settings import ConfigError, Problem


def register(commands: Any) -> None:
    _register_gateway(commands)
    parser = commands.add_parser(
        "serve", help="run the Garrison server",
        description="Run Garrison's gRPC server. With no arguments, the embedded default: a local Ray instance, "
                    "SQLite under the data directory, the bundled SmolLM2 model, gRPC on 127.0.0.1:50051, and on "
                    "first start an admin key (admin.key) and a 'default' tenant key (tenant.key) written to the "
                    "data directory with mode 0600. A YAML --config describes models, worker groups (role, tp, "
                    "ep), the Ray address, the database URL, TLS files and telemetry. --check validates all of "
                    "it, and that its ports are free and its models resolve, without starting anything.")
    parser.add_argument("--config", type=Path, help="YAML file (see garrison/serving/config.py for every setting)")
    parser.add_argument("--data-dir", type=Path, help="state directory (default: $GARRISON_DATA_DIR or "
                                                      "~/.local/share/garrison)")
    parser.add_argument("--listen", help=f"HOST:PORT to serve gRPC on (default {serve_config.DEFAULT_LISTEN})")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow plaintext gRPC on an address other than loopback (as insecure: true)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration, its ports, files and models, start nothing; exit 0 when "
                             "it is valid, 1 with every problem")
    parser.add_argument("--static", action="store_true",
                        help="with --check: the file alone (types, ranges, names, the rules between settings), not "
                             "its ports, files or models; for a file rendered elsewhere, e.g. by Helm")
    parser.add_argument("--json", action="store_true", help="with --check: print the result as one JSON object")
    parser.set_defaults(run=run)


def _register_gateway(commands: Any) -> None:
    parser = commands.add_parser(
        "gateway", help="run a stateless gRPC gateway of a Garrison cluster",
        description="Run a gateway of a cluster: the gRPC services (Inference, Admin, health, reflection) in front "
                    "of the engine cores that `garrison controller` runs on the Ray cluster at ray_address. A "
                    "gateway loads no model (it finds the cores by name and asks each for its model's tokenizer), "
                    "keeps no state of its own (tenants and usage are in the database at database_url, tenant "
                    "limits in the cluster), and serves within seconds of starting: run as many as you like "
                    "behind one address. SIGTERM drains it: new streams are refused with UNAVAILABLE and a retry "
                    "hint while those running get gateway.drain_seconds to finish (health says NOT_SERVING, on "
                    "gateway.health_listen too: a plaintext port serving only gRPC health, for probes that cannot "
                    "speak TLS).")
    parser.add_argument("--config", type=Path, required=True, help="YAML file (the same as the controller's)")
    parser.add_argument("--listen", help="HOST:PORT to serve gRPC on (overrides listen)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run_gateway)


def run(args: argparse.Namespace) -> int:
    if args.check:
        return check(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = serve_config.load(args.config, data_dir=args.data_dir, listen=args.listen, insecure=args.insecure)
    return asyncio.run(_serve(config, run_controller=True))


def run_gateway(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = serve_config.load(args.config, listen=args.listen)
    if config.ray_address is None:
        raise ConfigError.listing([Problem("ray_address", "a gateway streams from a cluster's engine cores: set "
                                                          "ray_address (garrison serve runs everything on one "
                                                          "machine)")], str(args.config))
    return asyncio.run(_serve(config, run_controller=False))


def check(args: argparse.Namespace) -> int:
    """`garrison serve --check`: every problem of the file and of its surroundings, or none."""
    try:
        config = serve_config.load(args.config, data_dir=args.data_dir, listen=args.listen, insecure=args.insecure)
        problems: list[Problem] = [] if args.static else preflight.problems(config)
    except ConfigError as err:
        config, problems = None, list(err.problems)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": [p.to_json() for p in problems]}, indent=2))
        return 1 if problems else 0
    if problems:
        raise ConfigError.listing(problems, str(args.config) if args.config else "the embedded default")
    assert config is not None
    print(f"{args.config or 'the embedded default'}: OK ({len(config.models)} model(s): "
          f"{', '.join(m.name for m in config.models)}; gRPC on {config.listen})")
    return 0


async def _serve(config: serve_config.ServeConfig, run_controller: bool) -> int:
    from garrison.serving.server import GarrisonServer  # Ray, gRPC servers and the engine: not needed by --check

    server = GarrisonServer(config, run_controller=run_controller)
    print(f"garrison: starting {', '.join(m.name for m in config.models)} (data in {config.data_dir}) ...",
          file=sys.stderr, flush=True)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    # What startup built (modules, models, Ray's and gRPC's objects) lives as long as the process: freezing it
    # keeps the collector's full passes from walking it, which otherwise stalled a decode step by ~250 ms.
    gc.collect()
    gc.freeze()
    _announce(server)
    lost = await until_stopped(server.lost())
    if lost is not None:  # the streams in flight have lost their engines already: nothing to drain
        print(f"garrison: {lost}; exiting", file=sys.stderr, flush=True)
        await server.stop(1.0)
        return 1
    drain = config.gateway.drain_seconds
    print(f"garrison: draining (no new streams; those in flight get {drain:g} s)", file=sys.stderr, flush=True)
    await server.drain(drain)
    await server.stop(1.0)
    return 0


def _announce(server: Any) -> None:
    config = server.config
    host = config.listen.rpartition(":")[0]
    address = f"{host}:{server.port}"
    admin_key = config.admin_key_file or config.data_dir / "admin.key"
    tenant_key = config.data_dir / "tenant.key"
    model = config.models[0].name
    tls = "TLS" + (" with client certificates (mTLS)" if config.tls and config.tls.client_ca else "") \
        if config.tls else "plaintext"
    lines = [f"garrison: serving {', '.join(m.name for m in config.models)} on {address} ({tls}); "
             "gRPC health and reflection are on"]
    if server.health_port:
        lines.append(f"garrison: gRPC health alone, plaintext, for probes on "
                     f"{config.gateway.health_listen.rpartition(':')[0]}:{server.health_port}")
    if server.bootstrap.admin_key_file:
        lines.append(f"garrison: admin key written to {server.bootstrap.admin_key_file} (mode 0600, first start only)")
    if server.bootstrap.tenant_key_file:
        lines.append(f"garrison: tenant 'default' key written to {server.bootstrap.tenant_key_file} (mode 0600)")
    chat = f"  garrison chat --server {address} --key-file {{key}} --prompt 'What is the capital of France?'"
    tenant = [f"  garrison tenants create team-a --models {model} --server {address} --key-file {admin_key}",
              f"  garrison keys create --tenant team-a --server {address} --key-file {admin_key} > team-a.key"]
    # Without the bootstrap tenant (a configuration that does not ask for it) there is no tenant key yet: the
    # commands that make one come first, and the chat uses it.
    key = tenant_key if tenant_key.exists() else "team-a.key"
    lines += ["", "try it, from another terminal:"]
    lines += [chat.format(key=key), *tenant] if tenant_key.exists() else [*tenant, chat.format(key=key)]
    lines += [f"  grpcurl -plaintext -H \"authorization: Bearer $(cat {key})\" "
              f"-d '{{\"model\": \"{model}\", \"prompt\": \"Hello\"}}' {address} garrison.v1.Inference/Generate",
              "stop with Ctrl-C"]
    print("\n".join(lines), file=sys.stderr, flush=True)
