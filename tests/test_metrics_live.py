"""A scrape in the middle of bench traffic shows every metric family, with real values.

The real backend runs as two processes, the proxy as a process with a learn group that
shares its pins through a private Redis, and the bench's simulated users log in,
upload, delete and restore while the test scrapes the admin listener.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from stickyproxy.bench_users import Observations, drive
from tests.support import RedisServer, free_port, repo_root, wait_for_port

FAMILIES = (
    "requests_total",
    "request_duration_seconds",
    "upstream_response_seconds",
    "request_body_bytes_total",
    "response_body_bytes_total",
    "client_connections",
    "requests_in_flight",
    "upstream_state",
    "upstream_weight",
    "health_checks_total",
    "health_transitions_total",
    "upstream_failures_total",
    "retries_total",
    "selections_total",
    "repins_total",
    "invalid_affinity_cookies_total",
    "pinned_sessions",
    "session_drift_total",
    "redis_connected",
    "redis_errors",
    "redis_latency_seconds",
    "config_reloads_total",
    "config_last_reload_success",
)


@contextmanager
def process(*command: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process for the block and stop it by PID afterwards."""
    child = subprocess.Popen(
        command, cwd=repo_root(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)


def value(text: str, pattern: str) -> float:
    """Return the sum of the samples whose line matches pattern."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("#") and re.match(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_scrape_during_bench_traffic_shows_every_family(
    tmp_path: Path, redis: RedisServer
) -> None:
    backend, proxy, admin = free_port(), free_port(), free_port()
    config = tmp_path / "live.toml"
    config.write_text(
        f'[[listeners]]\naddress = "127.0.0.1:{proxy}"\n'
        f'[admin]\naddress = "127.0.0.1:{admin}"\n[log]\naccess = "off"\n'
        '[forwarded]\ntrusted_proxies = ["127.0.0.0/8"]\n'
        '[groups.app]\npolicy = "learn"\n'
        f'[groups.app.learn]\nredis_url = "{redis.url}"\n'
        '[groups.app.health]\npath = "/health"\ninterval = 0.5\n'
        f'[[groups.app.servers]]\nurl = "http://127.0.0.1:{backend}"\n'
        f'[[groups.app.servers]]\nurl = "http://127.0.0.1:{backend + 1}"\n'
    )
    launcher = (sys.executable, "-m", "backend", "--instances", "2")
    with (
        process(*launcher, "--port", str(backend)),
        process(sys.executable, "-m", "stickyproxy", "run", "-c", str(config)),
    ):
        loop = asyncio.get_running_loop()
        for port in (backend, backend + 1, proxy, admin):
            await loop.run_in_executor(None, wait_for_port, port)

        observations = Observations(loop.time())
        users = asyncio.create_task(
            drive(
                observations,
                f"http://127.0.0.1:{proxy}/",
                6,
                4.0,
                "stable",
                "live",
                "stickyproxy",
            )
        )
        await asyncio.sleep(2.5)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                text = await response.text()
        await users

    declared = set(re.findall(r"^# TYPE stickyproxy_(\w+) ", text, re.MULTILINE))
    for family in FAMILIES:
        base = family.removesuffix("_total")
        assert {base, base + "_total"} & declared, family
    assert value(text, r'stickyproxy_requests_total\{.*code="2xx"') > 20
    assert value(text, r'stickyproxy_selections_total\{.*reason="pinned"') > 10
    assert value(text, r"stickyproxy_pinned_sessions\{") >= 1
    assert value(text, r"stickyproxy_redis_connected\{") == 1
    assert value(text, r'stickyproxy_upstream_state\{.*state="up"') == 2
    assert value(text, r'stickyproxy_health_checks_total\{.*result="success"') >= 2
    assert value(text, r"stickyproxy_session_drift_total\{") == 0
    assert value(text, r"stickyproxy_config_last_reload_success ") == 1
    assert observations.requests > 20 and observations.unauthorized == 0
