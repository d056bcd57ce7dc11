"""Client connections: parse requests with httptools and answer them in order.

Per client connection, requests are answered one at a time in order; a pipelined
request waits, parsed, until the one before it is answered. Timeouts are deadlines
that the proxy's ticker checks, so a request costs no timer of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from stickyproxy.errors import BadRequest, ClientRequestError, HeadersTooLarge
from stickyproxy.exchange import PAUSE_PIPELINE, Exchange
from stickyproxy.headers import error_response, forwarded_node
from stickyproxy.log import PROXY_LOGGER

if TYPE_CHECKING:
    from stickyproxy.connections import UpstreamConnection
    from stickyproxy.forwarding import Proxy

log = logging.getLogger(PROXY_LOGGER)

#: how long a refused client may keep sending before the connection is closed
LINGER_SECONDS = 2.0


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and answers them in order."""

    def __init__(self, proxy: Proxy, secure: bool) -> None:
        self.proxy = proxy
        self.secure = secure
        self.loop = proxy.loop
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.peer_trusted = False
        self.peer_bytes = b""
        #: the Forwarded element naming this peer, built once per connection
        self.forwarded_for = b""
        self.scheme = b"https" if secure else b"http"
        #: the exchange being answered, and the one being parsed (differs if pipelined)
        self.active: Exchange | None = None
        self.parsing: Exchange | None = None
        self.queued: deque[Exchange] = deque()
        self.paused = 0
        self.deadline = 0.0
        self.error: ClientRequestError | None = None
        #: bytes received while a request head is unfinished
        self.head_pending = 0
        #: after a refusal: discarding input until the client has read the answer
        self.lingering = False
        #: a refusal held back until the requests before it are answered
        self.refused: ClientRequestError | None = None
        self.tunnel: UpstreamConnection | None = None
        self.closed = False
        #: writes held back to leave together (see cork)
        self.corked: list[bytes] | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self.transport = transport = cast(asyncio.Transport, transport)
        proxy = self.proxy
        state = proxy.state
        if (
            len(proxy.clients) >= state.config.limits.client_connections
            or not proxy.accepting
        ):
            # over the limit: close at once rather than queue work we cannot do
            transport.abort()
            self.closed = True
            return
        proxy.clients.add(self)
        proxy.observer.client_opened()
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "unix"
        if self.peer.startswith("::ffff:"):
            self.peer = self.peer[7:]
        self.peer_trusted = bool(state.trusted) and state.trusted.contains(self.peer)
        self.peer_bytes = self.peer.encode()
        self.forwarded_for = b"for=" + forwarded_node(self.peer).encode()
        self.deadline = self.loop.time() + state.client_header_timeout

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            if self.active is not None:
                self.active.touch_tunnel()
            self.tunnel.send(data)
            return
        if self.closed or self.lingering or self.refused is not None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.parsing
            if exchange is not None:
                exchange.early_tunnel_data = data[upgrade.args[0] :]
                self.parsing = None
                self.pause(PAUSE_PIPELINE, True)
            return
        except httptools.HttpParserCallbackError:
            self.reject(self.error or BadRequest())
            return
        except httptools.HttpParserError as exc:
            self.reject(self.error or _parser_error(exc))
            return

        # the parser buffers an unfinished header line whole, so a line that never
        # ends is bounded here, by the bytes that arrived while the head was open
        exchange = self.parsing
        if exchange is not None and not exchange.method:
            self.head_pending += len(data)
            if self.head_pending > exchange.state.header_limit:
                self.reject(HeadersTooLarge())
        else:
            self.head_pending = 0

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.clients.discard(self)
        self.proxy.observer.client_closed()
        for exchange in (self.active, self.parsing, *self.queued):
            if exchange is not None:
                exchange.client_gone()
        self.queued.clear()

    def pause_writing(self) -> None:
        if self.active is not None:
            self.active.pause_upstream_reading(True)

    def resume_writing(self) -> None:
        if self.active is not None:
            self.active.pause_upstream_reading(False)

    # httptools callbacks

    def on_message_begin(self) -> None:
        state = self.proxy.state
        exchange = Exchange(self, state)
        self.parsing = exchange
        if self.active is None:
            self.deadline = self.loop.time() + state.client_header_timeout

    def on_url(self, url: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.target += url
        exchange.head_bytes += len(url)
        if exchange.head_bytes > exchange.state.header_limit:
            self.error = HeadersTooLarge()
            raise self.error

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.head_bytes += len(name) + len(value) + 4
        if exchange.head_bytes > exchange.state.header_limit:
            self.error = HeadersTooLarge()
            raise self.error
        exchange.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        parser = self.parser
        exchange.method = parser.get_method().decode("ascii")
        exchange.version = parser.get_http_version()
        exchange.client_keep_alive = parser.should_keep_alive()
        exchange.upgrade = parser.should_upgrade()
        try:
            exchange.prepare()
        except ClientRequestError as exc:
            self.error = exc
            raise
        self.deadline = self.loop.time() + exchange.state.client_body_timeout
        if self.active is None:
            self.active = exchange
            exchange.start()
        else:
            self.queued.append(exchange)
            self.pause(PAUSE_PIPELINE, True)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.deadline = self.loop.time() + exchange.state.client_body_timeout
        exchange.on_request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.parsing = None
        if self.active is exchange:
            self.deadline = 0.0
        exchange.on_request_complete()

    # used by exchanges

    def pause(self, reason: int, on: bool) -> None:
        """Pause or resume reading from the client for one reason among several."""
        before = self.paused
        self.paused = before | reason if on else before & ~reason
        transport = self.transport
        if transport is None or self.closed:
            return
        if before and not self.paused:
            transport.resume_reading()
        elif self.paused and not before:
            transport.pause_reading()

    def write(self, data: bytes) -> None:
        """Write response bytes to the client, or hold them while corked."""
        if self.corked is not None:
            self.corked.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    def cork(self) -> None:
        """Hold writes until uncork, so that one response leaves in one send."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        """Send what was held since cork with a single system call."""
        held, self.corked = self.corked, None
        if held and self.transport is not None and not self.closed:
            if len(held) == 1:
                self.transport.write(held[0])
            else:
                self.transport.writelines(held)

    def finished(self, exchange: Exchange, keep_alive: bool) -> None:
        """Move on after an exchange is answered: the next request, idle, or close."""
        if self.active is not exchange:
            return
        self.active = None
        if not keep_alive or self.closed:
            if exchange.request_done or self.closed:
                self.close()
            else:
                # answered before the body ended (a 413, a 502): let it be read
                self.linger()
            return
        state = self.proxy.state
        if self.queued:
            self.active = self.queued.popleft()
            # start on a fresh call stack: the finishing exchange may be mid-parse
            self.loop.call_soon(self.active.start)
            if not self.queued and self.refused is None:
                self.pause(PAUSE_PIPELINE, False)
            return
        if self.refused is not None:
            self._refuse(self.refused, None)
            return
        if self.parsing is None:
            self.deadline = self.loop.time() + state.keepalive_timeout
        self.pause(PAUSE_PIPELINE, False)
        if not self.proxy.accepting and self.parsing is None:
            self.close()

    def start_tunnel(self, upstream: UpstreamConnection) -> None:
        """Relay raw bytes both ways from now on (after a 101 Switching Protocols)."""
        self.tunnel = upstream
        self.deadline = self.loop.time() + self.proxy.state.tunnel_timeout
        self.pause(PAUSE_PIPELINE, False)

    def reject(self, error: ClientRequestError) -> None:
        """Answer a request we refuse, then close the connection.

        When the refused request follows complete ones (pipelining), those are
        answered first, as the client expects its answers in order.
        """
        exchange = self.active
        if (
            exchange is not None
            and exchange.request_done
            and exchange is not self.parsing
        ):
            self.refused = error
            self.parsing = None
            self.pause(PAUSE_PIPELINE, True)
            return
        if exchange is not None and exchange.response_started:
            self.close()
            return
        if exchange is not None:
            exchange.abandon_upstream()
        self._refuse(error, self.parsing or exchange)

    def _refuse(self, error: ClientRequestError, exchange: Exchange | None) -> None:
        self.write(error_response(error.status, error.detail, close=True))
        log.warning("refused request from %s: %s", self.peer, error.detail)
        if exchange is not None:
            exchange.refused(error.status)
        self.active = None
        self.linger()

    def linger(self) -> None:
        """Half-close, then read and discard what the client still sends for a while.

        Closing outright with unread input makes the kernel reset the connection, and
        a client still sending (a too-large body, say) may never read the answer.
        """
        transport = self.transport
        self.parsing = None
        self.uncork()
        if transport is None or self.closed or not transport.can_write_eof():
            self.close()
            return
        self.lingering = True
        transport.write_eof()
        self.deadline = self.loop.time() + LINGER_SECONDS
        if self.paused:
            self.paused = 0
            transport.resume_reading()

    def timed_out(self) -> None:
        """Close the connection: idle too long, or too slow sending a request."""
        exchange = self.active or self.parsing
        # a body that stalls gets a 408; an idle or half-sent head is just closed
        stalled_body = (
            exchange is not None
            and exchange is self.parsing
            and exchange.method
            and not exchange.response_started
            and self.tunnel is None
        )
        if stalled_body:
            assert exchange is not None
            exchange.abandon_upstream()
            self.write(error_response(408, "request timeout", close=True))
        self.close()

    def close(self) -> None:
        """Close after flushing what was written."""
        self.uncork()
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        if self.transport is not None:
            self.transport.close()
        self.deadline = 0.0


def _parser_error(exc: Exception) -> ClientRequestError:
    text = str(exc) or "malformed request"
    return BadRequest(f"malformed request: {text}")
