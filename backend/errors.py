"""Errors the backend raises on purpose, each carrying the status that answers it.

The class tree::

    BackendError
    ├── RequestError                         the client sent something we refuse
    │   ├── BadRequest              400
    │   ├── Unauthorized            401
    │   ├── NotFound                404
    │   ├── Conflict                409
    │   ├── PayloadTooLarge         413
    │   └── UnsupportedMediaType    415
    └── StoreUnavailable            503      the session store cannot be reached
                                             (also ConnectionError)

Redis and socket errors are translated into ``StoreUnavailable`` in the store module,
with ``raise ... from exc``; the application turns every ``BackendError`` into a JSON
answer ``{"error": <message>}`` with the class's status.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class of every error the backend raises on purpose."""

    status = 500
    message = "internal error"

    def __init__(self, message: str = "") -> None:
        self.message = message or self.message
        super().__init__(self.message)


class RequestError(BackendError):
    """The request cannot be accepted as sent."""

    status = 400
    message = "bad request"


class BadRequest(RequestError):
    """The body or a parameter is malformed or out of range."""


class Unauthorized(RequestError):
    """The request carries no valid session."""

    status = 401
    message = "not authenticated"


class NotFound(RequestError):
    """The addressed resource does not exist for this user."""

    status = 404
    message = "not found"


class Conflict(RequestError):
    """The request clashes with the current state, such as a full file list."""

    status = 409
    message = "conflict"


class PayloadTooLarge(RequestError):
    """The request body exceeds its limit."""

    status = 413
    message = "request body too large"


class UnsupportedMediaType(RequestError):
    """The request body is not JSON."""

    status = 415
    message = "content type must be application/json"


class StoreUnavailable(BackendError, ConnectionError):
    """The session store (Redis) does not answer; retrying later may succeed."""

    status = 503
    message = "session store unavailable"
