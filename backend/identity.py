"""User and tenant ids: validation and the one normalisation of user ids."""

from __future__ import annotations

from .errors import BadRequest

#: Longest user or tenant id accepted at login.
MAX_ID_LENGTH = 256

# marks a guest account copied into another directory
_GUEST_MARK = "#ext#"


def normalize_user_id(user_id: str) -> str:
    """Return the one id of a person, undoing the guest ('#EXT#') form.

    Ids are trimmed and lower-cased. A guest id such as
    ``alice_contoso.com#EXT#@fabrikam.onmicrosoft.com`` becomes
    ``alice@contoso.com``: the part before the mark, with its last underscore
    (which stood for the '@', since domain names hold no underscore) restored.
    """
    lowered = user_id.strip().lower()
    head, mark, _ = lowered.partition(_GUEST_MARK)
    if not mark:
        return lowered

    local, underscore, domain = head.rpartition("_")
    if not underscore or not local or not domain:
        return head
    return f"{local}@{domain}"


def _checked(value: object, field: str) -> str:
    """Return value trimmed if it is an acceptable id, or raise BadRequest."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string")

    text = value.strip()
    if not text:
        raise BadRequest(f"{field} must not be empty")
    if len(text) > MAX_ID_LENGTH:
        raise BadRequest(f"{field} must be at most {MAX_ID_LENGTH} characters")
    if not text.isprintable():
        raise BadRequest(f"{field} must not contain control characters")
    return text


def login_identity(body: dict[str, object]) -> tuple[str, str]:
    """Return the normalised user id and the tenant id of a login body."""
    unknown = sorted(set(body) - {"userId", "tenantId"})
    if unknown:
        raise BadRequest(f"unexpected field {unknown[0]!r}")

    user_id = normalize_user_id(_checked(body.get("userId"), "userId"))
    tenant_id = _checked(body.get("tenantId"), "tenantId")

    # a guest id with nothing before its mark normalises to nothing at all
    if not user_id:
        raise BadRequest("userId must name a user")
    return user_id, tenant_id
