"""One request and its response: choosing the upstream, forwarding, streaming back.

An ``Exchange`` is driven by callbacks from both sides: the client connection's
parser (head, body pieces, end) and the upstream connection's parser (status,
headers, body pieces, end). It writes the forwarded request head, relays bodies with
flow control, retries where that is safe, and maps failures to 502, 503 and 504.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from stickyproxy import headers as h
from stickyproxy.errors import (
    BadRequest,
    BodyTooLarge,
    MethodNotAllowed,
    NotImplementedCoding,
    NoUpstreamAvailable,
    PinnedUnavailable,
    StickyProxyError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    VersionNotSupported,
    status_for,
)
from stickyproxy.headers import error_response
from stickyproxy.log import PROXY_LOGGER, SELECTION_LOGGER, AccessLog
from stickyproxy.selection import RequestView
from stickyproxy.upstreams import Selection, Upstream

if TYPE_CHECKING:
    from stickyproxy.clients import ClientConnection
    from stickyproxy.connections import UpstreamConnection
    from stickyproxy.forwarding import Group, ProxyState

log = logging.getLogger(PROXY_LOGGER)
selection_log = logging.getLogger(SELECTION_LOGGER)

# bytes of request body held while no upstream connection takes them yet
BODY_BUFFER_LIMIT = 256 * 1024

# a reverse proxy forwards to origin servers: tunnels and loop-backs stay here
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})

# request headers a proxy looks at; every other header is copied as it came
_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _UPGRADE = 1, 2, 3, 4, 5
_XFF, _FORWARDED, _XF_PROTO, _DROPPED = 6, 7, 8, 9
_REQUEST_HEADERS = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"x-forwarded-for": _XFF,
    b"forwarded": _FORWARDED,
    b"x-forwarded-proto": _XF_PROTO,
    b"x-forwarded-host": _DROPPED,
    b"keep-alive": _DROPPED,
    b"proxy-connection": _DROPPED,
    b"te": _DROPPED,
    b"trailer": _DROPPED,
}

# response headers a proxy looks at; hop-by-hop ones map to _DROPPED
_RESPONSE_HEADERS = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"keep-alive": _DROPPED,
    b"proxy-connection": _DROPPED,
    b"te": _DROPPED,
    b"trailer": _DROPPED,
}

# why client reading is paused; reading resumes when no reason is left
PAUSE_UPSTREAM_FULL = 1
PAUSE_PIPELINE = 2
PAUSE_BODY_BUFFER = 4


class Exchange:
    """One request and its response, from the client's head to the last body byte."""

    __slots__ = (
        "body_buffer",
        "body_received",
        "body_sent_bytes",
        "bytes_out",
        "chunked_request",
        "chunked_response",
        "client",
        "client_gone_flag",
        "client_keep_alive",
        "client_stalled",
        "connection",
        "content_length",
        "early_tunnel_data",
        "group",
        "head",
        "head_bytes",
        "headers",
        "host",
        "is_head",
        "last_error",
        "method",
        "request_done",
        "response_done",
        "response_headers",
        "response_reason",
        "response_started",
        "response_time",
        "response_until_close",
        "selection",
        "start_time",
        "state",
        "status",
        "target",
        "task",
        "tried",
        "upgrade",
        "upstream",
        "version",
        "view",
    )

    def __init__(self, client: ClientConnection, state: ProxyState) -> None:
        self.client = client
        self.state = state
        self.start_time = client.loop.time()
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.method = ""
        self.version = "1.1"
        self.host = ""
        self.client_keep_alive = True
        self.upgrade = False
        self.is_head = False
        self.content_length = -1
        self.chunked_request = False
        self.body_buffer: list[bytes] | None = None
        self.body_received = 0
        self.body_sent_bytes = 0
        self.request_done = False
        self.head = b""
        self.view: RequestView | None = None
        self.group: Group | None = None
        self.selection: Selection | None = None
        self.upstream: Upstream | None = None
        self.connection: UpstreamConnection | None = None
        self.tried: list[Upstream] = []
        #: the failure that made the last retry necessary
        self.last_error: UpstreamError | None = None
        self.early_tunnel_data = b""
        self.status = 0
        self.response_reason = b""
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.response_started = False
        #: loop time the upstream's final response head arrived; 0 until then
        self.response_time = 0.0
        self.response_done = False
        self.response_until_close = False
        self.chunked_response = False
        self.bytes_out = 0
        self.client_gone_flag = False
        #: the client stopped taking response bytes (flow control paused the upstream)
        self.client_stalled = False
        #: the task of a step that waits (connecting, a store lookup), kept referenced
        self.task: asyncio.Task[None] | None = None

    # the request

    def prepare(self) -> None:
        """Check the request head and build what is forwarded; runs once per request."""
        client, state = self.client, self.state
        headers = self.headers
        if self.version not in ("1.1", "1.0"):
            raise VersionNotSupported()
        if self.method in _REFUSED_METHODS:
            raise MethodNotAllowed(f"{self.method} is not passed to upstreams")
        content_lengths = []
        connection_values = []
        hosts = 0
        transfer_codings = b""
        xff: list[bytes] = []
        forwarded: list[bytes] = []
        proto = host = b""
        upgrade_value = b""
        transfer_encoding = False

        # one pass: ordinary headers are copied as they come, the few that matter to
        # a proxy are noted (and hop-by-hop and forwarding ones left out)
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method.encode(), self.target)]
        append = lines.append
        special = _REQUEST_HEADERS
        for name, value in headers:
            kind = special.get(name.lower())
            if kind is None:
                append(b"%s: %s\r\n" % (name, value))
            elif kind == _HOST:
                host = value
                hosts += 1
                append(b"%s: %s\r\n" % (name, value))
            elif kind == _CONTENT_LENGTH:
                content_lengths.append(value)
            elif kind == _TRANSFER_ENCODING:
                transfer_encoding = True
                transfer_codings += value
            elif kind == _CONNECTION:
                connection_values.append(value)
            elif kind == _UPGRADE:
                upgrade_value = value
            elif kind == _XFF:
                xff.append(value)
            elif kind == _FORWARDED:
                forwarded.append(value)
            elif kind == _XF_PROTO:
                proto = value

        # framing: refuse anything a server behind us could read differently
        if transfer_encoding and content_lengths:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if transfer_encoding:
            if self.version == "1.0":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            if transfer_codings.strip().lower() != b"chunked":
                raise NotImplementedCoding()
        if hosts > 1:
            raise BadRequest("more than one Host header")
        if self.upgrade and (
            transfer_encoding or self.content_length_given(content_lengths)
        ):
            raise BadRequest("an upgrade request cannot carry a body")
        if content_lengths:
            text = content_lengths[0]
            if len(content_lengths) > 1 and len(set(content_lengths)) > 1:
                raise BadRequest("conflicting Content-Length headers")
            if not text.isdigit():
                raise BadRequest("invalid Content-Length")
            self.content_length = int(text)
            if state.body_limit and self.content_length > state.body_limit:
                raise BodyTooLarge()
        self.chunked_request = transfer_encoding
        self.is_head = self.method == "HEAD"
        target_bytes = self.target
        if not target_bytes.startswith(b"/"):
            # absolute form: its authority is the host (RFC 9112, 3.2.2)
            scheme, _, rest = target_bytes.partition(b"://")
            if scheme.lower() in (b"http", b"https") and rest:
                host = rest.split(b"/", 1)[0].split(b"?", 1)[0]
            elif not (target_bytes == b"*" and self.method == "OPTIONS"):
                raise BadRequest("request target must be a path or an absolute URL")
        if not host and self.version == "1.1":
            raise BadRequest("missing Host header")
        self.host = _host_name(host)

        # who the client is: believe forwarding headers only from trusted peers
        trusted = client.peer_trusted
        client_ip = client.peer
        scheme = client.scheme
        if trusted:
            source = state.config.forwarded.client_address
            if source == "x-forwarded-for" and xff:
                client_ip = h.client_from_xff(xff, client_ip, state.trusted)
            elif source == "forwarded" and forwarded:
                client_ip = h.client_from_forwarded(forwarded, client_ip, state.trusted)
            if proto:
                scheme = proto.split(b",")[0].strip().lower()

        target = self.target.decode("latin-1")
        self.view = RequestView(
            client_ip, self.method, target, self.host, headers, scheme == b"https"
        )
        group = state.route(self.host, target)
        self.group = group

        # rare cases need the careful filter: headers named by Connection, a cookie
        # to strip, or a Host to replace
        extra_tokens = h.extra_connection_tokens(connection_values)
        if extra_tokens or (
            group is not None
            and (group.policy.strip_cookie is not None or group.config.rewrite_host)
        ):
            lines = self._filtered_head(lines[0], extra_tokens or frozenset())
            append = lines.append

        peer = client.peer_bytes
        xff_out = b", ".join([*xff, peer]) if trusted and xff else peer
        element = client.forwarded_for + b";proto=" + scheme
        if host:
            element += b';host="%s"' % host.replace(b'"', b"")
        if trusted and forwarded:
            element = b", ".join([*forwarded, element])
        append(
            b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nForwarded: %s\r\n"
            % (xff_out, scheme, element)
        )
        if host:
            append(b"X-Forwarded-Host: %s\r\n" % host)
        if self.upgrade:
            append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % upgrade_value)
        if transfer_encoding:
            append(b"Transfer-Encoding: chunked\r\n")
        self.head = b"".join(lines)

    @staticmethod
    def content_length_given(values: list[bytes]) -> bool:
        """Return whether Content-Length headers announce a body."""
        return any(value.strip() not in (b"", b"0") for value in values)

    def _filtered_head(
        self, request_line: bytes, drop_also: frozenset[bytes]
    ) -> list[bytes]:
        """Copy the request's headers again, applying every rule of the group."""
        group = self.group
        strip_cookie = group.policy.strip_cookie if group is not None else None
        rewrite_host = group is not None and group.config.rewrite_host
        drop = h.REQUEST_DROP | drop_also
        lines = [request_line]
        for name, value in self.headers:
            lname = name.lower()
            if lname in drop or (lname == b"host" and rewrite_host):
                continue
            if strip_cookie is not None and lname == b"cookie":
                value = _strip_cookie(value, strip_cookie)
                if not value:
                    continue
            lines.append(b"%s: %s\r\n" % (name, value))
        return lines

    def start(self) -> None:
        """Choose an upstream and send the request head, when it is this one's turn."""
        if self.client_gone_flag:
            return
        group = self.group
        if group is None:
            self.fail(
                NoUpstreamAvailable("no route for this host and path"), log_it=False
            )
            return
        assert self.view is not None
        policy = group.policy
        if policy.shared_store and not self.tried and policy.needs_lookup(self.view):
            # a pin another proxy may have learned: ask the shared store first
            self.task = self.client.loop.create_task(self._lookup_then_select(group))
            return
        self._select(group)

    async def _lookup_then_select(self, group: Group) -> None:
        assert self.view is not None
        await group.policy.prefetch(self.view)
        if not self.client_gone_flag:
            self._select(group)

    def _select(self, group: Group) -> None:
        """Ask the group's policy for an upstream and send the request there."""
        try:
            selection = group.policy.select(self.view, self.tried)  # type: ignore[arg-type]
        except PinnedUnavailable as exc:
            if exc.wait and not self.tried:
                self.task = self.client.loop.create_task(self._wait_for_pin(group))
            else:
                self.fail(exc)
            return
        if selection is None:
            # after a failed try, the client hears why it failed, not "none left"
            self.fail(self.last_error or NoUpstreamAvailable())
            return
        self.selection = selection
        upstream = selection.upstream
        if self.state.debug:
            selection_log.debug(
                "%s %s -> %s (%s%s)",
                self.view.client_ip if self.view else "-",
                group.config.name,
                upstream.name,
                selection.reason,
                f", {selection.cause}" if selection.cause else "",
            )
        self._attach(upstream)
        connection = self.client.proxy.connections.acquire_idle(upstream)
        if connection is not None:
            self._send(connection)
        else:
            self.task = self.client.loop.create_task(self._connect(upstream))

    async def _wait_for_pin(self, group: Group) -> None:
        """Retry the pinned upstream until it serves or the group's wait runs out."""
        deadline = self.client.loop.time() + group.config.pinned_wait
        while self.client.loop.time() < deadline and not self.client_gone_flag:
            await asyncio.sleep(0.1)
            try:
                group.policy.select(self.view, self.tried)  # type: ignore[arg-type]
            except PinnedUnavailable:
                continue
            self._select(group)
            return
        if not self.client_gone_flag:
            self.fail(PinnedUnavailable(1))

    def _attach(self, upstream: Upstream) -> None:
        self.upstream = upstream
        upstream.active += 1
        upstream.requests += 1

    def _detach(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.active -= 1
            self.upstream = None

    async def _connect(self, upstream: Upstream) -> None:
        try:
            connection = await self.client.proxy.connections.connect(upstream)
        except UpstreamConnectError as exc:
            self._retry_or_fail(upstream, exc, "connect")
            return
        except asyncio.CancelledError:
            self._detach()
            raise
        if self.client_gone_flag:
            self._detach()
            connection.close()
            return
        self._send(connection)

    def _send(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        connection.exchange = self
        connection.uses += 1
        connection.received = 0
        # the read timeout runs once the request is out; until then the client's
        # body timeout governs, so a slow upload is the client's fault, not the
        # upstream's
        connection.deadline = (
            self.client.loop.time() + self.state.read_timeout
            if self.request_done
            else 0.0
        )
        head = self.head
        upstream = self.upstream
        if upstream is not None and (
            not self.host or (self.group is not None and self.group.config.rewrite_host)
        ):
            # HTTP/1.1 requires a Host; an HTTP/1.0 client may have sent none
            head += b"Host: %s\r\n" % upstream.authority.encode()
        connection.send(head + self._framing_header())
        buffered = self.body_buffer
        if buffered:
            self.body_buffer = None
            for chunk in buffered:
                self._send_body(chunk)
            self.client.pause(PAUSE_BODY_BUFFER, False)
        if self.request_done:
            self._send_body_end()

    def _framing_header(self) -> bytes:
        if self.content_length >= 0 and not self.chunked_request:
            return b"Content-Length: %d\r\n\r\n" % self.content_length
        return b"\r\n"

    def on_request_body(self, body: bytes) -> None:
        """Stream a piece of the request body, or hold it until an upstream is ready."""
        self.body_received += len(body)
        limit = self.state.body_limit
        if limit and self.body_received > limit:
            self.client.error = BodyTooLarge()
            raise self.client.error
        if self.connection is not None and not self.tunnel_open:
            self._send_body(body)
            return
        if self.body_buffer is None:
            self.body_buffer = []
        self.body_buffer.append(body)
        if self.body_received - self.body_sent_bytes > BODY_BUFFER_LIMIT:
            self.client.pause(PAUSE_BODY_BUFFER, True)

    @property
    def tunnel_open(self) -> bool:
        return self.connection is not None and self.connection.tunnel

    def _send_body(self, body: bytes) -> None:
        assert self.connection is not None
        self.body_sent_bytes += len(body)
        if self.chunked_request:
            self.connection.send(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.connection.send(body)

    def _send_body_end(self) -> None:
        if self.chunked_request and self.connection is not None:
            self.connection.send(b"0\r\n\r\n")

    def on_request_complete(self) -> None:
        """Note that the whole request body has arrived, and finish it upstream."""
        self.request_done = True
        connection = self.connection
        if connection is not None and not connection.tunnel:
            self._send_body_end()
            if not connection.deadline:
                connection.deadline = self.client.loop.time() + self.state.read_timeout

    # the response

    def touch_upstream(self, connection: UpstreamConnection) -> None:
        """Push the upstream's read deadline forward; it just sent something."""
        if connection.tunnel:
            connection.deadline = self.client.loop.time() + self.state.tunnel_timeout
        elif self.request_done and not self.client_stalled:
            connection.deadline = self.client.loop.time() + self.state.read_timeout

    def on_response_headers_complete(self, connection: UpstreamConnection) -> None:
        """Write the response head to the client, with the proxy's own headers."""
        status = connection.parser.get_status_code()
        self.response_reason, connection.reason = connection.reason, b""
        self.response_headers, connection.headers = connection.headers, []
        if 100 <= status < 200 and status != 101:
            self._relay_informational(status)
            return
        self.status = status
        self.response_started = True
        self.response_time = self.client.loop.time()
        upstream_headers = self.response_headers

        # one pass, as for requests: copy ordinary headers, note the framing ones
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, self.response_reason)]
        append = lines.append
        connection_values = []
        content_length = chunked = False
        upgrade_line = b""
        special = _RESPONSE_HEADERS
        for name, value in upstream_headers:
            kind = special.get(name.lower())
            if kind is None:
                append(b"%s: %s\r\n" % (name, value))
            elif kind == _CONTENT_LENGTH:
                content_length = True
                append(b"%s: %s\r\n" % (name, value))
            elif kind == _TRANSFER_ENCODING:
                chunked = True
            elif kind == _CONNECTION:
                connection_values.append(value)
            elif kind == _UPGRADE:
                upgrade_line = b"%s: %s\r\n" % (name, value)
        extra_tokens = h.extra_connection_tokens(connection_values)
        if extra_tokens or (chunked and content_length):
            drop = h.HOP_BY_HOP | (extra_tokens or frozenset())
            if chunked:
                drop |= {b"content-length"}
            lines = lines[:1]
            append = lines.append
            for name, value in upstream_headers:
                if name.lower() not in drop:
                    append(b"%s: %s\r\n" % (name, value))

        if status == 101 and not self.upgrade:
            self.response_started = False
            error = UpstreamProtocolError("101 Switching Protocols to a plain request")
            self.upstream_failed(connection, error)
            return
        upgraded = status == 101 and self.upgrade
        if upgraded and upgrade_line:
            append(upgrade_line)
        bodiless = self.is_head or status in (204, 304) or upgraded
        if chunked:
            content_length = False
        until_close = not bodiless and not content_length and not chunked
        self.response_until_close = until_close
        keep_alive = self.client_keep_alive and not self.upgrade
        if not self.request_done:
            # answered before the request body ended: the rest of it cannot be trusted
            keep_alive = False
        use_chunked = (
            (chunked or until_close) and self.version == "1.1" and not bodiless
        )
        if (chunked or until_close) and self.version != "1.1":
            keep_alive = False
        self.chunked_response = use_chunked
        self.client_keep_alive = keep_alive

        group = self.group
        selection = self.selection
        if group is not None and selection is not None:
            if group.policy.sticky and self.view is not None:
                for line in group.policy.on_response(
                    self.view, selection, upstream_headers
                ):
                    append(line)
            if self.state.explain:
                append(
                    b"X-Stickyproxy-Upstream: %s\r\n" % selection.upstream.name.encode()
                )
                reason = selection.reason
                if selection.cause:
                    reason = f"{reason}; {selection.cause}"
                append(b"X-Stickyproxy-Reason: %s\r\n" % reason.encode())
        if upgraded:
            append(b"Connection: upgrade\r\n")
        elif use_chunked:
            append(b"Transfer-Encoding: chunked\r\n")
        if not upgraded:
            if not keep_alive:
                append(b"Connection: close\r\n")
            elif self.version == "1.0":
                append(b"Connection: keep-alive\r\n")
        append(b"\r\n")
        self.client.write(b"".join(lines))

        if upgraded:
            connection.tunnel = True
            return
        if self.is_head:
            # the parser would wait for a body a HEAD response never has
            connection.new_parser()
            self.on_response_complete(connection)

    def _relay_informational(self, status: int) -> None:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, self.response_reason)]
        for name, value in self.response_headers:
            if name.lower() not in h.HOP_BY_HOP:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        self.client.write(b"".join(lines))

    def on_response_body(self, body: bytes) -> None:
        """Stream a piece of the response body to the client."""
        if not self.response_started or self.response_done:
            return
        self.bytes_out += len(body)
        if self.chunked_response:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))
        else:
            self.client.write(body)

    def on_response_complete(self, connection: UpstreamConnection) -> None:
        """Finish the response; the connection goes back to the pool if it can."""
        if not self.response_started or connection.tunnel:
            # an informational response ended (the final one follows), or a 101 did
            # (the tunnel follows)
            return
        if self.response_done:
            return
        self.response_done = True
        if self.chunked_response:
            self.client.write(b"0\r\n\r\n")
        self.connection = None
        connection.finish(
            self.request_done
            and connection.parser.should_keep_alive()
            and not self.response_until_close
        )
        self._finish()

    def upstream_upgraded(self, rest: bytes) -> None:
        """The upstream switched protocols: relay raw bytes both ways from now on."""
        connection = self.connection
        if connection is None:
            return  # already failed: a 101 nobody asked for
        if not connection.tunnel:
            self.upstream_failed(
                connection, UpstreamProtocolError("unexpected upgrade")
            )
            return
        self.touch_upstream(connection)
        self.client.start_tunnel(connection)
        if rest:
            self.client.write(rest)
        if self.early_tunnel_data:
            connection.send(self.early_tunnel_data)
            self.early_tunnel_data = b""

    def tunnel_to_client(self, data: bytes) -> None:
        """Relay bytes from an upgraded upstream connection."""
        self.touch_tunnel()
        self.client.write(data)

    def touch_tunnel(self) -> None:
        """Push both sides' idle deadlines forward: the tunnel is in use."""
        deadline = self.client.loop.time() + self.state.tunnel_timeout
        self.client.deadline = deadline
        if self.connection is not None:
            self.connection.deadline = deadline

    # failures

    def upstream_closed(
        self, connection: UpstreamConnection, exc: Exception | None
    ) -> None:
        """The upstream connection closed while this exchange used it."""
        if self.response_done:
            return
        if connection.tunnel:
            self.response_done = True
            self._finish()
            self.client.close()
            return
        if self.response_started and self.response_until_close:
            self.on_response_complete(connection)
            return
        error = UpstreamConnectError("upstream closed the connection")
        self.upstream_failed(connection, error)

    def upstream_timed_out(self, connection: UpstreamConnection) -> None:
        """The upstream stayed silent past its read timeout."""
        if connection.tunnel:
            connection.close()
            return
        self.upstream_failed(connection, UpstreamTimeout("upstream read timed out"))

    def upstream_failed(
        self, connection: UpstreamConnection, error: UpstreamError
    ) -> None:
        """Retry elsewhere when that is safe, else answer with an error."""
        upstream = self.upstream
        self.connection = None
        connection.abort()
        if upstream is None or self.response_done:
            return
        if self.response_started:
            # part of the response went out already: all we can do is cut the client off
            self.response_done = True
            self._finish(keep_alive=False)
            return
        stale = connection.uses > 1 and connection.received == 0
        safe = self.method in h.IDEMPOTENT_METHODS and self.body_sent_bytes == 0
        if stale and safe and self.content_length <= 0 and not self.chunked_request:
            # a reused connection the upstream had closed: try once on a fresh one
            self.task = self.client.loop.create_task(self._reconnect(upstream))
            return
        kind = "timeout" if isinstance(error, UpstreamTimeout) else "reset"
        if isinstance(error, UpstreamTimeout) or not safe:
            self._record_failure(upstream, kind)
            self._detach()
            self.fail(error)
            return
        self._retry_or_fail(upstream, error, kind)

    async def _reconnect(self, upstream: Upstream) -> None:
        try:
            connection = await self.client.proxy.connections.connect(upstream)
        except UpstreamConnectError as exc:
            self._retry_or_fail(upstream, exc, "connect")
            return
        if self.client_gone_flag:
            self._detach()
            connection.close()
            return
        self._send(connection)

    def _record_failure(self, upstream: Upstream, kind: str) -> None:
        resting = upstream.record_failure()
        self.client.proxy.observer.upstream_failed(upstream, kind, resting)

    def _retry_or_fail(
        self, upstream: Upstream, error: UpstreamError, kind: str
    ) -> None:
        self._record_failure(upstream, kind)
        self._detach()
        self.tried.append(upstream)
        group = self.group
        log.warning("upstream %s failed: %s", upstream.name, error)
        if self.client_gone_flag or group is None:
            return
        if len(self.tried) <= group.config.retries:
            self.client.proxy.observer.retried(group.config.name)
            self.selection = None
            self.last_error = error
            self.start()
            return
        self.fail(error)

    def fail(self, error: StickyProxyError, log_it: bool = True) -> None:
        """Answer with the error's status, unless a response already began."""
        self._detach()
        if self.response_started or self.client_gone_flag:
            self.client.close()
            return
        status, reason = status_for(error)
        detail = str(error) or reason
        if log_it:
            log.warning(
                "%s %s -> %d: %s",
                self.method,
                self.target.decode("latin-1"),
                status,
                detail,
            )
        extra = b""
        if isinstance(error, PinnedUnavailable):
            extra = b"Retry-After: %d\r\n" % error.retry_after
        self.status = status
        self.response_started = True
        self.response_done = True
        keep_alive = self.client_keep_alive and self.request_done
        self.client.write(
            error_response(status, reason, close=not keep_alive, extra=extra)
        )
        self.bytes_out = len(reason) + 1
        self._finish(keep_alive=keep_alive)

    def abandon_upstream(self) -> None:
        """Drop the upstream side of an exchange the client side gave up on."""
        connection = self.connection
        self.connection = None
        if connection is not None:
            connection.abort()
        self._detach()

    def client_gone(self) -> None:
        """The client disconnected: abandon the upstream side."""
        if self.client_gone_flag:
            return
        self.client_gone_flag = True
        if not self.response_done:
            self.abandon_upstream()

    def pause_client_reading(self, on: bool) -> None:
        """Flow control: the upstream cannot take request bytes as fast as they come.

        While it lags, the wait is the upstream's: its deadline runs (as a send
        timeout) and the client's body timeout is suspended.
        """
        client = self.client
        client.pause(PAUSE_UPSTREAM_FULL, on)
        connection = self.connection
        now = client.loop.time()
        if on:
            client.deadline = 0.0
            if connection is not None:
                connection.deadline = now + self.state.read_timeout
        elif not self.request_done:
            client.deadline = now + self.state.client_body_timeout
            if connection is not None:
                connection.deadline = 0.0

    def pause_upstream_reading(self, on: bool) -> None:
        """Flow control: the client cannot take response bytes as fast as they come.

        While it lags, the wait is the client's: the upstream's read timeout is
        suspended and the client's send timeout runs instead.
        """
        self.client_stalled = on
        client = self.client
        connection = self.connection
        now = client.loop.time()
        if on:
            client.deadline = now + self.state.client_send_timeout
        elif self.request_done:
            client.deadline = 0.0
        if connection is not None and connection.transport is not None:
            if on:
                connection.deadline = 0.0
                connection.transport.pause_reading()
            else:
                connection.deadline = now + self.state.read_timeout
                connection.transport.resume_reading()

    def _finish(self, keep_alive: bool | None = None) -> None:
        """Account for the finished exchange and let the client connection move on."""
        self._detach()
        upstream = self.selection.upstream if self.selection is not None else None
        if upstream is not None and 0 < self.status < 500:
            upstream.record_success()
        access_log = self.state.access_log
        if access_log is not None:
            self._write_access_log(access_log, upstream)
        self.client.proxy.observer.request_finished(self)
        if keep_alive is None:
            keep_alive = self.client_keep_alive
        self.client.finished(self, keep_alive)

    def refused(self, status: int) -> None:
        """Account for a request the client side refused (400, 413, 431, ...)."""
        self.status = status
        self.response_done = True
        access_log = self.state.access_log
        if access_log is not None:
            self._write_access_log(access_log, None)
        self.client.proxy.observer.request_finished(self)

    def _write_access_log(
        self, access_log: AccessLog, upstream: Upstream | None
    ) -> None:
        view = self.view
        selection = self.selection
        access_log.write(
            client=view.client_ip if view is not None else self.client.peer,
            method=self.method,
            target=self.target.decode("latin-1"),
            version=self.version,
            status=self.status,
            sent=self.bytes_out,
            referer=_header(self.headers, b"referer"),
            agent=_header(self.headers, b"user-agent"),
            upstream=upstream.name if upstream is not None else "",
            duration=self.client.loop.time() - self.start_time,
            reason=selection.reason if selection is not None else "",
        )

    @property
    def duration(self) -> float:
        """Return seconds since the request began."""
        return self.client.loop.time() - self.start_time


def _host_name(host: bytes) -> str:
    """Return the host part of a Host header value, without the port."""
    text = host.decode("latin-1")
    if text.startswith("["):
        return text[: text.find("]") + 1]
    return text.partition(":")[0]


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _strip_cookie(value: bytes, name: bytes) -> bytes:
    """Remove one cookie from a Cookie header value, keeping the others as sent."""
    prefix = name + b"="
    kept = [part for part in value.split(b";") if not part.strip().startswith(prefix)]
    return b";".join(kept).strip()
