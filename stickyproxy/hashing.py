"""Hash-based and load-aware selection algorithms, the nginx ones reproduced exactly.

Every table here is built from a sequence of peers when the pool changes and then
answers each request with plain arithmetic: no I/O, no clock, no locks. A table reads
a peer's ``name`` and ``weight`` once, when it is built, and its ``available`` and
``active`` on every decision.

An answer is a *position* in the sequence the table was built from; that sequence is
nginx's server order with the backup servers left out. ``None`` means what nginx means
when it gives up on a hash: ask the round robin policy instead (or, for the load-aware
selections, that no available upstream can take the request).

``tried`` is the set of positions the current request has already tried, nginx's
``tried`` bitmap. A retry that passes it replays the candidate order nginx follows for
that request; the one difference is that nginx's budget of 20 re-hashes spans all the
attempts of a request, while here it starts afresh on each call.
"""

from __future__ import annotations

import hashlib
import math
import random
import socket
import zlib
from bisect import bisect_left, bisect_right
from collections.abc import Sequence, Set
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

#: nginx re-hashes this many times past an unavailable pick, then uses round robin.
MAX_REHASH = 20

#: points each unit of weight puts on nginx's consistent hash ring.
KETAMA_POINTS = 160

#: the ip_hash key nginx uses for a client that has no IP address (a unix socket).
UNIX_SOCKET_KEY = bytes(3)

_IP_HASH_START = 89
_IP_HASH_MULTIPLIER = 113
_IP_HASH_MODULUS = 6271

_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_NO_TRIES: frozenset[int] = frozenset()
_MASK64 = (1 << 64) - 1

# nginx's `hash` prefixes the key with the decimal try number from the second try on;
# a crc32 continues from the crc of what came before, so the prefixes are done once
_REHASH_SEEDS = (0, *(zlib.crc32(str(n).encode()) for n in range(1, MAX_REHASH + 1)))


class Peer(Protocol):
    """What a selection table reads from an upstream."""

    @property
    def name(self) -> str:
        """Return the upstream as nginx's ``server`` directive writes it: host:port."""
        ...

    @property
    def weight(self) -> int:
        """Return the relative share of requests, at least 1."""
        ...

    @property
    def available(self) -> bool:
        """Return whether the upstream may take a new request right now."""
        ...

    @property
    def active(self) -> int:
        """Return the number of requests the upstream is serving right now."""
        ...


def _weights(peers: Sequence[Peer]) -> tuple[int, ...]:
    """Return the peers' weights, refusing any below 1 as nginx does."""
    weights = tuple(peer.weight for peer in peers)
    for peer, weight in zip(peers, weights, strict=True):
        if weight < 1:
            raise ValueError(f"weight of {peer.name} must be >= 1, got {weight}")

    return weights


@dataclass(frozen=True, slots=True)
class IpKeyMode:
    """Choose which leading bits of a client address form its ip_hash key.

    The key is the first ``ceil(prefix / 8)`` bytes of the address, with the bits past
    the prefix cleared in the last byte. The default (/24 for IPv4, /128 for IPv6) is
    exactly nginx's key. With ``unmap_ipv4`` an IPv4-mapped IPv6 address
    (``::ffff:a.b.c.d``) counts as the IPv4 address, so a client keeps its upstream
    whether it reaches a dual-stack listener or an IPv4 one; nginx itself hashes all 16
    bytes of such an address when it sees one (``ipv6only=off`` or a forwarded header).
    """

    ipv4_prefix: int = 24
    ipv6_prefix: int = 128
    unmap_ipv4: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.ipv4_prefix <= 32:
            raise ValueError(f"ipv4_prefix must be 0..32, got {self.ipv4_prefix}")
        if not 0 <= self.ipv6_prefix <= 128:
            raise ValueError(f"ipv6_prefix must be 0..128, got {self.ipv6_prefix}")


#: nginx's ip_hash key: the /24 network of an IPv4 client, all of an IPv6 one.
NGINX_IP_KEY = IpKeyMode()

#: the whole address: one key per client instead of one per IPv4 /24.
FULL_IP_KEY = IpKeyMode(ipv4_prefix=32)


def ip_hash_key(address: str, mode: IpKeyMode = NGINX_IP_KEY) -> bytes:
    """Return the ip_hash key of a textual IPv4 or IPv6 address.

    A zone suffix (``fe80::1%eth0``) is ignored; anything else that is not an address
    raises ValueError. Clients without an address take ``UNIX_SOCKET_KEY``.
    """
    text = address.partition("%")[0]
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
        else:
            packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        raise ValueError(f"not an IP address: {address!r}") from None

    if len(packed) == 4:
        prefix = mode.ipv4_prefix
    elif mode.unmap_ipv4 and packed.startswith(_V4_MAPPED_PREFIX):
        packed = packed[12:]
        prefix = mode.ipv4_prefix
    else:
        prefix = mode.ipv6_prefix

    size, spare = -(-prefix // 8), -prefix % 8
    if not spare:
        return packed[:size]
    return packed[: size - 1] + bytes((packed[size - 1] >> spare << spare,))


class IpHashTable:
    """Select like nginx ``ip_hash``: a client address chain hash, weighted walk.

    A decision costs a few integer steps per key byte and one table look-up per try,
    whatever the pool size.
    """

    __slots__ = ("_peers", "_slots")

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = tuple(peers)
        weights = _weights(self._peers)
        total = sum(weights)

        # the chain hash stays below its modulus, so each of its values can be mapped
        # to the position nginx's weighted walk reaches for it, once per pool
        owners: list[int] = []
        for position, weight in enumerate(weights):
            owners.extend([position] * min(weight, _IP_HASH_MODULUS - len(owners)))
        self._slots = (
            tuple(owners[h % total] for h in range(_IP_HASH_MODULUS)) if total else ()
        )

    def select(self, key: bytes, tried: Set[int] = _NO_TRIES) -> int | None:
        """Return the position nginx ip_hash picks for key, or None for round robin.

        Past an unavailable or tried pick nginx runs the key through the chain again,
        continuing from where it stopped; after 20 such re-hashes it gives up.
        """
        peers = self._peers
        if len(peers) < 2:
            return None

        slots = self._slots
        value = _IP_HASH_START
        for _ in range(MAX_REHASH + 1):
            for byte in key:
                value = (value * _IP_HASH_MULTIPLIER + byte) % _IP_HASH_MODULUS

            position = slots[value]
            if position not in tried and peers[position].available:
                return position

        return None


class KeyHashTable:
    """Select like nginx ``hash $key`` without ``consistent``: crc32 modulo weight.

    A decision costs one crc32 and, when the weights differ, one bisect per try.
    """

    __slots__ = ("_bounds", "_peers", "_total")

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = tuple(peers)
        weights = _weights(self._peers)
        self._total = sum(weights)

        # with unit weights the walk lands on the remainder itself
        unit = self._total == len(weights)
        self._bounds = None if unit else tuple(accumulate(weights))

    def select(self, key: bytes, tried: Set[int] = _NO_TRIES) -> int | None:
        """Return the position nginx hash picks for key, or None for round robin.

        The n-th re-hash adds ``crc32(str(n) + key)``'s bits 16..30 to the running
        value, as Cache::Memcached does; an empty key goes to round robin at once.
        """
        peers = self._peers
        if len(peers) < 2 or not key:
            return None

        bounds, total = self._bounds, self._total
        value = 0
        for seed in _REHASH_SEEDS:
            value += (zlib.crc32(key, seed) >> 16) & 0x7FFF
            point = value % total
            position = point if bounds is None else bisect_right(bounds, point)
            if position not in tried and peers[position].available:
                return position

        return None


def _ketama_base(name: str) -> int:
    """Return the crc32 of nginx's point prefix for a server name: host, NUL, port."""
    raw = name.encode()
    if raw[:5].lower() == b"unix:":
        host, port = raw[5:], b""
    else:
        head, colon, tail = raw.rpartition(b":")
        if colon and all(0x30 <= byte <= 0x39 for byte in tail):
            host, port = head, tail
        else:
            host, port = raw, b""

    return zlib.crc32(host + b"\0" + port)


class KetamaRing:
    """Select like nginx ``hash $key consistent``: a ketama ring of crc32 points.

    Each peer puts ``160 * weight`` points on the ring, derived from its name exactly as
    nginx derives them from the ``server`` directive, so the same names and weights put
    every key on the same upstream as nginx. Peers sharing a name share their points;
    nginx spreads such peers round robin, here the first available one takes the key.
    A decision costs one crc32 and one bisect over the points, O(log n).
    """

    __slots__ = ("_groups", "_hashes", "_owners", "_peers")

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = tuple(peers)
        weights = _weights(self._peers)

        groups: dict[str, tuple[int, ...]] = {}
        for position, peer in enumerate(self._peers):
            groups[peer.name] = (*groups.get(peer.name, ()), position)

        # each point is the crc32 of the prefix followed by the previous point,
        # little-endian, as nginx builds them on a little-endian machine
        points: list[tuple[int, int]] = []
        for position, (peer, weight) in enumerate(
            zip(self._peers, weights, strict=True)
        ):
            base, point = _ketama_base(peer.name), 0
            for _ in range(KETAMA_POINTS * weight):
                point = zlib.crc32(point.to_bytes(4, "little"), base)
                points.append((point, position))

        # nginx keeps the first of equal points after a stable sort by value
        points.sort()
        hashes: list[int] = []
        owners: list[tuple[int, ...]] = []
        for point, position in points:
            if not hashes or hashes[-1] != point:
                hashes.append(point)
                owners.append(groups[self._peers[position].name])

        self._hashes = hashes
        self._owners = tuple(owners)
        self._groups = len(groups)

    def select(self, key: bytes, tried: Set[int] = _NO_TRIES) -> int | None:
        """Return the position nginx picks for key, or None for round robin.

        The key's point is the first ring point at or after its crc32; past an
        unavailable or tried owner nginx moves one point on, at most 20 times.
        """
        peers = self._peers
        if len(peers) < 2 or not key:
            return None

        owners, count = self._owners, len(self._owners)
        start = bisect_left(self._hashes, zlib.crc32(key))
        for step in range(MAX_REHASH + 1):
            for position in owners[(start + step) % count]:
                if position not in tried and peers[position].available:
                    return position

        return None

    def select_bounded(
        self, key: bytes, bound: int, tried: Set[int] = _NO_TRIES
    ) -> int | None:
        """Return the first peer on from key's point that stays within bound.

        A peer qualifies when it is available, untried and would serve at most
        ``bound`` requests with this one (see ``load_bound``). The walk may go round
        the whole ring; None means no peer qualifies.
        """
        peers, owners = self._peers, self._owners
        count = len(owners)
        start = bisect_left(self._hashes, zlib.crc32(key))
        seen: set[int] = set()
        for step in range(count):
            group = owners[(start + step) % count]
            if group[0] in seen:
                continue

            seen.add(group[0])
            for position in group:
                peer = peers[position]
                if position not in tried and peer.available and peer.active < bound:
                    return position

            if len(seen) == self._groups:
                break

        return None


def load_bound(factor: float, total_active: int, available: int) -> int:
    """Return how many requests one upstream may serve, counting the next one.

    That is ``ceil(factor * (total_active + 1) / available)``, the bound of
    consistent hashing with bounded loads; ``total_active`` counts the requests in
    flight on the ``available`` upstreams. A factor of at least 1 guarantees that some
    available upstream is within the bound.
    """
    if factor < 1:
        raise ValueError(f"load factor must be >= 1, got {factor}")
    if available < 1:
        return 0

    # rounding first keeps float noise (1.1 * 10 == 11.000000000000002) off the ceiling
    return math.ceil(round(factor * (total_active + 1) / available, 9))


def pool_load_bound(peers: Sequence[Peer], factor: float) -> int:
    """Return ``load_bound`` for peers, counting the available ones (O(n))."""
    total = count = 0
    for peer in peers:
        if peer.available:
            total += peer.active
            count += 1

    return load_bound(factor, total, count)


def _hash64(data: bytes) -> int:
    """Return a 64-bit hash of data that is the same in every process."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class RendezvousTable:
    """Select by weighted rendezvous (highest random weight) hashing.

    Each peer scores ``weight / -ln(u)`` for a key, where ``u`` in (0, 1) is a hash of
    the key and the peer's name; the best available score wins. Adding or removing one
    of n peers moves only the keys it wins or won, about 1/n of them. Each decision
    costs O(n): one splitmix64 finaliser per available peer, plus a logarithm when the
    weights differ.
    """

    __slots__ = ("_entries", "_peers", "_unit")

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = tuple(peers)
        weights = _weights(self._peers)
        self._entries = tuple(
            (position, peer, _hash64(peer.name.encode()), weight)
            for position, (peer, weight) in enumerate(
                zip(self._peers, weights, strict=True)
            )
        )

        # equal weights rank peers by the hash alone: no logarithm needed
        self._unit = len(set(weights)) <= 1

    def select(self, key: bytes, tried: Set[int] = _NO_TRIES) -> int | None:
        """Return the available peer with the highest score for key, or None."""
        salt, unit, log = _hash64(key), self._unit, math.log
        best, chosen = -1.0, None
        for position, peer, seed, weight in self._entries:
            if position in tried or not peer.available:
                continue

            # splitmix64's finaliser spreads the key and name seeds into a uniform u
            mixed = salt ^ seed
            mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
            mixed ^= mixed >> 31
            score = mixed if unit else weight / -log(((mixed >> 11) + 0.5) * 2.0**-53)
            if score >= best:
                best, chosen = score, position

        return chosen

    def select_bounded(
        self, key: bytes, bound: int, tried: Set[int] = _NO_TRIES
    ) -> int | None:
        """Return the best-scoring peer that stays within bound (see load_bound)."""
        salt, unit, log = _hash64(key), self._unit, math.log
        scores: list[tuple[float, int]] = []
        for position, peer, seed, weight in self._entries:
            if position in tried or not peer.available or peer.active >= bound:
                continue

            # the same score as select, kept inline: this loop is the hot path
            mixed = salt ^ seed
            mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
            mixed ^= mixed >> 31
            score = mixed if unit else weight / -log(((mixed >> 11) + 0.5) * 2.0**-53)
            scores.append((score, position))

        return max(scores)[1] if scores else None


class RandomTable:
    """Select like nginx ``random`` and ``random two least_conn``: weighted draws."""

    __slots__ = ("_bounds", "_peers", "_total")

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = tuple(peers)
        self._bounds = tuple(accumulate(_weights(self._peers)))
        self._total = self._bounds[-1] if self._bounds else 0

    def _draw(self, rng: random.Random) -> int:
        """Return a position drawn with probability proportional to its weight."""
        return bisect_right(self._bounds, int(rng.random() * self._total))

    def _eligible(self, tried: Set[int]) -> list[int]:
        """Return the positions of the available, untried peers."""
        peers = self._peers
        return [p for p in range(len(peers)) if p not in tried and peers[p].available]

    def _pick(self, rng: random.Random, positions: list[int]) -> int:
        """Return one of positions drawn by weight."""
        weights = [self._peers[p].weight for p in positions]
        return rng.choices(positions, weights)[0]

    def select(self, rng: random.Random, tried: Set[int] = _NO_TRIES) -> int | None:
        """Return a random available peer drawn by weight, or None if there is none."""
        peers = self._peers
        for _ in range(MAX_REHASH + 1):
            position = self._draw(rng)
            if position not in tried and peers[position].available:
                return position

        # most of the pool is out: draw among the rest instead of retrying blindly
        eligible = self._eligible(tried)
        return self._pick(rng, eligible) if eligible else None

    def select_two(self, rng: random.Random, tried: Set[int] = _NO_TRIES) -> int | None:
        """Draw two distinct available peers by weight; return the less loaded one.

        Load is ``active / weight``; on a tie the second draw wins, as in nginx. With a
        single available peer that peer is returned; None means there is none.
        """
        peers = self._peers
        first: int | None = None
        for _ in range(MAX_REHASH + 1):
            position = self._draw(rng)
            if position == first or position in tried or not peers[position].available:
                continue
            if first is None:
                first = position
                continue
            return self._less_loaded(first, position)

        # most of the pool is out: draw among the rest instead of retrying blindly
        eligible = self._eligible(tried)
        if first is None:
            if not eligible:
                return None
            first = self._pick(rng, eligible)

        others = [p for p in eligible if p != first]
        if not others:
            return first
        return self._less_loaded(first, self._pick(rng, others))

    def _less_loaded(self, first: int, second: int) -> int:
        """Return whichever of two positions has less load per unit of weight."""
        one, two = self._peers[first], self._peers[second]
        if two.active * one.weight > one.active * two.weight:
            return first
        return second
