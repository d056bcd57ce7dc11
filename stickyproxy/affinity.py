"""Sticky policies: a signed affinity cookie, or the application's own session cookie.

``cookie`` places a client's first request with its fallback policy and answers with
a signed cookie naming the upstream by an id keyed with the signing secret; later
requests carrying a valid cookie go to the same upstream. ``learn`` sets no cookie:
it watches the upstreams' Set-Cookie headers for the application's session cookie
and remembers which upstream issued each session.

Both keep a pin only while its upstream serves pinned requests (a draining upstream
still does). Otherwise the group's ``on_pinned_down`` decides: re-pin through the
fallback, answer 503 at once, or wait for the pinned upstream. A bad cookie is never
an error: the request is placed anew, and the selection says why.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from email.utils import parsedate_to_datetime
from typing import NamedTuple

from stickyproxy.config import CookieConfig, GroupConfig
from stickyproxy.errors import PinnedUnavailable
from stickyproxy.log import AFFINITY_LOGGER
from stickyproxy.selection import NO_EXCLUSIONS, LeastConn, Policy, RequestView
from stickyproxy.stores import RedisMirror, SessionTable
from stickyproxy.upstreams import Pool, Selection, Upstream

log = logging.getLogger(AFFINITY_LOGGER)

#: why a request went where it went
REASONS = frozenset({"new", "pinned", "repinned", "hashed", "fallback"})

#: why a sticky policy could not keep a pin; "draining" never comes from cookie or
#: learn, since a draining upstream keeps serving the requests pinned to it
CAUSES = frozenset(
    {
        "pin_down",
        "draining",
        "invalid",
        "expired",
        "unknown_upstream",
        "duplicated",
        "oversized",
        "empty",
    }
)

#: longest affinity cookie value read; longer ones are refused unread
MAX_COOKIE_LENGTH = 256

#: seconds a cookie's issue time may lie ahead of our clock (other proxies' clocks)
CLOCK_SKEW = 300

#: distinct verified cookie values remembered, so each signature is checked once
VERIFIED_CACHE_SIZE = 4096

#: session cookie values whose table key is remembered
KEY_CACHE_SIZE = 4096

#: longest Expires attribute read in a Set-Cookie; an HTTP date has 29 characters
MAX_DATE_LENGTH = 64

_FORMAT = "v1"
_SIGNATURE_BYTES = 16
_ID_LENGTH = 12
_HEX = frozenset("0123456789abcdef")

_generated_secret = ""


class _Sticky(Policy):
    """What both sticky policies share: the fallback and what to do with a lost pin."""

    sticky = True

    def __init__(self, pool: Pool, fallback: Policy | None = None) -> None:
        super().__init__(pool)
        self.fallback = fallback if fallback is not None else LeastConn(pool)

    def _place(
        self,
        request: RequestView,
        exclude: Collection[Upstream],
        reason: str,
        cause: str,
    ) -> Selection | None:
        """Place the request with the fallback policy and say why."""
        selection = self.fallback.select(request, exclude)
        if selection is None:
            return None
        return Selection(selection.upstream, reason, cause)

    def _keep(
        self, request: RequestView, exclude: Collection[Upstream], upstream: Upstream
    ) -> Selection | None:
        """Send the request to its pinned upstream, or apply on_pinned_down."""
        if upstream.serves_pinned and upstream not in exclude:
            return Selection(upstream, "pinned")
        config = self.pool.config
        if config.on_pinned_down == "repin":
            return self._place(request, exclude, "repinned", "pin_down")
        raise PinnedUnavailable(
            retry_after(upstream, config), wait=config.on_pinned_down == "wait"
        )

    async def start(self) -> None:
        await self.fallback.start()

    async def close(self) -> None:
        await self.fallback.close()

    def adopt(self, previous: Policy) -> None:
        """Carry over what the policy it replaces on a reload has learned."""

    def pinned_counts(self) -> dict[str, int]:
        """Return pins per upstream name."""
        raise NotImplementedError


def retry_after(upstream: Upstream, config: GroupConfig) -> int:
    """Return the seconds a client should wait for its pinned upstream."""
    if upstream.full:
        return 1
    if not upstream.healthy:
        return max(1, math.ceil(config.health.interval * config.health.rise))
    if upstream.resting:
        return max(1, math.ceil(upstream.config.fail_timeout))
    return max(1, math.ceil(config.pinned_wait))


# the cookie policy


def key_id(secret: str) -> str:
    """Return the short public name of a signing key."""
    return hashlib.sha256(b"stickyproxy cookie key\0" + secret.encode()).hexdigest()[:8]


class CookiePin(NamedTuple):
    """What a verified affinity cookie says."""

    kid: str
    #: the upstream's id as the cookie writes it; ``CookieSigner.cookie_id``
    cookie_id: str
    issued: int


class CookieSigner:
    """Sign affinity cookies with one key; verify them with that key or older ones.

    A value reads ``v1.<key id>.<cookie id>.<issued unix time>.<signature>``; the
    signature is a truncated HMAC-SHA256 over everything before it. The cookie id is
    an HMAC of the upstream's id under a key derived from the secret: the same for
    a secret across restarts and proxies, and no guess of group names and addresses
    leads to it without the secret.
    """

    def __init__(self, secret: str, verify_secrets: Sequence[str] = ()) -> None:
        self.kid = key_id(secret)
        self._keys = {key_id(s): s.encode() for s in (*verify_secrets, secret) if s}
        #: older keys still verify, so pins signed with them get re-signed
        self.rotating = len(self._keys) > 1
        self._id_keys = {
            kid: hmac.new(
                key, b"stickyproxy cookie upstream id", hashlib.sha256
            ).digest()
            for kid, key in self._keys.items()
        }

    @property
    def kids(self) -> Collection[str]:
        """Return the ids of every key a cookie may be signed with."""
        return self._keys.keys()

    def cookie_id(self, upstream_id: str, kid: str | None = None) -> str:
        """Return how a cookie signed with a key (ours by default) names an upstream."""
        key = self._id_keys[self.kid if kid is None else kid]
        digest = hmac.new(key, upstream_id.encode(), hashlib.sha256).hexdigest()
        return digest[:_ID_LENGTH]

    def _signature(self, key: bytes, message: str) -> str:
        digest = hmac.new(key, message.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:_SIGNATURE_BYTES]).rstrip(b"=").decode()

    def sign(self, upstream_id: str, issued: int) -> str:
        """Return a cookie value pinning to the upstream, issued at a unix time."""
        message = f"{_FORMAT}.{self.kid}.{self.cookie_id(upstream_id)}.{issued}"
        return f"{message}.{self._signature(self._keys[self.kid], message)}"

    def verify(self, value: str) -> CookiePin | None:
        """Return what the value says if one of our keys signed it, else None."""
        if not value.isascii():
            return None
        parts = value.split(".")
        if len(parts) != 5 or parts[0] != _FORMAT:
            return None
        _, kid, cookie_id, issued, signature = parts
        key = self._keys.get(kid)
        if (
            key is None
            or len(cookie_id) != _ID_LENGTH
            or not _HEX.issuperset(cookie_id)
        ):
            return None
        if not issued.isdigit() or len(issued) > 12:
            return None
        expected = self._signature(key, value[: -len(signature) - 1])
        if not hmac.compare_digest(expected, signature):
            return None
        return CookiePin(kid, cookie_id, int(issued))


def cookie_secret(configured: str) -> str:
    """Return the configured secret, or one generated once for this process."""
    global _generated_secret
    if configured:
        return configured
    if not _generated_secret:
        _generated_secret = secrets.token_urlsafe(32)
        log.warning(
            "no cookie secret configured (cookie.secret or STICKYPROXY_COOKIE_SECRET): "
            "using a random one, so affinity cookies will not survive a restart or be "
            "honoured by other workers and proxies"
        )
    return _generated_secret


class CookieAffinity(_Sticky):
    """Pin clients with a signed cookie the proxy sets itself.

    A cookie is set when a request is placed anew or re-pinned, and refreshed on a
    pinned request once half of its lifetime (the smaller non-zero of max_age and
    server_max_age) has passed, or when an older verify key signed it.
    ``pinned_counts`` counts the pins issued per upstream since start, since the
    cookies clients still hold cannot be counted.
    """

    name = "cookie"

    def __init__(
        self,
        pool: Pool,
        fallback: Policy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(pool, fallback)
        config = pool.config.cookie
        self.config = config
        self.clock = clock
        self.cookie_name = config.name
        self.signer = CookieSigner(cookie_secret(config.secret), config.verify_secrets)
        if config.strip:
            self.strip_cookie = config.name.encode()
        lifetimes = [age for age in (config.max_age, config.server_max_age) if age > 0]
        self._refresh_after = min(lifetimes) / 2 if lifetimes else 0.0
        self._verified: dict[str, CookiePin] = {}
        self._issued: dict[str, int] = {}
        self._upstreams: dict[tuple[str, str], Upstream] = {}
        self._upstreams_version = -1
        self._attributes = {
            secure: _cookie_attributes(config, secure) for secure in (False, True)
        }

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        values = request.cookies(self.cookie_name)
        if not values:
            return self._place(request, exclude, "new", "")
        pinned = self._read(values)
        if isinstance(pinned, str):
            return self._place(request, exclude, "repinned", pinned)
        return self._keep(request, exclude, pinned[1])

    def _read(self, values: Sequence[str]) -> tuple[CookiePin, Upstream] | str:
        """Return the pin the cookie values carry and its upstream, or why not."""
        if len(values) > 1:
            return "duplicated"
        value = values[0]
        if not value:
            return "empty"
        if len(value) > MAX_COOKIE_LENGTH:
            return "oversized"

        pin = self._verified.get(value)
        if pin is None:
            pin = self.signer.verify(value)
            if pin is None:
                return "invalid"
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                del self._verified[next(iter(self._verified))]
            self._verified[value] = pin

        # a verified cookie still ages: check its time on every request
        now = self.clock()
        max_age = self.config.server_max_age
        if max_age and now - pin.issued > max_age:
            return "expired"
        if pin.issued > now + CLOCK_SKEW:
            return "invalid"
        upstream = self._cookie_upstreams().get((pin.kid, pin.cookie_id))
        if upstream is None:
            return "unknown_upstream"
        return pin, upstream

    def _cookie_upstreams(self) -> dict[tuple[str, str], Upstream]:
        """Return the upstreams by key id and cookie id, for the pool as it is now."""
        pool = self.pool
        if self._upstreams_version != pool.version:
            signer = self.signer
            self._upstreams = {
                (kid, signer.cookie_id(upstream.id, kid)): upstream
                for kid in signer.kids
                for upstream in pool
            }
            self._upstreams_version = pool.version
        return self._upstreams

    def on_response(
        self,
        request: RequestView,
        selection: Selection,
        response_headers: Sequence[tuple[bytes, bytes]],
    ) -> Sequence[bytes]:
        upstream = selection.upstream
        if selection.reason == "pinned":
            # without lifetimes or old keys a valid pin never needs a new cookie
            if not (self._refresh_after or self.signer.rotating):
                return ()
            if not self._needs_refresh(request):
                return ()
        else:
            self._issued[upstream.id] = self._issued.get(upstream.id, 0) + 1
        return (self.set_cookie_line(upstream, request.secure),)

    def _needs_refresh(self, request: RequestView) -> bool:
        pinned = self._read(request.cookies(self.cookie_name))
        if isinstance(pinned, str):
            return True
        pin = pinned[0]
        if pin.kid != self.signer.kid:
            return True
        return bool(self._refresh_after) and (
            self.clock() - pin.issued > self._refresh_after
        )

    def set_cookie_line(self, upstream: Upstream, secure: bool) -> bytes:
        """Return the Set-Cookie header line that pins to the upstream."""
        value = self.signer.sign(upstream.id, int(self.clock()))
        return b"Set-Cookie: %s=%s%s\r\n" % (
            self.cookie_name.encode(),
            value.encode(),
            self._attributes[secure],
        )

    def adopt(self, previous: Policy) -> None:
        """Keep counting pins where the replaced policy left off."""
        # verified cookies are not carried over: the keys may have changed
        if isinstance(previous, CookieAffinity):
            for upstream_id, issued in previous._issued.items():
                self._issued[upstream_id] = self._issued.get(upstream_id, 0) + issued

    def pinned_counts(self) -> dict[str, int]:
        """Return the pins issued per upstream name since start."""
        by_id = self.pool.by_id
        return {by_id[uid].name: n for uid, n in self._issued.items() if uid in by_id}


def _cookie_attributes(config: CookieConfig, request_secure: bool) -> bytes:
    """Return the attributes after a Set-Cookie value, for a plain or a TLS request."""
    secure = config.secure == "always" or (config.secure == "auto" and request_secure)
    parts = [f"Path={config.path}"]
    if config.domain:
        parts.append(f"Domain={config.domain}")
    if config.max_age:
        parts.append(f"Max-Age={config.max_age}")
    if config.httponly:
        parts.append("HttpOnly")
    if secure:
        parts.append("Secure")

    # browsers refuse SameSite=None without Secure; their default (Lax) applies then
    if config.samesite != "None" or secure:
        parts.append(f"SameSite={config.samesite}")
    return "".join(f"; {part}" for part in parts).encode("latin-1")


# the learn policy


class SessionCookie(NamedTuple):
    """The session cookie a request carries: its name and its table key."""

    name: str
    key: str


class LearnedAffinity(_Sticky):
    """Pin on the application's own session cookie, learned from its Set-Cookie.

    A session an upstream sets is a confirmed pin. A request may also carry a
    session no upstream set here (one from before a restart, or one the client made
    up); where it goes is remembered as an observed pin, so that it keeps its
    upstream, in a smaller part of the table that never pushes out confirmed pins
    and is never shared through Redis. It becomes confirmed once an upstream sets
    it. A confirmed session re-pinned away from a lost upstream stays confirmed.

    The table holds a hash of each session value, never the value. With a Redis URL
    the table is shared: the data plane must call ``needs_lookup`` once per request
    and, when it returns True, await ``prefetch`` before ``select``. A pin learned by
    another proxy after this one cached the session is seen once the local pin idles
    out or is replaced.
    """

    name = "learn"
    shared_store = True

    def __init__(
        self,
        pool: Pool,
        fallback: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(pool, fallback)
        config = pool.config.learn
        self.cookie_names = config.cookies
        self.table = SessionTable(config.max_entries, config.idle_timeout, clock)
        self.clock = clock
        self.store: RedisMirror | None = None
        if config.redis_url:
            prefix = f"stickyproxy:learn:{pool.name}:"
            self.store = RedisMirror(
                config.redis_url, prefix, config.idle_timeout, config.max_entries
            )
        self._refresh_after = config.idle_timeout / 4
        self._keys: dict[tuple[str, str], str] = {}

    @property
    def redis_connected(self) -> bool:
        """Return whether Redis answered last time it was asked."""
        return self.store is not None and self.store.connected

    @property
    def redis_errors(self) -> int:
        """Return how many Redis commands or pipelines failed."""
        return self.store.errors if self.store is not None else 0

    @property
    def redis_latency(self) -> float | None:
        """Return the seconds the last successful Redis command took, if any."""
        return self.store.latency if self.store is not None else None

    async def start(self) -> None:
        await super().start()
        if self.store is not None:
            await self.store.start()

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
        await super().close()

    def session(self, request: RequestView) -> SessionCookie | None:
        """Return the first configured session cookie the request carries."""
        for name in self.cookie_names:
            values = request.cookies(name)
            # when a cookie is sent twice, browsers put the most specific path first
            if values and values[0]:
                return SessionCookie(name, self._key(name, values[0]))
        return None

    def _key(self, name: str, value: str) -> str:
        """Return a session's table key: a hash, so that no session id is stored."""
        key = self._keys.get((name, value))
        if key is None:
            data = f"{name}={value}".encode("utf-8", "surrogateescape")
            key = hashlib.sha256(data).hexdigest()[:32]
            if len(self._keys) >= KEY_CACHE_SIZE:
                del self._keys[next(iter(self._keys))]
            self._keys[name, value] = key
        return key

    def needs_lookup(self, request: RequestView) -> bool:
        """Return whether prefetch should run: a session missing here, Redis up."""
        if self.store is None or not self.store.connected:
            return False
        session = self.session(request)
        return session is not None and self.table.get(session.key) is None

    async def prefetch(self, request: RequestView) -> None:
        """Copy the session's pin from Redis into the local table; never raises."""
        session = self.session(request)
        if self.store is None or session is None or self.table.get(session.key):
            return
        upstream_id = await self.store.lookup(session.key)
        if upstream_id:
            pin = self.table.put(session.key, upstream_id)
            pin.shared = self.clock()

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        session = self.session(request)
        if session is None:
            return self._place(request, exclude, "new", "")
        pin = self.table.get(session.key)
        if pin is None:
            return self._place(request, exclude, "new", "")
        upstream = self.pool.by_id.get(pin.upstream_id)
        if upstream is None:
            return self._place(request, exclude, "repinned", "unknown_upstream")

        # an active session keeps its pin alive in Redis too
        store = self.store
        if (
            store is not None
            and pin.confirmed
            and pin.used - pin.shared > self._refresh_after
        ):
            pin.shared = pin.used
            store.write(session.key, pin.upstream_id, "keep")
        return self._keep(request, exclude, upstream)

    def on_response(
        self,
        request: RequestView,
        selection: Selection,
        response_headers: Sequence[tuple[bytes, bytes]],
    ) -> Sequence[bytes]:
        upstream_id = selection.upstream.id
        session = self.session(request)
        spoken = False
        for header, value in response_headers:
            if len(header) != 10 or header.lower() != b"set-cookie":
                continue
            parsed = parse_session_cookie(value, self.cookie_names)
            if parsed is None:
                continue
            name, cookie_value, clears = parsed
            if session is not None and name == session.name:
                spoken = True
            if not clears:
                self._learn(self._key(name, cookie_value), upstream_id)
                continue
            if cookie_value:
                self._forget(self._key(name, cookie_value))
            if session is not None and name == session.name:
                self._forget(session.key)

        # the upstream took a session it was not pinned to and did not set:
        # remember where it went, without trusting the client's word for a session
        if session is not None and not spoken and selection.reason != "pinned":
            pin = self.table.observe(session.key, upstream_id)
            if pin.confirmed and self.store is not None:
                pin.shared = pin.used
                self.store.write(session.key, upstream_id, "set")
        return ()

    def _learn(self, key: str, upstream_id: str) -> None:
        pin = self.table.put(key, upstream_id)
        if self.store is not None:
            pin.shared = pin.used
            self.store.write(key, upstream_id, "set")

    def _forget(self, key: str) -> None:
        self.table.delete(key)
        if self.store is not None:
            self.store.delete(key)

    def adopt(self, previous: Policy) -> None:
        """Take over the replaced policy's session table, so a reload forgets no pin."""
        if isinstance(previous, LearnedAffinity):
            self.table.absorb(previous.table)

    def pinned_counts(self) -> dict[str, int]:
        """Return the sessions pinned per upstream name in this process's table."""
        by_id = self.pool.by_id
        return {
            by_id[uid].name: n for uid, n in self.table.counts().items() if uid in by_id
        }


def parse_session_cookie(
    value: bytes, names: Collection[str]
) -> tuple[str, str, bool] | None:
    """Return the name, value and whether it clears, if a Set-Cookie sets one of names.

    A cookie clears when its value is empty, its Max-Age is not positive, or, without
    a Max-Age, its Expires lies in the past. A malformed Max-Age or Expires counts as
    absent, as browsers ignore it; no value makes this raise.
    """
    text = value.decode("latin-1")
    pair, _, attributes = text.partition(";")
    name, sep, cookie_value = pair.partition("=")
    name = name.strip()
    if not sep or name not in names:
        return None
    cookie_value = cookie_value.strip().strip('"')

    max_age_clears: bool | None = None
    expired: bool | None = None
    for attribute in attributes.split(";"):
        key, _, argument = attribute.partition("=")
        key, argument = key.strip().lower(), argument.strip()
        # a malformed attribute is skipped and leaves an earlier one of its kind
        if key == "max-age" and (read := _max_age_clears(argument)) is not None:
            max_age_clears = read
        elif key == "expires" and (read := _expired(argument)) is not None:
            expired = read

    # Max-Age wins over Expires when a cookie has both
    if max_age_clears is None:
        max_age_clears = bool(expired)
    return name, cookie_value, not cookie_value or max_age_clears


def _max_age_clears(argument: str) -> bool | None:
    """Return whether a Max-Age value clears its cookie, or None if it is malformed."""
    digits = argument.removeprefix("-")
    if not digits.isascii() or not digits.isdigit():
        return None

    # only the sign matters: a number of any length is read without converting it
    return argument.startswith("-") or not digits.strip("0")


def _expired(argument: str) -> bool | None:
    """Return whether an Expires date lies in the past, or None if it is malformed."""
    if len(argument) > MAX_DATE_LENGTH:
        return None
    try:
        return parsedate_to_datetime(argument).timestamp() < time.time()
    except (TypeError, ValueError, OverflowError, OSError):
        # out-of-range fields fail in several ways inside email.utils and datetime
        return None
