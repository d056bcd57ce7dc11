"""Quick mode in front of two upstreams, driven by curl and by a real Chromium."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from tests.proxy_support import aiohttp_upstream
from tests.support import free_port, repo_root, wait_for_port

CHROMIUM = shutil.which("chromium")
CURL = shutil.which("curl")

PAGE = """<!doctype html>
<html><body><p id="out">waiting</p>
<script>
fetch("/api/who").then(r => r.text()).then(t => {
  document.getElementById("out").textContent = "served by " + t;
});
</script></body></html>
"""


def page_app(name: str) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def who(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/api/who", who)
    return app


async def run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, command
    return stdout.decode()


@pytest.mark.skipif(CHROMIUM is None or CURL is None, reason="chromium or curl missing")
async def test_quick_mode_serves_curl_and_a_browser(tmp_path: Path) -> None:
    port = free_port()
    async with (
        aiohttp_upstream(page_app("A")) as (a, _),
        aiohttp_upstream(page_app("B")) as (b, _),
    ):
        process = subprocess.Popen(
            [
                sys.executable, "-m", "stickyproxy", "run",
                "--listen", f"127.0.0.1:{port}",
                "--upstream", a, "--upstream", b,
                "--policy", "round_robin", "--admin", "",
            ],
            cwd=repo_root(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await asyncio.get_running_loop().run_in_executor(None, wait_for_port, port)
            answers = {
                await run(CURL, "-sf", f"http://127.0.0.1:{port}/api/who")  # type: ignore[arg-type]
                for _ in range(4)
            }
            assert answers == {"A", "B"}

            dom = await run(
                CHROMIUM,  # type: ignore[arg-type]
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=5000", "--dump-dom",
                f"http://127.0.0.1:{port}/",
            )  # fmt: skip
        finally:
            process.kill()
            process.wait(timeout=10)
    assert "served by A" in dom or "served by B" in dom
