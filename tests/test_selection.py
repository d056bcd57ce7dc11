"""The basic policies and upstream state, without sockets."""

from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest

from stickyproxy.config import GroupConfig, ServerConfig
from stickyproxy.hash_policies import Hash, IpHash, ip_key_mode
from stickyproxy.selection import LeastConn, RandomTwo, RequestView, RoundRobin
from stickyproxy.upstreams import Pool


def make_pool(*weights: int, backup: tuple[int, ...] = (), **group: object) -> Pool:
    servers = tuple(
        ServerConfig(
            url=f"http://127.0.0.1:{3000 + index}",
            weight=weight,
            backup=index in backup,
            max_fails=2,
            fail_timeout=0.2,
        )
        for index, weight in enumerate(weights)
    )
    return Pool(GroupConfig(name="app", servers=servers, **group))  # type: ignore[arg-type]


def request(client: str = "10.0.0.1", target: str = "/") -> RequestView:
    return RequestView(client, "GET", target, "h", [(b"X-Key", b"k1")])


def test_round_robin_is_smooth_for_unequal_weights() -> None:
    pool = make_pool(5, 1, 1)
    policy = RoundRobin(pool)
    picks = [policy.select(request()) for _ in range(70)]
    names = [pick.upstream.index for pick in picks if pick is not None]
    assert Counter(names) == {0: 50, 1: 10, 2: 10}
    # each cycle of seven holds each upstream exactly weight times...
    for start in range(len(names) - 7):
        assert Counter(names[start : start + 7]) == {0: 5, 1: 1, 2: 1}
    # ...and is smooth: the light ones are spread apart, never a run of five heavy
    longest = run = 1
    for before, after in itertools.pairwise(names):
        run = run + 1 if before == after else 1
        longest = max(longest, run)
        assert {before, after} != {1, 2}
    assert longest <= 4


def test_round_robin_skips_unavailable_and_uses_backups_last() -> None:
    pool = make_pool(1, 1, 1, backup=(2,))
    policy = RoundRobin(pool)
    assert {policy.select(request()).upstream.index for _ in range(10)} == {0, 1}  # type: ignore[union-attr]
    pool.upstreams[0].set_admin_state("down")
    assert {policy.select(request()).upstream.index for _ in range(10)} == {1}  # type: ignore[union-attr]
    pool.upstreams[1].set_healthy(False)
    assert {policy.select(request()).upstream.index for _ in range(10)} == {2}  # type: ignore[union-attr]
    pool.upstreams[2].set_admin_state("drain")
    assert policy.select(request()) is None


def test_round_robin_follows_weight_changes() -> None:
    pool = make_pool(1, 1)
    policy = RoundRobin(pool)
    pool.set_weight(pool.upstreams[0], 3)
    counts = Counter(policy.select(request()).upstream.index for _ in range(40))  # type: ignore[union-attr]
    assert counts == {0: 30, 1: 10}


def test_least_conn_prefers_fewest_in_flight_per_weight() -> None:
    pool = make_pool(1, 2, 1)
    policy = LeastConn(pool)
    pool.upstreams[0].active = 2
    pool.upstreams[1].active = 3  # 1.5 per weight unit
    pool.upstreams[2].active = 1
    assert policy.select(request()).upstream.index == 2  # type: ignore[union-attr]
    pool.upstreams[2].active = 4
    assert policy.select(request()).upstream.index == 1  # type: ignore[union-attr]


def test_random_two_never_picks_the_busier_of_two() -> None:
    pool = make_pool(1, 1)
    policy = RandomTwo(pool)
    pool.upstreams[0].active = 10
    picks = Counter(policy.select(request()).upstream.index for _ in range(200))  # type: ignore[union-attr]
    # the busy one wins only when both draws land on it (about a quarter of the time)
    assert 20 < picks[0] < 90


def test_passive_failures_rest_an_upstream_then_it_returns() -> None:
    pool = make_pool(1, 1)
    upstream = pool.upstreams[0]
    assert not upstream.record_failure()
    assert upstream.record_failure()  # max_fails = 2
    assert not upstream.available and upstream.state == "unhealthy"
    time.sleep(0.25)
    assert upstream.available


def test_drain_takes_only_pinned_requests() -> None:
    pool = make_pool(1, 1)
    upstream = pool.upstreams[0]
    assert upstream.set_admin_state("drain")
    assert not upstream.set_admin_state("drain")
    assert not upstream.available and upstream.serves_pinned
    assert upstream.set_admin_state("down")
    assert not upstream.serves_pinned


def test_upstream_ids_reveal_no_address() -> None:
    pool = make_pool(1, 1)
    for upstream in pool:
        assert "127.0.0.1" not in upstream.id and str(upstream.port) not in upstream.id
    assert len({u.id for u in pool}) == 2


@pytest.mark.parametrize(
    ("key", "v4", "v6"),
    [("nginx", 24, 128), ("full", 32, 128), ("/16", 16, 128), ("/64", 24, 64)],
)
def test_ip_hash_key_option(key: str, v4: int, v6: int) -> None:
    mode = ip_key_mode(key)
    assert (mode.ipv4_prefix, mode.ipv6_prefix) == (v4, v6)


def test_ip_hash_keeps_a_24_together_and_rehashes_around_a_down_upstream() -> None:
    pool = make_pool(1, 1, 1, policy="ip_hash")
    policy = IpHash(pool)
    first = policy.select(request("1.2.3.4"))
    assert first is not None and first.reason == "hashed"
    assert first.upstream.index == 1  # nginx's answer, derived in test_hashing
    assert policy.select(request("1.2.3.200")).upstream is first.upstream  # type: ignore[union-attr]
    first.upstream.set_admin_state("down")
    moved = policy.select(request("1.2.3.4"))
    assert moved is not None and moved.upstream is not first.upstream


def test_hash_reads_its_key_from_a_header() -> None:
    from stickyproxy.config import HashConfig

    pool = make_pool(
        1, 1, 1, 1, policy="hash", hash=HashConfig(key="header:X-Key", consistent=True)
    )
    policy = Hash(pool)
    picks = {policy.select(request(client=f"10.0.0.{i}")).upstream for i in range(20)}  # type: ignore[union-attr]
    assert len(picks) == 1  # same header, same upstream, whatever the client


def test_random_two_honours_weights() -> None:
    pool = make_pool(1, 3)
    policy = RandomTwo(pool)
    picks = Counter(policy.select(request()).upstream.index for _ in range(4000))  # type: ignore[union-attr]
    # idle upstreams tie, so the first draw wins: weighted 1 to 3
    assert 0.68 < picks[1] / 4000 < 0.82
    pool.upstreams[1].set_admin_state("down")
    assert {policy.select(request()).upstream.index for _ in range(20)} == {0}  # type: ignore[union-attr]
