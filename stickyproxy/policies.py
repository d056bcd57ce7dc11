"""The registry of selection policies by configuration name."""

from __future__ import annotations

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
    return _SIMPLE[name](pool)
