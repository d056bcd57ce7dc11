"""Client connections: limits, timeouts, pipelining, HTTP/1.0 and TLS listeners."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from tests.proxy_support import (
    aiohttp_upstream,
    parse_head,
    proxy_config,
    read_head,
    running_proxy,
)


def name_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=f"{request.path} {request.scheme}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def read_response(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    status, headers = parse_head(await asyncio.wait_for(read_head(reader), 5))
    length = int(dict(headers)["content-length"])
    return status, await reader.readexactly(length)


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with aiohttp_upstream(name_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(
                b"".join(
                    b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % number
                    for number in range(5)
                )
            )
            bodies = [(await read_response(reader))[1] for _ in range(5)]
            writer.close()
    assert bodies == [b"/%d http" % number for number in range(5)]


async def test_http_10_client_gets_keep_alive_only_when_asked(tmp_path: Path) -> None:
    async with aiohttp_upstream(name_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url])) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers = parse_head(await asyncio.wait_for(read_head(reader), 5))
            assert ("connection", "keep-alive") in headers
            await reader.readexactly(int(dict(headers)["content-length"]))
            writer.write(b"GET /b HTTP/1.0\r\n\r\n")
            status, headers = parse_head(await asyncio.wait_for(read_head(reader), 5))
            assert (
                status.startswith("HTTP/1.1 200") and ("connection", "close") in headers
            )
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"/b")
            writer.close()


async def test_client_connection_limit_closes_the_excess(tmp_path: Path) -> None:
    extra = "[limits]\nclient_connections = 2"
    async with aiohttp_upstream(name_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url], extra=extra)) as proxy:
            port = proxy.ports[0]
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await asyncio.sleep(0.1)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            for held_reader, held_writer in held:
                held_writer.write(b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\n")
                assert (await read_response(held_reader))[1] == b"/ok http"
                held_writer.close()


async def test_slow_and_idle_clients_are_timed_out(tmp_path: Path) -> None:
    extra = "[timeouts]\nclient_header = 0.4\nkeepalive_idle = 0.4\nclient_body = 0.4"
    async with aiohttp_upstream(name_app()) as (url, _):
        async with running_proxy(proxy_config(tmp_path, [url], extra=extra)) as proxy:
            port = proxy.ports[0]
            loop = asyncio.get_running_loop()

            # a head that never ends is cut off
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ")
            started = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert loop.time() - started < 2
            writer.close()

            # an idle keep-alive connection is closed after its request
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            await read_response(reader)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

            # a body that stalls gets a 408
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
            status, _ = parse_head(await asyncio.wait_for(read_head(reader), 5))
            assert status.startswith("HTTP/1.1 408")
            writer.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_tls_listener_serves_https_and_says_so_upstream(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip

    async def forwarded(request: web.Request) -> web.Response:
        return web.Response(text=request.headers["X-Forwarded-Proto"])

    app = web.Application()
    app.router.add_get("/", forwarded)
    async with aiohttp_upstream(app) as (url, _):
        config_path = tmp_path / "tls.toml"
        config_path.write_text(
            f'[[listeners]]\naddress = "127.0.0.1:0"\ntls_cert = "{cert}"\n'
            f'tls_key = "{key}"\n[admin]\naddress = ""\n[log]\naccess = "off"\n'
            f'[groups.app]\n[[groups.app.servers]]\nurl = "{url}"\n'
        )
        from stickyproxy.config import load_config

        async with running_proxy(load_config(config_path, environ={})) as proxy:
            context = ssl.create_default_context(cafile=str(cert))
            context.check_hostname = False
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.ports[0], ssl=context
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, body = await read_response(reader)
            writer.close()
    assert status.startswith("HTTP/1.1 200") and body == b"https"
