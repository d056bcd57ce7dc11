"""Active health probes against upstreams that answer badly; a checker that lasts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from stickyproxy.config import GroupConfig, HealthCheckConfig, ServerConfig
from stickyproxy.health import HealthChecker, ProbeListener, probe
from stickyproxy.upstreams import Pool, Upstream
from tests.proxy_support import RawUpstream, raw_upstream

HEALTH = HealthCheckConfig(path="/health", interval=0.02, timeout=1.0, rise=1, fall=1)

Answer = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter, RawUpstream], Awaitable[None]
]


def answering(data: bytes) -> Answer:
    """Return a raw handler that reads the probe, writes data and closes."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: RawUpstream
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()

    return handler


def pool_of(*urls: str) -> Pool:
    """Return a pool of the given upstreams with fast active checks."""
    servers = tuple(ServerConfig(url=url, max_fails=0) for url in urls)
    return Pool(GroupConfig(name="app", servers=servers, health=HEALTH))


@contextlib.asynccontextmanager
async def checking(
    pool: Pool, listener: ProbeListener | None = None
) -> AsyncIterator[HealthChecker]:
    """Run a health checker over the pool for the block."""
    checker = HealthChecker(pool, listener)
    checker.start()
    try:
        yield checker
    finally:
        await checker.stop()


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition for at most five seconds."""
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 " + b"x" * 100_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 " + b"x" * 100_000,
        b"HTTP/1.1 200 OK",
        b"",
        b"HTTP/1.1 0000200 OK\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"\xff\xfe 200 \xff\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ],
)
async def test_a_malformed_answer_is_a_failed_probe(answer: bytes) -> None:
    async with raw_upstream(answering(answer)) as upstream:
        (target,) = pool_of(upstream.url)
        assert await probe(target, HEALTH) is False


async def test_a_clean_status_line_is_a_passed_probe() -> None:
    async with raw_upstream(answering(b"HTTP/1.1 200 OK\r\n\r\n")) as upstream:
        (target,) = pool_of(upstream.url)
        assert await probe(target, HEALTH) is True


async def test_a_huge_status_line_does_not_end_the_checks_of_the_group() -> None:
    huge = answering(b"HTTP/1.1 200 " + b"x" * 100_000 + b"\r\n\r\n")
    async with (
        raw_upstream(huge) as bad,
        raw_upstream(answering(b"HTTP/1.1 200 OK\r\n\r\n")) as good,
    ):
        pool = pool_of(bad.url, good.url)
        first, second = pool
        async with checking(pool) as checker:
            await wait_until(lambda: not first.healthy, "the bad upstream to fail")
            await wait_until(lambda: good.connections >= 3, "a few rounds")
            assert second.healthy

            # the good upstream stops: the checker must still be there to notice
            assert good.server is not None
            good.server.close()
            await good.server.wait_closed()
            await wait_until(lambda: not second.healthy, "the stopped upstream")
            assert checker.task is not None and not checker.task.done()


async def test_a_failing_round_is_logged_once_and_probing_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds = 0

    def broken(upstream: Upstream, ok: bool, changed: bool) -> None:
        nonlocal rounds
        rounds += 1
        raise RuntimeError("listener bug")

    async with raw_upstream(answering(b"HTTP/1.1 200 OK\r\n\r\n")) as upstream:
        async with checking(pool_of(upstream.url), broken) as checker:
            await wait_until(lambda: rounds >= 5, "five rounds")
            assert checker.task is not None and not checker.task.done()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "health checks of app failed" in failures[0].getMessage()
