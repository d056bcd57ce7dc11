"""Prometheus metrics: every family declared here, on a registry the process owns."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from stickyproxy.forwarding import Exchange
    from stickyproxy.upstreams import Upstream

NAMESPACE = "stickyproxy"


class Metrics:
    """The metric families of one process and the observer that feeds them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "requests",
            "Requests answered, by group, upstream, method and status class.",
            ["group", "upstream", "method", "code"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.duration = Histogram(
            "request_duration_seconds",
            "Time from the request head to the end of the response.",
            ["group"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.client_connections = Gauge(
            "client_connections",
            "Open client connections.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.upstream_failures = Counter(
            "upstream_failures",
            "Passive failures of upstreams, by kind.",
            ["group", "upstream", "kind"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.retries = Counter(
            "retries",
            "Requests retried on another upstream.",
            ["group"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.reloads = Counter(
            "config_reloads",
            "Configuration reloads, by result.",
            ["result"],
            namespace=NAMESPACE,
            registry=registry,
        )

    def observer(self) -> MetricsObserver:
        """Return the observer the data plane reports to."""
        return MetricsObserver(self)

    def probe_listener(self, upstream: Upstream, ok: bool, changed: bool) -> None:
        """Count one active health probe."""

    def reloaded(self, ok: bool) -> None:
        """Count one reload attempt."""
        self.reloads.labels("success" if ok else "failure").inc()

    def exposition(self) -> bytes:
        """Return the text exposition of every family."""
        return generate_latest(self.registry)


class MetricsObserver:
    """Turns the data plane's reports into metric updates."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._connections = metrics.client_connections

    def client_opened(self) -> None:
        self._connections.inc()

    def client_closed(self) -> None:
        self._connections.dec()

    def request_finished(self, exchange: Exchange) -> None:
        group = exchange.group.config.name if exchange.group is not None else ""
        selection = exchange.selection
        upstream = selection.upstream.name if selection is not None else ""
        code = f"{exchange.status // 100}xx" if exchange.status else "none"
        self.metrics.requests.labels(group, upstream, exchange.method, code).inc()
        self.metrics.duration.labels(group).observe(exchange.duration)

    def upstream_failed(self, upstream: Upstream, kind: str, now_resting: bool) -> None:
        self.metrics.upstream_failures.labels(upstream.group, upstream.name, kind).inc()

    def retried(self, group: str) -> None:
        self.metrics.retries.labels(group).inc()
