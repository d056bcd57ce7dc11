"""Unit tests for stickyproxy.hashing: hand-derived vectors, retries, spread, remap."""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from dataclasses import dataclass, field

import pytest

from stickyproxy.hashing import (
    FULL_IP_KEY,
    MAX_REHASH,
    IpHashTable,
    IpKeyMode,
    KetamaRing,
    KeyHashTable,
    RandomTable,
    RendezvousTable,
    ip_hash_key,
    load_bound,
    pool_load_bound,
)


@dataclass
class FakePeer:
    """A peer whose state a test sets directly."""

    name: str
    weight: int = 1
    available: bool = True
    active: int = 0


@dataclass
class CountingPeer:
    """A peer that counts how often a table asks whether it is available."""

    name: str
    weight: int = 1
    active: int = 0
    asked: list[int] = field(default_factory=list)

    @property
    def available(self) -> bool:
        self.asked.append(1)
        return False


def pool(*weights: int) -> list[FakePeer]:
    """Return available peers named like nginx servers, one per weight."""
    return [FakePeer(f"10.0.0.{n}:80", w) for n, w in enumerate(weights, 1)]


def spread(picks: list[int | None], size: int) -> list[float]:
    """Return the share of picks each position got."""
    counts = Counter(picks)
    return [counts[position] / len(picks) for position in range(size)]


def random_ipv4(rng: random.Random) -> str:
    """Return a random IPv4 address."""
    return ".".join(str(rng.randrange(256)) for _ in range(4))


# 1.2.3.4 -> key 01 02 03; the chain from 89 is
#   (89 * 113 + 1) % 6271 = 3787, (3787 * 113 + 2) % 6271 = 1505,
#   (1505 * 113 + 3) % 6271 = 751
# and running the key through again gives 3341, 1275, 6116.
FIRST_HASH, SECOND_HASH = 751, 6116


def test_ip_hash_key_is_first_three_octets_of_ipv4() -> None:
    assert ip_hash_key("1.2.3.4") == b"\x01\x02\x03"


def test_ip_hash_key_is_whole_ipv6_address() -> None:
    key = ip_hash_key("2001:db8::1")

    assert key == bytes.fromhex("20010db8000000000000000000000001")


def test_ipv4_mapped_address_hashes_as_ipv4() -> None:
    assert ip_hash_key("::ffff:1.2.3.4") == ip_hash_key("1.2.3.4")
    assert ip_hash_key("::ffff:1.2.3.4", FULL_IP_KEY) == b"\x01\x02\x03\x04"


def test_ipv4_mapped_address_hashes_all_sixteen_bytes_without_unmapping() -> None:
    key = ip_hash_key("::ffff:1.2.3.4", IpKeyMode(unmap_ipv4=False))

    assert key == bytes(10) + b"\xff\xff\x01\x02\x03\x04"


@pytest.mark.parametrize(
    ("address", "mode", "key"),
    [
        ("1.2.3.4", FULL_IP_KEY, b"\x01\x02\x03\x04"),
        ("1.2.3.4", IpKeyMode(ipv4_prefix=16), b"\x01\x02"),
        ("1.2.255.4", IpKeyMode(ipv4_prefix=20), b"\x01\x02\xf0"),
        ("1.2.3.4", IpKeyMode(ipv4_prefix=0), b""),
        (
            "2001:db8:1:2:3:4:5:6",
            IpKeyMode(ipv6_prefix=64),
            bytes.fromhex("20010db800010002"),
        ),
        (
            "2001:db8::ffff",
            IpKeyMode(ipv6_prefix=60),
            bytes.fromhex("20010db800000000"),
        ),
        (
            "2001:db8:0:ff::",
            IpKeyMode(ipv6_prefix=60),
            bytes.fromhex("20010db8000000f0"),
        ),
        ("fe80::1%eth0", IpKeyMode(ipv6_prefix=16), b"\xfe\x80"),
    ],
)
def test_ip_hash_key_keeps_the_prefix_bytes(
    address: str, mode: IpKeyMode, key: bytes
) -> None:
    assert ip_hash_key(address, mode) == key


@pytest.mark.parametrize("address", ["", "1.2.3", "1.2.3.256", "example.org", "::g"])
def test_ip_hash_key_refuses_what_is_not_an_address(address: str) -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        ip_hash_key(address)


@pytest.mark.parametrize(("v4", "v6"), [(-1, 128), (33, 128), (24, -1), (24, 129)])
def test_ip_key_mode_refuses_impossible_prefixes(v4: int, v6: int) -> None:
    with pytest.raises(ValueError, match="prefix"):
        IpKeyMode(v4, v6)


def test_ip_hash_picks_chain_value_modulo_peer_count() -> None:
    table = IpHashTable(pool(1, 1, 1))

    assert table.select(ip_hash_key("1.2.3.4")) == FIRST_HASH % 3 == 1


def test_ip_hash_walks_weights_when_weighted() -> None:
    # 751 % 11 = 3: past weight 1 of position 0, inside weight 3 of position 1
    table = IpHashTable(pool(1, 3, 2, 5))

    assert table.select(ip_hash_key("1.2.3.4")) == 1


def test_ip_hash_with_equal_weights_above_one_still_walks() -> None:
    # nginx walks whenever the total weight is not the peer count: 751 % 6 = 1
    table = IpHashTable(pool(2, 2, 2))

    assert table.select(ip_hash_key("1.2.3.4")) == 0


def test_ip_hash_rehashes_past_an_unavailable_peer() -> None:
    peers = pool(1, 1, 1)
    peers[1].available = False

    assert IpHashTable(peers).select(ip_hash_key("1.2.3.4")) == SECOND_HASH % 3 == 2


def test_ip_hash_rehashes_past_a_tried_peer() -> None:
    table = IpHashTable(pool(1, 1, 1))

    assert table.select(ip_hash_key("1.2.3.4"), frozenset({1})) == 2


def test_ip_hash_gives_up_after_twenty_rehashes() -> None:
    peers = [CountingPeer(f"10.0.0.{n}:80") for n in range(3)]

    assert IpHashTable(peers).select(ip_hash_key("1.2.3.4")) is None
    assert sum(len(peer.asked) for peer in peers) == MAX_REHASH + 1


def test_ip_hash_leaves_a_single_peer_to_round_robin() -> None:
    assert IpHashTable(pool(1)).select(b"\x01\x02\x03") is None
    assert IpHashTable([]).select(b"\x01\x02\x03") is None


def test_ip_hash_honours_weights_over_many_networks() -> None:
    rng = random.Random(7)
    weights = (1, 3, 2, 5)
    table = IpHashTable(pool(*weights))

    picks = [table.select(ip_hash_key(random_ipv4(rng))) for _ in range(20000)]

    for share, weight in zip(spread(picks, 4), weights, strict=True):
        assert share == pytest.approx(weight / 11, rel=0.1)


def test_ip_hash_keeps_a_network_on_one_peer() -> None:
    table = IpHashTable(pool(1, 1, 1, 1, 1))

    picks = {table.select(ip_hash_key(f"192.0.2.{n}")) for n in range(256)}

    assert len(picks) == 1


def test_weights_below_one_are_refused() -> None:
    for table in (IpHashTable, KeyHashTable, KetamaRing, RendezvousTable, RandomTable):
        with pytest.raises(ValueError, match="weight"):
            table(pool(1, 0))


def test_key_hash_takes_bits_16_to_30_of_crc32() -> None:
    # crc32("abc") = 0x352441c2, bits 16..30 = 0x3524 = 13604; 13604 % 4 = 0 and
    # 13604 % 11 = 8, which the walk over 1, 3, 2, 5 places in position 3
    assert zlib.crc32(b"abc") == 0x352441C2

    assert KeyHashTable(pool(1, 1, 1, 1)).select(b"abc") == 0
    assert KeyHashTable(pool(1, 3, 2, 5)).select(b"abc") == 3


def test_key_hash_rehash_prefixes_the_try_number() -> None:
    # 13604 % 5 = 4; then 13604 + bits 16..30 of crc32("1abc") = 22746, % 5 = 1
    peers = pool(1, 1, 1, 1, 1)
    peers[4].available = False

    value = 0x3524 + ((zlib.crc32(b"1abc") >> 16) & 0x7FFF)
    assert value == 22746
    assert KeyHashTable(peers).select(b"abc") == 1


def test_key_hash_leaves_an_empty_key_to_round_robin() -> None:
    assert KeyHashTable(pool(1, 1)).select(b"") is None


def test_key_hash_gives_up_after_twenty_rehashes() -> None:
    peers = [CountingPeer(f"10.0.0.{n}:80") for n in range(3)]

    assert KeyHashTable(peers).select(b"abc") is None
    assert sum(len(peer.asked) for peer in peers) == MAX_REHASH + 1


def test_ketama_ring_is_built_from_host_nul_port_points() -> None:
    # nginx: a point is crc32(host, NUL, port, previous point as 4 little-endian
    # bytes), 160 per unit of weight; a key goes to the first point at or after its
    # crc32, wrapping round to the lowest
    weights = {"10.0.0.1": 1, "10.0.0.2": 2}
    points: list[tuple[int, int]] = []
    for position, (host, weight) in enumerate(weights.items()):
        previous = 0
        for _ in range(160 * weight):
            previous = zlib.crc32(
                f"{host}\x0080".encode() + previous.to_bytes(4, "little")
            )
            points.append((previous, position))
    points.sort()

    ring = KetamaRing([FakePeer(f"{host}:80", w) for host, w in weights.items()])
    for n in range(2000):
        key = f"session-{n}".encode()
        owner = next(
            (p for value, p in points if value >= zlib.crc32(key)), points[0][1]
        )
        assert ring.select(key) == owner


@pytest.mark.parametrize(
    ("names", "same_as"),
    [
        (["a:", "b"], ["a", "b:"]),
        (["unix:/run/a.sock", "b:1"], ["UNIX:/run/a.sock", "b:1"]),
        (["[::1]", "a:8x"], ["[::1]:", "a:8x:"]),
    ],
)
def test_ketama_splits_names_like_nginx(names: list[str], same_as: list[str]) -> None:
    # the port is what follows the last colon if that is all digits (or nothing),
    # else the whole name is the host; a unix: prefix in any case is dropped
    ring = KetamaRing([FakePeer(name) for name in names])
    other = KetamaRing([FakePeer(name) for name in same_as])

    keys = [str(n).encode() for n in range(500)]
    assert [ring.select(k) for k in keys] == [other.select(k) for k in keys]


def test_ketama_walks_to_the_next_point_past_an_unavailable_peer() -> None:
    peers = pool(1, 1, 1, 1)
    keys = [f"session-{n}".encode() for n in range(2000)]
    ring = KetamaRing(peers)
    before = [ring.select(key) for key in keys]
    peers[2].available = False
    after = [ring.select(key) for key in keys]

    for old, new in zip(before, after, strict=True):
        assert new == old if old != 2 else new not in (2, None)


def test_ketama_gives_up_after_twenty_points() -> None:
    peers = [CountingPeer(f"10.0.0.{n}:80") for n in range(3)]

    assert KetamaRing(peers).select(b"abc") is None
    assert sum(len(peer.asked) for peer in peers) == MAX_REHASH + 1


def test_ketama_shares_points_between_peers_of_one_name() -> None:
    peers = [FakePeer("a:1"), FakePeer("a:1"), FakePeer("b:1")]
    ring = KetamaRing(peers)
    keys = [str(n).encode() for n in range(500)]
    assert 1 not in {ring.select(k) for k in keys}

    peers[0].available = False
    assert 1 in {ring.select(k) for k in keys}


def remapped(before: list[int | None], after: list[int | None]) -> float:
    """Return the share of keys whose pick changed."""
    return sum(b != a for b, a in zip(before, after, strict=True)) / len(before)


@pytest.mark.parametrize("table", [KetamaRing, RendezvousTable])
@pytest.mark.parametrize("weights", [(1,) * 9, (1, 3, 2, 5, 1, 1, 4, 2, 1)])
def test_adding_an_upstream_moves_about_its_share_of_keys(
    table: type[KetamaRing | RendezvousTable], weights: tuple[int, ...]
) -> None:
    keys = [f"session-{n}".encode() for n in range(10000)]
    peers = pool(*weights)
    selector = table(peers)
    before = [selector.select(key) for key in keys]
    selector = table([*peers, FakePeer("10.0.1.1:80", 2)])
    after = [selector.select(key) for key in keys]

    share = 2 / (sum(weights) + 2)
    assert 0.5 * share < remapped(before, after) < 1.6 * share

    # every key that moved went to the new upstream
    assert {a for b, a in zip(before, after, strict=True) if a != b} == {len(peers)}


@pytest.mark.parametrize("table", [KetamaRing, RendezvousTable])
def test_removing_an_upstream_moves_only_its_keys(
    table: type[KetamaRing | RendezvousTable],
) -> None:
    keys = [f"session-{n}".encode() for n in range(5000)]
    peers = pool(1, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    smaller = peers[:4] + peers[5:]
    larger, reduced = table(peers), table(smaller)
    before = [peers[larger.select(key) or 0].name for key in keys]
    after = [smaller[reduced.select(key) or 0].name for key in keys]

    moved = [old for old, new in zip(before, after, strict=True) if old != new]
    assert set(moved) == {peers[4].name}
    assert 0.5 / 10 < len(moved) / len(keys) < 1.6 / 10


def test_rendezvous_honours_weights() -> None:
    weights = (1, 3, 2, 5)
    table = RendezvousTable(pool(*weights))

    picks = [table.select(f"k{n}".encode()) for n in range(20000)]

    for share, weight in zip(spread(picks, 4), weights, strict=True):
        assert share == pytest.approx(weight / 11, rel=0.1)


def test_rendezvous_skips_unavailable_and_tried_peers() -> None:
    peers = pool(1, 1, 1)
    table = RendezvousTable(peers)
    first = table.select(b"abc")
    assert first is not None

    second = table.select(b"abc", frozenset({first}))
    assert second not in (first, None)
    peers[first].available = False
    assert table.select(b"abc") == second
    assert table.select(b"abc", frozenset({0, 1, 2})) is None


def test_rendezvous_choice_is_stable_across_releases() -> None:
    # a changed hash would move every session of a running fleet on upgrade
    table = RendezvousTable(pool(1, 1, 1, 1, 1))
    weighted = RendezvousTable(pool(1, 3, 2, 5))

    picks = [table.select(f"user-{n}".encode()) for n in range(8)]
    assert picks == [2, 3, 3, 0, 4, 0, 4, 4]
    picks = [weighted.select(f"user-{n}".encode()) for n in range(8)]
    assert picks == [3, 3, 3, 3, 1, 1, 3, 3]


@pytest.mark.parametrize(
    ("factor", "total", "available", "bound"),
    [(1.25, 0, 4, 1), (1.25, 7, 2, 5), (1.1, 9, 1, 11), (1.0, 9, 5, 2), (2, 5, 0, 0)],
)
def test_load_bound(factor: float, total: int, available: int, bound: int) -> None:
    assert load_bound(factor, total, available) == bound


def test_load_bound_refuses_factor_below_one() -> None:
    with pytest.raises(ValueError, match="factor"):
        load_bound(0.9, 1, 1)


def test_pool_load_bound_counts_only_available_peers() -> None:
    peers = pool(1, 1, 1)
    peers[0].active, peers[1].active, peers[2].active = 4, 3, 100
    peers[2].available = False

    assert pool_load_bound(peers, 1.5) == math.ceil(1.5 * 8 / 2)


@pytest.mark.parametrize("table", [KetamaRing, RendezvousTable])
def test_bounded_load_never_exceeds_the_bound(
    table: type[KetamaRing | RendezvousTable],
) -> None:
    # a few hot keys take most requests; nothing is released, so load only grows
    rng = random.Random(3)
    peers = pool(1, 1, 1, 1, 1, 1, 1, 1)
    peers[5].available = False
    selector = table(peers)
    factor = 1.25

    for n in range(3000):
        key = f"hot-{n % 3}" if rng.random() < 0.7 else f"cold-{n}"
        position = selector.select_bounded(key.encode(), pool_load_bound(peers, factor))
        assert position is not None and position != 5
        peers[position].active += 1

        total = sum(p.active for p in peers if p.available)
        ceiling = math.ceil(factor * total / 7)
        assert max(p.active for p in peers) <= ceiling


@pytest.mark.parametrize("table", [KetamaRing, RendezvousTable])
def test_bounded_load_keeps_the_plain_pick_while_under_the_bound(
    table: type[KetamaRing | RendezvousTable],
) -> None:
    peers = pool(1, 1, 1, 1)
    selector = table(peers)

    for n in range(200):
        key = f"k{n}".encode()
        assert selector.select_bounded(key, bound=1) == selector.select(key)


@pytest.mark.parametrize("table", [KetamaRing, RendezvousTable])
def test_bounded_load_returns_none_when_every_peer_is_full(
    table: type[KetamaRing | RendezvousTable],
) -> None:
    peers = pool(1, 1, 1)
    for peer in peers:
        peer.active = 3

    assert table(peers).select_bounded(b"abc", bound=3) is None
    assert table(peers).select_bounded(b"abc", bound=4) is not None


def test_random_honours_weights() -> None:
    rng = random.Random(5)
    weights = (1, 3, 2, 5)
    table = RandomTable(pool(*weights))

    picks = [table.select(rng) for _ in range(20000)]

    for share, weight in zip(spread(picks, 4), weights, strict=True):
        assert share == pytest.approx(weight / 11, rel=0.1)


def test_two_choices_prefers_the_less_loaded_peer() -> None:
    # the idle peer wins whenever it is one of the two draws: 1 - 3/4 * 2/3 = 1/2
    rng = random.Random(11)
    peers = pool(1, 1, 1, 1)
    for peer in peers[1:]:
        peer.active = 5
    table = RandomTable(peers)

    picks = [table.select_two(rng) for _ in range(8000)]

    assert spread(picks, 4)[0] == pytest.approx(0.5, abs=0.03)


def test_two_choices_compares_load_per_unit_of_weight() -> None:
    rng = random.Random(2)
    peers = pool(1, 4)
    peers[0].active, peers[1].active = 2, 6
    table = RandomTable(peers)

    assert {table.select_two(rng) for _ in range(100)} == {1}


def test_two_choices_with_one_available_peer_returns_it() -> None:
    rng = random.Random(1)
    peers = pool(5, 5, 1)
    peers[0].available = peers[1].available = False
    table = RandomTable(peers)

    assert {table.select_two(rng) for _ in range(50)} == {2}
    assert {table.select(rng) for _ in range(50)} == {2}
    assert table.select_two(rng, frozenset({2})) is None
    assert table.select(rng, frozenset({2})) is None
