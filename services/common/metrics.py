"""Prometheus metrics: one registry per process, served over HTTP.

Services receive a :class:`Metrics` through their constructors and add their
own instruments to ``metrics.registry``; nothing here is a module global.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        self.rpc_requests = Counter(
            "coinstore_rpc_requests",
            "gRPC calls handled, by method and status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.rpc_latency = Histogram(
            "coinstore_rpc_duration_seconds",
            "gRPC handling time, by method",
            ["service", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rpc_errors = Counter(
            "coinstore_rpc_errors",
            "gRPC calls that ended in an error, by method and ErrorInfo reason",
            ["service", "method", "reason"],
            registry=self.registry,
        )

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, doc, list(labels), buckets=_LATENCY_BUCKETS, registry=self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP server in a daemon thread; returns the bound port."""
        if port == 0:
            return 0
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
