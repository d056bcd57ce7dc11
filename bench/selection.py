"""Print the cost of one selection decision per policy and pool size, in microseconds.

Run with ``python -m bench.selection``. Every peer is available and idle except where a
row says otherwise, so the numbers are the common case: no re-hash, no long walk.
"""

from __future__ import annotations

import argparse
import random
import timeit
from collections.abc import Callable
from dataclasses import dataclass

from stickyproxy.hashing import (
    IpHashTable,
    KetamaRing,
    KeyHashTable,
    RandomTable,
    RendezvousTable,
    ip_hash_key,
    load_bound,
    pool_load_bound,
)

SIZES = (4, 100, 1000)
KEYS = 1000


@dataclass
class BenchPeer:
    """An upstream as the tables see it."""

    name: str
    weight: int
    available: bool = True
    active: int = 0


def pool(size: int, weighted: bool) -> list[BenchPeer]:
    """Return size peers named like nginx servers, weights 1..5 if weighted."""
    return [
        BenchPeer(f"10.{n // 250}.{n % 250}.1:8080", 1 + n % 5 if weighted else 1)
        for n in range(size)
    ]


def cases(size: int, weighted: bool) -> dict[str, Callable[[int], object]]:
    """Return one decision per policy, each taking the index of a prepared key."""
    rng = random.Random(1)
    peers = pool(size, weighted)
    for peer in peers:
        peer.active = rng.randrange(10)
    addresses = [
        f"198.{rng.randrange(256)}.{rng.randrange(256)}.7" for _ in range(KEYS)
    ]
    ip_keys = [ip_hash_key(address) for address in addresses]
    keys = [f"session-{rng.getrandbits(64):016x}".encode() for _ in range(KEYS)]

    ip_table, key_table = IpHashTable(peers), KeyHashTable(peers)
    ring, hrw, draws = KetamaRing(peers), RendezvousTable(peers), RandomTable(peers)
    bound = load_bound(1.25, sum(p.active for p in peers), len(peers))

    return {
        "ip_hash_key": lambda i: ip_hash_key(addresses[i]),
        "ip_hash": lambda i: ip_table.select(ip_keys[i]),
        "hash": lambda i: key_table.select(keys[i]),
        "hash consistent": lambda i: ring.select(keys[i]),
        "ketama bounded": lambda i: ring.select_bounded(keys[i], bound),
        "rendezvous": lambda i: hrw.select(keys[i]),
        "rendezvous bounded": lambda i: hrw.select_bounded(keys[i], bound),
        "pool_load_bound": lambda i: pool_load_bound(peers, 1.25),
        "random": lambda i: draws.select(rng),
        "random two": lambda i: draws.select_two(rng),
    }


def per_decision(decide: Callable[[int], object], repeat: int) -> float:
    """Return the best observed microseconds per call over all prepared keys."""
    runs = timeit.repeat(
        lambda: [decide(i) for i in range(KEYS)], number=1, repeat=repeat
    )
    return min(runs) / KEYS * 1e6


def main() -> None:
    """Measure every policy at every pool size and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per cell (5)")
    parser.add_argument("--weighted", action="store_true", help="weights 1..5")
    args = parser.parse_args()

    table = {size: cases(size, args.weighted) for size in SIZES}
    names = list(table[SIZES[0]])
    print(f"{'µs per decision':<20}" + "".join(f"{size:>10}" for size in SIZES))
    for name in names:
        cells = [per_decision(table[size][name], args.repeat) for size in SIZES]
        print(f"{name:<20}" + "".join(f"{cell:>10.2f}" for cell in cells))


if __name__ == "__main__":
    main()
