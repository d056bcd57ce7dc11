"""Settings of one backend instance, read from the command line and the environment."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

#: The signing secret used when SESSION_SECRET is unset; fine for a demo only.
DEFAULT_SESSION_SECRET = "dev_session_secret_only"

#: Idle lifetime of a session, renewed by every authenticated request.
DEFAULT_SESSION_TTL = 24 * 60 * 60

_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOSTNAME_JUNK = re.compile(r"[^A-Za-z0-9._-]+")


def valid_instance_id(value: str) -> bool:
    """Tell whether value may name an instance (it goes into a header and logs)."""
    return _INSTANCE_ID.fullmatch(value) is not None


def host_prefix() -> str:
    """Return this machine's name cleaned up for instance ids, or 'instance'."""
    name = _HOSTNAME_JUNK.sub("-", socket.gethostname()).strip("-._")[:40]
    return name or "instance"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything one instance needs to run; checked when built."""

    instance_id: str
    host: str = "127.0.0.1"
    port: int = 3000
    #: Redis URL for sessions and files; None keeps them in this process's memory.
    redis_url: str | None = None
    session_secret: str = DEFAULT_SESSION_SECRET
    #: Idle lifetime of a session in seconds.
    session_ttl: int = DEFAULT_SESSION_TTL

    def __post_init__(self) -> None:
        if not valid_instance_id(self.instance_id):
            raise ValueError(
                f"instance id {self.instance_id!r}: expected 1-64 characters "
                "of letters, digits, '.', '_' or '-'"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port}: expected 0..65535")
        if not self.session_secret:
            raise ValueError("SESSION_SECRET: expected a non-empty value")
        if self.session_ttl < 1:
            raise ValueError(f"session ttl {self.session_ttl}: expected >= 1 second")

    @property
    def default_secret(self) -> bool:
        """Tell whether the session secret is the public development default."""
        return self.session_secret == DEFAULT_SESSION_SECRET


def settings_from_env(
    *,
    host: str,
    port: int,
    instance_id: str | None = None,
    session_ttl: int = DEFAULT_SESSION_TTL,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from arguments plus REDIS_URL, SESSION_SECRET and INSTANCE_ID.

    An explicit instance_id wins over INSTANCE_ID, which wins over
    ``<hostname>-<port>``. Empty variables count as unset.
    """
    env = os.environ if environ is None else environ
    chosen_id = instance_id or env.get("INSTANCE_ID") or f"{host_prefix()}-{port}"
    return Settings(
        instance_id=chosen_id,
        host=host,
        port=port,
        redis_url=env.get("REDIS_URL") or None,
        session_secret=env.get("SESSION_SECRET") or DEFAULT_SESSION_SECRET,
        session_ttl=session_ttl,
    )
