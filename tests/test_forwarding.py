"""The data plane over real sockets: framing, headers, streaming, upgrades, failures."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.proxy_support import (
    RawUpstream,
    aiohttp_upstream,
    exchange,
    parse_head,
    proxy_config,
    raw_upstream,
    read_head,
    running_proxy,
)
from tests.support import free_port


def echo_app() -> web.Application:
    """An upstream that answers with what it received, as JSON."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
                "body_len": len(body),
                "body": body[:100].decode("latin-1"),
            }
        )

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_request_target_reaches_upstream_byte_for_byte(tmp_path: Path) -> None:
    async def record(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        up.requests.append(await read_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with raw_upstream(record) as upstream:
        config = proxy_config(tmp_path, [upstream.url])
        async with running_proxy(config) as proxy:
            target = b"/a%2Fb/../c;p?x=%20&y=1&z=%zz#"
            status, _, body = await exchange(
                proxy.ports[0],
                b"GET " + target + b" HTTP/1.1\r\nHost: example.test\r\n\r\n",
            )
    assert status == "HTTP/1.1 200 OK"
    assert body == b"ok"
    assert upstream.requests[0].startswith(b"GET " + target + b" HTTP/1.1\r\n")


async def test_hop_by_hop_headers_are_not_forwarded_either_way(tmp_path: Path) -> None:
    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        up.requests.append(await read_head(reader))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Secret\r\n"
            b"X-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok"
        )
        await writer.drain()

    async with raw_upstream(answer) as upstream:
        config = proxy_config(tmp_path, [upstream.url])
        async with running_proxy(config) as proxy:
            _, headers, _ = await exchange(
                proxy.ports[0],
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Private\r\n"
                b"X-Private: p\r\nKeep-Alive: 300\r\nTE: trailers\r\nTrailer: X\r\n"
                b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-App: a\r\n\r\n",
            )
    _, sent = parse_head(upstream.requests[0])
    sent_names = {name for name, _ in sent}
    for name in (
        "x-private",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "upgrade",
    ):
        assert name not in sent_names
    assert ("x-app", "a") in sent
    names = {name for name, _ in headers}
    assert "x-secret" not in names and "keep-alive" not in names
    assert ("x-kept", "yes") in headers


async def test_every_set_cookie_line_reaches_the_client(tmp_path: Path) -> None:
    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        for name in ("a", "b", "c"):
            response.set_cookie(name, name * 3, httponly=True)
        return response

    app = web.Application()
    app.router.add_get("/", cookies)
    async with aiohttp_upstream(app) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            _, headers, _ = await exchange(
                proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
            )
    set_cookies = [value for name, value in headers if name == "set-cookie"]
    assert len(set_cookies) == 3
    assert {value.split("=")[0] for value in set_cookies} == {"a", "b", "c"}


async def test_host_is_preserved_by_default_and_rewritten_on_request(
    tmp_path: Path,
) -> None:
    async with aiohttp_upstream(echo_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            _, _, body = await exchange(
                proxy.ports[0], b"GET / HTTP/1.1\r\nHost: public.test\r\n\r\n"
            )
        assert ["Host", "public.test"] in json.loads(body)["headers"]

        config = proxy_config(tmp_path, [url], group="rewrite_host = true")
        async with running_proxy(config) as proxy:
            _, _, body = await exchange(
                proxy.ports[0], b"GET / HTTP/1.1\r\nHost: public.test\r\n\r\n"
            )
    sent = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
    assert sent["host"] == url.removeprefix("http://")
    assert sent["x-forwarded-host"] == "public.test"


async def test_forwarded_headers_from_untrusted_peers_are_replaced(
    tmp_path: Path,
) -> None:
    request = (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n\r\n"
    )
    async with aiohttp_upstream(echo_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            _, _, body = await exchange(proxy.ports[0], request)
        sent = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
        assert sent["x-forwarded-for"] == "127.0.0.1"
        assert sent["x-forwarded-proto"] == "http"
        assert sent["forwarded"] == 'for=127.0.0.1;proto=http;host="h"'

        trusted = '[forwarded]\ntrusted_proxies = ["127.0.0.0/8"]'
        async with running_proxy(proxy_config(tmp_path, [url], extra=trusted)) as proxy:
            _, _, body = await exchange(proxy.ports[0], request)
        sent = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
        assert sent["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
        assert sent["x-forwarded-proto"] == "https"
        assert sent["forwarded"].startswith("for=6.6.6.6, for=127.0.0.1")


async def test_head_204_and_304_carry_no_body_and_keep_headers(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/204":
            return web.Response(status=204, headers={"X-Kind": "204"})
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(body=b"x" * 1234)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with aiohttp_upstream(app) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            # three requests on one connection: any stray body byte would break the next
            for path in (b"HEAD /", b"GET /204", b"GET /304"):
                writer.write(path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
                status, headers = parse_head(
                    await asyncio.wait_for(read_head(reader), 5)
                )
                if path == b"HEAD /":
                    assert ("content-length", "1234") in headers
                if path == b"GET /204":
                    assert (
                        status.startswith("HTTP/1.1 204")
                        and ("x-kind", "204") in headers
                    )
                if path == b"GET /304":
                    assert (
                        status.startswith("HTTP/1.1 304")
                        and ("etag", '"v1"') in headers
                    )
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            _, headers = parse_head(await asyncio.wait_for(read_head(reader), 5))
            assert len(await asyncio.wait_for(reader.readexactly(1234), 5)) == 1234
            writer.close()


async def test_chunked_bodies_stream_both_ways(tmp_path: Path) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        received = await request.read()
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(3):
            await response.write(received)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/", chunked)

    async def body() -> bytes:  # type: ignore[misc]
        for part in (b"ab", b"cd", b"ef"):
            yield part

    async with aiohttp_upstream(app) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"http://127.0.0.1:{proxy.ports[0]}/", data=body()
                ) as response:
                    assert response.headers.get("Transfer-Encoding") == "chunked"
                    assert await response.read() == b"abcdef" * 3


async def test_expect_continue_and_early_final_status(tmp_path: Path) -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        head = await read_head(reader)
        if b"/reject" in head:
            writer.write(
                b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 2\r\n\r\nno"
            )
        else:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            body = await reader.readexactly(5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()

    async with raw_upstream(handler) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(
                b"POST /ok HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            interim = await asyncio.wait_for(read_head(reader), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"hello")
            status, _ = parse_head(await asyncio.wait_for(read_head(reader), 5))
            assert status == "HTTP/1.1 200 OK"
            assert await reader.readexactly(5) == b"hello"
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(
                b"POST /reject HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            status, headers = parse_head(await asyncio.wait_for(read_head(reader), 5))
            assert status.startswith("HTTP/1.1 417")
            assert ("connection", "close") in headers
            assert await reader.readexactly(2) == b"no"
            writer.close()


async def test_websocket_upgrade_is_tunnelled(tmp_path: Path) -> None:
    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            await socket.send_str("echo:" + message.data)
        return socket

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text="no")

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/refuse", refuse)
    config_extra = "[timeouts]\nupstream_read = 0.5\ntunnel_idle = 30"
    async with aiohttp_upstream(app) as (url, _):
        config = proxy_config(tmp_path, [url], extra=config_extra)
        async with running_proxy(config) as proxy:
            base = f"http://127.0.0.1:{proxy.ports[0]}"
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(base + "/ws") as socket:
                    await socket.send_str("one")
                    assert (await socket.receive_str(timeout=5)) == "echo:one"
                    # idle longer than the HTTP read timeout: the tunnel timeout governs
                    await asyncio.sleep(1.2)
                    await socket.send_str("two")
                    assert (await socket.receive_str(timeout=5)) == "echo:two"
                try:
                    await session.ws_connect(base + "/refuse")
                except aiohttp.WSServerHandshakeError as exc:
                    assert exc.status == 403
                else:
                    raise AssertionError("the refused upgrade succeeded")


async def test_server_sent_events_are_not_buffered(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: second\n\n")
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    async with aiohttp_upstream(app) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            async with aiohttp.ClientSession() as session:
                async with session.get(
                    f"http://127.0.0.1:{proxy.ports[0]}/events"
                ) as response:
                    first = await asyncio.wait_for(
                        response.content.readuntil(b"\n\n"), 5
                    )
                    assert first == b"data: first\n\n"
                    release.set()
                    second = await asyncio.wait_for(
                        response.content.readuntil(b"\n\n"), 5
                    )
                    assert second == b"data: second\n\n"


async def test_upstream_connections_are_reused(tmp_path: Path) -> None:
    async def keepalive(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        while True:
            up.requests.append(await read_head(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_upstream(keepalive) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            for _ in range(20):
                status, _, _ = await exchange(
                    proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
                )
                assert status == "HTTP/1.1 200 OK"
    assert len(upstream.requests) == 20
    assert upstream.connections == 1


async def test_stale_pooled_connection_is_retried_for_get_but_never_for_post(
    tmp_path: Path,
) -> None:
    async def one_shot(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        # answer once, then read the next request and hang up without answering:
        # the race of an upstream closing an idle keep-alive connection
        up.requests.append(await read_head(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        head = await read_head(reader)
        up.requests.append(head)

    async with raw_upstream(one_shot) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            port = proxy.ports[0]
            await exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            status, _, _ = await exchange(
                port, b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n"
            )
            assert status == "HTTP/1.1 200 OK"
            gets = [r for r in upstream.requests if r.startswith(b"GET /again")]
            assert len(gets) == 2  # the stale attempt and the retry

            status, _, _ = await exchange(
                port, b"POST /pay HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            )
            assert status.startswith("HTTP/1.1 502")
            posts = [r for r in upstream.requests if r.startswith(b"POST /pay")]
            assert len(posts) == 1


async def test_failures_map_to_502_503_504(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    other = f"http://127.0.0.1:{free_port()}"
    config = proxy_config(tmp_path, [closed, other], group="retries = 0")
    async with running_proxy(config) as proxy:
        request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
        for _ in range(2):
            status, _, body = await exchange(proxy.ports[0], request)
            assert status.startswith("HTTP/1.1 502") and body == b"bad gateway\n"
        # max_fails = 1 took each upstream out in turn: nothing is available now
        status, _, body = await exchange(proxy.ports[0], request)
        assert status.startswith("HTTP/1.1 503") and body == b"no upstream available\n"

    # as nginx, the only upstream of a group is never taken out
    async with running_proxy(proxy_config(tmp_path, [closed])) as proxy:
        for _ in range(2):
            status, _, _ = await exchange(proxy.ports[0], request)
            assert status.startswith("HTTP/1.1 502")

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        await read_head(reader)
        await asyncio.sleep(5)

    async with raw_upstream(silent) as upstream:
        config = proxy_config(
            tmp_path, [upstream.url], extra="[timeouts]\nupstream_read = 0.3"
        )
        async with running_proxy(config) as proxy:
            status, _, body = await exchange(
                proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
            )
    assert status.startswith("HTTP/1.1 504") and body == b"gateway timeout\n"
    # each failure also leaves a log line saying why
    said = [record.getMessage() for record in caplog.records]
    assert any("-> 502" in line and "connect to" in line for line in said), said
    assert any("-> 503" in line and "no upstream" in line for line in said), said
    assert any("-> 504" in line and "timed out" in line for line in said), said


async def test_connect_failure_is_retried_on_another_upstream(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with aiohttp_upstream(echo_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [closed, url])) as proxy:
            for _ in range(4):
                status, _, _ = await exchange(
                    proxy.ports[0],
                    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx",
                )
                assert status == "HTTP/1.1 200 OK"


async def test_bad_requests_get_clear_4xx_and_the_connection_closes(
    tmp_path: Path,
) -> None:
    extra = "[limits]\nheader_bytes = 2048\nbody_bytes = 10"
    async with aiohttp_upstream(echo_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url], extra=extra)) as proxy:
            port = proxy.ports[0]
            cases = [
                (b"NOT HTTP\r\n\r\n", "400"),
                (
                    b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n",
                    "431",
                ),
                (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n", "413"),
                (
                    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"b\r\nhello world\r\n0\r\n\r\n",
                    "413",
                ),
                (
                    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                    "400",
                ),
                (
                    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                    b"Content-Length: 4\r\n\r\nabcd",
                    "400",
                ),
                (b"GET / HTTP/1.1\r\n\r\n", "400"),
            ]
            for request, expected in cases:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                status, headers = parse_head(
                    await asyncio.wait_for(read_head(reader), 5)
                )
                assert status.split()[1] == expected, (request[:60], status)
                assert ("connection", "close") in headers
                await asyncio.wait_for(reader.read(), 5)  # the proxy closes
                writer.close()


async def test_access_log_names_upstream_and_time(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    extra = f'[log]\naccess = "json"\naccess_path = "{log_path}"'
    async with aiohttp_upstream(echo_app()) as (url, _):
        config = proxy_config(tmp_path, [url])
        text = (
            (tmp_path / "stickyproxy.toml")
            .read_text()
            .replace('[log]\naccess = "off"\n', extra + "\n")
        )
        (tmp_path / "stickyproxy.toml").write_text(text)
        from stickyproxy.config import load_config

        config = load_config(tmp_path / "stickyproxy.toml", environ={})
        async with running_proxy(config) as proxy:
            await exchange(
                proxy.ports[0], b"GET /logged?q=1 HTTP/1.1\r\nHost: h\r\n\r\n"
            )
    record = json.loads(log_path.read_text().splitlines()[0])
    assert record["target"] == "/logged?q=1"
    assert record["status"] == 200
    assert record["upstream"] == url.removeprefix("http://")
    assert record["duration_ms"] >= 0


async def test_encoded_bodies_pass_untouched(tmp_path: Path) -> None:
    payload = gzip.compress(b"hello " * 1000)

    async def encoded(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        up.requests.append(await read_head(reader))
        up.requests.append(await reader.readexactly(len(payload)))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        await writer.drain()

    async with raw_upstream(encoded) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            request = (
                b"POST / HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n"
                b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(payload)
            ) + payload
            status, headers, body = await exchange(proxy.ports[0], request)
    assert status == "HTTP/1.1 200 OK"
    assert ("content-encoding", "gzip") in headers
    assert body == payload
    assert upstream.requests[1] == payload
    assert b"Accept-Encoding: gzip" in upstream.requests[0]
