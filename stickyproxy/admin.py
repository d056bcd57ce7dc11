"""The admin listener: metrics, the upstream API and the status page, never public.

With one worker, the admin listener reads and steers that worker's pools. With
several, every worker also serves a small control API on a Unix socket in the control
directory the supervisor made (mode 0700: only our own user may connect); worker 0
runs the admin listener and relays each call to its siblings, so that one scrape
shows the whole family and one drain applies everywhere. Changes made through the
API are also written to ``overrides.json`` there, so that a worker the supervisor
restarts takes them back; a reload of the configuration file drops them.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from stickyproxy.config import is_loopback
from stickyproxy.errors import ConfigError
from stickyproxy.log import ADMIN_LOGGER
from stickyproxy.metrics import WorkerSnapshot, merge

if TYPE_CHECKING:
    from stickyproxy.metrics import Metrics
    from stickyproxy.server import ProxyServer
    from stickyproxy.upstreams import AdminState, Upstream

log = logging.getLogger(ADMIN_LOGGER)

STATIC_DIR = Path(__file__).parent / "static"

#: the weights the API accepts; a bound keeps round robin's schedule small
MAX_WEIGHT = 10_000

#: seconds a sibling worker may take to answer the admin listener
SIBLING_TIMEOUT = 2.0

#: what the API's "state" means to an upstream
ADMIN_STATES: dict[str, AdminState] = {"up": "up", "drain": "drain", "down": "down"}

OVERRIDES_FILE = "overrides.json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Overrides = dict[str, dict[str, dict[str, Any]]]


class AdminError(Exception):
    """A request the API refuses: answered as JSON with this status and reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def control_socket(control_dir: Path, index: int) -> Path:
    """Return where worker ``index`` serves its control API."""
    return control_dir / f"worker-{index}.sock"


class WorkerControl:
    """Reads and steers this worker's pools: what each API call does on each worker."""

    def __init__(self, server: ProxyServer, metrics: Metrics, index: int) -> None:
        self.server = server
        self.metrics = metrics
        self.index = index

    def snapshot(self) -> WorkerSnapshot:
        """Return this worker's groups and upstreams as they are right now."""
        return self.metrics.snapshot(self.server.state, self.index)

    def find(self, group: str, upstream: str) -> Upstream:
        """Return the upstream named by host:port, url or id, or raise a 404."""
        found = self.server.state.groups.get(group)
        if found is None:
            raise AdminError(404, f"unknown group {group!r}")
        chosen = found.pool.find(upstream)
        if chosen is None:
            raise AdminError(404, f"unknown upstream {upstream!r} in group {group!r}")
        return chosen

    def set_state(self, group: str, upstream: str, state: AdminState) -> bool:
        """Set an upstream up, draining or down; return whether it changed."""
        return self.find(group, upstream).set_admin_state(state)

    def set_weight(self, group: str, upstream: str, weight: int) -> bool:
        """Set an upstream's weight; return whether it changed."""
        chosen = self.find(group, upstream)
        return self.server.state.groups[group].pool.set_weight(chosen, weight)

    def apply(self, overrides: Overrides) -> None:
        """Apply saved API changes; those naming what no longer exists are skipped."""
        for group, upstreams in overrides.items():
            for upstream, change in upstreams.items():
                try:
                    if change.get("state") in ADMIN_STATES:
                        self.set_state(group, upstream, ADMIN_STATES[change["state"]])
                    if isinstance(change.get("weight"), int):
                        self.set_weight(group, upstream, change["weight"])
                except AdminError:
                    continue

    async def reload(self) -> bool:
        """Reload the configuration file; return whether it was accepted."""
        try:
            return await self.server.reload()
        except Exception:
            # a configuration that passed the checks but cannot be built is a bug
            log.exception("reload failed, keeping the running configuration")
            return False

    async def handle(self, request: web.Request) -> web.Response:
        """Serve a sibling's relayed call on the control socket."""
        if request.method == "GET":
            return web.json_response(self.snapshot())
        if request.path == "/worker/reload":
            return web.json_response({"ok": await self.reload()})
        body = await request.json()
        group, upstream = body["group"], body["upstream"]
        try:
            if "state" in body:
                changed = self.set_state(group, upstream, ADMIN_STATES[body["state"]])
            else:
                changed = self.set_weight(group, upstream, body["weight"])
        except AdminError as exc:
            # this worker runs another configuration than the admin listener's
            return web.json_response({"error": exc.reason}, status=exc.status)
        return web.json_response({"changed": changed})


class Siblings:
    """The other workers of the family, reached over their control sockets."""

    def __init__(self, control_dir: Path, index: int) -> None:
        self.control_dir = control_dir
        self.index = index
        self._sessions: dict[Path, aiohttp.ClientSession] = {}

    def sockets(self) -> list[Path]:
        """Return the control sockets of every worker but this one."""
        own = control_socket(self.control_dir, self.index)
        return sorted(p for p in self.control_dir.glob("worker-*.sock") if p != own)

    async def call(
        self, method: str, path: str, payload: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Send one call to every sibling; return the answers of those that answered."""
        answers = await asyncio.gather(
            *(self._call_one(sock, method, path, payload) for sock in self.sockets())
        )
        return [answer for answer in answers if answer is not None]

    async def _call_one(
        self, sock: Path, method: str, path: str, payload: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        session = self._sessions.get(sock)
        if session is None:
            # no keep-alive: a restarted worker must not meet a stale connection
            connector = aiohttp.UnixConnector(path=str(sock), force_close=True)
            session = self._sessions[sock] = aiohttp.ClientSession(connector=connector)
        try:
            async with asyncio.timeout(SIBLING_TIMEOUT):
                async with session.request(
                    method, f"http://worker{path}", json=payload
                ) as response:
                    if response.status != 200:
                        raise aiohttp.ClientError(f"status {response.status}")
                    return cast(dict[str, Any], await response.json())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # a worker being restarted: it reads the saved overrides when it starts
            level = logging.DEBUG if method == "GET" else logging.WARNING
            log.log(level, "worker at %s did not answer %s: %s", sock.name, path, exc)
            return None

    async def close(self) -> None:
        """Close the client sessions."""
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


class AdminServer:
    """Serves /metrics, the JSON API and the status page on the admin address."""

    def __init__(
        self,
        server: ProxyServer,
        metrics: Metrics,
        index: int = 0,
        control_dir: str | None = None,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.control = WorkerControl(server, metrics, index)
        self.control_dir = Path(control_dir) if control_dir is not None else None
        self.siblings: Siblings | None = None
        if self.control_dir is not None and index == 0:
            self.siblings = Siblings(self.control_dir, index)
        self.runners: list[web.AppRunner] = []
        #: the admin listener's bound port, once started (useful with port 0)
        self.port: int | None = None
        #: whether the admin listener is bound to loopback, where reads need no token
        self.loopback = True

    async def start(self) -> None:
        """Bind the control socket (with workers) and the admin listener (worker 0)."""
        if self.control_dir is not None:
            await self._start_control(self.control_dir)
            self.control.apply(self._load_overrides())
        address = self.server.config.admin.address
        if self.control.index != 0 or address is None:
            return

        app = web.Application(middlewares=[self._errors, self._same_site, self._auth])
        app.router.add_get("/", self._page)
        app.router.add_static("/static/", STATIC_DIR)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/groups", self._groups)
        app.router.add_post(
            "/api/groups/{group}/upstreams/{upstream}/state", self._set_state
        )
        app.router.add_post(
            "/api/groups/{group}/upstreams/{upstream}/weight", self._set_weight
        )
        app.router.add_post("/api/reload", self._reload)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, address.host, address.port)
        try:
            await site.start()
        except OSError as exc:
            await self.close()
            raise ConfigError(
                self.server.config.source,
                "admin.address",
                f"cannot listen on {address}: {exc.strerror} (choose another with "
                "--admin HOST:PORT, or turn it off with --admin '')",
            ) from exc
        self.port = runner.addresses[0][1]
        self.loopback = is_loopback(address.host)
        self.server.reload_listeners.append(self._reloaded)
        log.info("admin listening on %s", address)

    async def _start_control(self, control_dir: Path) -> None:
        app = web.Application()
        app.router.add_get("/worker/snapshot", self.control.handle)
        app.router.add_post("/worker/upstream", self.control.handle)
        app.router.add_post("/worker/reload", self.control.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.runners.append(runner)
        path = control_socket(control_dir, self.control.index)
        # the socket of this worker's predecessor, if the supervisor restarted it
        path.unlink(missing_ok=True)
        await web.UnixSite(runner, str(path)).start()

    async def close(self) -> None:
        """Stop listening and close connections to the siblings."""
        for runner in self.runners:
            await runner.cleanup()
        self.runners = []
        if self.siblings is not None:
            await self.siblings.close()
        if self.control_dir is not None:
            control_socket(self.control_dir, self.control.index).unlink(missing_ok=True)
        self.port = None

    # the family

    async def snapshots(self) -> list[WorkerSnapshot]:
        """Return this worker's snapshot and those of the siblings that answered."""
        snapshots = [self.control.snapshot()]
        if self.siblings is not None:
            answers = await self.siblings.call("GET", "/worker/snapshot")
            snapshots.extend(cast(WorkerSnapshot, answer) for answer in answers)
        snapshots.sort(key=lambda snapshot: snapshot["index"])
        return snapshots

    async def _relay(self, path: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        if self.siblings is None:
            return []
        return await self.siblings.call("POST", path, payload)

    def _load_overrides(self) -> Overrides:
        if self.control_dir is None:
            return {}
        try:
            text = (self.control_dir / OVERRIDES_FILE).read_text()
        except FileNotFoundError:
            return {}
        return cast(Overrides, json.loads(text))

    def _save_override(self, group: str, upstream: str, key: str, value: Any) -> None:
        if self.control_dir is None:
            return
        overrides = self._load_overrides()
        overrides.setdefault(group, {}).setdefault(upstream, {})[key] = value
        path = self.control_dir / OVERRIDES_FILE
        # a restarting worker must never read half a file
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(overrides))
        os.replace(temporary, path)

    def _reloaded(self, ok: bool) -> None:
        if ok and self.control_dir is not None:
            (self.control_dir / OVERRIDES_FILE).unlink(missing_ok=True)

    # middlewares

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except AdminError as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)
        except web.HTTPException as exc:
            if exc.status < 400 or not request.path.startswith("/api/"):
                raise
            # keep what tells the client how to retry (Allow); drop the text framing
            allow = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return web.json_response(
                {"error": exc.reason.lower()}, status=exc.status, headers=allow
            )
        except Exception:
            if not request.path.startswith("/api/"):
                raise
            log.exception("admin API failed on %s %s", request.method, request.path)
            return web.json_response(
                {"error": "internal error (see the log)"}, status=500
            )

    @web.middleware
    async def _same_site(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Refuse what a web page on another site could make a browser send."""
        host = request.headers.get("Host")
        # a rebound DNS name reaches loopback, but the browser still sends that name
        if self.loopback and host is not None and not self._local_host(host):
            raise AdminError(403, "expected the Host of the admin listener")
        origin = request.headers.get("Origin")
        if origin is not None and (
            host is None or _origin_authority(origin) != _authority(host)
        ):
            raise AdminError(403, "expected a request from the admin listener's page")
        # a form or a text/plain fetch from another site needs no preflight; JSON does
        routed = request.match_info.http_exception is None
        if (
            routed
            and request.method not in ("GET", "HEAD", "OPTIONS")
            and request.content_type != "application/json"
        ):
            raise AdminError(415, "expected Content-Type: application/json")
        return await handler(request)

    def _local_host(self, host: str) -> bool:
        """Return whether a Host header names this listener by a loopback name."""
        authority = _authority(host)
        if authority is None or authority[1] != self.port:
            return False
        name = authority[0]
        address = self.server.config.admin.address
        if name == "localhost" or (
            address is not None and name == address.host.lower()
        ):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response(
                {"error": "a bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        token = self.server.config.admin.token
        if not token:
            # the configuration allows no token only on loopback
            return True
        path = request.path
        if path == "/" or path.startswith("/static/"):
            # the page and its assets hold no data; the page sends the token itself
            return True
        if self.loopback and request.method in ("GET", "HEAD"):
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    # handlers

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "status.html")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics.exposition(await self.snapshots())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _groups(self, request: web.Request) -> web.Response:
        snapshots = await self.snapshots()
        workers = [
            {"index": s["index"], "pid": s["pid"], "requests": s["requests"]}
            for s in snapshots
        ]
        return web.json_response({"workers": workers, "groups": merge(snapshots)})

    async def _set_state(self, request: web.Request) -> web.Response:
        group, upstream = self._target(request)
        body = await _json_object(request)
        state = body.get("state")
        if not isinstance(state, str) or state not in ADMIN_STATES:
            raise AdminError(400, "expected state 'drain', 'down' or 'up'")
        changed = self.control.set_state(group, upstream.id, ADMIN_STATES[state])
        return await self._spread(request, group, upstream, "state", state, changed)

    async def _set_weight(self, request: web.Request) -> web.Response:
        group, upstream = self._target(request)
        body = await _json_object(request)
        weight = body.get("weight")
        if (
            not isinstance(weight, int)
            or isinstance(weight, bool)
            or not 1 <= weight <= MAX_WEIGHT
        ):
            raise AdminError(400, f"expected weight from 1 to {MAX_WEIGHT}")
        changed = self.control.set_weight(group, upstream.id, weight)
        return await self._spread(request, group, upstream, "weight", weight, changed)

    def _target(self, request: web.Request) -> tuple[str, Upstream]:
        group = request.match_info["group"]
        return group, self.control.find(group, request.match_info["upstream"])

    async def _spread(
        self,
        request: web.Request,
        group: str,
        upstream: Upstream,
        key: str,
        value: str | int,
        changed: bool,
    ) -> web.Response:
        """Save a change, pass it to the siblings, log it and answer."""
        self._save_override(group, upstream.id, key, value)
        payload = {"group": group, "upstream": upstream.id, key: value}
        answers = await self._relay("/worker/upstream", payload)
        changed = changed or any(answer.get("changed") for answer in answers)
        log.info(
            "%s/%s %s set to %s through the admin API by %s; holds until a reload",
            group,
            upstream.name,
            key,
            value,
            request.remote,
        )
        return web.json_response(
            {
                "group": group,
                "upstream": upstream.name,
                key: value,
                "changed": changed,
                "workers": 1 + len(answers),
            }
        )

    async def _reload(self, request: web.Request) -> web.Response:
        if self.server.config_path is None:
            raise AdminError(409, "started without a configuration file")
        log.info("reload requested through the admin API by %s", request.remote)
        ok = await self.control.reload()
        answers = await self._relay("/worker/reload", {}) if ok else []
        if not ok or not all(answer.get("ok") for answer in answers):
            raise AdminError(
                422, "configuration refused; the running one stays (see the log)"
            )
        return web.json_response({"reloaded": True, "workers": 1 + len(answers)})


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except LookupError:
        raise AdminError(400, "expected a known charset in Content-Type") from None
    except RecursionError:
        raise AdminError(400, "expected a JSON object nested less deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdminError(400, "expected a JSON object") from None
    except ValueError:
        # the only other refusal of json: an integer of thousands of digits
        raise AdminError(400, "expected a JSON object with shorter numbers") from None
    if not isinstance(body, dict):
        raise AdminError(400, "expected a JSON object")
    return body


def _authority(host: str) -> tuple[str, int] | None:
    """Split a Host header into a lower-case name and a port (80 when absent)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket:
            return None
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
    if not rest:
        return name, 80
    port = rest.removeprefix(":")
    if not rest.startswith(":") or not (port.isascii() and port.isdigit()):
        return None
    return name, int(port)


def _origin_authority(origin: str) -> tuple[str, int] | None:
    """Return the name and port of an Origin header; None for "null" or junk.

    The scheme is left out: a TLS terminator in front may turn https into http.
    """
    scheme, separator, host = origin.strip().lower().partition("://")
    if not separator or scheme not in ("http", "https"):
        return None
    return _authority(host)
