"""Session tables of the learn policy: a bounded local table and its Redis mirror.

The local table answers every request synchronously. When several workers or several
proxies must agree on each pin, a ``RedisMirror`` shares the table: writes go to the
local table at once and to Redis in the background, in pipelined batches; a request
whose session is missing locally may look it up in Redis before it is placed.

Redis going away degrades to the local table alone: one warning, a counter, and a
reconnect loop with capped exponential backoff; writes made meanwhile are kept
(bounded) and sent when Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError

from stickyproxy.log import AFFINITY_LOGGER

log = logging.getLogger(AFFINITY_LOGGER)

T = TypeVar("T")

#: what a failing Redis raises: its own errors, socket errors and timeouts
REDIS_ERRORS = (RedisError, OSError)

#: operations sent to Redis in one pipeline at most
BATCH = 512

#: seconds one Redis command may take before the mirror counts a fault
COMMAND_TIMEOUT = 0.5

#: "set" overwrites; "keep" creates the key if absent, else only extends its life
WriteKind = Literal["set", "keep", "delete"]


class Pin:
    """A session's upstream in the local table, with when it was used and shared."""

    __slots__ = ("confirmed", "shared", "upstream_id", "used")

    def __init__(self, upstream_id: str, used: float, confirmed: bool = True) -> None:
        self.upstream_id = upstream_id
        #: clock time of the last request that used the pin
        self.used = used
        #: clock time Redis was last told of the pin; 0 when never
        self.shared = 0.0
        #: learned from an upstream's Set-Cookie, not only seen in a request
        self.confirmed = confirmed


class SessionTable:
    """Session keys mapped to upstream ids; least recently used leave first.

    Pins are held in two parts. Confirmed pins, learned from an upstream's
    Set-Cookie, fill up to max_entries. Observed pins, for sessions a request carried
    but no upstream set, fill up to max_observed and only ever push out each other:
    a client can invent any number of session ids, and must not be able to evict
    the sessions the application really issued. An observed pin becomes confirmed
    when ``put`` learns it.

    A pin unused for idle_timeout is forgotten. Because every use moves a pin to the
    end of its part, idle pins gather at the front, where each insertion sweeps them
    away.
    """

    def __init__(
        self,
        max_entries: int,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        max_observed: int | None = None,
    ) -> None:
        self.max_entries = max_entries
        #: observed pins held at most; a quarter of max_entries unless given
        self.max_observed = (
            max(1, max_entries // 4) if max_observed is None else max_observed
        )
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        self._observed: OrderedDict[str, Pin] = OrderedDict()
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._pins) + len(self._observed)

    @property
    def observed(self) -> int:
        """Return the number of observed, unconfirmed pins."""
        return len(self._observed)

    def get(self, key: str) -> Pin | None:
        """Return the session's pin and mark it used, or None if unknown or idle."""
        pins = self._pins
        pin = pins.get(key)
        if pin is None:
            pins = self._observed
            pin = pins.get(key)
            if pin is None:
                return None
        now = self.clock()
        if now - pin.used > self.idle_timeout:
            self._remove(key)
            return None
        pin.used = now
        pins.move_to_end(key)
        return pin

    def put(self, key: str, upstream_id: str) -> Pin:
        """Pin the session to an upstream as confirmed, replacing any earlier pin."""
        return self._insert(key, upstream_id, confirmed=True)

    def observe(self, key: str, upstream_id: str) -> Pin:
        """Pin a session no upstream confirmed; a confirmed pin is only moved."""
        # moving a confirmed pin adds no session, so a re-pinned one stays confirmed
        return self._insert(key, upstream_id, confirmed=key in self._pins)

    def _insert(self, key: str, upstream_id: str, confirmed: bool) -> Pin:
        now = self.clock()
        self._remove(key)
        pin = Pin(upstream_id, now, confirmed)
        pins, bound = (
            (self._pins, self.max_entries)
            if confirmed
            else (self._observed, self.max_observed)
        )
        pins[key] = pin
        self._counts[upstream_id] = self._counts.get(upstream_id, 0) + 1

        self._sweep(pins, bound, now)
        return pin

    def _sweep(self, pins: OrderedDict[str, Pin], bound: int, now: float) -> None:
        """Drop idle pins from the front, then the oldest beyond the bound."""
        while pins:
            oldest_key, oldest = next(iter(pins.items()))
            if len(pins) <= bound and now - oldest.used <= self.idle_timeout:
                break
            self._remove(oldest_key)

    def absorb(self, other: SessionTable) -> None:
        """Take the pins of another table, keeping their parts, order and times."""
        for source, target in (
            (other._pins, self._pins),
            (other._observed, self._observed),
        ):
            for key, pin in source.items():
                self._remove(key)
                target[key] = pin
                self._counts[pin.upstream_id] = self._counts.get(pin.upstream_id, 0) + 1
        now = self.clock()
        self._sweep(self._pins, self.max_entries, now)
        self._sweep(self._observed, self.max_observed, now)

    def delete(self, key: str) -> bool:
        """Forget the session; return whether it was known."""
        return self._remove(key)

    def counts(self) -> dict[str, int]:
        """Return the number of pinned sessions per upstream id."""
        return {upstream_id: n for upstream_id, n in self._counts.items() if n}

    def _remove(self, key: str) -> bool:
        pin = self._pins.pop(key, None)
        if pin is None:
            pin = self._observed.pop(key, None)
            if pin is None:
                return False
        self._counts[pin.upstream_id] -= 1
        return True


class RedisMirror:
    """Share session pins through Redis; never blocks or fails a request."""

    def __init__(self, url: str, prefix: str, ttl: float, max_pending: int) -> None:
        self.prefix = prefix
        #: seconds a pin lives in Redis after its last write or refresh
        self.ttl = max(1, round(ttl))
        self.max_pending = max_pending
        self.where = describe_url(url)
        #: Redis answered the last command
        self.connected = False
        #: commands or pipelines that failed
        self.errors = 0
        #: writes dropped because Redis stayed away longer than the queue lasts
        self.dropped = 0
        #: lookups made for sessions missing from the local table
        self.lookups = 0
        #: seconds the last successful command or pipeline took; None before one
        self.latency: float | None = None
        # one immediate retry heals a pooled connection that a Redis restart broke
        self._client = Redis.from_url(
            url,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        self._pending: OrderedDict[str, tuple[WriteKind, str]] = OrderedDict()
        self._wake = asyncio.Event()
        self._backoff = ExponentialBackoff(cap=5.0, base=0.1)
        self._state: Literal["unknown", "up", "down"] = "unknown"
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Check that Redis answers, then start the background writer."""
        try:
            await self._timed(self._client.ping())
        except REDIS_ERRORS as exc:
            self._fault(exc)
        else:
            self._restored()
        self._writer = asyncio.create_task(
            self._run(), name=f"redis-mirror {self.where}"
        )

    async def close(self) -> None:
        """Stop the writer, send what is pending if Redis answers, close the client."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self.connected and self._pending:
            with contextlib.suppress(*REDIS_ERRORS):
                await asyncio.wait_for(self._flush(), COMMAND_TIMEOUT * 2)
        await self._client.aclose()

    @property
    def pending(self) -> int:
        """Return the number of writes waiting for Redis."""
        return len(self._pending)

    def write(self, key: str, upstream_id: str, kind: WriteKind = "set") -> None:
        """Queue a pin for Redis; a later write of the same key replaces this one."""
        pending = self._pending
        pending.pop(key, None)
        pending[key] = (kind, upstream_id)
        if len(pending) > self.max_pending:
            pending.popitem(last=False)
            self.dropped += 1
        self._wake.set()

    def delete(self, key: str) -> None:
        """Queue the removal of a pin from Redis."""
        self.write(key, "", "delete")

    async def lookup(self, key: str) -> str | None:
        """Return the upstream id Redis holds for the session, or None."""
        self.lookups += 1
        try:
            value = await self._timed(self._client.get(self.prefix + key))
        except REDIS_ERRORS as exc:
            self._fault(exc)
            return None
        if not isinstance(value, bytes):
            return None
        return value.decode("ascii", "replace")

    async def _run(self) -> None:
        """Send queued writes while Redis answers; otherwise retry with backoff."""
        failures = 0
        while True:
            if not self.connected:
                try:
                    await self._timed(self._client.ping())
                except REDIS_ERRORS as exc:
                    self._fault(exc)
                    failures += 1
                    await asyncio.sleep(self._backoff.compute(failures))
                    continue
                failures = 0
                self._restored()

            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._flush()
            except REDIS_ERRORS as exc:
                self._fault(exc)

    async def _flush(self) -> None:
        """Send one batch of queued writes; requeue it if Redis fails."""
        batch: list[tuple[str, tuple[WriteKind, str]]] = []
        pending = self._pending
        while pending and len(batch) < BATCH:
            batch.append(pending.popitem(last=False))

        pipe = self._client.pipeline(transaction=False)
        ttl = self.ttl
        for key, (kind, upstream_id) in batch:
            name = self.prefix + key
            if kind == "delete":
                pipe.delete(name)
            elif kind == "set":
                pipe.set(name, upstream_id, ex=ttl)
            else:
                pipe.set(name, upstream_id, ex=ttl, nx=True)
                pipe.expire(name, ttl)
        try:
            await self._timed(pipe.execute())
        except BaseException:
            # a newer write of the same key, queued meanwhile, wins over the old one
            for key, operation in reversed(batch):
                if key not in pending:
                    pending[key] = operation
                    pending.move_to_end(key, last=False)
            raise

    async def _timed(self, command: Awaitable[T]) -> T:
        """Await a Redis command and record how long it took."""
        started = time.monotonic()
        result = await command
        self.latency = time.monotonic() - started
        return result

    def _fault(self, exc: BaseException) -> None:
        self.errors += 1
        self.connected = False
        self._wake.set()
        if self._state != "down":
            self._state = "down"
            log.warning(
                "redis at %s unreachable, learned pins stay in this process until it "
                "returns: %s",
                self.where,
                exc,
            )

    def _restored(self) -> None:
        self.connected = True
        if self._state == "down":
            log.info("redis at %s reachable again, sharing learned pins", self.where)
        elif self._state == "unknown":
            log.info("sharing learned pins through redis at %s", self.where)
        self._state = "up"


def describe_url(url: str) -> str:
    """Return where a Redis URL points, without its credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 6379}{parts.path or ''}"
