"""Errors raised by stickyproxy, and the one place that maps failures to statuses.

The class tree::

    StickyProxyError
    ├── ConfigError (also ValueError)          a file, flag or variable is wrong
    ├── ClientRequestError                     the client sent something we refuse
    │   ├── BadRequest              400
    │   ├── MethodNotAllowed        405
    │   ├── BodyTooLarge            413
    │   ├── HeadersTooLarge         431
    │   ├── NotImplementedCoding    501
    │   └── VersionNotSupported     505
    └── UpstreamError                          forwarding to an upstream failed
        ├── NoUpstreamAvailable     503
        │   └── PinnedUnavailable   503 with Retry-After
        ├── UpstreamConnectError    502 (also ConnectionError)
        ├── UpstreamProtocolError   502
        └── UpstreamTimeout         504 (also TimeoutError)

Library errors (OSError, httptools parser errors, redis errors) are translated into
these at the boundary where they happen, with ``raise ... from exc``.
"""

from __future__ import annotations


class StickyProxyError(Exception):
    """Base class of every error stickyproxy raises on purpose."""


class ConfigError(StickyProxyError, ValueError):
    """A configuration value is missing or wrong; names where and what was expected."""

    def __init__(self, source: str, key: str, expected: str) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {expected}")


class ClientRequestError(StickyProxyError):
    """The request cannot be accepted; the connection closes after the answer."""

    status = 400
    reason = "bad request"

    def __init__(self, detail: str = "") -> None:
        self.detail = detail or self.reason
        super().__init__(self.detail)


class BadRequest(ClientRequestError):
    """The request is malformed or ambiguously framed."""


class MethodNotAllowed(ClientRequestError):
    """The method is one a reverse proxy does not pass on (CONNECT, TRACE)."""

    status = 405
    reason = "method not allowed"


class NotImplementedCoding(ClientRequestError):
    """The request uses a transfer coding other than chunked."""

    status = 501
    reason = "transfer coding not implemented"


class VersionNotSupported(ClientRequestError):
    """The request line names an HTTP version other than 1.0 and 1.1."""

    status = 505
    reason = "HTTP version not supported"


class HeadersTooLarge(ClientRequestError):
    """The request line and headers exceed the configured limit."""

    status = 431
    reason = "request header fields too large"


class BodyTooLarge(ClientRequestError):
    """The request body exceeds the configured limit."""

    status = 413
    reason = "request body too large"


class UpstreamError(StickyProxyError):
    """Forwarding a request to an upstream failed."""

    status = 502
    reason = "bad gateway"


class NoUpstreamAvailable(UpstreamError):
    """No upstream of the group can take the request."""

    status = 503
    reason = "no upstream available"


class PinnedUnavailable(NoUpstreamAvailable):
    """The request is pinned to an upstream that cannot serve; the group is strict."""

    reason = "pinned upstream unavailable"

    def __init__(self, retry_after: int, wait: bool = False) -> None:
        #: seconds the client is told to wait before trying again
        self.retry_after = retry_after
        #: the group waits for the pinned upstream rather than answering at once
        self.wait = wait
        super().__init__(self.reason)


class UpstreamConnectError(UpstreamError, ConnectionError):
    """Connecting to the upstream, or a reused connection to it, failed."""


class UpstreamProtocolError(UpstreamError):
    """The upstream answered with something that is not valid HTTP/1.x."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The upstream did not connect or answer within its timeout."""

    status = 504
    reason = "gateway timeout"


def status_for(exc: BaseException) -> tuple[int, str]:
    """Return the status code and short reason that answer a failed request."""
    if isinstance(exc, UpstreamError | ClientRequestError):
        return exc.status, exc.reason
    if isinstance(exc, TimeoutError):
        return 504, UpstreamTimeout.reason
    return 502, UpstreamError.reason
