"""Differential tests: a real nginx and stickyproxy.hashing pick the same upstreams.

One nginx process serves everything: a handful of identity servers that answer with
their own number, and a front server whose locations proxy to upstream groups balanced
by ``ip_hash``, ``hash $arg_k`` and ``hash $arg_k consistent``. The realip module takes
the client address from X-Forwarded-For, so any IPv4 or IPv6 client can be simulated
from loopback.
"""

from __future__ import annotations

import http.client
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stickyproxy.hashing import (
    IpHashTable,
    IpKeyMode,
    KetamaRing,
    KeyHashTable,
    ip_hash_key,
)
from tests.support import free_port, wait_for_port

NGINX = shutil.which("nginx")

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")

IDENTITIES = 5


@dataclass(frozen=True, slots=True)
class StaticPeer:
    """A peer whose state never changes while a test runs."""

    name: str
    weight: int = 1
    available: bool = True
    active: int = 0


@dataclass(frozen=True, slots=True)
class Server:
    """One ``server`` line of an upstream group: an identity server or a dead port."""

    identity: int | None
    weight: int = 1
    down: bool = False


@dataclass(frozen=True, slots=True)
class Group:
    """An upstream group and the location of the front server that proxies to it."""

    name: str
    balancer: str
    servers: tuple[Server, ...]


EQUAL = tuple(Server(n) for n in range(4))
WEIGHTED = (Server(0, 1), Server(1, 3), Server(2, 2), Server(3, 5))
ONE_DOWN = (Server(0), Server(1, 2), Server(2, down=True), Server(3), Server(4, 3))

# nginx connects to the dead port, is refused and asks the balancer again; max_fails=0
# keeps the port eligible, so every request takes the retry path
ONE_DEAD = (Server(0, 2), Server(None), Server(1), Server(2, 3))

GROUPS = tuple(
    Group(f"{prefix}_{kind}", balancer, servers)
    for prefix, balancer in (
        ("ip", "ip_hash"),
        ("hash", "hash $arg_k"),
        ("chash", "hash $arg_k consistent"),
    )
    for kind, servers in (
        ("equal", EQUAL),
        ("weighted", WEIGHTED),
        ("down", ONE_DOWN),
        ("dead", ONE_DEAD),
    )
)


class Nginx:
    """A private nginx on free loopback ports, serving the groups above."""

    def __init__(self, binary: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stickyproxy-nginx-"))
        self.front = free_port()
        self.identities = [free_port() for _ in range(IDENTITIES)]
        self.dead = free_port()
        (self.dir / "tmp").mkdir()
        (self.dir / "nginx.conf").write_text(self._config())
        self.process = subprocess.Popen(
            [binary, "-p", str(self.dir), "-c", "nginx.conf", "-e", "error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def port(self, server: Server) -> int:
        """Return the port a server line points at."""
        return (
            self.dead if server.identity is None else self.identities[server.identity]
        )

    def peers(self, group: Group) -> list[StaticPeer]:
        """Return the group's servers as peers, named as nginx names them."""
        return [
            StaticPeer(f"127.0.0.1:{self.port(s)}", s.weight, available=not s.down)
            for s in group.servers
        ]

    def _config(self) -> str:
        """Return nginx.conf: identity servers, upstream groups, the front server."""
        upstreams = []
        for group in GROUPS:
            lines = [f"upstream {group.name} {{", f"    {group.balancer};"]
            for server in group.servers:
                options = f" weight={server.weight}"
                options += " down" if server.down else ""
                options += " max_fails=0" if server.identity is None else ""
                lines.append(f"    server 127.0.0.1:{self.port(server)}{options};")
            lines += ["    keepalive 8;", "}"]
            upstreams.append("\n".join(lines))

        locations = "\n".join(
            f"        location /{group.name} {{ proxy_pass http://{group.name}; }}"
            for group in GROUPS
        )
        identities = "\n".join(
            f'    server {{ listen 127.0.0.1:{port}; return 200 "{number}"; }}'
            for number, port in enumerate(self.identities)
        )
        temp = " ".join(
            f"{kind}_temp_path tmp/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""
daemon off;
master_process off;
pid nginx.pid;
error_log error.log crit;
events {{ worker_connections 256; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 100000;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
{chr(10).join(upstreams)}
{identities}
    server {{
        listen 127.0.0.1:{self.front};
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Forwarded-For;
{locations}
    }}
}}
"""

    def stop(self) -> None:
        """Stop nginx by its process id and remove its folder."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def nginx() -> Iterator[Nginx]:
    """Start one nginx for the module."""
    assert NGINX is not None
    server = Nginx(NGINX)
    try:
        try:
            wait_for_port(server.front)
        except TimeoutError:
            log = server.dir / "error.log"
            pytest.fail(
                f"nginx did not start: {log.read_text() if log.exists() else ''}"
            )
        yield server
    finally:
        server.stop()


def served_by(
    nginx: Nginx, group: Group, requests: list[tuple[str, dict[str, str]]]
) -> list[int]:
    """Send each (query, headers) to the group on one connection; return identities."""
    connection = http.client.HTTPConnection("127.0.0.1", nginx.front, timeout=10)
    answers = []
    try:
        for query, headers in requests:
            connection.request("GET", f"/{group.name}?{query}", headers=headers)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (group.name, query, headers, body)
            answers.append(int(body))
    finally:
        connection.close()

    return answers


Select = Callable[[int, frozenset[int]], int | None]


def expected_identity(group: Group, select: Select, index: int) -> int | None:
    """Return the identity our table picks, retrying past a dead port as nginx does."""
    position = select(index, frozenset())
    if position is not None and group.servers[position].identity is None:
        position = select(index, frozenset({position}))
    return None if position is None else group.servers[position].identity


def assert_same_choices(
    nginx: Nginx,
    group: Group,
    requests: list[tuple[str, dict[str, str]]],
    select: Select,
) -> None:
    """Assert nginx and our select (request index, tried) agree on every request."""
    answers = served_by(nginx, group, requests)
    mismatches = []
    for index, (request, answer) in enumerate(zip(requests, answers, strict=True)):
        expected = expected_identity(group, select, index)
        if expected != answer:
            mismatches.append((request, answer, expected))

    assert not mismatches, f"{len(mismatches)} of {len(requests)}: {mismatches[:5]}"


def random_ipv4(rng: random.Random) -> str:
    """Return a random IPv4 address."""
    return ".".join(str(rng.randrange(256)) for _ in range(4))


def random_ipv6(rng: random.Random) -> str:
    """Return a random global IPv6 address."""
    return ":".join(f"{rng.randrange(0x10000):x}" for _ in range(8))


def random_key(rng: random.Random) -> str:
    """Return a URL-safe session-like key of varying length."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40)))


@pytest.mark.parametrize(
    "group", [g for g in GROUPS if g.balancer == "ip_hash"], ids=lambda g: g.name
)
def test_ip_hash_matches_nginx(nginx: Nginx, group: Group) -> None:
    rng = random.Random(group.name)
    addresses = [random_ipv4(rng) for _ in range(1000)]
    addresses += [random_ipv6(rng) for _ in range(300)]
    addresses += ["2001:db8::1", "::1", "10.0.0.1", "10.0.0.255", "10.0.1.0"]
    table = IpHashTable(nginx.peers(group))
    keys = [ip_hash_key(address) for address in addresses]

    requests = [("", {"X-Forwarded-For": address}) for address in addresses]
    assert_same_choices(
        nginx, group, requests, lambda i, tried: table.select(keys[i], tried)
    )


def test_ip_hash_of_ipv4_mapped_address_matches_nginx_without_unmapping(
    nginx: Nginx,
) -> None:
    group = GROUPS[1]
    rng = random.Random(group.name)
    addresses = [f"::ffff:{random_ipv4(rng)}" for _ in range(300)]
    table = IpHashTable(nginx.peers(group))
    literal = IpKeyMode(unmap_ipv4=False)
    keys = [ip_hash_key(address, literal) for address in addresses]

    requests = [("", {"X-Forwarded-For": address}) for address in addresses]
    assert_same_choices(
        nginx, group, requests, lambda i, tried: table.select(keys[i], tried)
    )


@pytest.mark.parametrize(
    "group", [g for g in GROUPS if g.balancer != "ip_hash"], ids=lambda g: g.name
)
def test_key_hash_matches_nginx(nginx: Nginx, group: Group) -> None:
    rng = random.Random(group.name)
    keys = [random_key(rng) for _ in range(1000)]
    peers = nginx.peers(group)
    table = KetamaRing(peers) if "consistent" in group.balancer else KeyHashTable(peers)
    encoded = [key.encode() for key in keys]

    requests: list[tuple[str, dict[str, str]]] = [(f"k={key}", {}) for key in keys]
    assert_same_choices(
        nginx, group, requests, lambda i, tried: table.select(encoded[i], tried)
    )
