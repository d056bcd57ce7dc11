"""Large bodies stream through the proxy process with its memory staying flat."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.proxy_support import RawUpstream, raw_upstream, read_head
from tests.support import free_port, repo_root, wait_for_port

GIB = 1 << 30
BLOCK = b"\0" * (1 << 20)


def memory_kib(pid: int, field: str) -> int:
    """Return a memory figure of a process from /proc, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def proxy_process(upstream: str, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """Run the proxy as a process of its own, so that its memory can be read."""
    port = free_port()
    config = tmp_path / "stream.toml"
    config.write_text(
        f'[[listeners]]\naddress = "127.0.0.1:{port}"\n[admin]\naddress = ""\n'
        '[log]\naccess = "off"\n[limits]\nbody_bytes = 0\n'
        f'[groups.app]\n[[groups.app.servers]]\nurl = "{upstream}"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "stickyproxy", "run", "-c", str(config)],
        cwd=repo_root(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield process.pid, port
    finally:
        process.kill()
        process.wait(timeout=10)


async def send_blocks(writer: asyncio.StreamWriter, total: int) -> None:
    sent = 0
    while sent < total:
        writer.write(BLOCK)
        sent += len(BLOCK)
        await writer.drain()


async def count_until(reader: asyncio.StreamReader, total: int) -> int:
    received = 0
    while received < total:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        received += len(chunk)
    return received


async def download(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: RawUpstream
) -> None:
    head = await read_head(reader)
    up.requests.append(head)
    if head.startswith(b"POST"):
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received = await count_until(reader, length)
        body = str(received).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
        await send_blocks(writer, GIB)
    await writer.drain()


async def test_one_gib_each_way_keeps_proxy_memory_bounded(tmp_path: Path) -> None:
    async with raw_upstream(download) as upstream:
        with proxy_process(upstream.url, tmp_path) as (pid, port):
            baseline = memory_kib(pid, "VmRSS")

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            head = await asyncio.wait_for(read_head(reader), 10)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(count_until(reader, GIB), 120) == GIB

            writer.write(
                b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % GIB
            )
            await asyncio.wait_for(send_blocks(writer, GIB), 120)
            head = await asyncio.wait_for(read_head(reader), 30)
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(len(str(GIB))) == str(GIB).encode()
            writer.close()

            peak = memory_kib(pid, "VmHWM")
    # flow control holds a few socket buffers, not the body: far below 1 GiB
    assert peak - baseline < 48 * 1024, (baseline, peak)
