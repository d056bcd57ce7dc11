"""Metrics over real sockets: requests through an in-process proxy, then a scrape.

Each test starts aiohttp upstreams on free loopback ports, a ProxyServer reporting to
a fresh Metrics, and the admin listener; it then sends plain HTTP/1.1 requests and
reads the text exposition back, as Prometheus would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from stickyproxy.admin import AdminServer
from stickyproxy.config import load_config
from stickyproxy.metrics import Metrics
from stickyproxy.server import ProxyServer
from tests.support import free_port

SESSION = "connect.sid"

#: a cookie-policy group with a fixed secret (a random one would be warned about)
COOKIE_GROUP = 'policy = "cookie"\n[groups.app.cookie]\nsecret = "test-secret"\n'

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Response:
    """What a test needs of a response."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """Return the first value of a header."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def cookies(self) -> dict[str, str]:
        """Return the name and value of every Set-Cookie."""
        found = {}
        for name, value in self.headers:
            if name.lower() == "set-cookie":
                pair = value.split(";", 1)[0]
                key, _, cookie = pair.partition("=")
                found[key.strip()] = cookie.strip()
        return found


@dataclass
class Backend:
    """An upstream that names itself, issues sessions and can hold a request."""

    name: str
    hits: int = 0
    health: int = 200
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        """Return the aiohttp application serving this upstream."""
        app = web.Application()
        app.router.add_get("/", self.hello)
        app.router.add_get("/login", self.login)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/health", self.check)
        return app

    async def hello(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(text=self.name)

    async def login(self, request: web.Request) -> web.Response:
        self.hits += 1
        response = web.Response(text=self.name)
        response.set_cookie(SESSION, uuid.uuid4().hex)
        return response

    async def slow(self, request: web.Request) -> web.Response:
        self.hits += 1
        await self.release.wait()
        return web.Response(text=self.name)

    async def check(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health)


@dataclass
class Stack:
    """A proxy, its admin listener and its upstreams, all on loopback."""

    server: ProxyServer
    admin: AdminServer
    metrics: Metrics
    apps: dict[str, Backend]

    @property
    def port(self) -> int:
        return self.server.ports[0]

    @property
    def admin_port(self) -> int:
        assert self.admin.port is not None
        return self.admin.port

    def name_of(self, index: int) -> str:
        """Return host:port of the index-th upstream."""
        return list(self.apps)[index]


@contextlib.asynccontextmanager
async def upstreams(count: int) -> AsyncIterator[dict[str, Backend]]:
    """Serve count upstreams; yields them by host:port."""
    runners = []
    backends = {}
    try:
        for index in range(count):
            backend = Backend(f"u{index}")
            runner = web.AppRunner(backend.app(), access_log=None, shutdown_timeout=0.2)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            backends[f"127.0.0.1:{runner.addresses[0][1]}"] = backend
        yield backends
    finally:
        for backend in backends.values():
            backend.release.set()
        for runner in runners:
            await runner.cleanup()


def write_config(
    path: Path, names: list[str], group: str = "", extra: str = "", token: str = ""
) -> Path:
    """Write a configuration with one group over the named upstreams."""
    servers = "".join(f'[[groups.app.servers]]\nurl = "http://{n}"\n' for n in names)
    path.write_text(
        '[[listeners]]\naddress = "127.0.0.1:0"\n'
        f'[admin]\naddress = "127.0.0.1:{free_port()}"\ntoken = "{token}"\n'
        '[log]\naccess = "off"\n'
        "[server]\nexplain_headers = true\n"
        f"{extra}\n[groups.app]\n{group}\n{servers}"
    )
    return path


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path,
    count: int = 2,
    group: str = "",
    extra: str = "",
    admin_token: str = "",
) -> AsyncIterator[Stack]:
    """Run upstreams, a proxy reporting to fresh metrics, and the admin listener."""
    async with upstreams(count) as apps:
        path = tmp_path / "proxy.toml"
        write_config(path, list(apps), group, extra, admin_token)
        config = load_config(path, environ={})
        metrics = Metrics()
        server = ProxyServer(
            config,
            str(path),
            observer=metrics.observer(),
            probe_listener=metrics.probe_listener,
        )
        server.reload_listeners.append(metrics.reloaded)
        await server.start()
        admin = AdminServer(server, metrics)
        try:
            await admin.start()
            yield Stack(server, admin, metrics, apps)
        finally:
            await admin.close()
            await server.close()


async def request(
    port: int,
    path: str = "/",
    cookies: dict[str, str] | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Response:
    """Send one HTTP/1.1 request on a new connection and read the whole answer."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: close",
    ]
    if cookies:
        lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()))
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        raw = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    pairs = []
    for line in header_lines:
        name, _, value = line.partition(":")
        pairs.append((name.strip(), value.strip()))
    return Response(int(status_line.split()[1]), pairs, content)


async def scrape(port: int) -> Samples:
    """Read /metrics from the admin listener; return every sample by name and labels."""
    response = await request(port, "/metrics")
    assert response.status == 200
    assert (response.header("Content-Type") or "").startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Add up the samples of a name whose labels include the given ones."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def has(samples: Samples, name: str) -> bool:
    """Return whether any sample of that name was exposed."""
    return any(n == name for n, _ in samples)


async def test_requests_are_counted_per_upstream_and_timed(tmp_path: Path) -> None:
    async with stack(tmp_path, count=2) as s:
        for _ in range(6):
            response = await request(s.port)
            assert response.status == 200
        await request(s.port, "/login", method="POST", body=b"x" * 100)

        samples = await scrape(s.admin_port)
        first, second = s.name_of(0), s.name_of(1)
        name = "stickyproxy_requests_total"
        assert value(samples, name, upstream=first, method="GET", code="2xx") == 3
        assert value(samples, name, upstream=second, method="GET", code="2xx") == 3
        # the upstreams answer POST /login with 405
        assert value(samples, name, method="POST", code="4xx") == 1
        assert value(samples, "stickyproxy_request_duration_seconds_count") == 7
        assert value(samples, "stickyproxy_upstream_response_seconds_count") == 7
        assert value(samples, "stickyproxy_request_body_bytes_total") == 100
        assert value(samples, "stickyproxy_response_body_bytes_total") >= 12
        assert value(samples, "stickyproxy_selections_total", reason="new") == 7
        assert value(samples, "stickyproxy_selections_total", policy="round_robin") == 7
        assert value(samples, "stickyproxy_workers") == 1
        for upstream in (first, second):
            state = "stickyproxy_upstream_state"
            assert value(samples, state, upstream=upstream, state="up") == 1
            assert value(samples, state, upstream=upstream, state="draining") == 0
            assert value(samples, "stickyproxy_upstream_weight", upstream=upstream) == 1


async def test_invented_methods_share_one_label(tmp_path: Path) -> None:
    async with stack(tmp_path, count=1) as s:
        await request(s.port, method="PROPFIND")
        await request(s.port, method="MKCOL")

        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_requests_total", method="other") == 2
        methods = {
            dict(labels)["method"]
            for n, labels in samples
            if n == "stickyproxy_requests_total"
        }
        assert methods == {"other"}


async def test_in_flight_gauge_returns_to_zero(tmp_path: Path) -> None:
    async with stack(tmp_path, count=1) as s:
        held = asyncio.create_task(request(s.port, "/slow"))
        samples: Samples = {}
        for _ in range(100):
            samples = await scrape(s.admin_port)
            if value(samples, "stickyproxy_requests_in_flight") == 1:
                break
            await asyncio.sleep(0.02)
        assert value(samples, "stickyproxy_requests_in_flight") == 1
        # the held client; scrapes go to the admin listener, which is not counted
        assert value(samples, "stickyproxy_client_connections") == 1

        s.apps[s.name_of(0)].release.set()
        assert (await held).status == 200
        for _ in range(100):
            samples = await scrape(s.admin_port)
            if value(samples, "stickyproxy_client_connections") == 0:
                break
            await asyncio.sleep(0.02)
        assert value(samples, "stickyproxy_requests_in_flight") == 0
        assert value(samples, "stickyproxy_client_connections") == 0


async def test_drift_is_counted_when_a_session_moves_under_a_sticky_policy(
    tmp_path: Path,
) -> None:
    group = 'policy = "hash"\n[groups.app.hash]\nkey = "arg:k"\n'
    async with stack(tmp_path, count=3, group=group) as s:
        session = {SESSION: "s-1"}
        first = await request(s.port, "/?k=0", session)
        home = first.header("X-Stickyproxy-Upstream")

        # the same session, hashed by another key, lands elsewhere: drift
        for k in itertools.count(1):
            assert k < 200, "no key hashed to another upstream"
            moved = await request(s.port, f"/?k={k}", session)
            if moved.header("X-Stickyproxy-Upstream") != home:
                break
        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_session_drift_total", group="app") == 1
        assert value(samples, "stickyproxy_selections_total", reason="hashed") >= 2

        # another session on the same upstreams is no drift of the first one
        await request(s.port, "/?k=0", {SESSION: "s-2"})
        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_session_drift_total", group="app") == 1


async def test_repinned_moves_are_not_drift_but_stale_pins_are(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path, count=2, group=COOKIE_GROUP) as s:
        login = await request(s.port, "/login")
        cookies = login.cookies()
        home = login.header("X-Stickyproxy-Upstream")
        assert home is not None
        assert set(cookies) == {SESSION, "stickyproxy"}
        old_pin = cookies["stickyproxy"]
        pinned = await request(s.port, "/", cookies)
        assert pinned.header("X-Stickyproxy-Upstream") == home

        # the pinned upstream goes down: the re-pin explains the move
        home_upstream = s.server.state.groups["app"].pool.find(home)
        assert home_upstream is not None
        home_upstream.set_admin_state("down")
        moved = await request(s.port, "/", cookies)
        assert moved.header("X-Stickyproxy-Reason") == "repinned; pin_down"
        cookies["stickyproxy"] = moved.cookies()["stickyproxy"]
        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_repins_total", cause="pin_down") == 1
        assert value(samples, "stickyproxy_session_drift_total") == 0

        # a forged affinity cookie is re-pinned too, and counted as invalid
        forged = await request(s.port, "/", {**cookies, "stickyproxy": "v1.forged"})
        assert forged.header("X-Stickyproxy-Reason") == "repinned; invalid"
        samples = await scrape(s.admin_port)
        kind = "stickyproxy_invalid_affinity_cookies_total"
        assert value(samples, kind, kind="invalid") == 1
        assert value(samples, "stickyproxy_session_drift_total") == 0

        # back up, an old pin takes the session home again with no re-pin: drift
        home_upstream.set_admin_state("up")
        stale = await request(s.port, "/", {**cookies, "stickyproxy": old_pin})
        assert stale.header("X-Stickyproxy-Upstream") == home
        assert stale.header("X-Stickyproxy-Reason") == "pinned"
        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_session_drift_total", group="app") == 1
        assert value(samples, "stickyproxy_pinned_sessions") >= 2


async def test_round_robin_moves_are_not_drift(tmp_path: Path) -> None:
    async with stack(tmp_path, count=2) as s:
        served = set()
        for _ in range(4):
            response = await request(s.port, "/", {SESSION: "s-1"})
            served.add(response.header("X-Stickyproxy-Upstream"))
        assert len(served) == 2

        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_session_drift_total") == 0


async def test_learned_sessions_show_as_pinned(tmp_path: Path) -> None:
    async with stack(tmp_path, count=2, group='policy = "learn"\n') as s:
        login = await request(s.port, "/login")
        home = login.header("X-Stickyproxy-Upstream")
        again = await request(s.port, "/", login.cookies())
        assert again.header("X-Stickyproxy-Upstream") == home

        samples = await scrape(s.admin_port)
        pinned = "stickyproxy_pinned_sessions"
        assert value(samples, pinned, upstream=str(home)) == 1
        assert value(samples, pinned) == 1
        assert value(samples, "stickyproxy_selections_total", reason="pinned") == 1
        # no Redis is configured, so no Redis family has a sample
        assert not has(samples, "stickyproxy_redis_connected")


async def test_health_probes_and_transitions_are_counted(tmp_path: Path) -> None:
    group = (
        '[groups.app.health]\npath = "/health"\ninterval = 0.05\nfall = 1\nrise = 1\n'
    )
    async with stack(tmp_path, count=2, group=group) as s:
        sick = s.name_of(1)
        s.apps[sick].health = 500
        samples: Samples = {}
        for _ in range(100):
            samples = await scrape(s.admin_port)
            state = "stickyproxy_upstream_state"
            if value(samples, state, upstream=sick, state="unhealthy") == 1:
                break
            await asyncio.sleep(0.02)

        checks = "stickyproxy_health_checks_total"
        transitions = "stickyproxy_health_transitions_total"
        assert value(samples, state, upstream=sick, state="unhealthy") == 1
        assert value(samples, state, upstream=sick, state="up") == 0
        assert value(samples, checks, upstream=sick, result="failure") >= 1
        assert value(samples, checks, upstream=s.name_of(0), result="success") >= 1
        assert value(samples, transitions, upstream=sick, to="unhealthy") == 1
        assert value(samples, transitions, upstream=s.name_of(0)) == 0


async def test_passive_failures_and_retries_are_counted(tmp_path: Path) -> None:
    async with upstreams(1) as apps:
        live = next(iter(apps))
        dead = f"127.0.0.1:{free_port()}"
        path = write_config(tmp_path / "proxy.toml", [live, dead])
        config = load_config(path, environ={})
        metrics = Metrics()
        server = ProxyServer(config, str(path), observer=metrics.observer())
        await server.start()
        admin = AdminServer(server, metrics)
        await admin.start()
        assert admin.port is not None
        try:
            # round robin reaches the dead port once, then it rests
            for _ in range(2):
                assert (await request(server.ports[0])).status == 200
            samples = await scrape(admin.port)
        finally:
            await admin.close()
            await server.close()

        failures = "stickyproxy_upstream_failures_total"
        assert value(samples, failures, upstream=dead, kind="connect") == 1
        assert value(samples, "stickyproxy_retries_total", group="app") == 1
        assert value(samples, "stickyproxy_requests_total", upstream=live) == 2
        assert value(samples, "stickyproxy_upstream_state", state="unhealthy") == 1


def test_batched_updates_expose_exactly_what_direct_ones_do() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from stickyproxy.metrics import _LATENCY_BUCKETS, Batch

    def families() -> tuple[CollectorRegistry, Counter, Histogram]:
        registry = CollectorRegistry()
        counter = Counter("c", "c", ["k"], registry=registry)
        histogram = Histogram("h", "h", buckets=_LATENCY_BUCKETS, registry=registry)
        return registry, counter, histogram

    direct, batched = families(), families()
    batch = Batch()
    values = [0.0, 0.001, 0.0011, 0.3, 2.5, 7.0, 99.0, 0.0025]
    for value in values:
        direct[1].labels("a").inc(3)
        direct[2].observe(value)
        batch.inc(batched[1].labels("a"), 3)
        batch.observe(batched[2], value)

    def samples(registry: CollectorRegistry) -> list[bytes]:
        # creation times differ between the two registries; nothing else may
        text = generate_latest(registry).splitlines()
        return [line for line in text if b"_created" not in line]

    assert samples(direct[0]) != samples(batched[0])
    batch.flush()
    assert samples(direct[0]) == samples(batched[0])
