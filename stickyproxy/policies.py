"""The registry of selection policies by configuration name."""

from __future__ import annotations

from stickyproxy.affinity import CookieAffinity, LearnedAffinity
from stickyproxy.hash_policies import Hash, IpHash
from stickyproxy.selection import LeastConn, Policy, RandomTwo, RoundRobin
from stickyproxy.upstreams import Pool

_SIMPLE: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConn,
    "random": RandomTwo,
    "ip_hash": IpHash,
    "hash": Hash,
}


def build_policy(pool: Pool) -> Policy:
    """Return the policy the pool's group asks for, with its options applied."""
    name = pool.config.policy
    if name == "cookie":
        return CookieAffinity(pool, _SIMPLE[pool.config.cookie.fallback](pool))
    if name == "learn":
        return LearnedAffinity(pool, _SIMPLE[pool.config.learn.fallback](pool))
    return _SIMPLE[name](pool)
