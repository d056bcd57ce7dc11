"""File records: what an upload may contain and how a record looks."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import NotRequired, TypedDict

from .errors import BadRequest, PayloadTooLarge

#: Longest file name, in characters.
MAX_NAME_LENGTH = 255
#: Largest inline content, in UTF-8 bytes.
MAX_CONTENT_BYTES = 16 * 1024
#: Largest declared size of a file whose content is not uploaded (1 TB).
MAX_DECLARED_SIZE = 10**12
#: Most files (listed plus trashed) one user may hold.
MAX_FILES_PER_USER = 500

_FORBIDDEN_IN_NAMES = frozenset('/\\<>:"|?*')


class FileRecord(TypedDict):
    """One stored file as the API shows it."""

    id: str
    name: str
    size: int
    createdAt: str
    content: NotRequired[str]
    deletedAt: NotRequired[str]


def now_iso() -> str:
    """Return the current UTC time as an ISO 8601 string with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def new_file_id() -> str:
    """Return a fresh file id: 32 lower-case hex digits."""
    return secrets.token_hex(16)


def valid_file_id(value: str) -> bool:
    """Tell whether value has the shape of a file id."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _checked_name(value: object) -> str:
    """Return value if it is an acceptable file name, or raise BadRequest."""
    if not isinstance(value, str):
        raise BadRequest("name must be a string")

    name = value.strip()
    if not name or name in {".", ".."}:
        raise BadRequest("name must name a file")
    if len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"name must be at most {MAX_NAME_LENGTH} characters")
    if not name.isprintable() or _FORBIDDEN_IN_NAMES.intersection(name):
        raise BadRequest('name must not contain control characters or /\\<>:"|?*')
    return name


def _checked_size(value: object) -> int:
    """Return value if it is an acceptable declared size, or raise BadRequest."""
    # bool is an int in Python but never a size
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest("size must be an integer")
    if not 0 <= value <= MAX_DECLARED_SIZE:
        raise BadRequest(f"size must be between 0 and {MAX_DECLARED_SIZE}")
    return value


def record_from_upload(body: dict[str, object]) -> FileRecord:
    """Build a new record from an upload body ``{name, size}`` or ``{name, content}``.

    With content, size is its length in UTF-8 bytes; a size sent alongside must
    agree with it.
    """
    unknown = sorted(set(body) - {"name", "size", "content"})
    if unknown:
        raise BadRequest(f"unexpected field {unknown[0]!r}")

    name = _checked_name(body.get("name"))
    if "content" not in body:
        if "size" not in body:
            raise BadRequest("give size or content")
        size = _checked_size(body["size"])
        return {"id": new_file_id(), "name": name, "size": size, "createdAt": now_iso()}

    content = body["content"]
    if not isinstance(content, str):
        raise BadRequest("content must be a string")
    try:
        size = len(content.encode())
    except UnicodeEncodeError:
        # JSON can carry lone surrogates, which no store can keep as UTF-8
        raise BadRequest("content must be valid Unicode text") from None
    if size > MAX_CONTENT_BYTES:
        raise PayloadTooLarge(f"content must be at most {MAX_CONTENT_BYTES} bytes")
    if "size" in body and _checked_size(body["size"]) != size:
        raise BadRequest("size does not match the content")

    return {
        "id": new_file_id(),
        "name": name,
        "size": size,
        "content": content,
        "createdAt": now_iso(),
    }
