"""A stack of real processes: the backend instances, the proxy and maybe Redis.

The demo and the bench build one per option: the backend launcher with its instances,
the proxy configured from ``config/demo-<name>.toml`` with the ports chosen at start,
and for an option whose instances share sessions, a Redis server. Each runs as a child
process in a process group of its own, so that a Ctrl-C reaches only this process,
which then stops them by PID: the proxy first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from stickyproxy.config import Config, load_config
from stickyproxy.errors import ConfigError, StickyProxyError

#: where the option configurations live: the checkout's config folder
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

ADMIN_PORT = 9180

#: seconds the stack may take to open its ports
START_TIMEOUT = 20.0
#: seconds each process gets to stop after SIGTERM before it is killed
STOP_TIMEOUT = 8.0

REDIS_MISSING = (
    "the redis option needs Redis: set REDIS_URL (or --redis-url) to a server, or "
    "install redis-server so that the demo can start a private one "
    "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)"
)

# variables that would change what the generated configuration says
_OWN_ENV = ("REDIS_URL", "SESSION_SECRET", "INSTANCE_ID")
_STARTED = re.compile(r"instance (\S+) pid (\d+) port (\d+)")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_FILE_ID = re.compile(r"\b[0-9a-f]{32}\b")
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ ")


class StackError(StickyProxyError):
    """A stack cannot start or keep running; the message is one line for the user."""


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Tell whether nothing listens on host:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # connections of a previous run in TIME_WAIT do not make a port busy
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, preferred: int | None = None) -> int:
    """Return the first of count consecutive free loopback ports, preferred if free."""
    if (
        preferred is not None
        and preferred + count - 1 <= 65535
        and all(port_free(port) for port in range(preferred, preferred + count))
    ):
        return preferred

    # the kernel's pick is free; the ports after it usually are too
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            first: int = sock.getsockname()[1]
        if first + count - 1 > 65535:
            continue
        if all(port_free(port) for port in range(first + 1, first + count)):
            return first
    raise StackError(f"found no {count} consecutive free ports on 127.0.0.1")


def render_toml(document: Mapping[str, Any]) -> str:
    """Render a parsed TOML document (tables, arrays of tables, scalars) as text."""
    lines: list[str] = []
    _render_table(lines, "", document)
    return "\n".join(lines).strip() + "\n"


def _render_table(lines: list[str], prefix: str, table: Mapping[str, Any]) -> None:
    nested = []
    for key, value in table.items():
        if isinstance(value, Mapping) or (
            isinstance(value, list) and value and isinstance(value[0], Mapping)
        ):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")

    for key, value in nested:
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, Mapping):
            lines.extend(("", f"[{name}]"))
            _render_table(lines, name, value)
            continue
        for item in value:
            lines.extend(("", f"[[{name}]]"))
            _render_table(lines, name, item)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return (
        '"'
        + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
        + '"'
    )


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def option_config_path(name: str) -> Path:
    """Return the shipped configuration of an option, or raise StackError."""
    path = CONFIG_DIR / f"demo-{name}.toml"
    if not path.is_file():
        raise StackError(
            f"{path} is missing: run the demo from a checkout (pip install -e .)"
        )
    return path


def stack_document(
    name: str,
    *,
    proxy_port: int,
    admin_port: int | None,
    backend_ports: range,
    trust_loopback: bool,
    access_log: bool,
) -> dict[str, Any]:
    """Return the option's configuration with this stack's ports filled in."""
    path = option_config_path(name)
    with open(path, "rb") as file:
        document = tomllib.load(file)

    document["listeners"] = [{"address": f"127.0.0.1:{proxy_port}"}]
    admin = f"127.0.0.1:{admin_port}" if admin_port is not None else ""
    document["admin"] = {**document.get("admin", {}), "address": admin}
    document["log"] = {**document.get("log", {}), "access": "combined"}
    if not access_log:
        document["log"]["access"] = "off"
    # nobody waits for in-flight requests of a demo that is told to stop
    document["timeouts"] = {**document.get("timeouts", {}), "grace": 2.0}
    if trust_loopback:
        forwarded = document.setdefault("forwarded", {})
        forwarded["trusted_proxies"] = ["127.0.0.0/8"]
    servers = [{"url": f"http://127.0.0.1:{port}"} for port in backend_ports]
    for group in document.get("groups", {}).values():
        group["servers"] = servers
    return document


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """Return this environment without variables the stack sets itself, plus extra."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _OWN_ENV and not key.startswith("STICKYPROXY_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def children(pid: int) -> list[int]:
    """Return the PIDs of a process's children (Linux), or [] when unknown."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(part) for part in text.split()]


def _wait_or_kill(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a signalled process; kill it by PID when it takes too long."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


class Stack:
    """The backend instances, the proxy and maybe Redis of one option, as processes."""

    def __init__(
        self,
        name: str,
        instances: int,
        *,
        shared_store: bool = False,
        proxy_port: int | None = None,
        backend_port: int | None = None,
        admin: bool = True,
        trust_loopback: bool = False,
        access_log: bool = True,
        redis_url: str | None = None,
    ) -> None:
        self.name = name
        self.instances = instances
        self.shared_store = shared_store
        self.admin = admin
        self.trust_loopback = trust_loopback
        self.access_log = access_log
        self.redis_url = redis_url if shared_store else None
        self.proxy_port = proxy_port if proxy_port is not None else free_ports(1)
        first = free_ports(self.instances, backend_port)
        self.backend_ports = range(first, first + self.instances)
        self.admin_port = free_ports(1, ADMIN_PORT) if admin else None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"stickyproxy-{name}-"))
        self.redis: subprocess.Popen[bytes] | None = None
        self.launcher: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        #: the proxy's configuration, once start has written it
        self.config: Config | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """Return the proxy's public URL."""
        return f"http://127.0.0.1:{self.proxy_port}/"

    @property
    def admin_url(self) -> str | None:
        """Return the admin listener's status page URL, if it has one."""
        return f"http://127.0.0.1:{self.admin_port}/" if self.admin_port else None

    @property
    def backend_log(self) -> Path:
        """Return the file the launcher and its instances log to."""
        return self.workdir / "backend.log"

    @property
    def proxy_log(self) -> Path:
        """Return the file the proxy logs to (access log included)."""
        return self.workdir / "proxy.log"

    def start(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Start Redis if needed, the backend and the proxy; wait until they listen."""
        try:
            self._start(cancelled)
        except BaseException:
            self.stop()
            raise

    def _start(self, cancelled: Callable[[], bool]) -> None:
        if self.shared_store and not self.redis_url:
            # an instance that finds no Redis falls back to memory: wait for it first
            self.redis_url, port = self._start_redis()
            self._wait_for_ports([port], cancelled)

        # one signing secret for all instances: a cookie must verify on each of them
        backend_env = {"SESSION_SECRET": secrets.token_urlsafe(24)}
        if self.redis_url:
            backend_env["REDIS_URL"] = self.redis_url
        self.launcher = self._spawn(
            [
                sys.executable, "-m", "backend",
                "--instances", str(self.instances),
                "--port", str(self.backend_ports[0]),
                "--id-prefix", "app",
                "--grace", "2",
            ],
            child_environment(backend_env),
            self.backend_log,
        )  # fmt: skip

        config_path = self.workdir / f"demo-{self.name}.toml"
        document = stack_document(
            self.name,
            proxy_port=self.proxy_port,
            admin_port=self.admin_port,
            backend_ports=self.backend_ports,
            trust_loopback=self.trust_loopback,
            access_log=self.access_log,
        )
        config_path.write_text(render_toml(document))
        try:
            self.config = load_config(config_path, environ={})
        except ConfigError as exc:
            raise StackError(f"the generated configuration is refused: {exc}") from exc
        proxy_env = {"STICKYPROXY_COOKIE_SECRET": secrets.token_urlsafe(32)}
        self.proxy = self._spawn(
            [sys.executable, "-m", "stickyproxy", "run", "-c", str(config_path)],
            child_environment(proxy_env),
            self.proxy_log,
        )

        ports = [*self.backend_ports, self.proxy_port]
        if self.admin_port is not None:
            ports.append(self.admin_port)
        self._wait_for_ports(ports, cancelled)

        if self.shared_store:
            lost = [i for i, kind in self.instance_stores().items() if kind != "redis"]
            if lost:
                raise StackError(
                    f"instances {', '.join(sorted(lost))} could not reach Redis at "
                    f"{without_password(self.redis_url or '')} and keep sessions in "
                    "memory"
                )

    def _spawn(
        self, command: list[str], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as output:
            # a group of its own: a terminal's Ctrl-C reaches us, and we stop it
            return subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                process_group=0,
            )

    def _start_redis(self) -> tuple[str, int]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(REDIS_MISSING)
        port = free_ports(1)
        self.redis = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        )  # fmt: skip
        return f"redis://127.0.0.1:{port}/0", port

    def _wait_for_ports(self, ports: list[int], cancelled: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = list(ports)
        while waiting:
            if cancelled():
                raise StackError("stopped while starting")
            failed = self.failed()
            if failed:
                raise StackError(failed)
            if time.monotonic() > deadline:
                raise StackError(
                    f"ports {waiting} did not open within {START_TIMEOUT:.0f}s "
                    f"(logs: {self.workdir})"
                )
            try:
                with socket.create_connection(("127.0.0.1", waiting[0]), timeout=0.5):
                    waiting.pop(0)
            except OSError:
                time.sleep(0.02)

    def failed(self) -> str | None:
        """Return why the stack no longer runs, or None while every process does."""
        for name, process, log in (
            ("redis-server", self.redis, None),
            ("the backend launcher", self.launcher, self.backend_log),
            ("the proxy", self.proxy, self.proxy_log),
        ):
            if process is None or process.poll() is None:
                continue
            message = f"{name} exited with status {process.returncode}"
            last = _last_line(log) if log is not None else ""
            return f"{message}: {last}" if last else message
        return None

    def instance_stores(self) -> dict[str, str]:
        """Ask each instance's /health for its id and session store kind."""
        stores = {}
        for port in self.backend_ports:
            url = f"http://127.0.0.1:{port}/health"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    health = json.loads(response.read())
            except (OSError, ValueError) as exc:
                raise StackError(f"{url} did not answer: {exc}") from exc
            stores[str(health["instance"])] = str(health.get("store"))
        return stores

    def proxy_events(self, limit: int = 20) -> dict[str, int]:
        """Return what the proxy logged about its upstreams, each line with a count."""
        events: dict[str, int] = {}
        try:
            text = self.proxy_log.read_text(errors="replace")
        except OSError:
            return events
        for line in text.splitlines():
            message = _FILE_ID.sub("{id}", _LOG_PREFIX.sub("", line).strip())
            if "upstream" not in message and " -> " not in message:
                continue
            if message in events or len(events) < limit:
                events[message] = events.get(message, 0) + 1
        return events

    def instance_pids(self) -> dict[str, int]:
        """Return the PID of each instance by id, as the launcher last reported it."""
        pids: dict[str, int] = {}
        try:
            text = self.backend_log.read_text(errors="replace")
        except OSError:
            return pids
        for found in _STARTED.finditer(text):
            pids[found.group(1)] = int(found.group(2))
        return pids

    def pause_restarts(self) -> None:
        """Stop the launcher (SIGSTOP) so that a killed instance stays down."""
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume_restarts(self) -> None:
        """Let the launcher run again (SIGCONT); it restarts what died meanwhile."""
        if self._paused and self.launcher is not None:
            self.launcher.send_signal(signal.SIGCONT)
            self._paused = False

    def kill_instance(self, instance_id: str) -> int:
        """Kill one instance by PID (SIGKILL, as a crash would) and return the PID."""
        assert self.launcher is not None
        pid = self.instance_pids().get(instance_id)
        # only a process the launcher still owns: never a recycled PID
        if pid is None or pid not in children(self.launcher.pid):
            raise StackError(f"instance {instance_id} is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        """Stop the proxy, then the backend, then Redis, each by PID; idempotent."""
        self.resume_restarts()
        if self.proxy is not None:
            if self.proxy.poll() is None:
                self.proxy.terminate()
            _wait_or_kill(self.proxy, STOP_TIMEOUT)
        if self.launcher is not None:
            # its instances too, should the launcher itself have to be killed
            instances = children(self.launcher.pid)
            if self.launcher.poll() is None:
                self.launcher.terminate()
            _wait_or_kill(self.launcher, STOP_TIMEOUT)
            for pid in instances:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
        if self.redis is not None:
            if self.redis.poll() is None:
                self.redis.terminate()
            _wait_or_kill(self.redis, STOP_TIMEOUT)

    def cleanup(self) -> None:
        """Stop everything and remove the working folder (configs, logs)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def without_password(url: str) -> str:
    """Return a URL with any password replaced, fit to print."""
    return re.sub(r"//[^@/]*@", "//***@", url)
