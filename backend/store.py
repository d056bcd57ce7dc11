"""Where sessions and files live: this process's memory, or Redis shared by all.

Files are kept in the same store as sessions on purpose: with several in-memory
instances a user's files exist only on the instance that took the upload, which
is exactly the drift the deployment guide warns about.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import Settings
from .errors import Conflict, StoreUnavailable
from .files import MAX_FILES_PER_USER, FileRecord
from .log import SESSION

logger = logging.getLogger(SESSION)

#: Seconds to wait for Redis to connect or answer before calling it unavailable.
REDIS_TIMEOUT = 1.0
#: Most sessions one in-memory store keeps; the least recently used go first.
MAX_MEMORY_SESSIONS = 100_000

_PREFIX = "backend:"

# adds a file unless the user's listed plus trashed files reach the limit
_ADD_FILE = """
local held = redis.call('HLEN', KEYS[1]) + redis.call('HLEN', KEYS[2])
if held >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# moves one file between the listed and trashed hashes, setting or clearing
# deletedAt (an empty ARGV[2] clears it); returns the moved record or nil
_MOVE_FILE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return nil end
local record = cjson.decode(raw)
if ARGV[2] == '' then record['deletedAt'] = nil else record['deletedAt'] = ARGV[2] end
raw = cjson.encode(record)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], raw)
return raw
"""


@dataclass(frozen=True, slots=True)
class SessionData:
    """What a session remembers: who logged in, for which tenant, and when."""

    user_id: str
    tenant_id: str
    created_at: str


def _sorted(records: list[FileRecord]) -> list[FileRecord]:
    """Return records oldest first, ties broken by id."""
    return sorted(records, key=lambda r: (r["createdAt"], r["id"]))


class Store(ABC):
    """Sessions with an idle lifetime, and each user's listed and trashed files."""

    kind: Literal["memory", "redis"]

    @abstractmethod
    async def create_session(self, session_id: str, data: SessionData) -> None:
        """Store a new session under session_id."""

    @abstractmethod
    async def get_session(self, session_id: str) -> SessionData | None:
        """Return a live session and renew its idle lifetime, or None."""

    @abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Forget a session; forgetting an unknown one is not an error."""

    @abstractmethod
    async def list_files(self, user_id: str) -> list[FileRecord]:
        """Return the user's listed files, oldest first."""

    @abstractmethod
    async def list_trash(self, user_id: str) -> list[FileRecord]:
        """Return the user's trashed files, oldest upload first."""

    @abstractmethod
    async def add_file(self, user_id: str, record: FileRecord) -> None:
        """Add a record to the user's files, or raise Conflict when they are full."""

    @abstractmethod
    async def trash_file(
        self, user_id: str, file_id: str, deleted_at: str
    ) -> FileRecord | None:
        """Move a listed file to the trash and return it, or None if not listed."""

    @abstractmethod
    async def restore_file(self, user_id: str, file_id: str) -> FileRecord | None:
        """Move a trashed file back to the list and return it, or None."""

    @abstractmethod
    async def reachable(self) -> bool:
        """Tell whether the store answers right now."""

    @abstractmethod
    async def close(self) -> None:
        """Release the store's connections."""


class MemoryStore(Store):
    """Keep everything in this process; every instance has its own copy."""

    kind = "memory"

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        # insertion order doubles as recency: a renewed session moves to the end
        self._sessions: dict[str, tuple[SessionData, float]] = {}
        self._files: dict[str, dict[str, FileRecord]] = {}
        self._trash: dict[str, dict[str, FileRecord]] = {}

    async def create_session(self, session_id: str, data: SessionData) -> None:
        now = self._clock()
        expired = [k for k, (_, until) in self._sessions.items() if until <= now]
        for key in expired:
            del self._sessions[key]
        while len(self._sessions) >= MAX_MEMORY_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

        self._sessions[session_id] = (data, now + self._ttl)

    async def get_session(self, session_id: str) -> SessionData | None:
        entry = self._sessions.pop(session_id, None)
        if entry is None:
            return None

        data, until = entry
        now = self._clock()
        if until <= now:
            return None
        self._sessions[session_id] = (data, now + self._ttl)
        return data

    async def delete_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def list_files(self, user_id: str) -> list[FileRecord]:
        return _sorted([r.copy() for r in self._files.get(user_id, {}).values()])

    async def list_trash(self, user_id: str) -> list[FileRecord]:
        return _sorted([r.copy() for r in self._trash.get(user_id, {}).values()])

    async def add_file(self, user_id: str, record: FileRecord) -> None:
        files = self._files.setdefault(user_id, {})
        if len(files) + len(self._trash.get(user_id, {})) >= MAX_FILES_PER_USER:
            raise Conflict(f"at most {MAX_FILES_PER_USER} files per user")
        files[record["id"]] = record.copy()

    async def trash_file(
        self, user_id: str, file_id: str, deleted_at: str
    ) -> FileRecord | None:
        record = self._files.get(user_id, {}).pop(file_id, None)
        if record is None:
            return None

        record["deletedAt"] = deleted_at
        self._trash.setdefault(user_id, {})[file_id] = record
        return record.copy()

    async def restore_file(self, user_id: str, file_id: str) -> FileRecord | None:
        record = self._trash.get(user_id, {}).pop(file_id, None)
        if record is None:
            return None

        record.pop("deletedAt", None)
        self._files.setdefault(user_id, {})[file_id] = record
        return record.copy()

    async def reachable(self) -> bool:
        return True

    async def close(self) -> None:
        # nothing to release: the data goes with the process
        return None


class RedisStore(Store):
    """Keep everything in Redis, shared by every instance that uses the same URL.

    A session is a hash with an EXPIRE renewed on every read; a user's files are
    two hashes (listed and trashed) keyed by file id, changed only by single
    commands or scripts, so concurrent requests never overwrite each other.
    """

    kind = "redis"

    def __init__(self, client: aioredis.Redis, ttl: int) -> None:
        self._client = client
        self._ttl = ttl
        self._add = client.register_script(_ADD_FILE)
        self._move = client.register_script(_MOVE_FILE)
        self._up = True

    @classmethod
    def from_url(cls, url: str, ttl: int) -> RedisStore:
        """Build a store whose commands fail within about a second when Redis is down.

        One immediate retry lets a pooled connection that died with a restarted
        Redis reconnect without failing the request; more would only delay a 503.
        """
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        return cls(client, ttl)

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Translate Redis failures to StoreUnavailable, logging only state changes."""
        try:
            yield
        except (RedisError, OSError) as exc:
            if self._up:
                self._up = False
                logger.warning(
                    "[SESSION] Redis unreachable, answering 503 until it returns: %s",
                    exc,
                )
            raise StoreUnavailable() from exc

        if not self._up:
            self._up = True
            logger.info("[SESSION] Redis reachable again")

    def _files_key(self, user_id: str) -> str:
        return f"{_PREFIX}files:{user_id}"

    def _trash_key(self, user_id: str) -> str:
        return f"{_PREFIX}trash:{user_id}"

    def _session_key(self, session_id: str) -> str:
        return f"{_PREFIX}session:{session_id}"

    async def create_session(self, session_id: str, data: SessionData) -> None:
        key = self._session_key(session_id)
        fields = [
            "userId", data.user_id,
            "tenantId", data.tenant_id,
            "createdAt", data.created_at,
        ]  # fmt: skip
        async with self._guard(), self._client.pipeline(transaction=True) as pipe:
            pipe.hset(key, items=fields)
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def get_session(self, session_id: str) -> SessionData | None:
        key = self._session_key(session_id)
        async with self._guard(), self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.expire(key, self._ttl)
            fields, _ = await pipe.execute()

        fields = cast(dict[str, str], fields)
        if "userId" not in fields or "tenantId" not in fields:
            return None
        return SessionData(
            user_id=fields["userId"],
            tenant_id=fields["tenantId"],
            created_at=fields.get("createdAt", ""),
        )

    async def delete_session(self, session_id: str) -> None:
        async with self._guard():
            await self._client.delete(self._session_key(session_id))

    async def _values(self, key: str) -> list[FileRecord]:
        async with self._guard():
            raw = cast(list[str], await self._client.hvals(key))
        return _sorted([cast(FileRecord, json.loads(v)) for v in raw])

    async def list_files(self, user_id: str) -> list[FileRecord]:
        return await self._values(self._files_key(user_id))

    async def list_trash(self, user_id: str) -> list[FileRecord]:
        return await self._values(self._trash_key(user_id))

    async def add_file(self, user_id: str, record: FileRecord) -> None:
        keys = [self._files_key(user_id), self._trash_key(user_id)]
        args: list[str | int] = [record["id"], json.dumps(record), MAX_FILES_PER_USER]
        async with self._guard():
            added = await self._add(keys=keys, args=args)
        if not added:
            raise Conflict(f"at most {MAX_FILES_PER_USER} files per user")

    async def _moved(
        self, keys: list[str], file_id: str, stamp: str
    ) -> FileRecord | None:
        async with self._guard():
            raw = await self._move(keys=keys, args=[file_id, stamp])
        if raw is None:
            return None
        return cast(FileRecord, json.loads(raw))

    async def trash_file(
        self, user_id: str, file_id: str, deleted_at: str
    ) -> FileRecord | None:
        keys = [self._files_key(user_id), self._trash_key(user_id)]
        return await self._moved(keys, file_id, deleted_at)

    async def restore_file(self, user_id: str, file_id: str) -> FileRecord | None:
        keys = [self._trash_key(user_id), self._files_key(user_id)]
        return await self._moved(keys, file_id, "")

    async def probe(self) -> None:
        """Ping Redis, raising StoreUnavailable if it does not answer; log nothing."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable() from exc

    async def reachable(self) -> bool:
        try:
            await self.probe()
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._client.aclose()


async def open_store(settings: Settings) -> Store:
    """Return the Redis store if REDIS_URL is set and answers, else a memory store."""
    if settings.redis_url is None:
        logger.info(
            "[SESSION] Using MemoryStore (set REDIS_URL to use Redis for PM2 clusters)"
        )
        return MemoryStore(settings.session_ttl)

    try:
        store = RedisStore.from_url(settings.redis_url, settings.session_ttl)
    except ValueError:
        # the parser's message may quote the URL, and a URL may carry a password
        logger.warning(
            "[SESSION] Redis connection failed, falling back to MemoryStore: "
            "REDIS_URL is not a valid Redis URL"
        )
        return MemoryStore(settings.session_ttl)

    try:
        await store.probe()
    except StoreUnavailable as exc:
        await store.close()
        logger.warning(
            "[SESSION] Redis connection failed, falling back to MemoryStore: %s",
            exc.__cause__,
        )
        return MemoryStore(settings.session_ttl)

    logger.info("[SESSION] Using Redis session store")
    return store
