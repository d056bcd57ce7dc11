"""The lifecycle of one worker: listeners, reloads, health checks and graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from stickyproxy.config import Config, Overrides, load_config
from stickyproxy.connections import ConnectionPool
from stickyproxy.errors import ConfigError
from stickyproxy.forwarding import Group, NullObserver, Observer, Proxy, ProxyState
from stickyproxy.health import HealthChecker, ProbeListener
from stickyproxy.log import SERVER_LOGGER, AccessLog
from stickyproxy.policies import build_policy
from stickyproxy.upstreams import Pool

log = logging.getLogger(SERVER_LOGGER)

#: how often connection deadlines are checked, at most
TICK = 0.5


def build_state(
    config: Config, previous: ProxyState | None, access_stream: TextIO | None
) -> ProxyState:
    """Build pools, policies and routes for a configuration.

    Upstreams that exist in the previous state keep their health and passive
    failure state, so a reload does not forget that an upstream is down.
    """
    groups = {}
    for name, group_config in config.groups.items():
        pool = Pool(group_config)
        policy = build_policy(pool)
        if previous is not None and name in previous.groups:
            pool.adopt(previous.groups[name].pool)
            policy.adopt(previous.groups[name].policy)
        groups[name] = Group(group_config, pool, policy)
    access_log = None
    if config.log.access != "off":
        access_log = AccessLog(config.log.access, access_stream or sys.stdout)
    return ProxyState(config, groups, access_log)


class ProxyServer:
    """One worker: owns its listeners, proxy, background tasks and policies."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        overrides: Overrides | None = None,
        observer: Observer | None = None,
        probe_listener: ProbeListener | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.observer: Observer = observer or NullObserver()
        self.probe_listener = probe_listener
        self.proxy: Proxy | None = None
        self.servers: list[asyncio.Server] = []
        self.checkers: list[HealthChecker] = []
        self.ticker: asyncio.Task[None] | None = None
        self.access_stream: TextIO | None = None
        self.stopped = asyncio.Event()
        #: called after each reload attempt with whether it succeeded
        self.reload_listeners: list[Callable[[bool], None]] = []

    @property
    def state(self) -> ProxyState:
        assert self.proxy is not None
        return self.proxy.state

    @property
    def ports(self) -> list[int]:
        """Return the ports actually bound, in listener order (for port 0)."""
        ports = []
        for server in self.servers:
            for sock in server.sockets:
                ports.append(sock.getsockname()[1])
                break
        return ports

    async def start(self) -> None:
        """Bind the listeners and start serving."""
        config = self.config
        if config.log.access != "off" and config.log.access_path != "-":
            self.access_stream = open(config.log.access_path, "a", buffering=1)  # noqa: SIM115
        state = build_state(config, None, self.access_stream)
        timeouts = config.timeouts
        connections = ConnectionPool(
            config.limits.upstream_keepalive, timeouts.upstream_idle, timeouts.connect
        )
        self.proxy = Proxy(state, connections, self.observer)
        await self._start_policies(state)
        loop = asyncio.get_running_loop()
        for listener in config.listeners:
            context = None
            if listener.tls:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(listener.tls_cert, listener.tls_key)  # type: ignore[arg-type]
            try:
                server = await loop.create_server(
                    self.proxy.protocol_factory(secure=listener.tls),
                    listener.address.host,
                    listener.address.port,
                    ssl=context,
                    reuse_port=config.workers > 1,
                    backlog=1024,
                )
            except OSError as exc:
                await self.close()
                raise ConfigError(
                    config.source,
                    "listeners",
                    f"cannot listen on {listener.address}: {exc.strerror}",
                ) from exc
            self.servers.append(server)
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._start_health(state)
        self.ticker = loop.create_task(self._tick(), name="deadline-ticker")
        log.info(
            "listening on %s",
            ", ".join(str(listener.address) for listener in config.listeners),
        )

    async def _start_policies(self, state: ProxyState) -> None:
        for group in state.groups.values():
            await group.policy.start()

    def _start_health(self, state: ProxyState) -> None:
        for group in state.groups.values():
            checker = HealthChecker(group.pool, self.probe_listener)
            checker.start()
            self.checkers.append(checker)

    async def _tick(self) -> None:
        assert self.proxy is not None
        interval = min(TICK, self._smallest_timeout() / 4)
        while True:
            await asyncio.sleep(interval)
            self.proxy.expire()

    def _smallest_timeout(self) -> float:
        timeouts = self.config.timeouts
        return min(
            timeouts.client_header,
            timeouts.client_body,
            timeouts.keepalive_idle,
            timeouts.upstream_read,
            timeouts.tunnel_idle,
            timeouts.upstream_idle,
        )

    async def reload(self) -> bool:
        """Re-read the configuration file and apply it; keep the old one if bad."""
        if self.config_path is None:
            log.warning("reload ignored: started without a configuration file")
            return False
        try:
            config = load_config(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self._notify_reload(False)
            return False
        try:
            return await self._apply(config)
        except Exception:
            # a configuration that loads but cannot be built is a bug to see
            log.exception("reload failed, keeping the running configuration")
            self._notify_reload(False)
            return False

    async def _apply(self, config: Config) -> bool:
        """Swap in the state built from a new configuration."""
        if config.listeners != self.config.listeners:
            log.warning("reload: listener changes take effect only after a restart")
        old_state = self.state
        state = build_state(config, old_state, self.access_stream)
        await self._start_policies(state)
        for checker in self.checkers:
            await checker.stop()
        self.checkers = []
        assert self.proxy is not None
        self.proxy.state = state
        self.proxy.connections.configure(
            config.limits.upstream_keepalive,
            config.timeouts.upstream_idle,
            config.timeouts.connect,
        )
        self.config = config
        self._start_health(state)
        for group in old_state.groups.values():
            await group.policy.close()
        log.info("configuration reloaded from %s", self.config_path)
        self._notify_reload(True)
        return True

    def _notify_reload(self, ok: bool) -> None:
        for listener in self.reload_listeners:
            listener(ok)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace, close."""
        if self.proxy is None:
            return
        grace = self.config.timeouts.grace if grace is None else grace
        proxy = self.proxy
        proxy.accepting = False
        for server in self.servers:
            server.close()
        proxy.close_idle_clients()
        log.info("stopping: %d requests in flight, %.0fs grace", proxy.busy, grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while proxy.busy and loop.time() < deadline:
            await asyncio.sleep(0.05)
            proxy.close_idle_clients()
        await self.close()

    async def close(self) -> None:
        """Release everything at once: listeners, connections, tasks, stores."""
        for server in self.servers:
            server.close()
        if self.ticker is not None:
            self.ticker.cancel()
            await asyncio.wait({self.ticker})
            self.ticker = None
        for checker in self.checkers:
            await checker.stop()
        self.checkers = []
        if self.proxy is not None:
            for client in list(self.proxy.clients):
                client.close()
            self.proxy.connections.close_all()
            for group in self.proxy.state.groups.values():
                await group.policy.close()
            access_log = self.proxy.state.access_log
            if access_log is not None:
                access_log.stream.flush()
        if self.access_stream is not None:
            self.access_stream.close()
            self.access_stream = None
        self.stopped.set()


async def serve(
    config: Config,
    config_path: str | None,
    overrides: Overrides | None,
    worker_index: int = 0,
    control_dir: str | None = None,
) -> int:
    """Run one worker until SIGTERM or SIGINT; SIGHUP reloads the file.

    With control_dir (made by the supervisor of several workers), metrics go to
    files the family shares and the admin API reaches every worker.
    """
    from stickyproxy.admin import AdminServer
    from stickyproxy.metrics import METRICS_SUBDIR, Metrics

    metrics_dir = (
        None if control_dir is None else str(Path(control_dir, METRICS_SUBDIR))
    )
    metrics = Metrics(metrics_dir)
    server = ProxyServer(
        config,
        config_path,
        overrides,
        observer=metrics.observer(),
        probe_listener=metrics.probe_listener,
    )
    server.reload_listeners.append(metrics.reloaded)
    await server.start()
    admin = AdminServer(server, metrics, worker_index, control_dir)
    await admin.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    background: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = loop.create_task(server.reload(), name="reload")
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    flusher = loop.create_task(metrics.flush_every(1.0), name="metrics-flush")
    await stop.wait()
    flusher.cancel()
    await asyncio.wait({flusher})
    await admin.close()
    await server.shutdown()
    metrics.flush()
    log.info("stopped")
    return 0


def check_listeners_free(config: Config) -> None:
    """Raise ConfigError if a listener's address is taken, even by SO_REUSEPORT.

    Workers bind with SO_REUSEPORT, which would let a second stickyproxy (or any
    process of the same user) silently share the port; a plain bind first refuses
    to start in that case.
    """
    for listener in config.listeners:
        address = listener.address
        if address.port == 0:
            continue
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address.host, address.port))
            except OSError as exc:
                raise ConfigError(
                    config.source,
                    "listeners",
                    f"cannot listen on {address}: {exc.strerror}",
                ) from exc
