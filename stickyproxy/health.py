"""Active health checks: probe each upstream over HTTP and count rises and falls.

Passive checks live on the upstream itself (``Upstream.record_failure``); this module
only sends probes. A transition is logged once, by the upstream, when rise or fall
consecutive results agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from stickyproxy.config import HealthCheckConfig
from stickyproxy.log import HEALTH_LOGGER
from stickyproxy.upstreams import Pool, Upstream

log = logging.getLogger(HEALTH_LOGGER)

#: called after every probe: the upstream, its verdict, whether its state changed
ProbeListener = Callable[[Upstream, bool, bool], None]


#: bytes a status line may take; a longer one is not a health answer
STATUS_LINE_LIMIT = 8 * 1024


async def probe(upstream: Upstream, config: HealthCheckConfig) -> bool:
    """Send one GET to the health path; return whether the answer was as expected.

    Anything but a complete, well-formed status line with an expected status counts
    as a failure, never as an error.
    """
    try:
        async with asyncio.timeout(config.timeout):
            reader, writer = await asyncio.open_connection(
                upstream.host, upstream.port, limit=STATUS_LINE_LIMIT
            )
            try:
                writer.write(
                    f"GET {config.path} HTTP/1.1\r\nHost: {upstream.authority}\r\n"
                    "User-Agent: stickyproxy-health\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                status_line = await reader.readline()
            finally:
                writer.close()
    # readline raises ValueError on a line beyond the limit
    except (OSError, TimeoutError, ValueError, EOFError):
        return False
    if not status_line.endswith(b"\n"):
        return False
    parts = status_line.split(None, 2)
    if (
        len(parts) < 2
        or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1")
        or len(parts[1]) != 3
        or not parts[1].isdigit()
    ):
        return False
    return int(parts[1]) in config.expect_status


class HealthChecker:
    """Probes every upstream of one pool at the configured interval."""

    def __init__(self, pool: Pool, listener: ProbeListener | None = None) -> None:
        self.pool = pool
        self.config = pool.config.health
        self.listener = listener
        self._streaks: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing in the background, if the group asks for active checks."""
        if self.config.path and self.task is None:
            self.task = asyncio.get_running_loop().create_task(
                self._run(), name=f"health-{self.pool.name}"
            )

    async def stop(self) -> None:
        """Stop probing and wait until the task has ended."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            # wait() does not raise the task's cancellation, but does raise our own
            await asyncio.wait({task})

    async def _run(self) -> None:
        # a bug in one round must not end active checks for the whole group
        failing = False
        while True:
            try:
                await self.check_once()
            except Exception:
                if not failing:
                    log.exception("health checks of %s failed", self.pool.name)
                failing = True
            else:
                failing = False
            await asyncio.sleep(self.config.interval)

    async def check_once(self) -> None:
        """Probe every upstream once, concurrently, and apply rise and fall."""
        upstreams = [u for u in self.pool if u.admin_state != "down"]
        results = await asyncio.gather(
            *(probe(u, self.config) for u in upstreams), return_exceptions=True
        )
        errors = []
        for upstream, result in zip(upstreams, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                errors.append(result)
            # a probe that broke says nothing good about the upstream
            ok = result is True
            changed = self._apply(upstream, ok)
            if self.listener is not None:
                self.listener(upstream, ok, changed)
        if errors:
            raise errors[0]

    def _apply(self, upstream: Upstream, ok: bool) -> bool:
        # a positive streak counts successes, a negative one failures
        streak = self._streaks.get(upstream.id, 0)
        if ok:
            streak = streak + 1 if streak > 0 else 1
        else:
            streak = streak - 1 if streak < 0 else -1
        self._streaks[upstream.id] = streak
        if ok and not upstream.healthy and streak >= self.config.rise:
            return upstream.set_healthy(True)
        if not ok and upstream.healthy and -streak >= self.config.fall:
            return upstream.set_healthy(False)
        return False
