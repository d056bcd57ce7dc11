"""Prometheus metrics: every family declared here, on a registry the process owns.

Two kinds of family live here. Event families (requests, selections, drift, probes)
are updated by the data plane through ``MetricsObserver``, with label children cached
so that a request costs a few dictionary lookups. With several workers,
prometheus-client keeps them in memory-mapped files that the scrape adds up. State
families (upstream state, requests in flight, pinned sessions, Redis) are read at
scrape time from a snapshot of each worker's pools, so they cost nothing per request.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypedDict

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector

if TYPE_CHECKING:
    from stickyproxy.config import GroupConfig
    from stickyproxy.exchange import Exchange
    from stickyproxy.forwarding import Group, ProxyState
    from stickyproxy.upstreams import Selection, Upstream

NAMESPACE = "stickyproxy"

#: the words ``Upstream.state`` uses, worst last
STATES = ("up", "backup", "unhealthy", "draining", "down")

_RANK = {name: position for position, name in enumerate(STATES)}

#: policies that promise to keep a client on one upstream
STICKY_POLICIES = frozenset({"cookie", "learn", "ip_hash", "hash"})

#: re-pin causes that mean the client's affinity cookie itself was bad
COOKIE_CAUSES = frozenset(
    {"invalid", "expired", "unknown_upstream", "duplicated", "oversized", "empty"}
)

#: where, inside the supervisor's control directory, workers keep their metric files
METRICS_SUBDIR = "metrics"

#: sessions the drift detector remembers per worker (least recently seen leave first)
DRIFT_MEMORY = 100_000

# methods keep their name as a label; anything else a client invents is "other"
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
_CODE_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")

# proxies answer in microseconds to minutes; the default buckets stop at 10s
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class UpstreamSnapshot(TypedDict):
    """One upstream as one worker sees it."""

    name: str
    id: str
    state: str
    admin_state: str
    healthy: bool
    backup: bool
    weight: int
    active: int
    requests: int
    #: sessions pinned to it, when the policy keeps count
    pinned: int | None


class RedisSnapshot(TypedDict):
    """A policy's Redis client as one worker sees it."""

    connected: bool
    errors: int
    #: seconds the last command took, when the policy measures it
    latency: float | None


class GroupSnapshot(TypedDict):
    """One group as one worker sees it."""

    name: str
    policy: str
    sticky: bool
    drift: int
    redis: RedisSnapshot | None
    upstreams: list[UpstreamSnapshot]


class WorkerSnapshot(TypedDict):
    """What one worker reports at scrape time and to the API."""

    index: int
    pid: int
    requests: int
    groups: list[GroupSnapshot]


class UpstreamView(UpstreamSnapshot):
    """One upstream over every worker: counts added up, states tallied."""

    #: how many workers see the upstream in each state
    states: dict[str, int]


class GroupView(TypedDict):
    """One group over every worker."""

    name: str
    policy: str
    sticky: bool
    drift: int
    redis: RedisSnapshot | None
    upstreams: list[UpstreamView]


class Metrics:
    """The metric families of one process and the observer that feeds them."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        #: PROMETHEUS_MULTIPROC_DIR of the process family, or None for one process
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def histogram(name: str, doc: str, labels: Sequence[str]) -> Histogram:
            return Histogram(
                name,
                doc,
                labels,
                namespace=NAMESPACE,
                registry=registry,
                buckets=_LATENCY_BUCKETS,
            )

        # traffic
        self.requests = counter(
            "requests",
            "Requests answered, by group, upstream, method and status class.",
            ["group", "upstream", "method", "code"],
        )
        self.duration = histogram(
            "request_duration_seconds",
            "Time from the request head to the end of the response.",
            ["group"],
        )
        self.upstream_response = histogram(
            "upstream_response_seconds",
            "Time from the request head to the upstream's response head.",
            ["group", "upstream"],
        )
        self.bytes_in = counter(
            "request_body_bytes",
            "Request body bytes received from clients.",
            ["group"],
        )
        self.bytes_out = counter(
            "response_body_bytes",
            "Response body bytes sent to clients.",
            ["group"],
        )
        self.client_connections = Gauge(
            "client_connections",
            "Open client connections.",
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livesum",
        )

        # upstream health
        self.health_checks = counter(
            "health_checks",
            "Active health probes, by result.",
            ["group", "upstream", "result"],
        )
        self.health_transitions = counter(
            "health_transitions",
            "Upstreams turning healthy or unhealthy by their active checks.",
            ["group", "upstream", "to"],
        )
        self.upstream_failures = counter(
            "upstream_failures",
            "Passive failures of upstreams, by kind.",
            ["group", "upstream", "kind"],
        )
        self.retries = counter(
            "retries",
            "Requests retried on another upstream.",
            ["group"],
        )

        # selection and affinity
        self.selections = counter(
            "selections",
            "Upstream choices, by policy and reason (new, pinned, repinned, ...).",
            ["group", "policy", "reason"],
        )
        self.repins = counter(
            "repins",
            "Clients moved off their pinned upstream, by cause.",
            ["group", "cause"],
        )
        self.invalid_cookies = counter(
            "invalid_affinity_cookies",
            "Affinity cookies that could not be honoured, by kind.",
            ["group", "kind"],
        )
        self.drift = counter(
            "session_drift",
            "Application sessions served by a different upstream than last time, "
            "unexplained by a re-pin, while the group's policy is sticky.",
            ["group"],
        )

        # configuration
        self.reloads = counter(
            "config_reloads",
            "Configuration reloads, by result.",
            ["result"],
        )
        self.last_reload_success = Gauge(
            "config_last_reload_success",
            "1 if the last reload of every worker succeeded (or none was tried).",
            namespace=NAMESPACE,
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.last_reload_success.set(1)

        self._observer = MetricsObserver(self)
        self._probe_children: dict[tuple[str, str, bool], Counter] = {}

    def observer(self) -> MetricsObserver:
        """Return the observer the data plane reports to."""
        return self._observer

    def probe_listener(self, upstream: Upstream, ok: bool, changed: bool) -> None:
        """Count one active health probe, and the transition it caused."""
        key = (upstream.group, upstream.name, ok)
        child = self._probe_children.get(key)
        if child is None:
            result = "success" if ok else "failure"
            child = self.health_checks.labels(upstream.group, upstream.name, result)
            self._probe_children[key] = child
        child.inc()
        if changed:
            to = "healthy" if upstream.healthy else "unhealthy"
            self.health_transitions.labels(upstream.group, upstream.name, to).inc()

    def reloaded(self, ok: bool) -> None:
        """Count one reload attempt and remember whether it succeeded."""
        self.reloads.labels("success" if ok else "failure").inc()
        self.last_reload_success.set(1 if ok else 0)
        # label children of the old groups are found again by name when needed
        self._observer.forget_groups()

    def flush(self) -> None:
        """Apply the observer's held increments to the families."""
        self._observer.batch.flush()

    async def flush_every(self, seconds: float) -> None:
        """Flush periodically, until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            self.flush()

    def snapshot(self, state: ProxyState, index: int = 0) -> WorkerSnapshot:
        """Return what this worker's pools look like right now."""
        self.flush()
        observer = self._observer
        groups: list[GroupSnapshot] = []
        for group in state.groups.values():
            groups.append(_group_snapshot(group, observer.drift_counts))
        return {
            "index": index,
            "pid": os.getpid(),
            "requests": observer.finished,
            "groups": groups,
        }

    def exposition(self, snapshots: Sequence[WorkerSnapshot]) -> bytes:
        """Return the text exposition of every family, for the whole process family."""
        self.flush()
        registry = CollectorRegistry(auto_describe=False)
        if self.multiprocess_dir is not None:
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        else:
            registry.register(_Forward(self.registry))
        registry.register(SnapshotCollector(snapshots))
        return generate_latest(registry)


def _group_snapshot(group: Group, drift: dict[str, int]) -> GroupSnapshot:
    config = group.config
    policy = group.policy
    counts: dict[str, int] | None = None
    pinned_counts = getattr(policy, "pinned_counts", None)
    if callable(pinned_counts):
        try:
            counts = pinned_counts()
        except NotImplementedError:
            counts = None

    upstreams: list[UpstreamSnapshot] = []
    for upstream in group.pool:
        pinned = None
        if counts is not None:
            # policies may key their counts by the opaque id or by host:port
            pinned = counts.get(upstream.id, counts.get(upstream.name, 0))
        upstreams.append(
            {
                "name": upstream.name,
                "id": upstream.id,
                "state": upstream.state,
                "admin_state": upstream.admin_state,
                "healthy": upstream.healthy,
                "backup": upstream.backup,
                "weight": upstream.weight,
                "active": upstream.active,
                "requests": upstream.requests,
                "pinned": pinned,
            }
        )
    return {
        "name": config.name,
        "policy": config.policy,
        "sticky": config.policy in STICKY_POLICIES,
        "drift": drift.get(config.name, 0),
        "redis": _redis_snapshot(policy) if config.learn.redis_url else None,
        "upstreams": upstreams,
    }


def _redis_snapshot(policy: object) -> RedisSnapshot | None:
    """Read the Redis attributes of a policy configured with a Redis URL."""
    connected = getattr(policy, "redis_connected", None)
    if connected is None:
        return None
    latency = getattr(policy, "redis_latency", None)
    return {
        "connected": bool(connected),
        "errors": int(getattr(policy, "redis_errors", 0) or 0),
        "latency": float(latency) if latency is not None else None,
    }


def merge(snapshots: Sequence[WorkerSnapshot]) -> list[GroupView]:
    """Combine the workers' snapshots: counts add up, the worst state shows."""
    groups: dict[str, GroupView] = {}
    upstreams: dict[tuple[str, str], UpstreamView] = {}
    for snapshot in snapshots:
        for group in snapshot["groups"]:
            view = groups.get(group["name"])
            if view is None:
                view = groups[group["name"]] = {
                    "name": group["name"],
                    "policy": group["policy"],
                    "sticky": group["sticky"],
                    "drift": 0,
                    "redis": None,
                    "upstreams": [],
                }
            view["drift"] += group["drift"]
            view["redis"] = _merge_redis(view["redis"], group["redis"])
            for upstream in group["upstreams"]:
                key = (group["name"], upstream["id"])
                merged = upstreams.get(key)
                if merged is None:
                    merged = upstreams[key] = {**upstream, "states": {}}
                    view["upstreams"].append(merged)
                else:
                    _add_upstream(merged, upstream)
                states = merged["states"]
                states[upstream["state"]] = states.get(upstream["state"], 0) + 1
    return list(groups.values())


def _add_upstream(merged: UpstreamView, upstream: UpstreamSnapshot) -> None:
    merged["active"] += upstream["active"]
    merged["requests"] += upstream["requests"]
    merged["healthy"] = merged["healthy"] and upstream["healthy"]
    if upstream["pinned"] is not None:
        merged["pinned"] = (merged["pinned"] or 0) + upstream["pinned"]
    if _worse(upstream["state"], merged["state"]):
        merged["state"] = upstream["state"]
        merged["admin_state"] = upstream["admin_state"]


def _worse(state: str, than: str) -> bool:
    return _RANK.get(state, 0) > _RANK.get(than, 0)


def _merge_redis(
    merged: RedisSnapshot | None, redis: RedisSnapshot | None
) -> RedisSnapshot | None:
    if redis is None:
        return merged
    if merged is None:
        return {**redis}
    latencies = [x for x in (merged["latency"], redis["latency"]) if x is not None]
    return {
        "connected": merged["connected"] and redis["connected"],
        "errors": merged["errors"] + redis["errors"],
        "latency": max(latencies) if latencies else None,
    }


class _Forward:
    """Yields another registry's families; lets one scrape add scrape-time ones."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


class SnapshotCollector:
    """Builds the state families from the workers' snapshots at scrape time."""

    def __init__(self, snapshots: Sequence[WorkerSnapshot]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        """Yield the state families; one sample per group or upstream."""
        workers = len(self.snapshots)
        groups = merge(self.snapshots)
        yield GaugeMetricFamily(
            f"{NAMESPACE}_workers", "Workers that answered this scrape.", workers
        )

        state = GaugeMetricFamily(
            f"{NAMESPACE}_upstream_state",
            "Share of workers that see the upstream in each state "
            "(up, backup, unhealthy, draining, down); 1 when they agree.",
            labels=["group", "upstream", "state"],
        )
        weight = GaugeMetricFamily(
            f"{NAMESPACE}_upstream_weight",
            "Current weight of each upstream.",
            labels=["group", "upstream"],
        )
        in_flight = GaugeMetricFamily(
            f"{NAMESPACE}_requests_in_flight",
            "Requests being forwarded to each upstream right now.",
            labels=["group", "upstream"],
        )
        pinned = GaugeMetricFamily(
            f"{NAMESPACE}_pinned_sessions",
            "Sessions pinned to each upstream, for policies that keep count.",
            labels=["group", "upstream"],
        )
        redis_connected = GaugeMetricFamily(
            f"{NAMESPACE}_redis_connected",
            "1 if every worker's Redis client of the group is connected.",
            labels=["group"],
        )
        redis_errors = CounterMetricFamily(
            f"{NAMESPACE}_redis_errors",
            "Redis commands that failed, over the live workers.",
            labels=["group"],
        )
        redis_latency = GaugeMetricFamily(
            f"{NAMESPACE}_redis_latency_seconds",
            "Time the last Redis command took, slowest worker.",
            labels=["group"],
        )

        for group in groups:
            name = group["name"]
            for upstream in group["upstreams"]:
                labels = [name, upstream["name"]]
                seen = sum(upstream["states"].values()) or 1
                for word in STATES:
                    share = upstream["states"].get(word, 0) / seen
                    state.add_metric([*labels, word], share)
                weight.add_metric(labels, upstream["weight"])
                in_flight.add_metric(labels, upstream["active"])
                if upstream["pinned"] is not None:
                    pinned.add_metric(labels, upstream["pinned"])
            redis = group["redis"]
            if redis is not None:
                redis_connected.add_metric([name], 1 if redis["connected"] else 0)
                redis_errors.add_metric([name], redis["errors"])
                if redis["latency"] is not None:
                    redis_latency.add_metric([name], redis["latency"])
        yield from (state, weight, in_flight, pinned)
        yield from (redis_connected, redis_errors, redis_latency)


class _GroupChildren:
    """One group's label children and drift settings, looked up once."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "config",
        "duration",
        "invalid",
        "name",
        "repins",
        "requests",
        "responses",
        "selections",
        "session_cookies",
    )

    def __init__(self, metrics: Metrics, config: GroupConfig | None) -> None:
        self.config = config
        name = self.name = config.name if config is not None else ""
        self.duration = metrics.duration.labels(name)
        self.bytes_in = metrics.bytes_in.labels(name)
        self.bytes_out = metrics.bytes_out.labels(name)
        #: the application's session cookies, when the policy is sticky
        self.session_cookies: tuple[str, ...] = ()
        if config is not None and config.policy in STICKY_POLICIES:
            self.session_cookies = config.learn.cookies
        self.requests: dict[tuple[str, str, str], Counter] = {}
        self.responses: dict[str, Histogram] = {}
        self.selections: dict[str, Counter] = {}
        self.repins: dict[str, Counter] = {}
        self.invalid: dict[str, Counter] = {}


class Batch:
    """Per-request increments held in dicts and applied to prometheus in bulk.

    prometheus-client takes a lock and walks the buckets on every update, which at
    tens of thousands of requests a second is a tenth of a worker's time. Here an
    update is one dictionary operation; ``flush`` applies the sums before every
    scrape and snapshot, and once a second so that a killed worker loses little.
    """

    #: histogram bounds as prometheus-client keeps them, +Inf included
    BOUNDS = (*_LATENCY_BUCKETS, float("inf"))

    def __init__(self) -> None:
        self.counts: dict[Counter, float] = {}
        self.samples: dict[Histogram, list[float]] = {}

    def inc(self, child: Counter, amount: float = 1) -> None:
        """Add to a counter child, later."""
        counts = self.counts
        counts[child] = counts.get(child, 0) + amount

    def observe(self, child: Histogram, value: float) -> None:
        """Record a histogram observation, later (as [sum, count per bucket...])."""
        sample = self.samples.get(child)
        if sample is None:
            sample = self.samples[child] = [0.0] * (len(self.BOUNDS) + 1)
        sample[0] += value
        sample[1 + bisect_left(self.BOUNDS, value)] += 1

    def flush(self) -> None:
        """Apply everything held so far."""
        counts, self.counts = self.counts, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        samples, self.samples = self.samples, {}
        for histogram, sample in samples.items():
            # the same updates observe() makes, summed: the sum and each bucket
            histogram._sum.inc(sample[0])
            for bucket, count in zip(histogram._buckets, sample[1:], strict=True):
                if count:
                    bucket.inc(count)


class MetricsObserver:
    """Turns the data plane's reports into metric updates."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.batch = Batch()
        self._connections = metrics.client_connections
        self._groups: dict[str, _GroupChildren] = {}
        self._unrouted = _GroupChildren(metrics, None)
        self._failures: dict[tuple[str, str, str], Counter] = {}
        self._retries: dict[str, Counter] = {}
        #: hash of (group, cookie, session) -> id of the upstream that served it last
        self._sessions: OrderedDict[int, str] = OrderedDict()
        self.session_memory = DRIFT_MEMORY
        #: drift per group, as this worker counted it (the status page shows it)
        self.drift_counts: dict[str, int] = {}
        #: requests this worker answered since it started
        self.finished = 0

    def forget_groups(self) -> None:
        """Drop cached children; the next request of each group looks them up anew."""
        self._groups.clear()

    def client_opened(self) -> None:
        """Count a client connection in."""
        self._connections.inc()

    def client_closed(self) -> None:
        """Count a client connection out."""
        self._connections.dec()

    def _children(self, group: Group | None) -> _GroupChildren:
        if group is None:
            return self._unrouted
        config = group.config
        children = self._groups.get(config.name)
        if children is None or children.config is not config:
            children = self._groups[config.name] = _GroupChildren(self.metrics, config)
        return children

    def request_finished(self, exchange: Exchange) -> None:
        """Count an answered request: traffic, timing, selection and drift."""
        self.finished += 1
        group = self._children(exchange.group)
        selection = exchange.selection
        upstream = selection.upstream.name if selection is not None else ""
        status = exchange.status
        code = _CODE_CLASSES[status // 100] if 100 <= status < 600 else "none"
        method = exchange.method if exchange.method in _METHODS else "other"

        key = (upstream, method, code)
        child = group.requests.get(key)
        if child is None:
            child = group.requests[key] = self.metrics.requests.labels(group.name, *key)
        batch = self.batch
        batch.inc(child)
        batch.observe(group.duration, exchange.duration)
        if exchange.body_received:
            batch.inc(group.bytes_in, exchange.body_received)
        if exchange.bytes_out:
            batch.inc(group.bytes_out, exchange.bytes_out)
        if selection is None:
            return

        # the upstream answered (not the proxy on its behalf)
        answered_at = exchange.response_time
        if answered_at:
            response = group.responses.get(upstream)
            if response is None:
                response = group.responses[upstream] = (
                    self.metrics.upstream_response.labels(group.name, upstream)
                )
            batch.observe(response, answered_at - exchange.start_time)

        self._count_selection(group, selection.reason, selection.cause)
        if group.session_cookies and answered_at and exchange.view is not None:
            for cookie in group.session_cookies:
                value = exchange.view.cookie(cookie)
                if value:
                    self._follow_session(
                        group, hash((group.name, cookie, value)), selection
                    )
                    break

    def _count_selection(self, group: _GroupChildren, reason: str, cause: str) -> None:
        metrics = self.metrics
        child = group.selections.get(reason)
        if child is None:
            policy = group.config.policy if group.config is not None else ""
            child = group.selections[reason] = metrics.selections.labels(
                group.name, policy, reason
            )
        self.batch.inc(child)
        if not cause:
            return
        if reason == "repinned":
            repin = group.repins.get(cause)
            if repin is None:
                repin = group.repins[cause] = metrics.repins.labels(group.name, cause)
            repin.inc()
        if cause in COOKIE_CAUSES:
            invalid = group.invalid.get(cause)
            if invalid is None:
                invalid = group.invalid[cause] = metrics.invalid_cookies.labels(
                    group.name, cause
                )
            invalid.inc()

    def _follow_session(
        self, group: _GroupChildren, key: int, selection: Selection
    ) -> None:
        sessions = self._sessions
        upstream_id = selection.upstream.id
        previous = sessions.get(key)
        if previous is None:
            sessions[key] = upstream_id
            if len(sessions) > self.session_memory:
                sessions.popitem(last=False)
            return
        sessions.move_to_end(key)
        if previous == upstream_id:
            return
        sessions[key] = upstream_id
        # a re-pin says why the session moved; anything else broke stickiness
        if selection.reason != "repinned":
            self.drift_counts[group.name] = self.drift_counts.get(group.name, 0) + 1
            self.metrics.drift.labels(group.name).inc()

    def upstream_failed(self, upstream: Upstream, kind: str, now_resting: bool) -> None:
        """Count a passive failure (connect, reset, timeout)."""
        key = (upstream.group, upstream.name, kind)
        child = self._failures.get(key)
        if child is None:
            child = self._failures[key] = self.metrics.upstream_failures.labels(*key)
        child.inc()

    def retried(self, group: str) -> None:
        """Count a request sent to another upstream after a failure."""
        child = self._retries.get(group)
        if child is None:
            child = self._retries[group] = self.metrics.retries.labels(group)
        child.inc()
