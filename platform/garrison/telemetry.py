"""Traces and metrics: one OpenTelemetry trace per request, metrics per tenant and model.

Gateways (and `garrison serve`) export the requests' figures and their view of the replicas; `garrison controller`
exports its own view of the replicas (`garrison.replicas` by model and state) and the engine cores it restarted
(`garrison.replica_restarts`).

Providers are objects owned by the server (no global provider is set), so two servers in one
process (the tests) never mix their data. Metrics are scraped by Prometheus from `/metrics` on
`prometheus_listen`, and/or pushed with traces to an OTLP collector (`otlp_endpoint`). The metrics
endpoint binds 127.0.0.1 unless `prometheus_listen` names a host (`0.0.0.0:9464` for every interface):
per-tenant figures are nobody else's business by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry

from garrison.serving.config import TelemetryConfig, parse_address

log = logging.getLogger(__name__)

# Seconds: from a few ms (a token on a GPU) to minutes (a million-token prompt's first token).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600)

LoadCallback = Callable[[], Iterable[tuple[dict[str, str], dict[str, float]]]]


class Telemetry:
    def __init__(self, config: TelemetryConfig, span_exporter: SpanExporter | None = None) -> None:
        resource = Resource.create({"service.name": config.service_name})
        self.tracer_provider = TracerProvider(resource=resource)
        readers: list[MetricReader] = []
        self._http: Any = None
        if config.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=config.otlp_endpoint)))
        if span_exporter is not None:  # tests read spans back from an in-memory exporter
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if config.prometheus_listen:
            readers.append(self._start_prometheus(config.prometheus_listen))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        self.tracer = self.tracer_provider.get_tracer("garrison")
        meter = self.meter_provider.get_meter("garrison")
        self.ttft = meter.create_histogram("garrison.time_to_first_token", unit="s",
                                           description="time from request arrival to its first token",
                                           explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS)
        self.tpot = meter.create_histogram("garrison.time_per_output_token", unit="s",
                                           description="mean gap between a request's output tokens",
                                           explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS)
        self.requests = meter.create_counter("garrison.requests", description="finished requests by status")
        self.tokens = meter.create_counter("garrison.tokens", description="prompt and output tokens")
        self.rejections = meter.create_counter("garrison.rejections",
                                               description="requests refused by a quota, by limit")
        self._meter = meter

    def observe_load(self, callback: LoadCallback) -> None:
        """Gauges read at collection time: each row is (attributes, {gauge name: value})."""
        names = {"queue_depth": "requests waiting for a slot", "in_flight": "requests holding a slot",
                 "kv_cache_usage": "fraction of KV cache blocks in use",
                 "replicas": "a model's replicas by state (serving, restarting, unplaceable, stopped)"}
        for name, description in names.items():
            self._meter.create_observable_gauge(f"garrison.{name}", [_gauge(callback, name)], description=description)

    def observe_restarts(self, callback: LoadCallback) -> None:
        """The controller's counter of engine cores it started again after losing them, read at collection time:
        each row is (attributes, {"replica_restarts": count since the controller started})."""
        self._meter.create_observable_counter(
            "garrison.replica_restarts", [_gauge(callback, "replica_restarts")],
            description="engine cores the controller started again after they were lost")

    def _start_prometheus(self, listen: str) -> MetricReader:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host, port = parse_address(listen)  # checked with the config
        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
        self._http, _ = start_http_server(port, host or "127.0.0.1", registry=registry)
        self.prometheus_port = self._http.server_port
        return reader

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def _gauge(callback: LoadCallback, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(values[name], attributes) for attributes, values in callback() if name in values]

    return observe
