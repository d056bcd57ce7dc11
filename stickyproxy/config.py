"""The configuration: frozen dataclasses read from TOML, flags and the environment.

Every default is documented once, on its field. Reading is strict: an unknown key, a
value of the wrong type or out of range raises ``ConfigError`` naming the file, the
dotted key and what was expected. Only this module reads files and the environment.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit

from stickyproxy.errors import ConfigError

PolicyName = Literal[
    "round_robin", "least_conn", "ip_hash", "hash", "random", "cookie", "learn"
]
OnPinnedDown = Literal["repin", "strict", "wait"]
HashAlgorithm = Literal["ketama", "rendezvous", "modulo"]
SameSite = Literal["Lax", "Strict", "None"]
ClientAddressSource = Literal["peer", "x-forwarded-for", "forwarded"]
AccessLogFormat = Literal["combined", "json", "off"]

ENV_PREFIX = "STICKYPROXY_"
T = TypeVar("T")

#: worker processes one family may run: beyond this a typo, not a plan
MAX_WORKERS = max(64, 4 * (os.cpu_count() or 1))


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return (
            f"[{self.host}]:{self.port}"
            if ":" in self.host
            else f"{self.host}:{self.port}"
        )


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One public listening socket; TLS when both certificate and key are given."""

    address: Address
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """One upstream server of a group, with nginx's per-server parameters."""

    url: str
    #: share of traffic relative to the group's other servers
    weight: int = 1
    #: failures within fail_timeout that make the server unavailable; 0 disables
    max_fails: int = 1
    #: seconds that window lasts, and how long the server then rests
    fail_timeout: float = 10.0
    #: takes traffic only when every primary server is unavailable
    backup: bool = False
    #: takes no traffic at all (nginx's ``down``)
    down: bool = False
    #: concurrent requests the server takes at most; 0 means no limit
    max_conns: int = 0

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    @property
    def authority(self) -> str:
        """Return ``host:port`` as nginx names the server (and hashes it)."""
        return urlsplit(self.url).netloc


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active HTTP health checks; off unless ``path`` is set."""

    #: request path of the probe; empty disables active checks
    path: str = ""
    #: seconds between probes of one upstream
    interval: float = 5.0
    #: seconds a probe may take
    timeout: float = 2.0
    #: statuses that count as healthy
    expect_status: tuple[int, ...] = (200,)
    #: consecutive successes that make an unhealthy upstream healthy again
    rise: int = 2
    #: consecutive failures that make a healthy upstream unhealthy
    fall: int = 3


@dataclass(frozen=True, slots=True)
class IpHashConfig:
    """Options of ``ip_hash``: which part of the client address is the key."""

    #: "nginx" (first three IPv4 octets, whole IPv6), "full", or a prefix like "/24"
    key: str = "nginx"


@dataclass(frozen=True, slots=True)
class HashConfig:
    """Options of ``hash``: the key and how it maps to upstreams."""

    #: "client", "uri", "header:NAME", "cookie:NAME" or "arg:NAME"
    key: str = "client"
    #: map keys with a ring so that few move when the server list changes
    consistent: bool = False
    #: with consistent: "ketama" (nginx-compatible) or "rendezvous" (weighted HRW)
    algorithm: HashAlgorithm = "ketama"
    #: with consistent: no upstream takes more than this times the mean load; 0 = off
    bounded_load: float = 0.0


@dataclass(frozen=True, slots=True)
class CookieConfig:
    """Options of ``cookie``: the signed affinity cookie the proxy sets."""

    name: str = "stickyproxy"
    #: signing secret; empty takes STICKYPROXY_COOKIE_SECRET or a random one at start
    secret: str = ""
    #: older secrets still accepted when verifying, for key rotation
    verify_secrets: tuple[str, ...] = ()
    path: str = "/"
    domain: str = ""
    #: seconds the browser keeps the cookie; 0 makes it a session cookie
    max_age: int = 0
    #: seconds after issue that the proxy stops honouring a cookie; 0 = no limit
    server_max_age: int = 0
    httponly: bool = True
    samesite: SameSite = "Lax"
    #: "auto" sets Secure on TLS or a trusted X-Forwarded-Proto of https
    secure: Literal["auto", "always", "never"] = "auto"
    #: remove the affinity cookie before the request reaches the upstream
    strip: bool = False
    #: policy that places requests without a valid pin
    fallback: PolicyName = "least_conn"


@dataclass(frozen=True, slots=True)
class LearnConfig:
    """Options of ``learn``: pin on the application's own session cookie."""

    cookies: tuple[str, ...] = ("connect.sid", "JSESSIONID", "sessionid", "PHPSESSID")
    #: share the session table through Redis; empty keeps it in memory
    redis_url: str = ""
    #: sessions learned from upstreams the table holds at most (least recently used
    #: leave first); sessions only seen in requests get a quarter of that apart
    max_entries: int = 100_000
    #: seconds a session may go unused before it is forgotten
    idle_timeout: float = 3600.0
    fallback: PolicyName = "least_conn"


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """A group of upstream servers and the policy that picks among them."""

    name: str
    servers: tuple[ServerConfig, ...]
    policy: PolicyName = "round_robin"
    #: when a pinned upstream cannot serve: choose anew, answer 503, or wait for it
    on_pinned_down: OnPinnedDown = "repin"
    #: seconds "wait" keeps retrying the pinned upstream before answering 503
    pinned_wait: float = 5.0
    #: further upstreams tried after a connect failure or a reset before a response
    retries: int = 2
    #: rewrite Host to the upstream's authority instead of passing the client's
    rewrite_host: bool = False
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    ip_hash: IpHashConfig = field(default_factory=IpHashConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    cookie: CookieConfig = field(default_factory=CookieConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Send requests for a host and/or path prefix to a group; first match wins."""

    group: str
    #: exact Host (without port); empty matches any host
    host: str = ""
    path_prefix: str = "/"


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Timeouts in seconds."""

    #: connecting to an upstream
    connect: float = 5.0
    #: between two reads from an upstream while a response is awaited or streamed
    upstream_read: float = 60.0
    #: for the client to send a complete request head
    client_header: float = 10.0
    #: between two reads of a request body
    client_body: float = 60.0
    #: a client that takes no response bytes for this long is cut off
    client_send: float = 60.0
    #: an idle client keep-alive connection is closed after this
    keepalive_idle: float = 75.0
    #: an upgraded (WebSocket) connection idle in both directions is closed after this
    tunnel_idle: float = 3600.0
    #: an idle pooled upstream connection is closed after this
    upstream_idle: float = 60.0
    #: in-flight requests may finish within this after SIGTERM
    grace: float = 10.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Limits that protect the proxy and the upstreams."""

    #: request line plus headers, in bytes (431 beyond)
    header_bytes: int = 32 * 1024
    #: request body, in bytes (413 beyond); 0 = no limit
    body_bytes: int = 100 * 1024 * 1024
    #: open client connections per worker; further ones are closed at once
    client_connections: int = 10_000
    #: idle keep-alive connections kept per upstream
    upstream_keepalive: int = 1024


@dataclass(frozen=True, slots=True)
class ForwardedConfig:
    """Whose forwarding headers to believe, and where the client address comes from."""

    #: CIDRs of proxies in front of us whose forwarding headers are believed
    trusted_proxies: tuple[str, ...] = ()
    #: "peer" ignores forwarding headers; the others walk them from the right
    client_address: ClientAddressSource = "x-forwarded-for"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging: the access log's format and destination, and the level of the rest."""

    access: AccessLogFormat = "combined"
    #: file for the access log; "-" is standard output
    access_path: str = "-"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: metrics, status page and API, never on a public listener."""

    #: empty disables the admin listener
    address: Address | None = field(default_factory=lambda: Address("127.0.0.1", 9180))
    #: bearer token required on the API; mandatory when not bound to loopback;
    #: empty takes STICKYPROXY_ADMIN_TOKEN
    token: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration of one stickyproxy process family."""

    listeners: tuple[ListenerConfig, ...]
    groups: Mapping[str, GroupConfig]
    routes: tuple[RouteConfig, ...]
    #: worker processes sharing the listening sockets (SO_REUSEPORT), at most
    #: MAX_WORKERS
    workers: int = 1
    #: add X-Stickyproxy-Upstream and -Reason to responses
    explain_headers: bool = False
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    forwarded: ForwardedConfig = field(default_factory=ForwardedConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    #: the file this was read from, for reloads and messages
    source: str = "<flags>"

    def group_for(self, host: str, path: str) -> GroupConfig | None:
        """Return the group of the first route matching host and path."""
        for route in self.routes:
            if route.host and route.host != host:
                continue
            if path.startswith(route.path_prefix):
                return self.groups[route.group]
        return None


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given on the command line; None leaves the file's value."""

    listen: tuple[str, ...] = ()
    upstreams: tuple[str, ...] = ()
    policy: str | None = None
    workers: int | None = None
    admin: str | None = None
    access_log: str | None = None
    log_level: str | None = None
    trusted_proxies: tuple[str, ...] = ()


class _Table:
    """A TOML table being read: remembers its dotted path and which keys were used."""

    def __init__(self, source: str, path: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, expected: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), expected)

    def get(self, name: str, kind: type[T], default: T, expected: str) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(name, f"expected {expected}, got {value!r}")
        # nan compares false with everything, so it would slip past every bound
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(name, f"expected a finite number, got {value!r}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self.get(name, float, default, "a number of seconds")
        if value < minimum:
            raise self.fail(name, f"expected a number >= {minimum}, got {value!r}")
        return value

    def integer(
        self, name: str, default: int, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.get(name, int, default, "an integer")
        if value < minimum:
            raise self.fail(name, f"expected an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.fail(name, f"expected an integer <= {maximum}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return self.get(name, bool, default, "true or false")

    def string(self, name: str, default: str) -> str:
        return self.get(name, str, default, "a string")

    def choice(self, name: str, default: str, choices: Sequence[str]) -> Any:
        value = self.string(name, default)
        if value not in choices:
            options = ", ".join(repr(choice) for choice in choices)
            raise self.fail(name, f"expected one of {options}, got {value!r}")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, list(default), "a list of strings")
        if not all(isinstance(item, str) for item in value):
            raise self.fail(name, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def table(self, name: str) -> _Table:
        value = self.get(name, dict, {}, "a table")
        return _Table(self.source, self.key(name), value)

    def tables(self, name: str) -> list[_Table]:
        value = self.get(name, list, [], "an array of tables")
        result = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.fail(f"{name}[{index}]", f"expected a table, got {item!r}")
            result.append(_Table(self.source, f"{self.key(name)}[{index}]", item))
        return result

    def finish(self) -> None:
        """Refuse keys nobody asked for: they are usually typos."""
        for name in self.data:
            if name not in self.used:
                raise self.fail(name, "unknown key")


def parse_address(text: str, source: str, key: str) -> Address:
    """Parse ``host:port`` or ``[v6]:port``; a bare port listens on loopback."""
    text = text.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":")
    # port 0 asks the system for a free port (tests, ephemeral setups)
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(source, key, f"expected host:port, got {text!r}")
    return Address(host, int(port_text))


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def _read_url(table: _Table, name: str, value: str) -> str:
    """Check an upstream url is http://host[:port] and return it without a slash."""
    expected = f"expected http://host:port, got {value!r}"
    if value[:7].lower() != "http://":
        raise table.fail(name, expected)
    netloc = value[7:].removesuffix("/")
    if "@" in netloc:
        # never echo the value: what precedes the @ may be a password
        raise table.fail(name, "expected http://host:port without user or password")
    if " " in netloc or not netloc.isprintable():
        raise table.fail(
            name, f"expected http://host:port without spaces, got {value!r}"
        )
    if any(c in netloc for c in "/?#"):
        raise table.fail(
            name,
            f"expected http://host:port without path, query or fragment, got {value!r}",
        )

    # an IPv6 literal is bracketed; anything else is a host name or IPv4 address
    if netloc.startswith("["):
        host, bracket, port_text = netloc[1:].partition("]")
        if not bracket or port_text == ":" or port_text[:1] not in ("", ":"):
            raise table.fail(name, expected)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise table.fail(name, expected) from None
        port_text = port_text.removeprefix(":")
    else:
        host, colon, port_text = netloc.partition(":")
        if not _HOSTNAME.fullmatch(host) or (colon and not port_text):
            raise table.fail(name, expected)
    if port_text and not (
        port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536
    ):
        raise table.fail(name, f"expected a port from 1 to 65535, got {value!r}")
    return f"http://{netloc}"


def _read_server(table: _Table) -> ServerConfig:
    url = _read_url(table, "url", table.string("url", ""))
    server = ServerConfig(
        url=url,
        weight=table.integer("weight", 1, minimum=1),
        max_fails=table.integer("max_fails", 1),
        fail_timeout=table.number("fail_timeout", 10.0),
        backup=table.boolean("backup", False),
        down=table.boolean("down", False),
        max_conns=table.integer("max_conns", 0),
    )
    table.finish()
    return server


def _read_health(table: _Table) -> HealthCheckConfig:
    statuses = table.get("expect_status", list, [200], "a list of status codes")
    if not statuses or not all(isinstance(s, int) and 100 <= s < 600 for s in statuses):
        raise table.fail("expect_status", f"expected status codes, got {statuses!r}")
    path = table.string("path", "")
    if path and not path.startswith("/"):
        raise table.fail("path", f"expected a path starting with '/', got {path!r}")
    health = HealthCheckConfig(
        path=path,
        interval=table.number("interval", 5.0, minimum=0.05),
        timeout=table.number("timeout", 2.0, minimum=0.01),
        expect_status=tuple(statuses),
        rise=table.integer("rise", 2, minimum=1),
        fall=table.integer("fall", 3, minimum=1),
    )
    table.finish()
    return health


def _read_ip_hash(table: _Table) -> IpHashConfig:
    key = table.string("key", "nginx")
    prefix = key.removeprefix("/")
    if key not in ("nginx", "full") and not (
        key.startswith("/") and prefix.isdigit() and 0 < int(prefix) <= 128
    ):
        raise table.fail(
            "key", f"expected 'nginx', 'full' or a prefix like '/24', got {key!r}"
        )
    table.finish()
    return IpHashConfig(key=key)


def _read_hash(table: _Table) -> HashConfig:
    key = table.string("key", "client")
    kind, _, name = key.partition(":")
    if not (key in ("client", "uri") or (kind in ("header", "cookie", "arg") and name)):
        raise table.fail(
            "key",
            "expected 'client', 'uri', 'header:NAME', 'cookie:NAME' or 'arg:NAME', "
            f"got {key!r}",
        )
    bounded = table.number("bounded_load", 0.0)
    if 0 < bounded <= 1:
        raise table.fail(
            "bounded_load", f"expected 0 (off) or a factor > 1, got {bounded}"
        )
    config = HashConfig(
        key=key,
        consistent=table.boolean("consistent", False),
        algorithm=table.choice("algorithm", "ketama", get_args(HashAlgorithm)),
        bounded_load=bounded,
    )
    table.finish()
    return config


_FALLBACKS = ("round_robin", "least_conn", "random", "ip_hash")


_NOT_IN_ATTRIBUTES = ';,"\t\r\n\0'


def _read_cookie(table: _Table) -> CookieConfig:
    name = table.string("name", "stickyproxy")
    if not name or any(c in name for c in ' =;,"\t\r\n'):
        raise table.fail("name", f"expected a cookie name token, got {name!r}")
    samesite = table.choice("samesite", "Lax", get_args(SameSite))
    secure = table.choice("secure", "auto", ("auto", "always", "never"))
    if samesite == "None" and secure == "never":
        raise table.fail(
            "samesite", "SameSite=None needs Secure; set secure to auto or always"
        )
    # path and domain are written into Set-Cookie as they are
    path = table.string("path", "/")
    if not path.startswith("/") or any(c in path for c in _NOT_IN_ATTRIBUTES):
        raise table.fail("path", f"expected a path starting with '/', got {path!r}")
    domain = table.string("domain", "")
    if any(c in domain for c in _NOT_IN_ATTRIBUTES + " "):
        raise table.fail("domain", f"expected a domain name, got {domain!r}")
    config = CookieConfig(
        name=name,
        secret=table.string("secret", ""),
        verify_secrets=table.strings("verify_secrets", ()),
        path=path,
        domain=domain,
        max_age=table.integer("max_age", 0),
        server_max_age=table.integer("server_max_age", 0),
        httponly=table.boolean("httponly", True),
        samesite=samesite,
        secure=secure,
        strip=table.boolean("strip", False),
        fallback=table.choice("fallback", "least_conn", _FALLBACKS),
    )
    table.finish()
    return config


def _check_redis_url(table: _Table, name: str, url: str) -> None:
    """Refuse a Redis url the client would only refuse when the policy starts.

    Messages never repeat the url: it may hold a password.
    """
    expected = "expected redis://host[:port][/db], rediss://... or unix:///path"
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise table.fail(name, expected)
    if not url.isprintable() or any(c.isspace() for c in url):
        raise table.fail(name, expected + " without spaces")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise table.fail(name, expected + "; the host does not parse") from None
    try:
        port = parts.port
    except ValueError:
        raise table.fail(name, "expected a port from 1 to 65535") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise table.fail(name, expected + "; the socket path is missing")
        return
    if not parts.hostname:
        raise table.fail(name, expected + "; the host is missing")
    if port == 0:
        raise table.fail(name, "expected a port from 1 to 65535")
    database = parts.path.removeprefix("/")
    if database and not (database.isascii() and database.isdigit()):
        raise table.fail(name, expected + "; the database is not a number")


def _read_learn(table: _Table) -> LearnConfig:
    redis_url = table.string("redis_url", "")
    if redis_url:
        _check_redis_url(table, "redis_url", redis_url)
    cookies = table.strings("cookies", LearnConfig().cookies)
    if not cookies:
        raise table.fail("cookies", "expected at least one cookie name")
    config = LearnConfig(
        cookies=cookies,
        redis_url=redis_url,
        max_entries=table.integer("max_entries", 100_000, minimum=1),
        idle_timeout=table.number("idle_timeout", 3600.0, minimum=1.0),
        fallback=table.choice("fallback", "least_conn", _FALLBACKS),
    )
    table.finish()
    return config


def _read_group(table: _Table, name: str) -> GroupConfig:
    servers = tuple(_read_server(server) for server in table.tables("servers"))
    if not servers:
        raise table.fail(
            "servers", "expected at least one [[...servers]] entry with a url"
        )
    urls = [server.url for server in servers]
    duplicate = next((url for url in urls if urls.count(url) > 1), None)
    if duplicate:
        raise table.fail("servers", f"expected each url once, got {duplicate!r} twice")
    group = GroupConfig(
        name=name,
        servers=servers,
        policy=table.choice("policy", "round_robin", get_args(PolicyName)),
        on_pinned_down=table.choice("on_pinned_down", "repin", get_args(OnPinnedDown)),
        pinned_wait=table.number("pinned_wait", 5.0),
        retries=table.integer("retries", 2),
        rewrite_host=table.boolean("rewrite_host", False),
        health=_read_health(table.table("health")),
        ip_hash=_read_ip_hash(table.table("ip_hash")),
        hash=_read_hash(table.table("hash")),
        cookie=_read_cookie(table.table("cookie")),
        learn=_read_learn(table.table("learn")),
    )
    table.finish()
    return group


def _read_cidrs(table: _Table, name: str, values: Sequence[str]) -> tuple[str, ...]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise table.fail(
                name, f"expected CIDRs like '10.0.0.0/8', got {value!r}"
            ) from None
    return tuple(values)


def _check_tls(table: _Table, cert: str, key: str) -> None:
    """Refuse a certificate or key the listener could not load when it starts."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise table.fail(name, f"cannot read {path!r} ({exc.strerror})") from None

    # a pass phrase would be asked for on the terminal by every worker
    encrypted = False

    def no_pass_phrase() -> bytes:
        nonlocal encrypted
        encrypted = True
        return b""

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=no_pass_phrase)
    except ssl.SSLError as exc:
        problem = "an unencrypted key" if encrypted else "a PEM certificate and key"
        reason = exc.reason or exc
        raise table.fail(
            "tls_cert", f"expected {problem} in {cert!r} and {key!r} ({reason})"
        ) from None


def _read_config(root: _Table) -> Config:
    """Build a Config from a parsed TOML document."""
    source = root.source
    listeners = []
    for table in root.tables("listeners"):
        cert, key = table.string("tls_cert", ""), table.string("tls_key", "")
        if bool(cert) != bool(key):
            raise table.fail(
                "tls_key" if cert else "tls_cert", "expected both tls_cert and tls_key"
            )
        address = parse_address(
            table.string("address", ""), source, table.key("address")
        )
        if cert:
            _check_tls(table, cert, key)
        listeners.append(ListenerConfig(address, cert or None, key or None))
        table.finish()

    groups_table = root.table("groups")
    groups = {
        name: _read_group(groups_table.table(name), name) for name in groups_table.data
    }

    routes = []
    for table in root.tables("routes"):
        group = table.string("group", "")
        if group not in groups:
            known = ", ".join(sorted(groups)) or "none defined"
            raise table.fail(
                "group", f"expected the name of a group ({known}), got {group!r}"
            )
        prefix = table.string("path_prefix", "/")
        if not prefix.startswith("/"):
            raise table.fail(
                "path_prefix", f"expected a path starting with '/', got {prefix!r}"
            )
        routes.append(
            RouteConfig(group=group, host=table.string("host", ""), path_prefix=prefix)
        )
        table.finish()

    server = root.table("server")
    workers = server.integer("workers", 1, minimum=1, maximum=MAX_WORKERS)
    explain = server.boolean("explain_headers", False)
    server.finish()

    timeouts_table = root.table("timeouts")
    defaults = TimeoutsConfig()
    timeouts = TimeoutsConfig(
        **{
            name: timeouts_table.number(name, getattr(defaults, name), minimum=0.001)
            for name in TimeoutsConfig.__dataclass_fields__
        }
    )
    timeouts_table.finish()

    limits_table = root.table("limits")
    limits = LimitsConfig(
        header_bytes=limits_table.integer("header_bytes", 32 * 1024, minimum=1024),
        body_bytes=limits_table.integer("body_bytes", 100 * 1024 * 1024),
        client_connections=limits_table.integer(
            "client_connections", 10_000, minimum=1
        ),
        upstream_keepalive=limits_table.integer("upstream_keepalive", 1024),
    )
    limits_table.finish()

    fwd = root.table("forwarded")
    forwarded = ForwardedConfig(
        trusted_proxies=_read_cidrs(
            fwd, "trusted_proxies", fwd.strings("trusted_proxies", ())
        ),
        client_address=fwd.choice(
            "client_address", "x-forwarded-for", get_args(ClientAddressSource)
        ),
    )
    fwd.finish()

    log_table = root.table("log")
    log = LogConfig(
        access=log_table.choice("access", "combined", get_args(AccessLogFormat)),
        access_path=log_table.string("access_path", "-"),
        level=log_table.choice("level", "info", ("debug", "info", "warning", "error")),
    )
    log_table.finish()

    admin_table = root.table("admin")
    admin_text = admin_table.string("address", "127.0.0.1:9180")
    admin = AdminConfig(
        address=parse_address(admin_text, source, admin_table.key("address"))
        if admin_text
        else None,
        token=admin_table.string("token", ""),
    )
    admin_table.finish()
    root.finish()

    return Config(
        listeners=tuple(listeners),
        groups=groups,
        routes=tuple(routes),
        workers=workers,
        explain_headers=explain,
        timeouts=timeouts,
        limits=limits,
        forwarded=forwarded,
        log=log,
        admin=admin,
        source=source,
    )


def _env_overrides(environ: Mapping[str, str], overrides: Overrides) -> Overrides:
    """Fill flags the command line left unset from STICKYPROXY_* variables."""
    workers_text = environ.get(ENV_PREFIX + "WORKERS")
    workers = overrides.workers
    if workers is None and workers_text is not None:
        if not (
            workers_text.isascii()
            and workers_text.isdigit()
            and 1 <= int(workers_text) <= MAX_WORKERS
        ):
            raise ConfigError(
                "environment",
                ENV_PREFIX + "WORKERS",
                f"expected an integer from 1 to {MAX_WORKERS}",
            )
        workers = int(workers_text)
    return Overrides(
        listen=overrides.listen or _env_list(environ, "LISTEN"),
        upstreams=overrides.upstreams or _env_list(environ, "UPSTREAMS"),
        policy=overrides.policy or environ.get(ENV_PREFIX + "POLICY"),
        workers=workers,
        admin=overrides.admin
        if overrides.admin is not None
        else environ.get(ENV_PREFIX + "ADMIN"),
        access_log=overrides.access_log or environ.get(ENV_PREFIX + "ACCESS_LOG"),
        log_level=overrides.log_level or environ.get(ENV_PREFIX + "LOG_LEVEL"),
        trusted_proxies=overrides.trusted_proxies
        or _env_list(environ, "TRUSTED_PROXIES"),
    )


def environment_upstreams(
    environ: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """Return the upstream URLs STICKYPROXY_UPSTREAMS names, as --upstream would."""
    return _env_list(os.environ if environ is None else environ, "UPSTREAMS")


def _env_list(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    value = environ.get(ENV_PREFIX + name, "")
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _apply_overrides(config: Config, overrides: Overrides, source: str) -> Config:
    """Return config with the command line's and the environment's values applied."""
    document: dict[str, Any] = {}
    if overrides.listen:
        listeners = tuple(
            ListenerConfig(parse_address(text, source, "--listen"))
            for text in overrides.listen
        )
        config = replace(config, listeners=listeners)
    if overrides.upstreams:
        servers = [{"url": url} for url in overrides.upstreams]
        document = {"groups": {"default": {"servers": servers}}}
        if overrides.policy:
            document["groups"]["default"]["policy"] = overrides.policy
        quick = _read_config(_Table(source, "", document))
        config = replace(
            config,
            groups=quick.groups,
            routes=(RouteConfig(group="default"),),
        )
    elif overrides.policy:
        if overrides.policy not in get_args(PolicyName):
            raise ConfigError(
                source, "--policy", f"expected one of {get_args(PolicyName)}"
            )
        config = replace(
            config,
            groups={
                name: replace(group, policy=cast(PolicyName, overrides.policy))
                for name, group in config.groups.items()
            },
        )
    if overrides.workers is not None:
        if not 1 <= overrides.workers <= MAX_WORKERS:
            raise ConfigError(
                source, "--workers", f"expected an integer from 1 to {MAX_WORKERS}"
            )
        config = replace(config, workers=overrides.workers)
    if overrides.admin is not None:
        address = (
            parse_address(overrides.admin, source, "--admin")
            if overrides.admin
            else None
        )
        config = replace(config, admin=replace(config.admin, address=address))
    if overrides.access_log:
        if overrides.access_log not in get_args(AccessLogFormat):
            raise ConfigError(source, "--access-log", "expected combined, json or off")
        fmt = cast(AccessLogFormat, overrides.access_log)
        config = replace(config, log=replace(config.log, access=fmt))
    if overrides.log_level:
        if overrides.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                source, "--log-level", "expected debug, info, warning or error"
            )
        config = replace(config, log=replace(config.log, level=overrides.log_level))  # type: ignore[arg-type]
    if overrides.trusted_proxies:
        table = _Table(source, "forwarded", {})
        cidrs = _read_cidrs(table, "trusted_proxies", overrides.trusted_proxies)
        config = replace(
            config, forwarded=replace(config.forwarded, trusted_proxies=cidrs)
        )
    return config


def _check(config: Config) -> Config:
    """Check what only the whole configuration can tell."""
    source = config.source
    if not config.listeners:
        raise ConfigError(
            source, "listeners", "expected at least one listener (or --listen)"
        )
    if not config.groups:
        raise ConfigError(
            source, "groups", "expected at least one group (or --upstream)"
        )
    if not config.routes:
        if len(config.groups) != 1:
            raise ConfigError(
                source, "routes", "expected routes when there are several groups"
            )
        only = next(iter(config.groups))
        config = replace(config, routes=(RouteConfig(group=only),))
    admin = config.admin.address
    if admin is not None and not config.admin.token and not is_loopback(admin.host):
        raise ConfigError(
            source,
            "admin.token",
            "expected a token when the admin listener is not on loopback",
        )
    public = {
        (listener.address.host, listener.address.port) for listener in config.listeners
    }
    # port 0 asks for any free port, so two of them never collide
    if admin is not None and admin.port != 0 and (admin.host, admin.port) in public:
        raise ConfigError(
            source, "admin.address", "expected a port no public listener uses"
        )
    if config.log.access != "off" and config.log.access_path != "-":
        _check_writable(source, "log.access_path", config.log.access_path)
    return config


def _check_writable(source: str, key: str, path: str) -> None:
    """Refuse a log file that cannot be opened for appending, without creating it."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(source, key, f"expected a file, got the directory {path!r}")
    if target.exists() and not target.is_file():
        # a pipe or a terminal (/dev/stdout): opening it could wait for a reader
        if not os.access(target, os.W_OK):
            raise ConfigError(source, key, f"cannot write to {path!r}")
        return
    if target.exists():
        try:
            # appending to an existing file changes nothing until a line is written
            with open(target, "a"):
                pass
        except OSError as exc:
            raise ConfigError(
                source, key, f"cannot append to {path!r} ({exc.strerror})"
            ) from None
        return
    folder = target.parent
    if not folder.is_dir():
        raise ConfigError(source, key, f"expected an existing folder for {path!r}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(source, key, f"cannot create {path!r} (permission denied)")


def is_loopback(host: str) -> bool:
    """Return whether host is localhost or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(
    path: str | Path | None = None,
    overrides: Overrides | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the file (if any), then apply environment variables, then flags."""
    environ = os.environ if environ is None else environ
    overrides = _env_overrides(environ, overrides or Overrides())
    source = str(path) if path is not None else "<flags>"
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except FileNotFoundError:
            raise ConfigError(source, "", "no such file") from None
        except OSError as exc:
            raise ConfigError(source, "", f"cannot be read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "", f"is not valid TOML ({exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                source, "", f"is not valid UTF-8 (byte {exc.start})"
            ) from None
    config = _read_config(_Table(source, "", document))
    config = _apply_overrides(config, overrides, source)
    return _check(_secrets_from(environ, config))


def _secrets_from(environ: Mapping[str, str], config: Config) -> Config:
    """Fill secrets the file leaves empty from STICKYPROXY_COOKIE_SECRET / _ADMIN_TOKEN.

    Secrets belong in the environment rather than in a file that is easily shared.
    """
    token = environ.get(ENV_PREFIX + "ADMIN_TOKEN", "")
    if token and not config.admin.token:
        config = replace(config, admin=replace(config.admin, token=token))
    secret = environ.get(ENV_PREFIX + "COOKIE_SECRET", "")
    if not secret:
        return config
    groups = {
        name: group
        if group.cookie.secret
        else replace(group, cookie=replace(group.cookie, secret=secret))
        for name, group in config.groups.items()
    }
    return replace(config, groups=groups)


def describe(config: Config) -> str:
    """Render the effective configuration as TOML text, secrets masked."""
    lines = [f"# effective configuration from {config.source}", "[server]"]
    lines.append(f"workers = {config.workers}")
    lines.append(f"explain_headers = {_toml_value(config.explain_headers)}")
    for listener in config.listeners:
        lines.append("\n[[listeners]]")
        lines.append(f'address = "{listener.address}"')
        if listener.tls:
            lines.append(f"tls_cert = {_toml_value(listener.tls_cert)}")
            lines.append(f"tls_key = {_toml_value(listener.tls_key)}")
    for section in ("timeouts", "limits", "forwarded", "log"):
        lines.append(f"\n[{section}]")
        lines.extend(_describe_fields(getattr(config, section)))
    lines.append("\n[admin]")
    lines.append(f'address = "{config.admin.address or ""}"')
    lines.append(f'token = "{"***" if config.admin.token else ""}"')
    for group in config.groups.values():
        lines.append(f"\n[groups.{group.name}]")
        for name in (
            "policy",
            "on_pinned_down",
            "pinned_wait",
            "retries",
            "rewrite_host",
        ):
            lines.append(f"{name} = {_toml_value(getattr(group, name))}")
        if group.policy in ("ip_hash", "hash", "cookie", "learn"):
            lines.append(f"[groups.{group.name}.{group.policy}]")
            lines.extend(_describe_fields(getattr(group, group.policy)))
        if group.health.path:
            lines.append(f"[groups.{group.name}.health]")
            lines.extend(_describe_fields(group.health))
        for server in group.servers:
            lines.append(f"[[groups.{group.name}.servers]]")
            lines.extend(_describe_fields(server))
    for route in config.routes:
        lines.append("\n[[routes]]")
        lines.extend(_describe_fields(route))
    return "\n".join(lines) + "\n"


_SECRETS = frozenset({"secret", "verify_secrets", "token", "redis_url"})


def _describe_fields(value: Any) -> list[str]:
    """Render a dataclass's fields as TOML lines, masking secrets."""
    lines = []
    for item in fields(value):
        shown = getattr(value, item.name)
        if item.name in _SECRETS and shown:
            shown = "***" if isinstance(shown, str) else ["***"] * len(shown)
        lines.append(f"{item.name} = {_toml_value(shown)}")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return str(value)
