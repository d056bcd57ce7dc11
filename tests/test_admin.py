"""The admin API over real sockets: drain, down, weight, reload, tokens, two workers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import free_port, repo_root, wait_for_port
from tests.test_metrics import (
    COOKIE_GROUP,
    Stack,
    request,
    scrape,
    stack,
    upstreams,
    value,
)

TOKEN = "s3cret-admin-token"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the admin API."""
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    client: aiohttp.ClientSession,
    port: int,
    path: str,
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST (with a body) or GET an admin endpoint; return status and JSON.

    A raw body is sent as application/json unless headers say otherwise.
    """
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        sent["Content-Type"] = "application/json"
    headers = {**sent, **(headers or {})}
    url = f"http://127.0.0.1:{port}{path}"
    if body is None and raw is None:
        context = client.get(url, headers=headers)
    else:
        context = client.post(url, json=body, data=raw, headers=headers)
    async with context as response:
        return response.status, await response.json()


def upstream_path(s: Stack, index: int, action: str) -> str:
    return f"/api/groups/app/upstreams/{s.name_of(index)}/{action}"


def find(groups: dict[str, Any], name: str) -> dict[str, Any]:
    """Return one upstream of group app from a GET /api/groups answer."""
    group = next(g for g in groups["groups"] if g["name"] == "app")
    return next(u for u in group["upstreams"] if u["name"] == name)


async def test_drained_upstream_keeps_pins_but_gets_no_new_clients(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=2, group=COOKIE_GROUP) as s:
        # a client pinned to the first upstream
        first, second = s.name_of(0), s.name_of(1)
        pinned: dict[str, str] = {}
        for _ in range(10):
            response = await request(s.port, "/")
            if response.header("X-Stickyproxy-Upstream") == first:
                pinned = response.cookies()
                break
        assert pinned

        status, answer = await call(
            client, s.admin_port, upstream_path(s, 0, "state"), {"state": "drain"}
        )
        assert status == 200
        assert answer == {
            "group": "app",
            "upstream": first,
            "state": "drain",
            "changed": True,
            "workers": 1,
        }

        hits = s.apps[first].hits
        for _ in range(6):
            response = await request(s.port, "/")
            assert response.header("X-Stickyproxy-Upstream") == second
        assert s.apps[first].hits == hits
        response = await request(s.port, "/", pinned)
        assert response.header("X-Stickyproxy-Upstream") == first

        status, groups = await call(client, s.admin_port, "/api/groups")
        assert status == 200
        assert find(groups, first)["state"] == "draining"
        assert find(groups, first)["admin_state"] == "drain"
        assert find(groups, second)["state"] == "up"
        assert groups["workers"][0]["requests"] >= 8
        samples = await scrape(s.admin_port)
        state = "stickyproxy_upstream_state"
        assert value(samples, state, upstream=first, state="draining") == 1


async def test_down_moves_pinned_clients_and_up_brings_them_back(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=2, group=COOKIE_GROUP) as s:
        first = s.name_of(0)
        path = upstream_path(s, 0, "state")
        status, answer = await call(client, s.admin_port, path, {"state": "down"})
        assert (status, answer["changed"]) == (200, True)
        status, answer = await call(client, s.admin_port, path, {"state": "down"})
        assert (status, answer["changed"]) == (200, False)

        for _ in range(4):
            response = await request(s.port, "/")
            assert response.header("X-Stickyproxy-Upstream") != first
        assert s.apps[first].hits == 0

        status, answer = await call(client, s.admin_port, path, {"state": "up"})
        assert (status, answer["changed"]) == (200, True)
        served = {
            (await request(s.port, "/")).header("X-Stickyproxy-Upstream")
            for _ in range(6)
        }
        assert first in served


async def test_weight_changes_the_share_of_new_requests(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=2) as s:
        status, answer = await call(
            client, s.admin_port, upstream_path(s, 0, "weight"), {"weight": 3}
        )
        assert (status, answer["weight"], answer["changed"]) == (200, 3, True)

        # two whole cycles of smooth weighted round robin: 3 + 1, twice
        for _ in range(8):
            await request(s.port, "/")
        assert (s.apps[s.name_of(0)].hits, s.apps[s.name_of(1)].hits) == (6, 2)

        status, groups = await call(client, s.admin_port, "/api/groups")
        assert find(groups, s.name_of(0))["weight"] == 3
        samples = await scrape(s.admin_port)
        weight = "stickyproxy_upstream_weight"
        assert value(samples, weight, upstream=s.name_of(0)) == 3


async def test_changes_hold_until_a_reload_of_the_file(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=2) as s:
        first = s.name_of(0)
        await call(
            client, s.admin_port, upstream_path(s, 0, "state"), {"state": "drain"}
        )
        await call(client, s.admin_port, upstream_path(s, 1, "weight"), {"weight": 5})

        status, answer = await call(client, s.admin_port, "/api/reload", {})
        assert (status, answer) == (200, {"reloaded": True, "workers": 1})
        status, groups = await call(client, s.admin_port, "/api/groups")
        assert find(groups, first)["state"] == "up"
        assert find(groups, s.name_of(1))["weight"] == 1
        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_config_reloads_total", result="success") == 1
        assert value(samples, "stickyproxy_config_last_reload_success") == 1

        # a broken file is refused and the running configuration stays
        assert s.server.config_path is not None
        Path(s.server.config_path).write_text("[groups.app\n")
        status, answer = await call(client, s.admin_port, "/api/reload", {})
        assert status == 422
        assert "refused" in answer["error"]
        assert (await request(s.port, "/")).status == 200
        samples = await scrape(s.admin_port)
        assert value(samples, "stickyproxy_config_reloads_total", result="failure") == 1
        assert value(samples, "stickyproxy_config_last_reload_success") == 0


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("/api/groups/nope/upstreams/x/state", {"state": "up"}, 404, "unknown group"),
        ("/api/groups/app/upstreams/nope/state", {"state": "up"}, 404, "unknown up"),
        ("{u}/state", {"state": "sleep"}, 400, "expected state"),
        ("{u}/state", {}, 400, "expected state"),
        ("{u}/state", ["up"], 400, "JSON object"),
        ("{u}/state", b"not json", 400, "JSON object"),
        ("{u}/weight", {"weight": 0}, 400, "expected weight"),
        ("{u}/weight", {"weight": "3"}, 400, "expected weight"),
        ("{u}/weight", {"weight": True}, 400, "expected weight"),
        ("{u}/weight", {"weight": 10**9}, 400, "expected weight"),
        ("{u}/rename", {}, 404, "not found"),
    ],
)
async def test_bad_input_gets_a_short_json_reason(
    tmp_path: Path,
    client: aiohttp.ClientSession,
    path: str,
    body: Any,
    status: int,
    reason: str,
) -> None:
    async with stack(tmp_path, count=1) as s:
        path = path.replace("{u}", f"/api/groups/app/upstreams/{s.name_of(0)}")
        raw = body if isinstance(body, bytes) else None
        got, answer = await call(
            client, s.admin_port, path, None if raw else body, raw=raw
        )
        assert got == status
        assert reason in answer["error"]


async def test_wrong_method_on_the_api_answers_json(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=1) as s:
        status, answer = await call(client, s.admin_port, "/api/reload")
        assert (status, answer) == (405, {"error": "method not allowed"})


async def test_a_configured_token_guards_changes_even_on_loopback(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=1, admin_token=TOKEN) as s:
        path = upstream_path(s, 0, "state")
        status, _ = await call(client, s.admin_port, "/api/groups")
        assert status == 200

        for token in (None, "wrong", TOKEN + "x"):
            status, answer = await call(
                client, s.admin_port, path, {"state": "drain"}, token=token
            )
            assert status == 401
            assert answer == {"error": "a bearer token is required"}
        upstream = s.server.state.groups["app"].pool.upstreams[0]
        assert upstream.state == "up"

        status, _ = await call(
            client, s.admin_port, path, {"state": "drain"}, token=TOKEN
        )
        assert status == 200
        assert upstream.state == "draining"


async def test_off_loopback_every_read_needs_the_token_but_the_page(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=1, admin_token=TOKEN) as s:
        # tests never listen beyond loopback; pretend the listener does
        s.admin.loopback = False
        for path in ("/api/groups", "/metrics"):
            url = f"http://127.0.0.1:{s.admin_port}{path}"
            async with client.get(url) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == "Bearer"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with client.get(url, headers=headers) as response:
                assert response.status == 200
        async with client.get(f"http://127.0.0.1:{s.admin_port}/") as response:
            assert response.status == 200
            assert "stickyproxy" in await response.text()


# what a web page on another site could make the operator's browser send


async def test_a_rebound_host_name_is_refused_on_loopback(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=1) as s:
        port = s.admin_port
        path = upstream_path(s, 0, "state")
        for host in (f"attacker.example:{port}", "127.0.0.1:1", "localhost"):
            status, answer = await call(
                client, port, "/api/groups", headers={"Host": host}
            )
            assert (status, answer) == (
                403,
                {"error": "expected the Host of the admin listener"},
            )
            status, _ = await call(
                client, port, path, {"state": "down"}, headers={"Host": host}
            )
            assert status == 403
        assert s.server.state.groups["app"].pool.upstreams[0].state == "up"

        for host in (f"127.0.0.1:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            status, _ = await call(client, port, "/api/groups", headers={"Host": host})
            assert status == 200, host


async def test_a_foreign_origin_cannot_change_an_upstream(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=1) as s:
        path = upstream_path(s, 0, "state")
        for origin in ("http://attacker.example", "null", "http://127.0.0.1:1"):
            status, answer = await call(
                client,
                s.admin_port,
                path,
                {"state": "down"},
                headers={"Origin": origin},
            )
            assert status == 403, origin
            assert "admin listener" in answer["error"]
        assert s.server.state.groups["app"].pool.upstreams[0].state == "up"

        # the status page's own origin is welcome
        origin = f"http://127.0.0.1:{s.admin_port}"
        status, _ = await call(
            client, s.admin_port, path, {"state": "drain"}, headers={"Origin": origin}
        )
        assert status == 200


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None],
)
async def test_a_change_needs_a_json_content_type(
    tmp_path: Path, client: aiohttp.ClientSession, content_type: str | None
) -> None:
    async with stack(tmp_path, count=1) as s:
        headers = {} if content_type is None else {"Content-Type": content_type}
        url = f"http://127.0.0.1:{s.admin_port}{upstream_path(s, 0, 'state')}"
        async with client.post(
            url, data=b'{"state": "down"}', headers=headers
        ) as response:
            assert response.status == 415
            assert await response.json() == {
                "error": "expected Content-Type: application/json"
            }
        assert s.server.state.groups["app"].pool.upstreams[0].state == "up"


async def test_a_post_to_no_route_still_says_which_route_is_wrong(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    async with stack(tmp_path, count=1) as s:
        headers = {"Content-Type": "text/plain"}
        for path, status in (("/api/groups", 405), ("/api/nothing", 404)):
            url = f"http://127.0.0.1:{s.admin_port}{path}"
            async with client.post(url, data=b"{}", headers=headers) as response:
                assert response.status == status


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b'{"state": "up"}', "application/json; charset=bogus", "known charset"),
        (b'{"weight": ' + b"9" * 5000 + b"}", "application/json", "shorter numbers"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "less deeply"),
    ],
)
async def test_an_unreadable_body_gets_a_400_in_json(
    tmp_path: Path,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    content_type: str,
    reason: str,
) -> None:
    async with stack(tmp_path, count=1) as s:
        status, answer = await call(
            client,
            s.admin_port,
            upstream_path(s, 0, "weight"),
            raw=body,
            headers={"Content-Type": content_type},
        )
        assert status == 400
        assert reason in answer["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "broken",
    [
        b"# \xff\n",
        b'[groups.app]\n[[groups.app.servers]]\nurl = "http://[::1"\n',
        b"[groups.app]\npolicy = 'learn'\n[groups.app.learn]\n"
        b"redis_url = 'redis://127.0.0.1:99999'\n"
        b'[[groups.app.servers]]\nurl = "http://127.0.0.1:1"\n',
    ],
)
async def test_a_reload_of_a_broken_file_answers_422_and_keeps_serving(
    tmp_path: Path, client: aiohttp.ClientSession, broken: bytes
) -> None:
    async with stack(tmp_path, count=1) as s:
        assert s.server.config_path is not None
        Path(s.server.config_path).write_bytes(
            b'[[listeners]]\naddress = "127.0.0.1:0"\n' + broken
        )
        status, answer = await call(client, s.admin_port, "/api/reload", {})
        assert status == 422
        assert "refused" in answer["error"]
        assert (await request(s.port, "/")).status == 200


async def test_a_reload_that_cannot_be_built_answers_422(
    tmp_path: Path,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("cannot build")

    async with stack(tmp_path, count=1) as s:
        monkeypatch.setattr("stickyproxy.server.build_state", broken)
        status, answer = await call(client, s.admin_port, "/api/reload", {})
        assert status == 422
        assert "refused" in answer["error"]
        assert (await request(s.port, "/")).status == 200
    assert "reload failed" in caplog.text


# two workers in their own processes


@pytest.fixture
def family_ports() -> tuple[int, int]:
    """A public port and an admin port for a family of workers."""
    return free_port(), free_port()


def start_family(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start `stickyproxy run --workers 2` in its own process."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "stickyproxy", "run", "-c", str(config)],
            cwd=repo_root(),
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.fixture
def family_log(tmp_path: Path) -> Iterator[Path]:
    """Where the family writes its logs; printed when a test fails."""
    path = tmp_path / "family.log"
    yield path
    if path.exists():
        sys.stderr.write(path.read_text(errors="replace")[-4000:])


async def wait_for(
    client: aiohttp.ClientSession, port: int, check: Any, what: str
) -> dict[str, Any]:
    """Poll /api/groups until check(answer) holds, for at most ten seconds."""
    answer: dict[str, Any] = {}
    for _ in range(200):
        try:
            status, answer = await call(client, port, "/api/groups")
        except aiohttp.ClientError:
            status = 0
        if status == 200 and check(answer):
            return answer
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last answer {answer}")


async def test_two_workers_share_one_scrape_and_one_drain(
    tmp_path: Path,
    client: aiohttp.ClientSession,
    family_ports: tuple[int, int],
    family_log: Path,
) -> None:
    port, admin_port = family_ports
    async with upstreams(2) as backends:
        first, second = list(backends)
        config = tmp_path / "family.toml"
        config.write_text(
            "[server]\nworkers = 2\nexplain_headers = true\n"
            f'[[listeners]]\naddress = "127.0.0.1:{port}"\n'
            f'[admin]\naddress = "127.0.0.1:{admin_port}"\n'
            '[log]\naccess = "off"\nlevel = "warning"\n'
            "[groups.app]\n"
            f'[[groups.app.servers]]\nurl = "http://{first}"\n'
            f'[[groups.app.servers]]\nurl = "http://{second}"\n'
        )
        family = start_family(config, family_log)
        try:
            await asyncio.to_thread(wait_for_port, admin_port, "127.0.0.1", 20)
            await wait_for(
                client, admin_port, lambda a: len(a["workers"]) == 2, "two workers"
            )
            await asyncio.to_thread(wait_for_port, port, "127.0.0.1", 20)

            # new connections spread over both workers (SO_REUSEPORT)
            for _ in range(40):
                assert (await request(port, "/")).status == 200
            answer = await wait_for(
                client,
                admin_port,
                lambda a: sum(w["requests"] for w in a["workers"]) == 40,
                "40 requests",
            )
            assert all(worker["requests"] > 0 for worker in answer["workers"])
            samples = await scrape(admin_port)
            assert value(samples, "stickyproxy_requests_total") == 40
            assert value(samples, "stickyproxy_workers") == 2
            assert value(samples, "stickyproxy_request_duration_seconds_count") == 40

            # one drain reaches both workers
            path = f"/api/groups/app/upstreams/{first}/state"
            status, answer = await call(client, admin_port, path, {"state": "drain"})
            assert (status, answer["workers"]) == (200, 2)
            hits = backends[first].hits
            for _ in range(20):
                await request(port, "/")
            assert backends[first].hits == hits
            samples = await scrape(admin_port)
            state = "stickyproxy_upstream_state"
            assert value(samples, state, upstream=first, state="draining") == 1

            # a worker killed and restarted takes the drain back; counts survive
            status, answer = await call(client, admin_port, "/api/groups")
            victim = next(w["pid"] for w in answer["workers"] if w["index"] == 1)
            os.kill(victim, signal.SIGKILL)
            await wait_for(
                client,
                admin_port,
                lambda a: (
                    len(a["workers"]) == 2
                    and victim not in [w["pid"] for w in a["workers"]]
                ),
                "the restarted worker",
            )
            await asyncio.to_thread(wait_for_port, port, "127.0.0.1", 20)
            for _ in range(20):
                await request(port, "/")
            assert backends[first].hits == hits
            samples = await scrape(admin_port)
            assert value(samples, "stickyproxy_requests_total") == 80

            # a reload through the API reaches both workers and ends the drain
            status, answer = await call(client, admin_port, "/api/reload", {})
            assert (status, answer) == (200, {"reloaded": True, "workers": 2})
            answer = await wait_for(
                client,
                admin_port,
                lambda a: a["groups"][0]["upstreams"][0]["states"] == {"up": 2},
                "both workers to see the upstream up again",
            )
            samples = await scrape(admin_port)
            assert value(samples, "stickyproxy_config_reloads_total") == 2
            assert value(samples, "stickyproxy_config_last_reload_success") == 1
        finally:
            family.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(family.wait, 30)
        assert code == 0
