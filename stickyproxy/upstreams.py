"""Upstreams and the pools that hold them: each upstream knows its own state.

An upstream is *available* when it may take a new request: not administratively down
or draining, healthy by its active checks, outside a passive-failure rest and below its
connection limit. State changes return whether anything changed, so that callers log
and count transitions rather than every probe or failure.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

from stickyproxy.config import GroupConfig, ServerConfig
from stickyproxy.log import UPSTREAM_LOGGER

log = logging.getLogger(UPSTREAM_LOGGER)

AdminState = Literal["up", "drain", "down"]


class Upstream:
    """One upstream server: its address, weight and health, and its live counters."""

    __slots__ = (
        "_fail_count",
        "_fail_window_start",
        "_resting_until",
        "active",
        "admin_state",
        "authority",
        "backup",
        "config",
        "group",
        "healthy",
        "host",
        "id",
        "index",
        "max_conns",
        "max_fails",
        "port",
        "requests",
        "weight",
    )

    def __init__(self, config: ServerConfig, group: str, index: int) -> None:
        self.config = config
        self.group = group
        #: position in the group's server list, as nginx identifies servers
        self.index = index
        #: stable opaque id used in affinity cookies and stores; reveals no address
        self.id = hashlib.sha256(f"{group}\0{config.url}".encode()).hexdigest()[:12]
        self.host = config.host
        self.port = config.port
        self.authority = config.authority
        self.weight = config.weight
        self.backup = config.backup
        self.max_conns = config.max_conns
        #: failures within fail_timeout that rest the upstream; 0 never rests it
        self.max_fails = config.max_fails
        self.admin_state: AdminState = "down" if config.down else "up"
        self.healthy = True
        self.active = 0
        self.requests = 0
        self._fail_count = 0
        self._fail_window_start = 0.0
        self._resting_until = 0.0

    def __repr__(self) -> str:
        return f"<Upstream {self.group}/{self.authority} {self.state}>"

    @property
    def name(self) -> str:
        """Return ``host:port``, the name logs and metrics use."""
        return self.authority

    @property
    def resting(self) -> bool:
        """Return whether passive failures keep the upstream out right now."""
        return self._resting_until > 0.0 and time.monotonic() < self._resting_until

    @property
    def full(self) -> bool:
        return 0 < self.max_conns <= self.active

    @property
    def available(self) -> bool:
        """Return whether the upstream may take a new, unpinned request."""
        return (
            self.admin_state == "up"
            and self.healthy
            and not self.full
            and not (self._resting_until and self.resting)
        )

    @property
    def serves_pinned(self) -> bool:
        """Return whether the upstream may take a request already pinned to it."""
        return (
            self.admin_state != "down"
            and self.healthy
            and not self.full
            and not (self._resting_until and self.resting)
        )

    @property
    def state(self) -> str:
        """Return one word for status pages and metrics."""
        if self.admin_state != "up":
            return "draining" if self.admin_state == "drain" else "down"
        if not self.healthy or self.resting:
            return "unhealthy"
        return "backup" if self.backup else "up"

    def set_admin_state(self, state: AdminState) -> bool:
        """Set up, drain or down; return whether it changed."""
        if state == self.admin_state:
            return False
        log.info(
            "upstream %s/%s %s -> %s", self.group, self.name, self.admin_state, state
        )
        self.admin_state = state
        return True

    def set_weight(self, weight: int) -> bool:
        """Set the weight; return whether it changed."""
        if weight < 1:
            raise ValueError(f"weight must be >= 1, got {weight}")
        changed = weight != self.weight
        self.weight = weight
        return changed

    def set_healthy(self, healthy: bool) -> bool:
        """Record an active health check verdict; return whether it changed."""
        if healthy == self.healthy:
            return False
        self.healthy = healthy
        log.info(
            "upstream %s/%s is %s",
            self.group,
            self.name,
            "healthy" if healthy else "unhealthy",
        )
        return True

    def record_failure(self) -> bool:
        """Count a passive failure; return whether the upstream started resting.

        As nginx does: max_fails failures within fail_timeout take the upstream out
        for fail_timeout. max_fails of 0 disables passive accounting.
        """
        max_fails = self.max_fails
        if max_fails == 0:
            return False
        now = time.monotonic()
        if now - self._fail_window_start > self.config.fail_timeout:
            self._fail_window_start = now
            self._fail_count = 0
        self._fail_count += 1
        if self._fail_count < max_fails or self.resting:
            return False
        self._resting_until = now + self.config.fail_timeout
        log.info(
            "upstream %s/%s unavailable for %.0fs after %d failures",
            self.group,
            self.name,
            self.config.fail_timeout,
            self._fail_count,
        )
        return True

    def record_success(self) -> None:
        """Forget passive failures after a good response."""
        if self._fail_count:
            self._fail_count = 0
            self._resting_until = 0.0


class Selection(NamedTuple):
    """The upstream a policy chose and the word that says why.

    A tuple, because one is made for every request and tuples are the cheapest
    immutable record Python has.
    """

    upstream: Upstream
    #: new, pinned, repinned, hashed, fallback, retry
    reason: str
    #: why a sticky policy could not keep its pin (pin_down, draining, invalid, ...)
    cause: str = ""


class Pool:
    """The upstreams of one group: primaries in order, then backups."""

    def __init__(self, config: GroupConfig) -> None:
        self.config = config
        self.name = config.name
        self.upstreams = tuple(
            Upstream(server, config.name, index)
            for index, server in enumerate(config.servers)
        )
        if len(self.upstreams) == 1:
            # as nginx: resting the only upstream would only turn errors into 503s
            self.upstreams[0].max_fails = 0
        self.primaries = tuple(u for u in self.upstreams if not u.backup)
        self.backups = tuple(u for u in self.upstreams if u.backup)
        self.by_id = {upstream.id: upstream for upstream in self.upstreams}
        #: bumped whenever weights or membership change, so policies rebuild tables
        self.version = 0

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self.upstreams)

    def available(self) -> Sequence[Upstream]:
        """Return the available primaries, or the available backups if none is."""
        primaries = [u for u in self.primaries if u.available]
        if primaries:
            return primaries
        return [u for u in self.backups if u.available]

    def find(self, name: str) -> Upstream | None:
        """Return the upstream with that host:port, url or id."""
        for upstream in self.upstreams:
            if name in (upstream.name, upstream.config.url, upstream.id):
                return upstream
        return None

    def set_weight(self, upstream: Upstream, weight: int) -> bool:
        """Set an upstream's weight and invalidate the policies' tables."""
        changed = upstream.set_weight(weight)
        if changed:
            self.version += 1
        return changed

    def adopt(self, previous: Pool) -> None:
        """Carry live state over from the pool this one replaces on reload."""
        for upstream in self.upstreams:
            old = previous.by_id.get(upstream.id)
            if old is None:
                continue
            upstream.healthy = old.healthy
            upstream.requests = old.requests
            upstream._fail_count = old._fail_count
            upstream._fail_window_start = old._fail_window_start
            upstream._resting_until = old._resting_until
