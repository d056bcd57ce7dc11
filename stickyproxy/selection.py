"""Selection policies: given the pool and a view of the request, choose an upstream.

A policy is small, synchronous and pure on the per-request path: it sees a ``Pool``
and a ``RequestView`` and returns a ``Selection`` (the upstream and why), or None when
no upstream can take the request, which the data plane answers with 503. Policies that
pin clients (cookie, learn) live in ``stickyproxy.affinity`` and use these ones as
their fallback.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Collection, Iterable, Sequence
from http.cookies import SimpleCookie
from itertools import accumulate
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit

from stickyproxy.config import GroupConfig
from stickyproxy.upstreams import Pool, Selection, Upstream

NO_EXCLUSIONS: frozenset[Upstream] = frozenset()


class RequestView:
    """What a policy may know of a request: client address, target and headers."""

    __slots__ = (
        "_cookies",
        "client_ip",
        "headers",
        "host",
        "method",
        "secure",
        "target",
    )

    def __init__(
        self,
        client_ip: str,
        method: str,
        target: str,
        host: str,
        headers: Sequence[tuple[bytes, bytes]],
        secure: bool = False,
    ) -> None:
        self.client_ip = client_ip
        self.method = method
        self.target = target
        self.host = host
        #: raw header lines as received, names in their original case
        self.headers = headers
        #: the client reached us over TLS, or a trusted proxy says it did
        self.secure = secure
        self._cookies: dict[str, list[str]] | None = None

    def header(self, name: str) -> str | None:
        """Return the first value of a header, matched case-insensitively."""
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None

    def cookies(self, name: str) -> list[str]:
        """Return every value the request carries for a cookie, in order."""
        if self._cookies is None:
            self._cookies = parse_cookies(
                value for key, value in self.headers if key.lower() == b"cookie"
            )
        return self._cookies.get(name, [])

    def cookie(self, name: str) -> str | None:
        """Return the cookie's value if it is sent exactly once."""
        values = self.cookies(name)
        return values[0] if len(values) == 1 else None

    def query_arg(self, name: str) -> str | None:
        """Return the first value of a query argument."""
        for key, value in parse_qsl(
            urlsplit(self.target).query, keep_blank_values=True
        ):
            if key == name:
                return value
        return None


def parse_cookies(lines: Iterable[bytes]) -> dict[str, list[str]]:
    """Parse Cookie header values leniently, keeping duplicate names."""
    cookies: dict[str, list[str]] = {}
    for line in lines:
        for part in line.decode("latin-1").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name:
                cookies.setdefault(name, []).append(value.strip().strip('"'))
    return cookies


def parse_set_cookie_name(value: bytes) -> tuple[str, str] | None:
    """Return the name and value a Set-Cookie header sets, or None if malformed."""
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(value.decode("latin-1"))
    except Exception:
        return None
    for morsel in cookie.values():
        return morsel.key, morsel.value
    return None


class Policy:
    """Base of every policy: chooses an upstream of one pool."""

    name: ClassVar[str] = ""
    #: sticky policies see responses (to set or learn cookies); the others do not
    sticky: ClassVar[bool] = False
    #: a cookie name removed from requests before they reach the upstream
    strip_cookie: bytes | None = None
    #: pins live in a store shared with other processes (see needs_lookup)
    shared_store: ClassVar[bool] = False

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        """Choose an upstream for the request, avoiding those in exclude."""
        raise NotImplementedError

    async def start(self) -> None:
        """Open what the policy needs (a Redis client); called before traffic flows."""

    def adopt(self, previous: Policy) -> None:
        """Take over state worth keeping from the policy this one replaces on reload."""

    def needs_lookup(self, request: RequestView) -> bool:
        """Return whether select needs prefetch awaited first (a shared-store miss)."""
        return False

    async def prefetch(self, request: RequestView) -> None:
        """Load what select will need from a shared store; never raises."""

    async def close(self) -> None:
        """Release what start opened."""

    def on_response(
        self,
        request: RequestView,
        selection: Selection,
        response_headers: Sequence[tuple[bytes, bytes]],
    ) -> Sequence[bytes]:
        """Return header lines to add to the response (sticky policies only)."""
        return ()

    def candidates(self, exclude: Collection[Upstream]) -> Sequence[Upstream]:
        """Return the available upstreams outside exclude (backups if no primary is)."""
        available = self.pool.available()
        if exclude:
            available = [u for u in available if u not in exclude]
            if not available:
                available = [
                    u for u in self.pool.backups if u.available and u not in exclude
                ]
        return available


class RoundRobin(Policy):
    """Smooth weighted round robin, as nginx does it: no bursts to a heavy upstream.

    The order for one cycle of the weights is computed once (nginx's algorithm run
    ahead of time), so each decision is O(1) whatever the number of upstreams;
    unavailable upstreams are skipped, and when many are, a scan finishes the job.
    """

    name = "round_robin"

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._version = -1
        self._schedule: list[Upstream] = []
        self._position = 0

    def _rebuild(self) -> None:
        self._version = self.pool.version
        self._schedule = smooth_weighted_order(self.pool.primaries)
        self._position = random.randrange(len(self._schedule)) if self._schedule else 0

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        if self._version != self.pool.version:
            self._rebuild()
        schedule = self._schedule
        size = len(schedule)

        # a few steps along the precomputed order nearly always find one
        for _ in range(min(size, 8)):
            upstream = schedule[self._position]
            self._position = (self._position + 1) % size
            if upstream.available and upstream not in exclude:
                return Selection(upstream, "new")

        candidates = self.candidates(exclude)
        if not candidates:
            return None
        return Selection(candidates[random.randrange(len(candidates))], "new")


def smooth_weighted_order(
    upstreams: Sequence[Upstream], limit: int = 1 << 16
) -> list[Upstream]:
    """Return one cycle of nginx's smooth weighted round robin over upstreams."""
    if not upstreams:
        return []
    weights = [u.weight for u in upstreams]
    divisor = weights[0]
    for weight in weights[1:]:
        divisor = _gcd(divisor, weight)
    weights = [weight // divisor for weight in weights]
    total = sum(weights)
    if total > limit:
        # an enormous cycle: scale the weights down; shares stay close enough
        scale = limit / total
        weights = [max(1, round(weight * scale)) for weight in weights]
        total = sum(weights)

    current = [0] * len(weights)
    order = []
    for _ in range(total):
        best = 0
        for index, weight in enumerate(weights):
            current[index] += weight
            if current[index] > current[best]:
                best = index
        current[best] -= total
        order.append(upstreams[best])
    return order


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


class LeastConn(Policy):
    """Fewest requests in flight relative to weight; ties go round robin."""

    name = "least_conn"

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._tie = 0

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        candidates = self.candidates(exclude)
        if not candidates:
            return None

        # compare active/weight by cross-multiplying, avoiding division
        best: list[Upstream] = []
        best_active, best_weight = 0, 1
        for upstream in candidates:
            left = upstream.active * best_weight
            right = best_active * upstream.weight
            if not best or left < right:
                best = [upstream]
                best_active, best_weight = upstream.active, upstream.weight
            elif left == right:
                best.append(upstream)
        self._tie += 1
        return Selection(best[self._tie % len(best)], "new")


class RandomTwo(Policy):
    """Two random choices (weighted): the one with fewer requests in flight wins.

    Draws use cumulative weights computed once per pool version, so a decision costs
    the same for 4 upstreams or 1,000; only when most upstreams are out does it fall
    back to scanning the available ones.
    """

    name = "random"

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self._version = -1
        self._upstreams: tuple[Upstream, ...] = ()
        self._cumulative: list[int] = []

    def _draw(self, exclude: Collection[Upstream]) -> Upstream | None:
        cumulative = self._cumulative
        for _ in range(4):
            point = random.randrange(cumulative[-1])
            upstream = self._upstreams[bisect_right(cumulative, point)]
            if upstream.available and upstream not in exclude:
                return upstream
        return None

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        if self._version != self.pool.version:
            self._version = self.pool.version
            self._upstreams = self.pool.primaries
            self._cumulative = list(accumulate(u.weight for u in self._upstreams))
        first = self._draw(exclude) if self._cumulative else None
        second = self._draw(exclude) if first is not None else None
        if first is None or second is None:
            candidates = self.candidates(exclude)
            if not candidates:
                return None
            if len(candidates) == 1:
                return Selection(candidates[0], "new")
            weights = [u.weight for u in candidates]
            first, second = random.choices(candidates, weights, k=2)
        if first.active * second.weight <= second.active * first.weight:
            return Selection(first, "new")
        return Selection(second, "new")


PolicyFactory = Callable[[Pool, GroupConfig], Policy]
