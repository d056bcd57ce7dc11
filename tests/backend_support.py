"""Helpers for the backend tests: instances as processes, a cookie-keeping client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiohttp

from tests.support import free_port, repo_root

COOKIE = "connect.sid"

# variables the backend reads; tests set them explicitly or not at all
_BACKEND_ENV = ("REDIS_URL", "SESSION_SECRET", "INSTANCE_ID")


def backend_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment without backend variables, plus extra."""
    env = {k: v for k, v in os.environ.items() if k not in _BACKEND_ENV}
    env.update(extra or {})
    return env


def free_ports(count: int, attempts: int = 50) -> int:
    """Return the first of count consecutive loopback ports that are all free now."""
    for _ in range(attempts):
        first = free_port()
        if first + count - 1 > 65535:
            continue
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"found no {count} consecutive free ports in {attempts} tries")


class Process:
    """A child process whose stderr lines are collected as they arrive."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str]) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            self.args,
            cwd=repo_root(),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        """Return everything written to stderr so far."""
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        """Return the first stderr line that satisfies predicate, waiting if needed."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise TimeoutError(
                        f"no matching line; stderr so far:\n{self.output}"
                    )
                self._changed.wait(min(left, 0.2))

    def signal(self, signum: int) -> None:
        """Send signum to the process if it still runs."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """Terminate the process (kill it after timeout) and return its status."""
        self.signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return status

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Instance(Process):
    """One ``python -m backend.server`` on a free port, ready when built."""

    def __init__(self, instance_id: str, env: Mapping[str, str] | None = None) -> None:
        self.instance_id = instance_id
        self.port = free_port()
        super().__init__(
            [
                sys.executable, "-m", "backend.server",
                "--port", str(self.port),
                "--instance-id", instance_id,
            ],
            backend_env(env),
        )  # fmt: skip
        try:
            self.wait_for(lambda line: "listening on" in line)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Reply:
    """What a call returned: status, headers and the decoded JSON body (or None)."""

    status: int
    headers: Mapping[str, str]
    body: Any
    text: str = ""


@dataclass
class Api:
    """A client that keeps the session cookie itself, as one browser would.

    The cookie is kept per client rather than per host, so the same cookie goes
    to every instance, as it would behind one load balancer address.
    """

    http: aiohttp.ClientSession
    base: str
    cookie: str | None = None
    history: list[Reply] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        base: str | None = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        """Send one request to base (default: the client's) and remember the cookie."""
        sent = dict(headers or {})
        if self.cookie is not None:
            sent["Cookie"] = f"{COOKIE}={self.cookie}"
        url = (base or self.base) + path
        kwargs: dict[str, Any] = {"headers": sent}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data

        async with self.http.request(method, url, **kwargs) as response:
            text = await response.text()
            if COOKIE in response.cookies:
                value = response.cookies[COOKIE].value
                self.cookie = value or None
            try:
                decoded = await response.json(content_type=None) if text else None
            except ValueError:
                decoded = None
            reply = Reply(response.status, dict(response.headers), decoded, text)
        self.history.append(reply)
        return reply

    async def login(
        self, user_id: str, tenant_id: str = "contoso", base: str | None = None
    ) -> Reply:
        """Log in and fail the test unless it worked."""
        reply = await self.call(
            "POST", "/api/login", {"userId": user_id, "tenantId": tenant_id}, base=base
        )
        assert reply.status == 200, reply.text
        return reply

    async def upload(
        self, name: str, content: str = "hello", base: str | None = None
    ) -> Reply:
        """Upload a small file and fail the test unless it was stored."""
        reply = await self.call(
            "POST", "/api/files", {"name": name, "content": content}, base=base
        )
        assert reply.status == 201, reply.text
        return reply


def client_session() -> aiohttp.ClientSession:
    """Return a client session that keeps no cookies of its own."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=10),
    )
