"""The signed session cookie, in the form express-session writes it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from urllib.parse import quote, unquote

COOKIE_NAME = "connect.sid"

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{32}")


def new_session_id() -> str:
    """Return a fresh, unguessable session id (192 random bits)."""
    return secrets.token_urlsafe(24)


def _signature(session_id: str, secret: str) -> str:
    """Return the unpadded base64 HMAC-SHA256 of session_id under secret."""
    mac = hmac.new(secret.encode(), session_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode().rstrip("=")


def sign(session_id: str, secret: str) -> str:
    """Return the cookie value ``s:<id>.<signature>``, percent-encoded."""
    return quote(f"s:{session_id}.{_signature(session_id, secret)}", safe="")


def unsign(value: str, secret: str) -> str | None:
    """Return the session id of a cookie value, or None if it is not genuine."""
    text = unquote(value)
    if not text.startswith("s:"):
        return None

    session_id, dot, signature = text[2:].rpartition(".")
    if not dot or _SESSION_ID.fullmatch(session_id) is None:
        return None

    # compare in constant time so the signature cannot be guessed byte by byte
    expected = _signature(session_id, secret)
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    return session_id
