"""Upstream connections: the response side of the data plane and the keep-alive pool.

An ``UpstreamConnection`` is an asyncio protocol that parses one response at a time
with httptools and hands each event to the exchange it currently serves. Idle
connections wait in a per-upstream LIFO stack, so the most recently used (and most
likely still open) one is reused first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from stickyproxy.errors import UpstreamConnectError, UpstreamProtocolError
from stickyproxy.log import UPSTREAM_LOGGER

if TYPE_CHECKING:
    from stickyproxy.exchange import Exchange
    from stickyproxy.upstreams import Upstream

log = logging.getLogger(UPSTREAM_LOGGER)


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream, serving exchanges one after another."""

    __slots__ = (
        "deadline",
        "exchange",
        "finished",
        "headers",
        "key",
        "overrun",
        "parser",
        "pool",
        "reason",
        "received",
        "reusable",
        "transport",
        "tunnel",
        "uses",
    )

    def __init__(self, pool: ConnectionPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        #: requests sent on this connection so far; above 1 it was reused
        self.uses = 0
        #: bytes of the current response received, to tell a stale connection
        self.received = 0
        #: monotonic time after which the connection is timed out; 0 means none
        self.deadline = 0.0
        self.tunnel = False
        #: a response ended during this read: pool or close once the parser returns
        self.finished = False
        self.reusable = False
        #: the upstream sent bytes after the end of a response
        self.overrun = False
        #: the status reason and headers of the response being parsed
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # an idle upstream must not talk; whatever it says, stop reusing it
            self.close()
            return
        self.received += len(data)
        if self.tunnel:
            exchange.tunnel_to_client(data)
            return
        exchange.touch_upstream(self)

        # a small response's head and body then reach the client in one send
        client = exchange.client
        client.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange.upstream_upgraded(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            if self.exchange is exchange:
                error = UpstreamProtocolError(f"invalid response: {exc}")
                exchange.upstream_failed(self, error)
        finally:
            client.uncork()
        if self.finished:
            self._settle()

    def _settle(self) -> None:
        """Pool the connection after a complete response, unless it said more."""
        self.finished = False
        if self.reusable and not self.overrun:
            self.pool.release(self)
        else:
            # bytes after the end of a response (or a response that cannot be
            # followed): whatever they are, they must never reach another client
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.upstream_closed(self, exc)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_client_reading(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_client_reading(False)

    # httptools callbacks, forwarded to the exchange

    def on_message_begin(self) -> None:
        if self.finished or self.exchange is None:
            self.overrun = True

    def on_status(self, reason: bytes) -> None:
        if self.exchange is not None:
            self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.exchange is not None:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.on_response_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.on_response_complete(self)

    # used by the exchange

    def send(self, data: bytes) -> None:
        """Write bytes of the current request."""
        assert self.transport is not None
        self.transport.write(data)

    def finish(self, reusable: bool) -> None:
        """End the current exchange; pooling waits until the parser has stopped."""
        self.exchange = None
        self.finished = True
        self.reusable = reusable

    def new_parser(self) -> None:
        """Start a fresh parser, for a response whose body the parser cannot know of."""
        self.parser = httptools.HttpResponseParser(self)

    def close(self) -> None:
        """Close the connection; connection_lost does the bookkeeping."""
        self.exchange = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()


class ConnectionPool:
    """Idle keep-alive connections per upstream, and the connecting of new ones."""

    def __init__(
        self, keepalive: int, idle_timeout: float, connect_timeout: float
    ) -> None:
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.idle: dict[str, deque[UpstreamConnection]] = {}
        #: every connection, idle or busy, for timeouts and shutdown
        self.open: set[UpstreamConnection] = set()
        self.loop = asyncio.get_running_loop()

    def configure(
        self, keepalive: int, idle_timeout: float, connect_timeout: float
    ) -> None:
        """Apply new limits on reload; connections already open stay."""
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout

    def acquire_idle(self, upstream: Upstream) -> UpstreamConnection | None:
        """Return an idle connection to the upstream, most recently used first."""
        stack = self.idle.get(upstream.authority)
        while stack:
            connection = stack.pop()
            transport = connection.transport
            if transport is not None and not transport.is_closing():
                return connection
        return None

    async def connect(self, upstream: Upstream) -> UpstreamConnection:
        """Open a new connection to the upstream, translating failures."""
        key = upstream.authority
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await self.loop.create_connection(
                    lambda: UpstreamConnection(self, key), upstream.host, upstream.port
                )
        except TimeoutError:
            raise UpstreamConnectError(f"connect to {key} timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(
                f"connect to {key}: {exc.strerror or exc}"
            ) from exc
        self.open.add(protocol)
        return protocol

    def release(self, connection: UpstreamConnection) -> None:
        """Put a connection whose response is complete back for reuse, or close it."""
        connection.exchange = None
        connection.received = 0
        stack = self.idle.setdefault(connection.key, deque())
        if len(stack) >= self.keepalive:
            connection.close()
            return
        connection.deadline = self.loop.time() + self.idle_timeout
        stack.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """Drop a closed connection from the books."""
        self.open.discard(connection)
        stack = self.idle.get(connection.key)
        if stack is not None:
            with contextlib.suppress(ValueError):
                stack.remove(connection)

    def expire(self, now: float) -> None:
        """Close connections whose deadline has passed (idle or waiting on a read)."""
        for connection in [c for c in self.open if c.deadline and c.deadline < now]:
            exchange = connection.exchange
            if exchange is None:
                connection.close()
            else:
                exchange.upstream_timed_out(connection)

    def close_all(self) -> None:
        """Close every connection, idle or busy."""
        for connection in list(self.open):
            connection.abort()
        self.idle.clear()
