"""Compare stickyproxy with nginx and HAProxy: throughput, latency, CPU and memory.

Run with ``python -m bench.throughput``. One nginx serves the upstreams (a small fixed
body each, keep-alive); nginx, HAProxy and stickyproxy, one worker each, proxy to them
with the same policy while wrk drives each in turn on loopback. The result is written
as JSON (``bench/results/throughput.json``) and printed as a table; bench/README.md
says how every number is taken and what it does not show.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import stickyproxy
from bench import selection as selection_bench
from stickyproxy.config import CookieConfig, GroupConfig, PolicyName, ServerConfig
from stickyproxy.policies import build_policy
from stickyproxy.selection import Policy, RequestView
from stickyproxy.upstreams import Pool, Selection

PROXIES = ("nginx", "haproxy", "stickyproxy")
POLICIES = ("round_robin", "ip_hash", "cookie")
COOKIE = "pin"
SECRET = "bench-only-secret"
RESULT = Path(__file__).parent / "results" / "throughput.json"
QUICK_RESULT = RESULT.with_name("throughput-quick.json")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024

#: the proxy under test gets a core to itself; wrk and the upstream nginx share the
#: other one, so the client never steals cycles from the proxy it measures
PROXY_CORE = "0"
CLIENT_CORE = "1"

#: wrk prints this line from the script's done(): exact counts and percentiles
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, " ..
    "\\"p50_us\\": %.0f, \\"p99_us\\": %.0f, \\"max_us\\": %.0f}\\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# configurations


def origin_config(ports: Sequence[int]) -> str:
    """Return nginx.conf for the upstreams: a fixed body each, naming the upstream."""
    servers = "".join(
        f"  server {{ listen 127.0.0.1:{port};"
        f' location / {{ return 200 "ok {i}\\n"; }} }}\n'
        for i, port in enumerate(ports)
    )
    return _nginx_main(f"  keepalive_timeout 75s;\n{servers}")


def nginx_config(
    port: int, upstreams: Sequence[int], policy: str, keepalive: int
) -> str:
    """Return nginx.conf proxying to the upstreams with the policy's nginx twin."""
    balance = {
        "round_robin": "",
        "ip_hash": "    ip_hash;\n",
        # nginx has no sticky cookie of its own: hashing the cookie pins as well
        "cookie": f"    hash $cookie_{COOKIE} consistent;\n",
    }[policy]
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in upstreams)
    return _nginx_main(
        "  upstream app {\n"
        f"{balance}{servers}"
        f"    keepalive {keepalive};\n"
        "    keepalive_requests 1000000;\n"
        "  }\n"
        "  server {\n"
        f"    listen 127.0.0.1:{port} backlog=4096;\n"
        "    location / {\n"
        "      proxy_pass http://app;\n"
        "      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n'
        "      proxy_set_header Host $http_host;\n"
        "      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
        "      proxy_set_header X-Forwarded-Proto $scheme;\n"
        "      proxy_set_header X-Forwarded-Host $host;\n"
        "    }\n"
        "  }\n"
    )


def _nginx_main(http_block: str) -> str:
    # keepalive_requests is raised so that neither side closes connections mid-run
    return (
        "worker_processes 1;\n"
        "worker_rlimit_nofile 20000;\n"
        "pid nginx.pid;\n"
        "events { worker_connections 10000; }\n"
        "http {\n"
        "  access_log off;\n"
        "  keepalive_requests 1000000;\n"
        f"{http_block}"
        "}\n"
    )


def haproxy_config(port: int, upstreams: Sequence[int], policy: str) -> str:
    """Return haproxy.cfg proxying to the upstreams with the policy's HAProxy twin."""
    balance = "source" if policy == "ip_hash" else "roundrobin"
    cookie = (
        f"  cookie {COOKIE} insert indirect nocache\n" if policy == "cookie" else ""
    )
    servers = "".join(
        f"  server u{i} 127.0.0.1:{p}" + (f" cookie u{i}\n" if cookie else "\n")
        for i, p in enumerate(upstreams)
    )
    return (
        "global\n  nbthread 1\n  maxconn 8000\n"
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 75s\n"
        "  timeout server 60s\n  timeout http-keep-alive 75s\n"
        f"frontend front\n  bind 127.0.0.1:{port}\n  option forwardfor\n"
        "  http-request set-header X-Forwarded-Proto http\n"
        "  http-request set-header X-Forwarded-Host %[req.hdr(host)]\n"
        "  default_backend app\n"
        f"backend app\n  balance {balance}\n{cookie}{servers}"
    )


def stickyproxy_config(
    port: int, upstreams: Sequence[int], policy: str, keepalive: int, workers: int
) -> str:
    """Return a stickyproxy TOML file for the policy, without access log or admin."""
    servers = "".join(
        f'[[groups.app.servers]]\nurl = "http://127.0.0.1:{p}"\n' for p in upstreams
    )
    return (
        f"[server]\nworkers = {workers}\n"
        f'[[listeners]]\naddress = "127.0.0.1:{port}"\n'
        '[admin]\naddress = ""\n'
        '[log]\naccess = "off"\nlevel = "warning"\n'
        f"[limits]\nupstream_keepalive = {keepalive}\n"
        f'[groups.app]\npolicy = "{policy}"\n'
        f'[groups.app.cookie]\nname = "{COOKIE}"\nsecret = "{SECRET}"\n'
        f"{servers}"
    )


# processes


def free_ports(count: int) -> list[int]:
    """Return loopback TCP ports that nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _stat_fields(pid: int) -> list[str]:
    # fields after the command name, which may itself hold spaces and parentheses
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rpartition(")")[2].split()


def process_tree(root: int) -> list[int]:
    """Return root and all its descendants, found through /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children[int(_stat_fields(int(entry))[1])].append(int(entry))
            except (OSError, IndexError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_times(pids: Sequence[int]) -> tuple[float, float]:
    """Return the user and the system CPU seconds the processes have used so far."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def wrk_cpu() -> float:
    """Return the CPU seconds of every finished child of this process (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> tuple[float, float]:
    """Return the CPU seconds all cores ran tasks since boot, and the wall time.

    Interrupt and softirq time is left out: on loopback much of it is the network
    work of the proxy and wrk themselves, which no process is charged for.
    """
    with open("/proc/stat") as stat:
        user, nice, system = (int(v) for v in stat.readline().split()[1:4])
    return (user + nice + system) / CLOCK_TICKS, time.monotonic()


def rss_kib(pid: int) -> int:
    """Return the process's resident set size in KiB, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Service:
    """A process tree the bench started: a proxy under test or the upstream nginx."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        workdir: Path,
        cores: str | None,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = workdir / f"{name}.log"
        pin = ["taskset", "-c", cores] if cores else []
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [*pin, *argv], stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir
            )

    def pids(self) -> list[int]:
        """Return the process and its children (nginx's worker, stickyproxy's)."""
        return process_tree(self.process.pid)

    def workers(self) -> list[int]:
        """Return the processes that serve traffic: the leaves of the tree."""
        pids = self.pids()
        return [pid for pid in pids if pid != self.process.pid] or pids

    def worker_rss_kib(self) -> int:
        """Return the largest resident set of one worker, in KiB."""
        return max(rss_kib(pid) for pid in self.workers())

    def set_cores(self, cores: set[int]) -> None:
        """Move every process of the tree (and its threads) onto the cores."""
        for pid in self.pids():
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), cores)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until the service answers a request, or raise with its log."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                if fetch(self.port)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} never answered:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        """Return the end of what the service printed."""
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """Stop the service by its own process id and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _nginx_argv(folder: Path) -> list[str]:
    return [
        "nginx", "-p", str(folder), "-c", "nginx.conf", "-e", "error.log",
        "-g", "daemon off;",
    ]  # fmt: skip


# talking to the proxies


def fetch(port: int, cookie: str | None = None) -> tuple[int, bytes, str | None]:
    """Make one request on a new connection; return status, body and Set-Cookie."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Set-Cookie")
    finally:
        connection.close()


def obtain_pin(proxy: str, port: int) -> str:
    """Return the Cookie header that pins a client, taken from the proxy's answer."""
    if proxy == "nginx":
        # nginx sets no cookie; any fixed value hashes to one upstream
        return f"{COOKIE}=bench-client"
    set_cookie = fetch(port)[2]
    if set_cookie is None or not set_cookie.startswith(f"{COOKIE}="):
        raise RuntimeError(f"{proxy} set no {COOKIE} cookie (got {set_cookie!r})")
    return set_cookie.split(";")[0]


def check_routing(proxy: str, policy: str, port: int, cookie: str | None) -> None:
    """Make sure the proxy spreads or pins requests as the policy says it should."""
    bodies = {fetch(port, cookie)[1] for _ in range(8)}
    spreads = policy == "round_robin"
    if spreads != (len(bodies) > 1):
        raise RuntimeError(f"{proxy} {policy}: requests reached {sorted(bodies)}")


def run_wrk(
    port: int,
    connections: int,
    seconds: int,
    cookie: str | None,
    script: Path,
    cores: str | None,
) -> dict[str, float]:
    """Run wrk with one thread against the port; return its counts in µs."""
    argv = ["taskset", "-c", cores] if cores else []
    argv += ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"]
    argv += ["-s", str(script)]
    if cookie:
        argv += ["-H", f"Cookie: {cookie}"]
    argv.append(f"http://127.0.0.1:{port}/")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            counts: dict[str, float] = json.loads(line.removeprefix("BENCH-JSON "))
            return counts
    raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")


class RssSampler:
    """Sample the largest worker resident set of some processes while a run lasts."""

    def __init__(self, pids: Sequence[int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, *(rss_kib(pid) for pid in self.pids))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Run:
    """One timed wrk run against one proxy."""

    proxy: str
    policy: str
    connections: int
    repetition: int
    workers: int
    requests: int
    errors: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_seconds: float
    cpu_us_per_request: float
    cpu_user_us_per_request: float
    cpu_system_us_per_request: float
    rss_peak_kib: int
    foreign_cores: float


@dataclass
class Settings:
    """What one invocation measures and for how long."""

    duration: int
    warmup: int
    repeat: int
    connections: tuple[int, ...]
    policies: tuple[str, ...]
    upstreams: int
    idle_connections: int
    upstream_keepalive: int
    selection_repeat: int
    pin: bool
    profile: Path | None
    note: str


class Bench:
    """One invocation: the upstream nginx, the settings and what was measured."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.script = workdir / "report.lua"
        self.script.write_text(WRK_SCRIPT)
        self.proxy_core = PROXY_CORE if settings.pin else None
        self.client_core = CLIENT_CORE if settings.pin else None
        self.ports = free_ports(settings.upstreams)
        folder = workdir / "origin"
        folder.mkdir()
        (folder / "nginx.conf").write_text(origin_config(self.ports))
        self.origin = Service(
            "origin", _nginx_argv(folder), self.ports[0], folder, self.client_core
        )
        self.runs: list[Run] = []
        self.worker_runs: list[Run] = []
        self.memory: dict[str, dict[str, dict[str, int]]] = {}
        self.profiles: dict[str, Any] = {}

    def start_proxy(
        self, proxy: str, policy: str, cores: str | None, workers: int = 1
    ) -> Service:
        """Start one proxy in front of the upstreams and wait until it answers."""
        port = free_ports(1)[0]
        name = f"{proxy}-{policy}-{workers}"
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        keepalive = self.settings.upstream_keepalive
        if proxy == "nginx":
            text = nginx_config(port, self.ports, policy, keepalive)
            (folder / "nginx.conf").write_text(text)
            argv = _nginx_argv(folder)
        elif proxy == "haproxy":
            text = haproxy_config(port, self.ports, policy)
            (folder / "haproxy.cfg").write_text(text)
            argv = ["haproxy", "-db", "-f", "haproxy.cfg"]
        else:
            text = stickyproxy_config(port, self.ports, policy, keepalive, workers)
            (folder / "stickyproxy.toml").write_text(text)
            argv = [
                sys.executable,
                "-m",
                "stickyproxy",
                "run",
                "-c",
                "stickyproxy.toml",
            ]
        service = Service(name, argv, port, folder, cores)
        try:
            service.wait_ready()
        except BaseException:
            service.stop()
            raise
        return service

    def measure(
        self,
        service: Service,
        proxy: str,
        policy: str,
        connections: int,
        repetition: int,
        cookie: str | None,
        workers: int = 1,
    ) -> Run:
        """Warm the proxy up, then time one wrk run and the CPU and memory it took."""
        settings = self.settings
        client = self.client_core if workers == 1 else None
        if settings.warmup:
            run_wrk(
                service.port, connections, settings.warmup, cookie, self.script, client
            )

        pids, origin = service.pids(), self.origin.pids()
        proxy_before, origin_before = cpu_times(pids), cpu_times(origin)
        wrk_before, machine_before = wrk_cpu(), machine_busy()
        with RssSampler(service.workers()) as sampler:
            counts = run_wrk(
                service.port,
                connections,
                settings.duration,
                cookie,
                self.script,
                client,
            )
        proxy_after, origin_after = cpu_times(pids), cpu_times(origin)
        wrk_after, machine_after = wrk_cpu(), machine_busy()
        user = proxy_after[0] - proxy_before[0]
        system = proxy_after[1] - proxy_before[1]
        ours = (
            user
            + system
            + sum(origin_after)
            - sum(origin_before)
            + wrk_after
            - wrk_before
        )
        busy = machine_after[0] - machine_before[0]
        wall = machine_after[1] - machine_before[1]

        requests = int(counts["requests"])
        per_request = 1e6 / max(requests, 1)
        seconds = counts["duration_us"] / 1e6
        return Run(
            proxy=proxy,
            policy=policy,
            connections=connections,
            repetition=repetition,
            workers=workers,
            requests=requests,
            errors=int(counts["errors"]),
            seconds=round(seconds, 3),
            requests_per_second=round(requests / seconds, 1),
            p50_ms=counts["p50_us"] / 1000,
            p99_ms=counts["p99_us"] / 1000,
            max_ms=counts["max_us"] / 1000,
            cpu_seconds=round(user + system, 2),
            cpu_us_per_request=round((user + system) * per_request, 2),
            cpu_user_us_per_request=round(user * per_request, 2),
            cpu_system_us_per_request=round(system * per_request, 2),
            rss_peak_kib=sampler.peak,
            # cores busy with anything but this proxy, wrk and the upstreams:
            # other work on the machine, which the numbers cannot exclude
            foreign_cores=round((busy - ours) / wall, 2),
        )

    def run_policy(self, policy: str) -> None:
        """Start the three proxies for one policy and measure them in alternation."""
        services: dict[str, Service] = {}
        try:
            for proxy in PROXIES:
                services[proxy] = self.start_proxy(proxy, policy, self.proxy_core)
            cookies = {
                proxy: obtain_pin(proxy, s.port) if policy == "cookie" else None
                for proxy, s in services.items()
            }
            for proxy, service in services.items():
                check_routing(proxy, policy, service.port, cookies[proxy])

            # memory first, while the proxies have not yet seen a load
            count = self.settings.idle_connections
            self.memory[policy] = {
                proxy: idle_memory(s, count, cookies[proxy])
                for proxy, s in services.items()
            }
            for repetition in range(self.settings.repeat):
                for connections in self.settings.connections:
                    for proxy in rotated(PROXIES, repetition):
                        run = self.measure(
                            services[proxy],
                            proxy,
                            policy,
                            connections,
                            repetition,
                            cookies[proxy],
                        )
                        self.runs.append(run)
                        _progress(run)

            if self.settings.profile is not None:
                self.profiles[policy] = self.profile(
                    services["stickyproxy"], policy, cookies["stickyproxy"]
                )
        finally:
            for service in services.values():
                service.stop()

    def profile(
        self, service: Service, policy: str, cookie: str | None
    ) -> dict[str, Any]:
        """Sample stickyproxy with py-spy under load at the first concurrency."""
        folder = self.settings.profile
        assert folder is not None
        folder.mkdir(parents=True, exist_ok=True)
        seconds = self.settings.duration
        load = threading.Thread(
            target=run_wrk,
            args=(
                service.port,
                self.settings.connections[0],
                seconds + 2,
                cookie,
                self.script,
                self.client_core,
            ),
        )
        load.start()
        time.sleep(1)
        try:
            return record_profile(service, seconds, folder / f"{policy}.txt")
        finally:
            load.join()

    def run_workers(self) -> None:
        """Measure stickyproxy with one and with two workers, nothing pinned."""
        self.origin.set_cores(set(range(os.cpu_count() or 1)))
        services: dict[int, Service] = {}
        try:
            for workers in (1, 2):
                services[workers] = self.start_proxy(
                    "stickyproxy", "round_robin", None, workers
                )
            for repetition in range(self.settings.repeat):
                for connections in self.settings.connections:
                    order = rotated(["1", "2"], repetition)
                    for workers in map(int, order):
                        run = self.measure(
                            services[workers],
                            "stickyproxy",
                            "round_robin",
                            connections,
                            repetition,
                            None,
                            workers,
                        )
                        self.worker_runs.append(run)
                        _progress(run)
        finally:
            for service in services.values():
                service.stop()
            if self.client_core is not None:
                self.origin.set_cores({int(self.client_core)})


def rotated(items: Sequence[str], by: int) -> list[str]:
    """Return items starting at a different one on each repetition."""
    by %= len(items)
    return [*items[by:], *items[:by]]


# idle keep-alive connections


async def _open_idle(port: int, cookie: str | None) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    writer.write(f"GET / HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return writer


async def _hold_idle(
    service: Service, count: int, cookie: str | None
) -> tuple[int, int]:
    writers: list[asyncio.StreamWriter] = []
    try:
        # in batches, so that the listen backlog never overflows
        for start in range(0, count, 100):
            batch = min(100, count - start)
            writers += await asyncio.gather(
                *(_open_idle(service.port, cookie) for _ in range(batch))
            )
        await asyncio.sleep(1.0)
        return len(writers), service.worker_rss_kib()
    finally:
        for writer in writers:
            writer.close()
        await asyncio.sleep(0.5)


def idle_memory(service: Service, count: int, cookie: str | None) -> dict[str, int]:
    """Return a worker's resident set before and while count idle clients are held."""
    idle = service.worker_rss_kib()
    held, rss = asyncio.run(_hold_idle(service, count, cookie))
    return {"idle_kib": idle, "connections": held, "held_kib": rss}


# selection alone


def policy_cases(size: int) -> dict[str, Callable[[int], object]]:
    """Return one decision per policy as the data plane makes it, on a fresh view."""
    rng = random.Random(2)
    peers = selection_bench.pool(size, weighted=False)
    servers = tuple(ServerConfig(f"http://{peer.name}") for peer in peers)
    keys = range(selection_bench.KEYS)
    addresses = [f"198.{rng.randrange(256)}.{rng.randrange(256)}.7" for _ in keys]
    picks = [rng.randrange(size) for _ in keys]
    cookie_config = CookieConfig(name=COOKIE, secret=SECRET)

    names: tuple[PolicyName, ...] = (
        "round_robin", "least_conn", "random", "ip_hash", "hash", "cookie",
    )  # fmt: skip
    decisions: dict[str, Callable[[int], object]] = {}
    for name in names:
        pool = Pool(GroupConfig("app", servers, policy=name, cookie=cookie_config))
        policy = build_policy(pool)

        # a valid pin per key, as the policy itself would set it
        headers = [
            [(b"Host", b"bench"), (b"Cookie", _pin_for(policy, pool, pick))]
            for pick in picks
        ]
        decisions[name] = _decision(policy, addresses, headers)
    decisions["request view only"] = lambda i: RequestView(
        addresses[i], "GET", "/", "bench", []
    )
    return decisions


def _decision(
    policy: Policy, addresses: list[str], headers: list[list[tuple[bytes, bytes]]]
) -> Callable[[int], object]:
    def decide(i: int) -> object:
        return policy.select(RequestView(addresses[i], "GET", "/", "bench", headers[i]))

    return decide


def _pin_for(policy: Policy, pool: Pool, index: int) -> bytes:
    view = RequestView("127.0.0.1", "GET", "/", "bench", [])
    lines = policy.on_response(view, Selection(pool.upstreams[index], "new"), ())
    if not lines:
        return f"{COOKIE}=none".encode()
    return bytes(lines[0]).split(b": ", 1)[1].split(b";")[0]


def selection_costs(repeat: int) -> dict[str, dict[str, float]]:
    """Return µs per decision for each policy and table at every pool size."""
    costs: dict[str, dict[str, float]] = defaultdict(dict)
    for size in selection_bench.SIZES:
        rows = {
            **{f"policy {k}": v for k, v in policy_cases(size).items()},
            **{f"table {k}": v for k, v in selection_bench.cases(size, False).items()},
        }
        for name, decide in rows.items():
            cost = selection_bench.per_decision(decide, repeat)
            costs[name][str(size)] = round(cost, 3)
    return dict(costs)


# profiling


def record_profile(service: Service, seconds: int, output: Path) -> dict[str, Any]:
    """Sample a stickyproxy worker with py-spy, native frames included."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    pid = service.workers()[0]
    subprocess.run(
        [spy, "record", "--pid", str(pid), "-d", str(seconds), "-r", "200",
         "--native", "-f", "raw", "--nolineno", "-o", str(output)],
        check=True, capture_output=True, timeout=seconds + 60,
    )  # fmt: skip
    return summarise_stacks(output.read_text())


def summarise_stacks(collapsed: str, top: int = 25) -> dict[str, Any]:
    """Return the functions with the most samples, alone (self) and with callees."""
    own: Counter[str] = Counter()
    python_own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count

        # the innermost Python function, with the C code it called (syscalls too)
        python = [frame for frame in frames if ".py)" in frame]
        python_own[python[-1] if python else frames[-1]] += count
        for frame in set(frames):
            total[frame] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * n / samples, 1)) for f, n in counter.most_common(top)]

    return {
        "samples": samples,
        "self_percent": shares(own),
        "python_self_percent": shares(python_own),
        "total_percent": shares(total),
    }


# the whole run


def _progress(run: Run) -> None:
    print(
        f"  {run.policy:<12}{run.connections:>6} {run.proxy:<12}"
        f"w{run.workers} {run.requests_per_second:>10.0f} req/s"
        f" {run.cpu_us_per_request:>8.1f} µs CPU/req  p99 {run.p99_ms:.2f} ms",
        file=sys.stderr,
        flush=True,
    )


# summaries


def summarise(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, Any]]]:
    """Return per policy, concurrency and proxy the medians, and the ratios to nginx."""
    cells: dict[tuple[str, int, str], list[Run]] = defaultdict(list)
    for run in runs:
        cells[run.policy, run.connections, run.proxy].append(run)

    summary: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (policy, connections, proxy), group in cells.items():
        cell = summary[policy].setdefault(str(connections), {})
        cell[proxy] = {
            "requests_per_second": statistics.median(
                r.requests_per_second for r in group
            ),
            "p50_ms": statistics.median(r.p50_ms for r in group),
            "p99_ms": statistics.median(r.p99_ms for r in group),
            # CPU per request over all repetitions: the total divided by the total
            "cpu_us_per_request": _per_request(group, "cpu_us_per_request"),
            "cpu_user_us_per_request": _per_request(group, "cpu_user_us_per_request"),
            "cpu_system_us_per_request": _per_request(
                group, "cpu_system_us_per_request"
            ),
            "foreign_cores": max(r.foreign_cores for r in group),
            "rss_peak_kib": max(r.rss_peak_kib for r in group),
            "errors": sum(r.errors for r in group),
            "requests": sum(r.requests for r in group),
        }
    for by_connections in summary.values():
        for cell in by_connections.values():
            if "stickyproxy" in cell and "nginx" in cell:
                cell["stickyproxy_to_nginx"] = _ratios(
                    cell["stickyproxy"], cell["nginx"]
                )
            if "stickyproxy" in cell and "haproxy" in cell:
                cell["stickyproxy_to_haproxy"] = _ratios(
                    cell["stickyproxy"], cell["haproxy"]
                )
    return dict(summary)


def _per_request(group: Sequence[Run], field: str) -> float:
    # over all repetitions: weighted by requests, as the total divided by the total
    used: float = sum(getattr(r, field) * r.requests for r in group)
    return round(used / max(1, sum(r.requests for r in group)), 2)


def _ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    keys = ("requests_per_second", "p50_ms", "p99_ms", "cpu_us_per_request")
    return {k: round(ours[k] / theirs[k], 2) if theirs[k] else 0.0 for k in keys}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the numbers against the goals stickyproxy sets itself."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, at_most: bool = True) -> None:
        met = value <= limit if at_most else value >= limit
        checks.append({"target": name, "value": value, "limit": limit, "met": met})

    for policy, by_connections in result["summary"].items():
        for connections, cell in by_connections.items():
            ratios = cell.get("stickyproxy_to_nginx")
            if ratios is None:
                continue
            check(
                f"CPU per request vs nginx, {policy}, {connections} conns",
                ratios["cpu_us_per_request"],
                2.0,
            )
            if connections == "50":
                check(f"p99 vs nginx, {policy}, 50 conns", ratios["p99_ms"], 2.0)
    for policy, proxies in result["idle_memory"].items():
        held = proxies["stickyproxy"]
        check(
            f"MiB per worker at {held['connections']} idle conns, {policy}",
            round(held["held_kib"] / MIB, 1),
            60.0,
        )
    for name, by_size in result["selection_us"].items():
        if name.startswith("policy ") and "view" not in name:
            spread = max(by_size.values()) / min(by_size.values())
            check(
                f"selection {name[7:]}: slowest / fastest size", round(spread, 2), 2.0
            )
    for connections, ratio in result["workers"]["two_to_one"].items():
        check(f"--workers 2 / 1 req/s, {connections} conns", ratio, 1.7, at_most=False)
    return checks


def workers_summary(runs: Sequence[Run]) -> dict[str, Any]:
    """Return median throughput per worker count and concurrency, and the ratios."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    cpu: dict[str, dict[str, float]] = defaultdict(dict)
    for connections in sorted({r.connections for r in runs}):
        for workers in (1, 2):
            group = [
                r for r in runs if r.connections == connections and r.workers == workers
            ]
            rates = [r.requests_per_second for r in group]
            medians[str(connections)][str(workers)] = statistics.median(rates)
            cpu[str(connections)][str(workers)] = _per_request(
                group, "cpu_us_per_request"
            )
    return {
        "requests_per_second": dict(medians),
        "cpu_us_per_request": dict(cpu),
        "two_to_one": {c: round(m["2"] / m["1"], 2) for c, m in medians.items()},
    }


def print_report(result: dict[str, Any]) -> None:
    """Print the summary, memory, workers, selection and targets as short tables."""
    print(
        f"\n{'policy':<12}{'conns':>6}  {'proxy':<12}{'req/s':>8}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'CPU µs/req (usr+sys)':>22}{'RSS MiB':>8}{'other':>6}"
    )
    for policy, by_connections in result["summary"].items():
        for connections, cell in by_connections.items():
            for proxy in PROXIES:
                s = cell[proxy]
                cpu = (
                    f"{s['cpu_us_per_request']:.1f}"
                    f" ({s['cpu_user_us_per_request']:.1f}"
                    f"+{s['cpu_system_us_per_request']:.1f})"
                )
                print(
                    f"{policy:<12}{connections:>6}  {proxy:<12}"
                    f"{s['requests_per_second']:>8.0f}{s['p50_ms']:>8.2f}"
                    f"{s['p99_ms']:>8.2f}{cpu:>22}"
                    f"{s['rss_peak_kib'] / MIB:>8.1f}{s['foreign_cores']:>6.2f}"
                )
            r = cell["stickyproxy_to_nginx"]
            print(
                f"{'':<20}stickyproxy / nginx: req/s {r['requests_per_second']}x,"
                f" p99 {r['p99_ms']}x, CPU/req {r['cpu_us_per_request']}x"
            )

    print(f"\n{'idle keep-alive memory, MiB per worker':<40}{'idle':>8}{'held':>8}")
    for policy, proxies in result["idle_memory"].items():
        for proxy, m in proxies.items():
            print(
                f"{policy + ' ' + proxy:<40}{m['idle_kib'] / MIB:>8.1f}"
                f"{m['held_kib'] / MIB:>8.1f}  ({m['connections']} conns)"
            )

    workers = result["workers"]
    print()
    for connections, ratio in workers["two_to_one"].items():
        rates = workers["requests_per_second"][connections]
        cpu = workers["cpu_us_per_request"][connections]
        print(
            f"stickyproxy --workers 2 / 1 at {connections} conns: {ratio}x"
            f" ({rates['2']:.0f} / {rates['1']:.0f} req/s;"
            f" CPU {cpu['2']:.1f} / {cpu['1']:.1f} µs/req)"
        )

    sizes = selection_bench.SIZES
    print(f"\n{'µs per decision':<32}" + "".join(f"{n:>9}" for n in sizes))
    for name, by_size in result["selection_us"].items():
        print(f"{name:<32}" + "".join(f"{by_size[str(n)]:>9.2f}" for n in sizes))

    for policy, shares in result.get("profiles", {}).items():
        print(f"\nstickyproxy {policy}, samples by innermost Python function:")
        for frame, percent in shares["python_self_percent"][:12]:
            print(f"{percent:>6.1f}%  {frame}")

    print()
    for t in result["targets"]:
        mark = "met" if t["met"] else "NOT MET"
        print(f"{mark:<8}{t['target']}: {t['value']} (limit {t['limit']})")


def environment(note: str) -> dict[str, Any]:
    """Return what the numbers depend on: machine, versions and the code measured."""
    source = Path(stickyproxy.__file__).parent

    def output(argv: list[str], succeeds: bool = True) -> str | None:
        # wrk -v prints its version and then fails for want of a URL
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, cwd=source
        )
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines and (done.returncode == 0 or not succeeds) else None

    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "nginx": output(["nginx", "-v"]),
        "haproxy": output(["haproxy", "-v"]),
        "wrk": output(["wrk", "-v"], succeeds=False),
        "stickyproxy_source": str(source),
        # None for an exported copy, which has no history: say which in --note
        "stickyproxy_commit": output(["git", "describe", "--always", "--dirty"]),
        "note": note,
    }


def run(settings: Settings) -> dict[str, Any]:
    """Measure everything the settings ask for and return the result."""
    # selection first, while none of the servers runs
    print("selection:", file=sys.stderr, flush=True)
    selection = selection_costs(settings.selection_repeat)

    with tempfile.TemporaryDirectory(prefix="stickyproxy-bench-") as tmp:
        bench = Bench(settings, Path(tmp))
        try:
            bench.origin.wait_ready()
            for policy in settings.policies:
                print(f"{policy}:", file=sys.stderr, flush=True)
                bench.run_policy(policy)
            print("workers:", file=sys.stderr, flush=True)
            bench.run_workers()
        finally:
            bench.origin.stop()

    result: dict[str, Any] = {
        "environment": environment(settings.note),
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k != "profile"},
            "proxy_core": bench.proxy_core,
            "client_core": bench.client_core,
        },
        "summary": summarise(bench.runs),
        "idle_memory": bench.memory,
        "workers": workers_summary(bench.worker_runs),
        "selection_us": selection,
        "runs": [asdict(r) for r in [*bench.runs, *bench.worker_runs]],
    }
    if bench.profiles:
        result["profiles"] = bench.profiles
    result["targets"] = targets(result)
    return result


def _csv(text: str) -> Iterator[str]:
    return (part.strip() for part in text.split(",") if part.strip())


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, Path]:
    """Read the command line into settings and the output path."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, help="seconds per timed run (8)")
    parser.add_argument("--warmup", type=int, help="seconds of load before each (2)")
    parser.add_argument("--repeat", type=int, help="repetitions of each cell (2)")
    parser.add_argument("--connections", default="50,1000", help="wrk -c values")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--upstreams", type=int, default=4)
    parser.add_argument("--idle-connections", type=int, default=1000)
    parser.add_argument(
        "--upstream-keepalive",
        type=int,
        default=1024,
        help="idle upstream connections nginx and stickyproxy keep (1024)",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 repetition")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--profile", type=Path, help="py-spy stickyproxy into DIR")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"where the JSON goes (default {RESULT}; with --quick, {QUICK_RESULT})",
    )
    parser.add_argument("--note", default="", help="recorded with the result")
    args = parser.parse_args(argv)

    quick = args.quick
    # a quick look must not replace the committed full run
    if args.output is None:
        args.output = QUICK_RESULT if quick else RESULT
    policies = tuple(_csv(args.policies))
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {POLICIES}")
    can_pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    settings = Settings(
        duration=args.duration or (3 if quick else 8),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 2),
        repeat=args.repeat or (1 if quick else 2),
        connections=tuple(int(c) for c in _csv(args.connections)),
        policies=policies,
        upstreams=args.upstreams,
        idle_connections=args.idle_connections,
        upstream_keepalive=args.upstream_keepalive,
        selection_repeat=2 if quick else 9,
        pin=can_pin and not args.no_pin,
        profile=args.profile,
        note=args.note,
    )
    return settings, args.output


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, write the JSON result and print the tables."""
    settings, output = parse_settings(argv)

    # a plain SIGTERM would skip the cleanup that stops every server started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    missing = [tool for tool in ("nginx", "haproxy", "wrk") if not shutil.which(tool)]
    if missing:
        sys.exit(f"bench.throughput needs {', '.join(missing)} on PATH")

    result = run(settings)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print_report(result)
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
