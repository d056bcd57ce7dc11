"""The demo as a user runs it: a real backend and proxy, stopped cleanly by PID."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from stickyproxy.bench_stack import render_toml, stack_document
from stickyproxy.config import load_config
from stickyproxy.demo import OPTIONS, Option
from tests.backend_support import free_ports
from tests.support import free_port, repo_root

STICKYPROXY = [sys.executable, "-m", "stickyproxy"]
OPEN_LINE = re.compile(r"^\s+open\s+(http://\S+)")


def demo_env(**extra: str) -> dict[str, str]:
    """Return this environment without what would steer the demo, plus extra."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "REDIS_URL" and not key.startswith("STICKYPROXY_")
    }
    env.update(extra)
    return env


def descendants(pid: int) -> set[int]:
    """Return every process below pid, read from /proc."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            text = Path(f"/proc/{current}/task/{current}/children").read_text()
        except OSError:
            continue
        for child in map(int, text.split()):
            found.add(child)
            pending.append(child)
    return found


def alive(pid: int) -> bool:
    """Tell whether pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Demo:
    """A ``stickyproxy demo`` process whose standard output is read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*STICKYPROXY, "demo", *args],
            cwd=repo_root(),
            env=env or demo_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(
        self, pattern: re.Pattern[str], timeout: float = 30.0
    ) -> re.Match[str]:
        """Return the first stdout line matching pattern, or fail with the output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                # once the process is gone, what it printed is all there is
                if self.process.poll() is not None and not self._reader.is_alive():
                    break
                continue
            self.seen.append(line)
            found = pattern.search(line)
            if found:
                return found
        assert self.process.stderr is not None
        stderr = self.process.stderr.read() if self.process.poll() is not None else ""
        raise AssertionError(f"no line like {pattern.pattern}: {self.seen} {stderr}")

    def stop(self) -> int:
        """Send SIGTERM by PID and return the exit status (killing it if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    def close(self) -> None:
        """Stop the process if it runs, and close its pipes."""
        if self.process.poll() is None:
            self.stop()
        self._reader.join(timeout=10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def running_demo(*args: str) -> Iterator[tuple[Demo, str]]:
    """Run the demo until the block ends; yield it and the URL it printed."""
    demo = Demo(*args)
    try:
        url = demo.wait_for(OPEN_LINE).group(1)
        yield demo, url
    finally:
        demo.close()


async def session_instances(
    url: str, user: str, requests: int, logins: int = 1
) -> list[str]:
    """Log in as user with a browser of its own; return who answered each request."""
    jar = aiohttp.CookieJar(unsafe=True)
    timeout = aiohttp.ClientTimeout(total=10)
    answered = []
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
        for login in range(logins):
            body = {"userId": user, "tenantId": "demo"}
            async with http.post(url + "api/login", json=body) as response:
                assert response.status == 200, await response.text()
                answered.append(response.headers["X-Instance-Id"])
            for index in range(requests):
                upload = {"name": f"{user}-{login}-{index}.txt", "content": "hello"}
                async with http.post(url + "api/files", json=upload) as response:
                    assert response.status == 201, await response.text()
                    answered.append(response.headers["X-Instance-Id"])
                async with http.get(url + "api/files") as response:
                    assert response.status == 200, await response.text()
                    listed = (await response.json())["files"]
                    assert len(listed) == login * requests + index + 1
                    answered.append(response.headers["X-Instance-Id"])
    return answered


async def test_cookie_demo_pins_each_login_and_stops_everything_on_sigterm() -> None:
    port = free_port()
    with running_demo(
        "--option", "cookie", "--instances", "2",
        "--port", str(port), "--backend-port", str(free_ports(2)),
    ) as (demo, url):  # fmt: skip
        assert url == f"http://127.0.0.1:{port}/"
        before = descendants(demo.process.pid)
        # the launcher, its two instances and the proxy
        assert len(before) >= 4, before

        async with aiohttp.ClientSession() as http, http.get(url) as page:
            assert page.status == 200
            assert "secure-api" in await page.text()

        # each browser logs in twice; the cookie keeps it on one instance throughout
        first = await session_instances(url, "alice", 4, logins=2)
        second = await session_instances(url, "bob", 4, logins=2)
        assert len(set(first)) == 1, first
        assert len(set(second)) == 1, second

        assert demo.stop() == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in before) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in before if alive(pid)]
        demo.wait_for(re.compile(r"^stopped$"), timeout=5)


async def test_redis_demo_spreads_requests_without_drift() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with running_demo(
        "--option", "redis", "--instances", "2",
        "--port", str(free_port()), "--backend-port", str(free_ports(2)),
    ) as (_, url):  # fmt: skip
        answered = await session_instances(url, "carol", 4)
        # round robin in front of shared sessions: both instances answer, no 401
        assert set(answered) == {"app-0", "app-1"}, answered


def test_redis_demo_without_redis_says_what_to_install(tmp_path: Path) -> None:
    env = demo_env(PATH=str(tmp_path))
    result = subprocess.run(
        [*STICKYPROXY, "demo", "--option", "redis", "--port", str(free_port())],
        cwd=repo_root(),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in message
    assert "REDIS_URL" in message and "apt-get install redis-server" in message


def test_demo_refuses_a_busy_port_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*STICKYPROXY, "demo", "--port", str(port)],
            cwd=repo_root(),
            env=demo_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"stickyproxy: port {port} is busy; choose another with --port"
    )


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_configuration_is_usable_with_run(name: str) -> None:
    path = repo_root() / "config" / f"demo-{name}.toml"
    config = load_config(path, environ={})
    group = config.groups["app"]
    expected = {"redis": "round_robin", "single": "round_robin"}.get(name, name)
    assert group.policy == expected
    assert len(group.servers) == (1 if name == "single" else 4)


@pytest.mark.parametrize("option", OPTIONS.values(), ids=lambda o: o.name)
def test_generated_configuration_keeps_the_option_and_takes_the_ports(
    option: Option, tmp_path: Path
) -> None:
    document = stack_document(
        option.name,
        proxy_port=18080,
        admin_port=None,
        backend_ports=range(13000, 13003),
        trust_loopback=True,
        access_log=False,
    )
    text = render_toml(document)
    assert tomllib.loads(text) == document

    path = tmp_path / "generated.toml"
    path.write_text(text)
    config = load_config(path, environ={})
    shipped_path = repo_root() / "config" / f"demo-{option.name}.toml"
    shipped = load_config(shipped_path, environ={})
    group, original = config.groups["app"], shipped.groups["app"]
    assert (group.policy, group.cookie, group.learn) == (
        original.policy,
        original.cookie,
        original.learn,
    )
    assert [s.url for s in group.servers] == [
        f"http://127.0.0.1:{port}" for port in range(13000, 13003)
    ]
    assert str(config.listeners[0].address) == "127.0.0.1:18080"
    assert config.admin.address is None
    assert config.forwarded.trusted_proxies == ("127.0.0.0/8",)


def test_redis_demo_refuses_instances_that_fell_back_to_memory() -> None:
    # nothing listens on port 1: the instances start with in-memory sessions
    result = subprocess.run(
        [
            *STICKYPROXY, "demo", "--option", "redis", "--instances", "2",
            "--port", str(free_port()), "--redis-url", "redis://127.0.0.1:1/0",
        ],
        cwd=repo_root(),
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "could not reach Redis at redis://127.0.0.1:1/0" in message
