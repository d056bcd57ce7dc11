"""Run the proxy in-process and talk to it over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from stickyproxy.config import Config, load_config
from stickyproxy.server import ProxyServer


def proxy_config(
    tmp_path: Path, upstreams: list[str], extra: str = "", group: str = ""
) -> Config:
    """Write a TOML file with one listener on a free port and one group, and load it."""
    servers = "\n".join(
        f'[[groups.app.servers]]\nurl = "{url}"' if "\n" not in url else url
        for url in upstreams
    )
    text = (
        '[[listeners]]\naddress = "127.0.0.1:0"\n'
        '[admin]\naddress = ""\n'
        '[log]\naccess = "off"\n'
        f"{extra}\n[groups.app]\n{group}\n{servers}\n"
    )
    path = tmp_path / "stickyproxy.toml"
    path.write_text(text)
    return load_config(path, environ={})


@contextlib.asynccontextmanager
async def running_proxy(config: Config) -> AsyncIterator[ProxyServer]:
    """Start a ProxyServer for the block; its first port is ``server.ports[0]``."""
    server = ProxyServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def aiohttp_upstream(
    app: web.Application, port: int = 0
) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """Serve an aiohttp application on loopback; yields its URL and runner."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{bound}", runner
    finally:
        await runner.cleanup()


@dataclass
class RawUpstream:
    """A byte-level upstream: records what it receives and answers with a handler."""

    handler: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter, RawUpstream], Awaitable[None]
    ]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_upstream(
    handler: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter, RawUpstream], Awaitable[None]
    ],
) -> AsyncIterator[RawUpstream]:
    """Serve a raw asyncio handler on a free loopback port."""
    upstream = RawUpstream(handler)
    upstream.server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
    try:
        yield upstream
    finally:
        upstream.server.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """Read up to and including the blank line that ends an HTTP head."""
    return await reader.readuntil(b"\r\n\r\n")


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Split a head into its first line and (lower-cased name, value) pairs."""
    lines = head.decode("latin-1").split("\r\n")
    pairs = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            pairs.append((name.strip().lower(), value.strip()))
    return lines[0], pairs


async def exchange(
    port: int, request: bytes, read_body: bool = True
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Send raw bytes on a new connection; return status line, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(read_head(reader), 10)
        status, headers = parse_head(head)
        body = b""
        if read_body:
            lengths = [int(v) for k, v in headers if k == "content-length"]
            if lengths and not request.startswith(b"HEAD"):
                body = await asyncio.wait_for(reader.readexactly(lengths[0]), 10)
        return status, headers, body
    finally:
        writer.close()
