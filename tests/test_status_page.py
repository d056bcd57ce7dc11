"""The status page in a real headless Chromium, driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.test_metrics import request, stack

TOKEN = "page-token"

CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)


class Page:
    """One browser tab, spoken to over its DevTools WebSocket."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result, skipping events."""
        ident = next(self._ids)
        await self.socket.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(10):
            while True:
                message = json.loads(await self.socket.receive_str())
                if message.get("id") == ident:
                    assert "error" not in message, message
                    result: dict[str, Any] = message["result"]
                    return result

    async def evaluate(self, expression: str) -> Any:
        """Return the value of a JavaScript expression in the page."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True
        )
        return result["result"].get("value")

    async def wait_until(self, expression: str, what: str) -> None:
        """Poll a JavaScript condition for at most ten seconds."""
        for _ in range(200):
            if await self.evaluate(expression):
                return
            await asyncio.sleep(0.05)
        text = await self.evaluate("document.body.innerText")
        raise AssertionError(f"the page never showed {what}; it shows:\n{text}")


@contextlib.asynccontextmanager
async def browser(tmp_path: Path) -> AsyncIterator[Page]:
    """Start a headless Chromium with an empty profile; yield its first tab."""
    assert CHROMIUM is not None
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Chromium writes the port it chose, then the browser's path, to this file
        active = profile / "DevToolsActivePort"
        for _ in range(300):
            if active.exists() and len(active.read_text().split()) == 2:
                break
            await asyncio.sleep(0.05)
        port = int(active.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            url = next(t for t in targets if t["type"] == "page")[
                "webSocketDebuggerUrl"
            ]
            async with session.ws_connect(url, max_msg_size=0) as socket:
                yield Page(socket)
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 10)


def row(upstream: str) -> str:
    """Return a JavaScript expression for an upstream's table row."""
    return f"document.querySelector('tr[data-upstream=\"{upstream}\"]')"


async def test_page_shows_upstreams_and_follows_a_drain_without_reloading(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path, count=2) as s, browser(tmp_path) as page:
        first, second = s.name_of(0), s.name_of(1)
        origin = f"http://127.0.0.1:{s.admin_port}"
        await page.send("Page.navigate", url=origin + "/")
        await page.wait_until(
            f"{row(first)} !== null && {row(second)} !== null", "both upstreams"
        )
        assert await page.evaluate(f"{row(first)}.dataset.state") == "up"
        text = await page.evaluate("document.body.innerText")
        assert first in text and second in text
        assert "round_robin" in text

        # a mark that a reload of the page would erase
        await page.evaluate("window.sameDocument = true")

        for _ in range(6):
            await request(s.port, "/")
        await page.wait_until(
            f"{row(first)}.querySelector('[data-field=requests]').textContent === '3'",
            "the requests served",
        )

        async with aiohttp.ClientSession() as client:
            url = f"{origin}/api/groups/app/upstreams/{first}/state"
            async with client.post(url, json={"state": "drain"}) as response:
                assert response.status == 200
        await page.wait_until(f"{row(first)}.dataset.state === 'draining'", "the drain")
        badge = await page.evaluate(f"{row(first)}.querySelector('.state').textContent")
        assert badge == "draining"
        assert await page.evaluate(f"{row(second)}.dataset.state") == "up"
        assert await page.evaluate("window.sameDocument") is True
        assert "live" in await page.evaluate(
            "document.getElementById('status').textContent"
        )

        # everything the page loaded came from the admin listener itself
        resources = await page.evaluate(
            "performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert resources
        assert all(name.startswith(origin + "/") for name in resources)


async def test_page_takes_a_token_from_its_address_and_hides_it(tmp_path: Path) -> None:
    async with stack(tmp_path, count=1, admin_token=TOKEN) as s:
        # tests never listen beyond loopback; pretend the listener does
        s.admin.loopback = False
        async with browser(tmp_path) as page:
            origin = f"http://127.0.0.1:{s.admin_port}"
            await page.send("Page.navigate", url=f"{origin}/")
            await page.wait_until(
                "document.getElementById('status').textContent.includes('token')",
                "that a token is needed",
            )

            await page.send("Page.navigate", url=f"{origin}/#token={TOKEN}")
            await page.wait_until(f"{row(s.name_of(0))} !== null", "the upstream")
            assert await page.evaluate("window.location.href") == origin + "/"

            # the tab keeps the token for later visits, out of the address
            await page.send("Page.navigate", url="about:blank")
            await page.send("Page.navigate", url=f"{origin}/")
            await page.wait_until(f"{row(s.name_of(0))} !== null", "the upstream")
