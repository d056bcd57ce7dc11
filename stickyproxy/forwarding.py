"""The data plane's owner: the proxy state a reload swaps, and the live connections.

The data plane itself runs in asyncio protocol callbacks, without a task per request:
``stickyproxy.clients`` parses requests with httptools, and ``stickyproxy.exchange``
chooses an upstream synchronously, takes an idle pooled connection and writes the
request head in the same callback. Only opening a new upstream connection (or waiting
for a pinned one, or a shared-store lookup) runs as a task. Bodies stream in both
directions with transport flow control, so memory stays bounded whatever their size.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from stickyproxy import headers as h
from stickyproxy.clients import ClientConnection
from stickyproxy.config import Config, GroupConfig
from stickyproxy.log import SELECTION_LOGGER, AccessLog
from stickyproxy.selection import Policy
from stickyproxy.upstreams import Pool, Upstream

if TYPE_CHECKING:
    from stickyproxy.connections import ConnectionPool
    from stickyproxy.exchange import Exchange


class Observer(Protocol):
    """What the data plane reports; metrics implement it, tests may too."""

    def client_opened(self) -> None: ...

    def client_closed(self) -> None: ...

    def request_finished(self, exchange: Exchange) -> None: ...

    def upstream_failed(
        self, upstream: Upstream, kind: str, now_resting: bool
    ) -> None: ...

    def retried(self, group: str) -> None: ...


class NullObserver:
    """An observer that records nothing."""

    def client_opened(self) -> None:
        pass

    def client_closed(self) -> None:
        pass

    def request_finished(self, exchange: Exchange) -> None:
        pass

    def upstream_failed(self, upstream: Upstream, kind: str, now_resting: bool) -> None:
        pass

    def retried(self, group: str) -> None:
        pass


@dataclass(slots=True)
class Group:
    """A group at run time: its configuration, its pool and its policy."""

    config: GroupConfig
    pool: Pool
    policy: Policy


class ProxyState:
    """Everything a request needs that a reload replaces as a whole."""

    def __init__(
        self,
        config: Config,
        groups: dict[str, Group],
        access_log: AccessLog | None,
    ) -> None:
        self.config = config
        self.groups = groups
        self.access_log = access_log
        self.trusted = h.TrustedProxies(config.forwarded.trusted_proxies)
        self.routes = [
            (route.host, route.path_prefix, groups[route.group])
            for route in config.routes
        ]
        self.single = (
            self.routes[0][2]
            if len(self.routes) == 1
            and self.routes[0][:2]
            == (
                "",
                "/",
            )
            else None
        )
        limits, timeouts = config.limits, config.timeouts
        self.header_limit = limits.header_bytes
        self.body_limit = limits.body_bytes
        self.client_header_timeout = timeouts.client_header
        self.client_body_timeout = timeouts.client_body
        self.client_send_timeout = timeouts.client_send
        self.keepalive_timeout = timeouts.keepalive_idle
        self.read_timeout = timeouts.upstream_read
        self.tunnel_timeout = timeouts.tunnel_idle
        self.explain = config.explain_headers
        #: a routing decision is logged only when someone reads debug lines
        self.debug = logging.getLogger(SELECTION_LOGGER).isEnabledFor(logging.DEBUG)

    def route(self, host: str, path: str) -> Group | None:
        """Return the group of the first route that matches host and path."""
        if self.single is not None:
            return self.single
        for route_host, prefix, group in self.routes:
            if (not route_host or route_host == host) and path.startswith(prefix):
                return group
        return None


class Proxy:
    """The long-lived owner of client connections and upstream connections."""

    def __init__(
        self,
        state: ProxyState,
        connections: ConnectionPool,
        observer: Observer | None = None,
    ) -> None:
        self.state = state
        self.connections = connections
        self.observer: Observer = observer or NullObserver()
        self.clients: set[ClientConnection] = set()
        self.loop = asyncio.get_running_loop()
        self.accepting = True

    def protocol_factory(self, secure: bool) -> Callable[[], ClientConnection]:
        """Return a factory of client protocols for a listener."""
        return lambda: ClientConnection(self, secure)

    def expire(self) -> None:
        """Time out connections whose deadline has passed; called periodically."""
        now = self.loop.time()
        for client in [c for c in self.clients if c.deadline and c.deadline < now]:
            client.timed_out()
        self.connections.expire(now)

    def close_idle_clients(self) -> None:
        """Close client connections that have no request in progress."""
        for client in list(self.clients):
            if client.active is None and client.parsing is None:
                client.close()

    @property
    def busy(self) -> int:
        """Return how many client connections have a request in progress."""
        return sum(1 for client in self.clients if client.active is not None)
