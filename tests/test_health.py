"""Active health checks, routes and the explain headers, over real sockets."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.proxy_support import aiohttp_upstream, proxy_config, running_proxy


class Switchable:
    """An upstream whose /health answer a test can flip."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.probes = 0
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/{tail:.*}", self.page)

    async def health(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.Response(status=200 if self.healthy else 500)

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=self.name)


async def names(port: int, count: int, path: str = "/", host: str = "h") -> list[str]:
    async with aiohttp.ClientSession() as session:
        result = []
        for _ in range(count):
            async with session.get(
                f"http://127.0.0.1:{port}{path}", headers={"Host": host}
            ) as response:
                result.append(await response.text())
        return result


async def test_active_checks_take_an_upstream_out_and_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stickyproxy")
    a, b = Switchable("A"), Switchable("B")
    group = "[groups.app.health]\npath = '/health'\ninterval = 0.05\nrise = 2\nfall = 2"
    async with (
        aiohttp_upstream(a.app) as (url_a, _),
        aiohttp_upstream(b.app) as (
            url_b,
            _,
        ),
    ):
        config = proxy_config(tmp_path, [url_a, url_b], extra="", group="")
        text = (tmp_path / "stickyproxy.toml").read_text() + group + "\n"
        (tmp_path / "stickyproxy.toml").write_text(text)
        from stickyproxy.config import load_config

        config = load_config(tmp_path / "stickyproxy.toml", environ={})
        async with running_proxy(config) as proxy:
            port = proxy.ports[0]
            assert set(await names(port, 4)) == {"A", "B"}

            b.healthy = False
            for _ in range(40):
                await asyncio.sleep(0.05)
                if not proxy.state.groups["app"].pool.upstreams[1].healthy:
                    break
            assert set(await names(port, 6)) == {"A"}

            b.healthy = True
            for _ in range(40):
                await asyncio.sleep(0.05)
                if proxy.state.groups["app"].pool.upstreams[1].healthy:
                    break
            assert set(await names(port, 4)) == {"A", "B"}
    assert a.probes >= 4 and b.probes >= 4
    transitions = [
        r.getMessage() for r in caplog.records if "is unhealthy" in r.getMessage()
    ]
    recoveries = [
        r.getMessage() for r in caplog.records if "is healthy" in r.getMessage()
    ]
    # logged once per transition, not once per probe
    assert len(transitions) == 1 and len(recoveries) == 1


async def test_routes_send_hosts_and_paths_to_their_groups(tmp_path: Path) -> None:
    a, b, c = Switchable("A"), Switchable("B"), Switchable("C")
    async with (
        aiohttp_upstream(a.app) as (url_a, _),
        aiohttp_upstream(b.app) as (
            url_b,
            _,
        ),
        aiohttp_upstream(c.app) as (url_c, _),
    ):
        path = tmp_path / "routes.toml"
        path.write_text(
            '[[listeners]]\naddress = "127.0.0.1:0"\n[admin]\naddress = ""\n'
            '[log]\naccess = "off"\n'
            f'[groups.web]\n[[groups.web.servers]]\nurl = "{url_a}"\n'
            f'[groups.api]\n[[groups.api.servers]]\nurl = "{url_b}"\n'
            f'[groups.other]\n[[groups.other.servers]]\nurl = "{url_c}"\n'
            '[[routes]]\ngroup = "other"\nhost = "other.test"\n'
            '[[routes]]\ngroup = "api"\npath_prefix = "/api/"\n'
            '[[routes]]\ngroup = "web"\n'
        )
        from stickyproxy.config import load_config

        async with running_proxy(load_config(path, environ={})) as proxy:
            port = proxy.ports[0]
            assert await names(port, 1, "/api/files") == ["B"]
            assert await names(port, 1, "/index.html") == ["A"]
            assert await names(port, 1, "/api/files", host="other.test:8080") == ["C"]


async def test_explain_headers_name_the_upstream_and_the_reason(tmp_path: Path) -> None:
    a, b = Switchable("A"), Switchable("B")
    async with (
        aiohttp_upstream(a.app) as (url, _),
        aiohttp_upstream(b.app) as (
            other,
            _,
        ),
    ):
        config = proxy_config(
            tmp_path,
            [url, other],
            extra="[server]\nexplain_headers = true",
            group='policy = "ip_hash"',
        )
        async with running_proxy(config) as proxy, aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{proxy.ports[0]}/") as response:
                chosen = response.headers["X-Stickyproxy-Upstream"]
                assert chosen in (
                    url.removeprefix("http://"),
                    other.removeprefix("http://"),
                )
                assert response.headers["X-Stickyproxy-Reason"] == "hashed"


async def test_debug_log_explains_every_decision(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="stickyproxy.selection")
    a, b = Switchable("A"), Switchable("B")
    async with (
        aiohttp_upstream(a.app) as (url, _),
        aiohttp_upstream(b.app) as (
            other,
            _,
        ),
    ):
        config = proxy_config(tmp_path, [url, other], group='policy = "cookie"')
        async with running_proxy(config) as proxy:
            await names(proxy.ports[0], 3)
    decisions = [
        r.getMessage() for r in caplog.records if r.name == "stickyproxy.selection"
    ]
    # aiohttp keeps no cookies for a bare IP host: each request comes unpinned
    assert len(decisions) == 3
    assert all(message.endswith("(new)") for message in decisions), decisions
