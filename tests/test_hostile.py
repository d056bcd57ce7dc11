"""Hostile or broken peers: each case once let a client or upstream hurt others."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from stickyproxy.log import AccessLog
from tests.proxy_support import (
    RawUpstream,
    exchange,
    parse_head,
    proxy_config,
    raw_upstream,
    read_head,
    running_proxy,
)
from tests.support import free_port


async def answer_each(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
) -> None:
    """Read whole requests (any body by Content-Length) and answer each with 'ok'."""
    while True:
        head = await read_head(reader)
        up.requests.append(head)
        _, headers = parse_head(head)
        length = int(dict(headers).get("content-length", "0"))
        if length:
            up.requests.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


async def test_slow_upload_is_not_an_upstream_failure(tmp_path: Path) -> None:
    extra = "[timeouts]\nupstream_read = 0.4\nclient_body = 2"
    async with raw_upstream(answer_each) as upstream:
        config = proxy_config(tmp_path, [upstream.url], extra=extra)
        async with running_proxy(config) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n")
            for byte in b"slow":
                # each pause is longer than the upstream read timeout
                await asyncio.sleep(0.5)
                writer.write(bytes([byte]))
            status, _ = parse_head(await asyncio.wait_for(read_head(reader), 5))
            writer.close()
            assert status == "HTTP/1.1 200 OK"
            assert proxy.state.groups["app"].pool.upstreams[0].available
    assert b"slow" in upstream.requests


async def test_a_header_line_that_never_ends_is_cut_off_early(tmp_path: Path) -> None:
    async with raw_upstream(answer_each) as upstream:
        config = proxy_config(tmp_path, [upstream.url])
        async with running_proxy(config) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\nX-Endless: ")
            for _ in range(16):  # 1 MiB of one header value, 32 times the limit
                writer.write(b"a" * 65536)
                await asyncio.wait_for(writer.drain(), 5)
            head = await asyncio.wait_for(read_head(reader), 5)
            # a later request on another connection is served without delay
            status, _, _ = await asyncio.wait_for(
                exchange(proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"), 2
            )
            writer.close()
    assert head.startswith(b"HTTP/1.1 431")
    assert status == "HTTP/1.1 200 OK"
    assert len(upstream.requests) == 1


async def test_bytes_after_a_response_never_reach_another_client(
    tmp_path: Path,
) -> None:
    async def overrun(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        while True:
            head = await read_head(reader)
            up.requests.append(head)
            if head.startswith(b"GET /first"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                    b"HTTP/1.1 200 OK\r\nX-Injected: yes\r\n"
                    b"Content-Length: 5\r\n\r\nEVIL!"
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean")
            await writer.drain()

    async with raw_upstream(overrun) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            port = proxy.ports[0]
            status, _, body = await exchange(
                port, b"GET /first HTTP/1.1\r\nHost: h\r\n\r\n"
            )
            assert body == b"hi"
            await asyncio.sleep(0.05)
            status, headers, body = await exchange(
                port, b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n"
            )
    assert status == "HTTP/1.1 200 OK" and body == b"clean"
    assert "x-injected" not in dict(headers)
    assert upstream.connections == 2  # the overrun connection was not reused


async def test_connection_cannot_strip_the_response_length(tmp_path: Path) -> None:
    async def sneaky(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Secret\r\n"
            b"X-Secret: s\r\nContent-Length: 2\r\n\r\nhi"
        )
        await writer.drain()

    async with raw_upstream(sneaky) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            _, headers, body = await exchange(
                proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
            )
    assert ("content-length", "2") in headers and body == b"hi"
    assert "x-secret" not in dict(headers)


async def test_a_bad_pipelined_request_waits_for_the_answer_before_it(
    tmp_path: Path,
) -> None:
    async with raw_upstream(answer_each) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(
                b"POST /ok HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
                b"GARBAGE\r\n\r\n"
            )
            first, _ = parse_head(await asyncio.wait_for(read_head(reader), 5))
            assert await reader.readexactly(2) == b"ok"
            second, _ = parse_head(await asyncio.wait_for(read_head(reader), 5))
            writer.close()
    assert first == "HTTP/1.1 200 OK"
    assert second.startswith("HTTP/1.1 400")


async def test_requests_no_upstream_should_see_are_refused_before_forwarding(
    tmp_path: Path,
) -> None:
    cases = [
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        (b"CONNECT internal:22 HTTP/1.1\r\nHost: internal:22\r\n\r\n", "405"),
        (b"TRACE / HTTP/1.1\r\nHost: h\r\n\r\n", "405"),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", "505"),
        (b"GET /\r\n\r\n", "505"),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            "501",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
            "400",
        ),
        (b"GET relative HTTP/1.1\r\nHost: h\r\n\r\n", "400"),
    ]
    async with raw_upstream(answer_each) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            # warm the pool, so that a forwarded head would go out at once
            await exchange(proxy.ports[0], b"GET /warm HTTP/1.1\r\nHost: h\r\n\r\n")
            for request, expected in cases:
                status, _, _ = await exchange(proxy.ports[0], request)
                assert status.split()[1] == expected, (request, status)
    assert [r for r in upstream.requests if not r.startswith(b"GET /warm")] == []


async def test_absolute_form_targets_route_by_their_authority(tmp_path: Path) -> None:
    async with raw_upstream(answer_each) as upstream:
        async with running_proxy(proxy_config(tmp_path, [upstream.url])) as proxy:
            status, _, _ = await exchange(
                proxy.ports[0],
                b"GET http://example.test/path?q=1 HTTP/1.1\r\nHost: other\r\n\r\n",
            )
    # the absolute URL's authority is the host, whatever the Host header says
    assert status == "HTTP/1.1 200 OK"
    assert b"X-Forwarded-Host: example.test" in upstream.requests[0]


async def test_unrequested_switching_protocols_is_a_bad_gateway(tmp_path: Path) -> None:
    async def switch(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\nraw"
        )
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_upstream(switch) as upstream:
        config = proxy_config(tmp_path, [upstream.url], group="retries = 0")
        async with running_proxy(config) as proxy:
            status, _, _ = await exchange(
                proxy.ports[0], b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
            )
    assert status.startswith("HTTP/1.1 502")


async def test_a_slow_reader_is_timed_by_client_send_not_upstream_read(
    tmp_path: Path,
) -> None:
    size = 8 * 1024 * 1024

    async def big(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
    ) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()

    extra = "[timeouts]\nupstream_read = 0.3\nclient_send = 10"
    async with raw_upstream(big) as upstream:
        async with running_proxy(
            proxy_config(tmp_path, [upstream.url], extra=extra)
        ) as proxy:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", proxy.ports[0], limit=1 << 16
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            await asyncio.wait_for(read_head(reader), 5)
            await asyncio.sleep(1.0)  # stop reading for three upstream read timeouts
            received = 0
            while received < size:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
                if not chunk:
                    break
                received += len(chunk)
            writer.close()
    assert received == size


def test_combined_log_escapes_what_clients_control() -> None:
    stream = io.StringIO()
    AccessLog("combined", stream).write(
        client="1.2.3.4",
        method="GET",
        target='/"x',
        version="1.1",
        status=200,
        sent=2,
        referer="",
        agent='evil" 500 "forged',
        upstream="u:1",
        duration=0.001,
        reason="new",
    )
    line = stream.getvalue()
    assert line.count('"') == 6  # request, referer and agent quoted, nothing more
    assert "evil\\x22 500 \\x22forged" in line


async def test_an_early_error_reaches_a_client_still_uploading(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    config = proxy_config(tmp_path, [closed], group="retries = 0")
    async with running_proxy(config) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
        writer.write(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (8 << 20)
        )
        # keep sending while the proxy has already answered
        for _ in range(16):
            writer.write(b"x" * 65536)
            await asyncio.sleep(0.01)
        head = await asyncio.wait_for(read_head(reader), 5)
        writer.close()
    assert head.startswith(b"HTTP/1.1 502")
