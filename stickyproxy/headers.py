"""HTTP/1.1 header rules a proxy applies: hop-by-hop removal and forwarding headers."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

#: headers that describe one connection and never cross the proxy (RFC 9110 7.6.1)
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: forwarding headers the proxy writes itself (incoming ones count only if trusted)
FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)

#: request headers never copied as received
REQUEST_DROP = HOP_BY_HOP | FORWARDING | {b"content-length"}

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    501: "Not Implemented",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """Return the lower-cased tokens of Connection header values."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


_PLAIN_CONNECTION = frozenset(
    {b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"}
)


#: headers a Connection list may not remove: the message's framing and target
_UNREMOVABLE = HOP_BY_HOP | {b"content-length", b"host"}


def extra_connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """Return the headers Connection names beyond the hop-by-hop ones (usually none).

    Framing headers are never removed this way: a peer that lists Content-Length
    in Connection would otherwise make the proxy send a message without a length.
    """
    if not values or (len(values) == 1 and values[0] in _PLAIN_CONNECTION):
        return frozenset()
    return connection_tokens(values) - _UNREMOVABLE


class TrustedProxies:
    """Answers whether a peer address belongs to a configured trusted network."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.networks = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in cidrs
        )
        self.contains = lru_cache(maxsize=4096)(self._contains)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def _contains(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


def client_from_xff(values: Sequence[bytes], peer: str, trusted: TrustedProxies) -> str:
    """Return the client address from X-Forwarded-For, walking from the right.

    The rightmost address that is not a trusted proxy is the client, as nginx's
    realip module does with ``real_ip_recursive on``; invalid entries stop the walk.
    """
    addresses = [
        part.strip().decode("latin-1")
        for value in values
        for part in value.split(b",")
        if part.strip()
    ]
    return _rightmost_untrusted(addresses, peer, trusted)


def client_from_forwarded(
    values: Sequence[bytes], peer: str, trusted: TrustedProxies
) -> str:
    """Return the client address from RFC 7239 Forwarded ``for=`` parameters."""
    addresses = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            for pair in element.split(";"):
                name, _, param = pair.strip().partition("=")
                if name.lower() == "for":
                    addresses.append(param.strip().strip('"'))
    return _rightmost_untrusted(addresses, peer, trusted)


def _rightmost_untrusted(
    addresses: Sequence[str], peer: str, trusted: TrustedProxies
) -> str:
    """Walk a forwarding chain from the right past trusted proxies to the client."""
    client = peer
    for address in reversed(addresses):
        address = _strip_port(address)
        if not _is_ip(address):
            break
        client = address
        if not trusted.contains(address):
            break
    return client


def _strip_port(address: str) -> str:
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") == 1:
        return address.partition(":")[0]
    return address


@lru_cache(maxsize=4096)
def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def forwarded_node(address: str) -> str:
    """Quote an address as RFC 7239 wants it in a ``for=`` parameter."""
    return f'"[{address}]"' if ":" in address else address


def error_response(status: int, detail: str, close: bool, extra: bytes = b"") -> bytes:
    """Return a complete short plain-text response."""
    body = (detail + "\n").encode()
    connection = b"Connection: close\r\n" if close else b""
    return b"".join(
        (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n".encode(),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            f"Content-Length: {len(body)}\r\n".encode(),
            connection,
            extra,
            b"\r\n",
            body,
        )
    )
