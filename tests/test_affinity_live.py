"""Sticky policies over real sockets: aiohttp upstreams, the proxy, a private Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from stickyproxy.affinity import CookieSigner, LearnedAffinity
from stickyproxy.config import GroupConfig, LearnConfig, ServerConfig
from stickyproxy.selection import Policy, RequestView
from stickyproxy.server import ProxyServer
from stickyproxy.upstreams import Pool, Upstream
from tests.proxy_support import proxy_config, running_proxy
from tests.support import RedisServer, free_port

SECRET = "live-test-secret"
EXPLAIN = "[server]\nexplain_headers = true\n"


class NamedUpstream:
    """An aiohttp upstream that answers with its name and can be stopped and restarted.

    ``/login`` starts a session (sets ``connect.sid``), ``/logout`` clears it, and
    every answer echoes the Cookie header the upstream received.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.runner: web.AppRunner | None = None
        self.sessions = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> web.Application:
        async def hello(request: web.Request) -> web.Response:
            response = web.Response(text=self.name)
            response.headers["X-Seen-Cookie"] = request.headers.get("Cookie", "")
            if request.path == "/login":
                self.sessions += 1
                response.headers["Set-Cookie"] = (
                    f"connect.sid={self.name}-{self.sessions}; Path=/; HttpOnly"
                )
            elif request.path == "/logout":
                response.headers["Set-Cookie"] = "connect.sid=; Path=/; Max-Age=0"
            return response

        app = web.Application()
        app.router.add_get("/{tail:.*}", hello)
        return app

    async def start(self) -> None:
        """Serve on this upstream's port (the same one after a restart)."""
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.runner = runner

    async def stop(self) -> None:
        """Stop serving; connections to the port are refused afterwards."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def upstreams(count: int) -> AsyncIterator[list[NamedUpstream]]:
    """Run count named upstreams for the block."""
    started = [NamedUpstream(f"up{n}") for n in range(1, count + 1)]
    try:
        for upstream in started:
            await upstream.start()
        yield started
    finally:
        for upstream in started:
            await upstream.stop()


def servers(found: list[NamedUpstream], fail_timeout: float = 10.0) -> list[str]:
    """Return [[groups.app.servers]] tables for the upstreams."""
    return [
        f'[[groups.app.servers]]\nurl = "{u.url}"\nfail_timeout = {fail_timeout}'
        for u in found
    ]


@dataclass
class Reply:
    """What a client learns from one answer."""

    status: int
    upstream: str
    reason: str
    set_cookies: list[str]
    seen_cookie: str

    def cookie(self, name: str) -> str | None:
        """Return the value a Set-Cookie of this name sets, if any."""
        for line in self.set_cookies:
            pair = line.split(";", 1)[0]
            key, _, value = pair.partition("=")
            if key == name:
                return value
        return None


async def get(
    http: aiohttp.ClientSession, port: int, path: str = "/", cookie: str = ""
) -> Reply:
    """Send a GET through the proxy with an explicit Cookie header."""
    headers = {"Cookie": cookie} if cookie else {}
    async with http.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response:
        body = await response.text()
        return Reply(
            response.status,
            body,
            response.headers.get("X-Stickyproxy-Reason", ""),
            response.headers.getall("Set-Cookie", []),
            response.headers.get("X-Seen-Cookie", ""),
        )


@contextlib.asynccontextmanager
async def client(
    jar: aiohttp.abc.AbstractCookieJar | None = None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that keeps cookies only when given a jar."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar() if jar is None else jar, timeout=timeout
    ) as http:
        yield http


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until condition holds, polling every 20 ms, or fail after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def policy_of(server: ProxyServer) -> Policy:
    """Return the policy of the group every test here uses."""
    return server.state.groups["app"].policy


def cookie_group(**options: str | int | bool | list[str]) -> str:
    """Return the group options of a cookie policy with the test secret."""
    lines = ['policy = "cookie"', "[groups.app.cookie]", f'secret = "{SECRET}"']
    for key, value in options.items():
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        lines.append(f"{key} = {shown}".replace("'", '"'))
    return "\n".join(lines)


# the cookie policy


async def test_cookie_pin_holds_for_many_requests(tmp_path: Path) -> None:
    async with upstreams(3) as found:
        config = proxy_config(tmp_path, servers(found), EXPLAIN, cookie_group())
        jar = aiohttp.CookieJar(unsafe=True)
        async with running_proxy(config) as proxy, client(jar) as http:
            port = proxy.ports[0]
            first = await get(http, port)
            assert first.reason == "new"
            assert first.cookie("stickyproxy") is not None

            for _ in range(50):
                reply = await get(http, port)
                assert (reply.status, reply.upstream) == (200, first.upstream)
                assert reply.reason == "pinned"
                assert reply.set_cookies == []


async def test_other_clients_are_spread_over_the_upstreams(tmp_path: Path) -> None:
    async with upstreams(3) as found:
        config = proxy_config(tmp_path, servers(found), EXPLAIN, cookie_group())
        async with running_proxy(config) as proxy, client() as http:
            placed = {(await get(http, proxy.ports[0])).upstream for _ in range(6)}
    assert placed == {"up1", "up2", "up3"}


async def test_repin_when_the_pinned_upstream_dies_and_the_new_pin_holds(
    tmp_path: Path,
) -> None:
    async with upstreams(3) as found:
        by_name = {u.name: u for u in found}
        config = proxy_config(
            tmp_path, servers(found, fail_timeout=0.2), EXPLAIN, cookie_group()
        )
        async with running_proxy(config) as proxy, client() as http:
            port = proxy.ports[0]
            first = await get(http, port)
            cookie = f"stickyproxy={first.cookie('stickyproxy')}"
            assert (await get(http, port, cookie=cookie)).upstream == first.upstream

            dead = by_name[first.upstream]
            await dead.stop()
            moved = await get(http, port, cookie=cookie)
            assert moved.status == 200
            assert moved.upstream != first.upstream
            assert moved.reason == "repinned; pin_down"
            new_value = moved.cookie("stickyproxy")
            assert new_value is not None
            cookie = f"stickyproxy={new_value}"

            # the old upstream comes back on its port and is available again
            await dead.start()
            await asyncio.sleep(0.3)
            back = await get(http, port)
            assert back.status == 200
            for _ in range(20):
                reply = await get(http, port, cookie=cookie)
                assert (reply.upstream, reply.reason) == (moved.upstream, "pinned")
            placed = {(await get(http, port)).upstream for _ in range(6)}
            assert dead.name in placed


async def test_every_malformed_cookie_gets_a_fresh_cookie_at_once(
    tmp_path: Path,
) -> None:
    async with upstreams(2) as found:
        group = cookie_group(server_max_age=3600)
        config = proxy_config(tmp_path, servers(found), EXPLAIN, group)
        async with running_proxy(config) as proxy, client() as http:
            port = proxy.ports[0]
            valid = (await get(http, port)).cookie("stickyproxy")
            assert valid is not None
            version, kid, written_id, issued, _ = valid.split(".")
            signer = CookieSigner(SECRET)
            upstream_id = next(
                upstream.id
                for upstream in policy_of(proxy).pool
                if signer.cookie_id(upstream.id) == written_id
            )
            variants = {
                "invalid": ".".join((version, kid, written_id, issued, "A" * 22)),
                "expired": signer.sign(upstream_id, int(issued) - 7200),
                "unknown_upstream": signer.sign("ffffffffffff", int(issued)),
                "empty": "",
                "oversized": valid + "x" * 300,
            }
            cookies = {
                cause: f"stickyproxy={value}" for cause, value in variants.items()
            }
            cookies["duplicated"] = f"stickyproxy={valid}; stickyproxy={valid}"
            cookies["invalid garbage"] = "stickyproxy=%00<script>"

            for cause, cookie in cookies.items():
                reply = await get(http, port, cookie=f"a=1; {cookie}; b=2")
                assert reply.status == 200, cause
                assert reply.reason == f"repinned; {cause.split()[0]}", cause
                fresh = reply.cookie("stickyproxy")
                assert fresh is not None, cause
                pin = signer.verify(fresh)
                assert pin is not None, cause
                again = await get(http, port, cookie=f"stickyproxy={fresh}")
                assert (again.upstream, again.reason) == (reply.upstream, "pinned")


async def test_key_rotation_over_sockets(tmp_path: Path) -> None:
    async with upstreams(3) as found, client() as http:
        old = proxy_config(tmp_path, servers(found), EXPLAIN, cookie_group())
        async with running_proxy(old) as proxy:
            first = await get(http, proxy.ports[0])
        value = first.cookie("stickyproxy")
        assert value is not None
        cookie = f"stickyproxy={value}"

        rotated_group = cookie_group(verify_secrets=[SECRET]).replace(
            f'secret = "{SECRET}"', 'secret = "next-secret"', 1
        )
        rotated = proxy_config(tmp_path, servers(found), EXPLAIN, rotated_group)
        async with running_proxy(rotated) as proxy:
            reply = await get(http, proxy.ports[0], cookie=cookie)
        assert (reply.upstream, reply.reason) == (first.upstream, "pinned")
        resigned = reply.cookie("stickyproxy")
        assert resigned is not None
        assert CookieSigner("next-secret").verify(resigned) is not None
        assert CookieSigner(SECRET).verify(resigned) is None
        # each secret names the upstream its own way
        assert resigned.split(".")[2] != value.split(".")[2]

        # once the old key is retired, its cookies no longer pin
        retired_group = cookie_group().replace(SECRET, "next-secret")
        retired = proxy_config(tmp_path, servers(found), EXPLAIN, retired_group)
        async with running_proxy(retired) as proxy:
            refused = await get(http, proxy.ports[0], cookie=cookie)
            kept = await get(http, proxy.ports[0], cookie=f"stickyproxy={resigned}")
        assert refused.reason == "repinned; invalid"
        assert (kept.upstream, kept.reason) == (first.upstream, "pinned")


async def test_strip_keeps_the_affinity_cookie_from_the_upstream(
    tmp_path: Path,
) -> None:
    async with upstreams(2) as found:
        group = cookie_group(strip=True, name="route")
        config = proxy_config(tmp_path, servers(found), EXPLAIN, group)
        async with running_proxy(config) as proxy, client() as http:
            port = proxy.ports[0]
            value = (await get(http, port)).cookie("route")
            reply = await get(http, port, cookie=f"a=1; route={value}; b=2")
            alone = await get(http, port, cookie=f"route={value}")
    assert reply.reason == "pinned"
    assert reply.seen_cookie == "a=1; b=2"
    assert alone.seen_cookie == ""


async def test_secure_attribute_follows_trusted_forwarded_proto(tmp_path: Path) -> None:
    async with upstreams(1) as found:
        extra = EXPLAIN + '[forwarded]\ntrusted_proxies = ["127.0.0.0/8"]\n'
        config = proxy_config(tmp_path, servers(found), extra, cookie_group())
        async with running_proxy(config) as proxy, client() as http:
            plain = await get(http, proxy.ports[0])
            async with http.get(
                f"http://127.0.0.1:{proxy.ports[0]}/",
                headers={"X-Forwarded-Proto": "https"},
            ) as response:
                secure = response.headers.getall("Set-Cookie")
    assert "; Secure" not in plain.set_cookies[0]
    assert "; Secure" in secure[0]
    assert "; HttpOnly" in secure[0] and "; SameSite=Lax" in secure[0]


# the learn policy


def learn_group(redis_url: str = "") -> str:
    """Return the group options of a learn policy, shared through Redis if given."""
    lines = ['policy = "learn"', "[groups.app.learn]", 'cookies = ["connect.sid"]']
    if redis_url:
        lines.append(f'redis_url = "{redis_url}"')
    return "\n".join(lines)


def learned(server: ProxyServer) -> LearnedAffinity:
    """Return the learn policy of a running proxy."""
    policy = policy_of(server)
    assert isinstance(policy, LearnedAffinity)
    return policy


async def test_learn_pins_the_application_session(tmp_path: Path) -> None:
    async with upstreams(3) as found:
        config = proxy_config(tmp_path, servers(found), EXPLAIN, learn_group())
        async with running_proxy(config) as proxy, client() as http:
            port = proxy.ports[0]
            login = await get(http, port, "/login")
            session = login.cookie("connect.sid")
            assert session is not None and session.startswith(login.upstream)
            # learn never sets cookies of its own
            assert len(login.set_cookies) == 1

            cookie = f"connect.sid={session}"
            for _ in range(30):
                reply = await get(http, port, cookie=cookie)
                assert (reply.upstream, reply.reason) == (login.upstream, "pinned")
                assert reply.set_cookies == []
            policy = learned(proxy)
            pinned = pool_upstream(policy.pool, found, login)
            assert policy.pinned_counts() == {pinned.name: 1}

            logout = await get(http, port, "/logout", cookie=cookie)
            assert logout.upstream == login.upstream
            after = await get(http, port, cookie=cookie)
            assert after.reason == "new"


def learn_pool(redis_url: str, upstream_urls: list[str]) -> Pool:
    """Return a pool whose learn table is shared through redis_url."""
    group = GroupConfig(
        name="app",
        servers=tuple(ServerConfig(url) for url in upstream_urls),
        policy="learn",
        learn=LearnConfig(cookies=("connect.sid",), redis_url=redis_url),
    )
    return Pool(group)


def view(cookie: str = "") -> RequestView:
    """Return a request view with one Cookie header."""
    headers = [(b"Host", b"app.test")]
    if cookie:
        headers.append((b"Cookie", cookie.encode()))
    return RequestView("192.0.2.1", "GET", "/", "app.test", headers)


@contextlib.asynccontextmanager
async def started(policy: LearnedAffinity) -> AsyncIterator[LearnedAffinity]:
    """Run a policy's start and close around the block."""
    await policy.start()
    try:
        yield policy
    finally:
        await policy.close()


async def test_learn_policies_sharing_redis_find_each_others_pins(
    redis: RedisServer,
) -> None:
    urls = ["http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003"]
    first = LearnedAffinity(learn_pool(redis.url, urls))
    second = LearnedAffinity(learn_pool(redis.url, urls))
    async with started(first), started(second):
        assert first.redis_connected and second.redis_connected
        assert first.redis_latency is not None and first.redis_latency < 1.0
        # a session no upstream set is remembered here but never shared
        invented = first.select(view("connect.sid=invented"))
        assert invented is not None
        first.on_response(view("connect.sid=invented"), invented, [])
        assert first.table.observed == 1

        login = first.select(view())
        assert login is not None
        header = [(b"Set-Cookie", b"connect.sid=s1; Path=/")]
        first.on_response(view(), login, header)
        assert first.store is not None
        await eventually(lambda: first.store is not None and first.store.pending == 0)

        later = view("connect.sid=s1")
        assert second.needs_lookup(later)
        await second.prefetch(later)
        assert not second.needs_lookup(later)
        selection = second.select(later)
        assert selection is not None
        assert (selection.upstream.id, selection.reason) == (
            login.upstream.id,
            "pinned",
        )

        # a session nobody learned stays unknown, and costs one lookup
        assert second.store is not None
        lookups = second.store.lookups
        await second.prefetch(view("connect.sid=nobody"))
        assert second.store.lookups == lookups + 1
        assert second.select(view("connect.sid=nobody")).reason == "new"  # type: ignore[union-attr]

    # nothing in Redis holds the session id itself
    async with aioredis.Redis.from_url(redis.url) as check:
        keys = [key async for key in check.scan_iter("stickyproxy:learn:app:*")]
        assert len(keys) == 1
        assert b"s1" not in keys[0]
        assert await check.get(keys[0]) == login.upstream.id.encode()


async def test_two_proxies_sharing_redis_agree_on_a_learned_pin(
    tmp_path: Path, redis: RedisServer
) -> None:
    async with upstreams(3) as found:
        one = proxy_config(tmp_path, servers(found), EXPLAIN, learn_group(redis.url))
        two = proxy_config(tmp_path, servers(found), EXPLAIN, learn_group(redis.url))
        async with (
            running_proxy(one) as first,
            running_proxy(two) as second,
            client() as http,
        ):
            if not hasattr(Policy, "prefetch"):
                pytest.skip("the data plane does not await Policy.prefetch yet")
            sessions = {}
            for _ in range(6):
                login = await get(http, first.ports[0], "/login")
                value = login.cookie("connect.sid")
                assert value is not None
                sessions[value] = login.upstream
            store = learned(first).store
            assert store is not None
            await eventually(lambda: store.pending == 0)

            for value, upstream in sessions.items():
                cookie = f"connect.sid={value}"
                for _ in range(3):
                    reply = await get(http, second.ports[0], cookie=cookie)
                    assert (reply.upstream, reply.reason) == (upstream, "pinned")


async def test_redis_outage_keeps_pins_flowing_and_writes_resume(
    tmp_path: Path, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stickyproxy.affinity")
    async with upstreams(3) as found:
        config = proxy_config(tmp_path, servers(found), EXPLAIN, learn_group(redis.url))
        async with running_proxy(config) as proxy, client() as http:
            port = proxy.ports[0]
            policy = learned(proxy)
            store = policy.store
            assert store is not None and policy.redis_connected

            before = await get(http, port, "/login")
            await eventually(lambda: store.pending == 0)
            redis.stop()

            # sessions old and new keep their pins on the local table
            during = await get(http, port, "/login")
            await eventually(lambda: not policy.redis_connected)
            for login in (before, during, before, during):
                cookie = f"connect.sid={login.cookie('connect.sid')}"
                reply = await get(http, port, cookie=cookie)
                assert (reply.status, reply.upstream) == (200, login.upstream)
                assert reply.reason == "pinned"
            errors = policy.redis_errors
            assert errors >= 1

            # Redis returns empty: the reconnect sends what was learned meanwhile
            redis.start()
            await eventually(lambda: policy.redis_connected and store.pending == 0)
            session = policy.session(
                view(f"connect.sid={during.cookie('connect.sid')}")
            )
            assert session is not None
            async with aioredis.Redis.from_url(redis.url) as check:
                value = await check.get(store.prefix + session.key)
            assert value == pool_upstream(policy.pool, found, during).id.encode()

    messages = [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "stickyproxy.affinity"
    ]
    warnings = [m for level, m in messages if level == "WARNING"]
    assert len(warnings) == 1, messages
    assert "unreachable" in warnings[0]
    assert sum("reachable again" in m for _, m in messages) == 1


def pool_upstream(pool: Pool, found: list[NamedUpstream], reply: Reply) -> Upstream:
    """Return the pool's upstream that gave the reply."""
    port = next(u.port for u in found if u.name == reply.upstream)
    upstream = pool.find(f"127.0.0.1:{port}")
    assert upstream is not None
    return upstream


async def test_learn_keeps_working_when_redis_is_down_at_start(
    tmp_path: Path, redis: RedisServer
) -> None:
    redis.stop()
    async with upstreams(2) as found:
        config = proxy_config(tmp_path, servers(found), EXPLAIN, learn_group(redis.url))
        async with running_proxy(config) as proxy, client() as http:
            policy = learned(proxy)
            assert not policy.redis_connected
            login = await get(http, proxy.ports[0], "/login")
            cookie = f"connect.sid={login.cookie('connect.sid')}"
            reply = await get(http, proxy.ports[0], cookie=cookie)
            assert (reply.upstream, reply.reason) == (login.upstream, "pinned")

            redis.start()
            store = policy.store
            assert store is not None
            await eventually(lambda: policy.redis_connected and store.pending == 0)
