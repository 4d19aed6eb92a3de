"""The OTLP switch: traces and metrics reach an OpenTelemetry collector over OTLP/gRPC.

The collector here is a real gRPC server speaking the OTLP collector services (opentelemetry-proto's
own service definitions), recording what it receives."""

from __future__ import annotations

from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from garrison.serving.config import TelemetryConfig
from garrison.telemetry import Telemetry


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []
        self.metric_names: set[str] = set()

    def Export(self, request, context):  # noqa: N802 (both services name their one RPC Export)
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            self.spans += [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
            return trace_service_pb2.ExportTraceServiceResponse()
        self.metric_names |= {m.name for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        return metrics_service_pb2.ExportMetricsServiceResponse()


def test_traces_and_metrics_are_exported_over_otlp() -> None:
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        telemetry = Telemetry(TelemetryConfig(otlp_endpoint=f"http://127.0.0.1:{port}", service_name="garrison-test"))
        with telemetry.tracer.start_as_current_span("gateway.Generate"):
            telemetry.tracer.start_span("router.queue").end()
        telemetry.ttft.record(0.25, {"tenant": "a", "model": "m"})
        telemetry.rejections.add(1, {"tenant": "a", "model": "m", "limit": "tokens_per_minute"})
        telemetry.shutdown()  # flushes both exporters
    finally:
        server.stop(0)
    assert sorted(span.name for span in collector.spans) == ["gateway.Generate", "router.queue"]
    assert len({span.trace_id for span in collector.spans}) == 1
    assert {"garrison.time_to_first_token", "garrison.rejections"} <= collector.metric_names
