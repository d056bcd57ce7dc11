"""The admin listener: metrics, the upstream API and the status page, off the public port."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from stickyproxy.log import ADMIN_LOGGER

if TYPE_CHECKING:
    from stickyproxy.metrics import Metrics
    from stickyproxy.server import ProxyServer

log = logging.getLogger(ADMIN_LOGGER)


class AdminServer:
    """Serves /metrics and the JSON API on the admin address."""

    def __init__(self, server: ProxyServer, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind the admin listener, if one is configured."""
        address = self.server.config.admin.address
        if address is None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, address.host, address.port)
        await site.start()
        log.info("admin listening on %s", address)

    async def close(self) -> None:
        """Stop the admin listener."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.exposition()
        return web.Response(body=body, content_type="text/plain", charset="utf-8")
