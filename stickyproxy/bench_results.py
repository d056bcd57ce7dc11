"""What the bench reports per option, counted from what the simulated users saw.

A session drifts when its requests reach an instance that does not hold its session
store: with in-memory sessions every instance is a store of its own (and a restarted
instance a new one), while instances sharing Redis are one store. Being served by
several instances of one store (round robin in front of Redis) is not drift; such
sessions are counted apart, as spread. When an instance is killed, a session's move
away from it is a re-pin, not drift.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from stickyproxy.bench_users import Observations, SessionTrace

#: latency percentiles kept for the report's chart
PERCENTILES = (10, 25, 50, 75, 90, 95, 99, 99.9, 100)


@dataclass(frozen=True, slots=True)
class Kill:
    """The instance the bench killed mid-run, and when (monotonic seconds)."""

    instance: str
    at: float
    #: when the launcher was let restart it again
    resumed: float


@dataclass(frozen=True, slots=True)
class OptionResult:
    """The figures of one option's run; the JSON report holds one per option."""

    option: str
    profile: str
    instances: int
    users: int
    duration_s: float
    sessions: int
    #: sessions whose requests reached an instance that does not hold their store
    drift_sessions: int
    #: sessions served by more than one instance, drifting or not
    spread_sessions: int
    #: 401 answers to requests of a session whose login succeeded
    unauthorized_after_login: int
    #: distinct uploaded files a later listing (or delete / restore) did not find
    ghost_files: int
    requests: int
    #: failures other than the above: 5xx, other statuses, transport errors
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    #: requests of the busiest instance divided by the mean per instance
    max_over_mean: float
    per_instance: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    #: with --kill-one: which instance, errors from the kill on, sessions moved away
    killed: str | None = None
    failover_errors: int | None = None
    repinned_sessions: int | None = None
    #: with --kill-one: answers below 400 that sessions got after the kill
    served_after_kill: int | None = None
    #: what the proxy logged about its upstreams (failures, state changes), counted
    proxy_events: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict."""
        return asdict(self)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Return the q-th percentile (nearest rank) of ascending values; 0 if none."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def _store_keys(
    trace: SessionTrace, stores: Mapping[str, str], kill: Kill | None
) -> list[tuple[float, str, str]]:
    """Return (time, instance, store) per answer; a restarted memory store is new."""
    keys = []
    for at, instance, _ in trace.answers:
        store = stores.get(instance, instance)
        # answers between the kill and the restart were on their way before the kill
        restarted = kill is not None and instance == kill.instance and at > kill.resumed
        if restarted and store == instance:
            store = f"{instance} (restarted)"
        keys.append((at, instance, store))
    return keys


def _classify(
    trace: SessionTrace, stores: Mapping[str, str], kill: Kill | None
) -> tuple[bool, bool, bool]:
    """Return whether a session drifted, was spread, and was re-pinned by the kill.

    A session is re-pinned when the killed instance served it and, after the kill,
    another instance did.
    """
    keys = _store_keys(trace, stores, kill)
    drifted = repinned = False
    for (before_at, before, old), (at, after, new) in pairwise(keys):
        if before == after:
            continue
        if (
            kill is not None
            and before == kill.instance
            and before_at <= kill.resumed
            and at > kill.at
        ):
            repinned = True
        elif old != new:
            drifted = True
    spread = len({instance for _, instance, _ in keys}) > 1
    return drifted, spread, repinned


def summarise(
    option: str,
    profile: str,
    users: int,
    duration: float,
    instances: Sequence[str],
    stores: Mapping[str, str],
    obs: Observations,
    elapsed: float,
    kill: Kill | None = None,
    proxy_events: Mapping[str, int] | None = None,
) -> OptionResult:
    """Count one option's figures from its observations."""
    drift = spread = repinned = 0
    for trace in obs.sessions:
        drifted, spread_out, moved = _classify(trace, stores, kill)
        drift += drifted
        spread += spread_out
        repinned += moved

    ordered = sorted(obs.latencies_ms)
    counts = {instance: obs.per_instance.get(instance, 0) for instance in instances}
    for instance, count in obs.per_instance.items():
        counts.setdefault(instance, count)
    total = sum(counts.values())
    mean = total / len(counts) if counts else 0.0
    skew = max(counts.values()) / mean if mean else 0.0

    failover = served = None
    if kill is not None:
        failover = sum(1 for at in obs.error_times if at >= kill.at)
        served = sum(
            1
            for trace in obs.sessions
            for at, _, status in trace.answers
            if at > kill.at and status < 400
        )
    return OptionResult(
        option=option,
        profile=profile,
        instances=len(instances),
        users=users,
        duration_s=round(elapsed, 2),
        sessions=len(obs.sessions),
        drift_sessions=drift,
        spread_sessions=spread,
        unauthorized_after_login=obs.unauthorized,
        ghost_files=len(obs.ghosts),
        requests=obs.requests,
        errors=obs.errors,
        rps=round(obs.requests / elapsed, 1) if elapsed > 0 else 0.0,
        p50_ms=round(percentile(ordered, 50), 2),
        p99_ms=round(percentile(ordered, 99), 2),
        max_over_mean=round(skew, 3),
        per_instance=counts,
        latency_ms={f"p{q:g}": round(percentile(ordered, q), 2) for q in PERCENTILES},
        error_kinds=dict(obs.error_kinds.most_common()),
        killed=kill.instance if kill is not None else None,
        failover_errors=failover,
        repinned_sessions=repinned if kill is not None else None,
        served_after_kill=served,
        proxy_events=dict(proxy_events or {}),
    )
