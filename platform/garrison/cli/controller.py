"""`garrison controller`: start a cluster's engine cores, keep them running, and answer health probes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from garrison.serving import config as serve_config
from garrison.serving.settings import ConfigError, Problem


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "controller", help="run the engines of a Garrison cluster",
        description="Start (or adopt) the engine core of every configured replica on the Ray cluster at "
                    "ray_address, as named actors that gateways find and that outlive this process, and keep them "
                    "running: a core that dies is started again with a backoff (its worker groups are supervised "
                    "by the core itself). The controller holds the store's key-encryption key and hands each core "
                    "its model's data key in memory. gRPC health (for probes) on controller.health_listen says "
                    "SERVING once every core has built its engine. Prometheus /metrics on "
                    "telemetry.prometheus_listen (when set): garrison_replicas{model,state} and "
                    "garrison_replica_restarts_total{model}, as the controller sees its cores. SIGTERM stops "
                    "supervising and leaves the cores serving, unless --stop-engines.")
    parser.add_argument("--config", type=Path, required=True, help="YAML file (the same as the gateways')")
    parser.add_argument("--stop-engines", action="store_true", help="on SIGTERM, stop the engine cores too")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = serve_config.load(args.config)
    if config.ray_address is None:
        raise ConfigError.listing([Problem("ray_address", "the controller runs the engines of a Ray cluster: set "
                                                          "ray_address (garrison serve runs everything on one "
                                                          "machine)")], str(args.config))
    return asyncio.run(_control(config, args.stop_engines))


async def _control(config: serve_config.ServeConfig, stop_engines: bool) -> int:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from garrison.serving.cluster_watch import ray_answers, until_stopped, watch_cluster
    from garrison.serving.controller import Controller
    from garrison.serving.preflight import port_problem
    from garrison.telemetry import Telemetry
    from garrison.tenancy.shared_limits import limits_actor
    from garrison_workers.worker_group import ensure_ray

    ports = [("controller.health_listen", config.controller.health_listen),
             ("telemetry.prometheus_listen", config.telemetry.prometheus_listen)]
    busy = [Problem(place, problem) for place, address in ports if address and (problem := port_problem(address))]
    if busy:  # before Ray: a port another process holds is found in a second, not after the engines started
        raise ConfigError.listing(busy)
    ensure_ray(config.ray_address)
    probes = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, probes)
    if probes.add_insecure_port(config.controller.health_listen) == 0:
        raise ConfigError.listing([Problem("controller.health_listen", f"cannot listen on "
                                                                      f"{config.controller.health_listen}")])
    await probes.start()
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    controller = Controller(config, config.ray_namespace, detached=True)
    telemetry = Telemetry(config.telemetry)  # the gateways export the requests; the controller, its replicas
    telemetry.observe_load(controller.replica_rows)
    telemetry.observe_restarts(controller.restart_rows)
    limits_actor(config.ray_namespace)  # the cluster's tenant limits, ready before the first gateway asks
    print(f"garrison: starting the engines of {', '.join(m.name for m in config.models)} on {config.ray_address}",
          file=sys.stderr, flush=True)
    await asyncio.to_thread(controller.start)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"garrison: engines up; health on {config.controller.health_listen}", file=sys.stderr, flush=True)
    lost = await until_stopped(watch_cluster(ray_answers, config.cluster_lost_seconds))
    if lost is None:
        await asyncio.to_thread(controller.stop, stop_engines)
    else:  # its calls would wait for ever: the engines went with the cluster
        print(f"garrison: {lost}; exiting", file=sys.stderr, flush=True)
    await probes.stop(1.0)
    telemetry.shutdown()
    return 0 if lost is None else 1
