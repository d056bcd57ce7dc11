"""End to end: the stickyproxy process routes every client as a real nginx does.

The same identity servers sit behind a private nginx and behind stickyproxy, with the
same server lists; thousands of simulated clients (addresses through a trusted
X-Forwarded-For, keys through a query argument) must reach the same identity through
both. This proves the whole path: trusted client resolution, policy wiring and the
hashing tables.
"""

from __future__ import annotations

import random
from pathlib import Path

import aiohttp
import pytest

from stickyproxy.config import load_config
from tests.proxy_support import running_proxy
from tests.test_nginx_compat import (
    GROUPS,
    NGINX,
    Group,
    Nginx,
    nginx,
    random_ipv4,
    random_ipv6,
    random_key,
    served_by,
)

__all__ = ["nginx"]  # the module-scoped nginx fixture, shared with the import

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")

POLICIES = {
    "ip_hash": 'policy = "ip_hash"',
    "hash $arg_k": 'policy = "hash"\n[groups.app.hash]\nkey = "arg:k"',
    "hash $arg_k consistent": (
        'policy = "hash"\n[groups.app.hash]\nkey = "arg:k"\nconsistent = true'
    ),
}


def stickyproxy_config(tmp_path: Path, nginx: Nginx, group: Group) -> Path:
    """Write a configuration that mirrors one of nginx's upstream groups."""
    servers = []
    for server in group.servers:
        # the dead port stays eligible in nginx (max_fails=0); mirror that
        max_fails = 0 if server.identity is None else 1
        servers.append(
            f'[[groups.app.servers]]\nurl = "http://127.0.0.1:{nginx.port(server)}"\n'
            f"weight = {server.weight}\ndown = {str(server.down).lower()}\n"
            f"max_fails = {max_fails}\n"
        )
    path = tmp_path / f"{group.name}.toml"
    path.write_text(
        '[[listeners]]\naddress = "127.0.0.1:0"\n[admin]\naddress = ""\n'
        '[log]\naccess = "off"\n[forwarded]\ntrusted_proxies = ["127.0.0.0/8"]\n'
        f"[groups.app]\n{POLICIES[group.balancer]}\n" + "\n".join(servers)
    )
    return path


def client_requests(group: Group, count: int) -> list[tuple[str, dict[str, str]]]:
    """Return (query, headers) pairs: client addresses for ip_hash, keys otherwise."""
    rng = random.Random(f"parity-{group.name}")
    if group.balancer == "ip_hash":
        addresses = [random_ipv4(rng) for _ in range(count)]
        addresses += [random_ipv6(rng) for _ in range(count // 5)]
        return [("", {"X-Forwarded-For": address}) for address in addresses]
    return [(f"k={random_key(rng)}", {}) for _ in range(count)]


@pytest.mark.parametrize("group", GROUPS, ids=lambda group: group.name)
async def test_stickyproxy_routes_like_nginx(
    nginx: Nginx, group: Group, tmp_path: Path
) -> None:
    requests = client_requests(group, 1000)
    expected = served_by(nginx, group, requests)

    config = load_config(stickyproxy_config(tmp_path, nginx, group), environ={})
    answers = []
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{proxy.ports[0]}/{group.name}"
        for query, headers in requests:
            async with session.get(f"{base}?{query}", headers=headers) as response:
                assert response.status == 200
                answers.append(int(await response.text()))

    mismatches = [
        (request, want, got)
        for request, want, got in zip(requests, expected, answers, strict=True)
        if want != got
    ]
    assert not mismatches, f"{len(mismatches)} of {len(requests)}: {mismatches[:5]}"
