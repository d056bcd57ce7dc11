"""Policies that map a request key to an upstream: ``ip_hash`` and ``hash``.

They wrap the nginx-compatible tables of ``stickyproxy.hashing``: positions are the
group's primary servers in configuration order, as nginx numbers them, and a table is
rebuilt only when the pool's weights or membership change. When a table gives up
(nginx's 20 re-hashes) the request falls back to round robin, as nginx does.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from stickyproxy import hashing
from stickyproxy.selection import NO_EXCLUSIONS, Policy, RequestView, RoundRobin
from stickyproxy.upstreams import Pool, Selection, Upstream

#: client addresses whose ip_hash key is remembered; the cache starts over when full
KEY_CACHE_SIZE = 65536

KeyTable = hashing.IpHashTable | hashing.KeyHashTable | hashing.KetamaRing
Table = KeyTable | hashing.RendezvousTable


def ip_key_mode(key: str) -> hashing.IpKeyMode:
    """Return the key mode of ``ip_hash`` for its ``key`` option.

    "nginx" is nginx's key (IPv4 /24, IPv6 whole); "full" the whole address; "/N"
    sets the IPv4 prefix when N is at most 32, else the IPv6 prefix, leaving the other
    family as nginx has it.
    """
    if key == "nginx":
        return hashing.NGINX_IP_KEY
    if key == "full":
        return hashing.FULL_IP_KEY
    prefix = int(key.removeprefix("/"))
    if prefix <= 32:
        return hashing.IpKeyMode(ipv4_prefix=prefix)
    return hashing.IpKeyMode(ipv6_prefix=prefix)


class _Hashed(Policy):
    """Shared plumbing: the table per pool version and the round-robin fallback."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.fallback = RoundRobin(pool)
        self._version = -1
        self._positions: dict[Upstream, int] = {}

    def _table(self) -> Table:
        raise NotImplementedError

    def _refresh(self) -> None:
        if self._version != self.pool.version:
            self._version = self.pool.version
            self._positions = {u: i for i, u in enumerate(self.pool.primaries)}
            self._rebuild()

    def _rebuild(self) -> None:
        raise NotImplementedError

    def _tried(self, exclude: Collection[Upstream]) -> frozenset[int]:
        if not exclude:
            return frozenset()
        positions = self._positions
        return frozenset(positions[u] for u in exclude if u in positions)

    def _pick(
        self, position: int | None, request: RequestView, exclude: Collection[Upstream]
    ) -> Selection | None:
        if position is not None:
            return Selection(self.pool.primaries[position], "hashed")
        chosen = self.fallback.select(request, exclude)
        return Selection(chosen.upstream, "fallback") if chosen is not None else None


class IpHash(_Hashed):
    """nginx ``ip_hash``, byte for byte, with an optional wider or narrower key."""

    name = "ip_hash"

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.mode = ip_key_mode(pool.config.ip_hash.key)
        self.table: hashing.IpHashTable | None = None
        #: client address -> key: clients repeat, and parsing an address is not free
        self._keys: dict[str, bytes] = {}

    def _rebuild(self) -> None:
        self.table = hashing.IpHashTable(self.pool.primaries)

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        self._refresh()
        assert self.table is not None
        client = request.client_ip
        key = self._keys.get(client)
        if key is None:
            try:
                key = hashing.ip_hash_key(client, self.mode)
            except ValueError:
                key = hashing.UNIX_SOCKET_KEY
            if len(self._keys) >= KEY_CACHE_SIZE:
                self._keys.clear()
            self._keys[client] = key
        position = self.table.select(key, self._tried(exclude))
        return self._pick(position, request, exclude)


def key_reader(spec: str) -> Callable[[RequestView], str]:
    """Return a function that extracts the configured hash key from a request."""
    kind, _, name = spec.partition(":")
    if kind == "client":
        return lambda request: request.client_ip
    if kind == "uri":
        return lambda request: request.target
    if kind == "header":
        return lambda request: request.header(name) or ""
    if kind == "cookie":
        return lambda request: request.cookie(name) or ""
    if kind == "arg":
        return lambda request: request.query_arg(name) or ""
    raise ValueError(f"unknown hash key {spec!r}")


class Hash(_Hashed):
    """nginx ``hash $key`` and ``hash $key consistent``, or weighted rendezvous.

    With ``bounded_load`` set, an upstream already serving more than that factor of
    the mean load is skipped for the next one on the ring (or in rendezvous order).
    Computing the mean walks the pool, so bounded selection is O(upstreams).
    """

    name = "hash"

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        options = pool.config.hash
        self.read_key = key_reader(options.key)
        self.consistent = options.consistent
        self.algorithm = options.algorithm if options.consistent else "modulo"
        self.bounded_load = options.bounded_load if options.consistent else 0.0
        self.table: Table | None = None

    def _rebuild(self) -> None:
        peers = self.pool.primaries
        if self.algorithm == "ketama":
            self.table = hashing.KetamaRing(peers)
        elif self.algorithm == "rendezvous":
            self.table = hashing.RendezvousTable(peers)
        else:
            self.table = hashing.KeyHashTable(peers)

    def select(
        self, request: RequestView, exclude: Collection[Upstream] = NO_EXCLUSIONS
    ) -> Selection | None:
        self._refresh()
        table = self.table
        assert table is not None
        key = self.read_key(request).encode("latin-1", "replace")
        tried = self._tried(exclude)
        if self.bounded_load and isinstance(
            table, hashing.KetamaRing | hashing.RendezvousTable
        ):
            bound = hashing.pool_load_bound(self.pool.primaries, self.bounded_load)
            return self._pick(table.select_bounded(key, bound, tried), request, exclude)
        return self._pick(table.select(key, tried), request, exclude)
