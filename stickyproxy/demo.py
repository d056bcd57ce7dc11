"""Run the sample backend behind the proxy, deployed as one option against drift.

An option is one way to run several instances of a session-using backend: share the
sessions through Redis, run a single instance, or pin each user to one instance
(by address, by the proxy's cookie, or by the backend's own session cookie).
"""

from __future__ import annotations

import signal
import sys
import textwrap
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from stickyproxy.bench_stack import (
    Stack,
    StackError,
    free_ports,
    port_free,
    without_password,
)

BACKEND_PORT = 3000
PROXY_PORT = 8080
DEFAULT_INSTANCES = 4
DEFAULT_OPTION = "cookie"


@dataclass(frozen=True, slots=True)
class Option:
    """One way to run several instances of a session-using backend."""

    name: str
    #: one line: what runs
    summary: str
    #: what to try in the page and what it shows
    look_for: str
    #: the instances share sessions and files through Redis
    shared_store: bool = False
    #: exactly one instance, whatever was asked for
    single: bool = False


OPTIONS = {
    option.name: option
    for option in (
        Option(
            "round_robin",
            "in-memory sessions behind plain round robin: the broken setup",
            "Log in, then upload and click Refresh a few times. Calls land on "
            "different instances (rows marked 'changed'), most of them answer 401, "
            "and your files come and go: this is session drift.",
        ),
        Option(
            "redis",
            "sessions shared through Redis, round robin in front",
            "Log in and click around. Calls land on different instances (rows marked "
            "'changed'), yet every one knows your session and your files, because "
            "they all keep them in Redis.",
            shared_store=True,
        ),
        Option(
            "single",
            "one instance with in-memory sessions",
            "Every call is answered by the one instance, so nothing drifts; but it "
            "is all the capacity there is, and a restart logs everyone out.",
            single=True,
        ),
        Option(
            "ip_hash",
            "in-memory sessions behind nginx-style ip_hash",
            "Every call from this browser lands on one instance, chosen by your "
            "address. Everyone in your /24 network lands there too, and a user "
            "whose address changes moves and is logged out.",
        ),
        Option(
            "cookie",
            "in-memory sessions behind signed-cookie affinity",
            "Every call lands on one instance: the proxy pinned this browser with its "
            "signed 'stickyproxy' cookie (see X-Stickyproxy-Reason in the response "
            "headers). A private window may be pinned elsewhere.",
        ),
        Option(
            "learn",
            "in-memory sessions, pinned on the backend's own connect.sid",
            "After you log in, every call lands on the instance that issued your "
            "connect.sid: the proxy learned it from the Set-Cookie and sets no "
            "cookie of its own.",
        ),
    )
}


def option_stack(option: Option, instances: int, **settings: Any) -> Stack:
    """Return a stack (not started) that runs option with that many instances."""
    count = 1 if option.single else instances
    return Stack(option.name, count, shared_store=option.shared_store, **settings)


def run_demo(
    option_name: str = DEFAULT_OPTION,
    instances: int = DEFAULT_INSTANCES,
    port: int | None = None,
    redis_url: str | None = None,
    out: TextIO | None = None,
    backend_port: int = BACKEND_PORT,
) -> int:
    """Run an option's stack until SIGINT or SIGTERM; return the exit status.

    Without a port, 8080 is used if free and any free port otherwise; a port given
    explicitly must be free. The instances take consecutive ports from backend_port,
    or from wherever enough consecutive ports are free.
    """
    option = OPTIONS[option_name]
    out = out or sys.stdout
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        proxy_port = _proxy_port(port)
        with option_stack(
            option,
            instances,
            proxy_port=proxy_port,
            backend_port=backend_port,
            redis_url=redis_url,
        ) as stack:
            stack.start(stopping.is_set)
            _print_banner(option, stack, instances, out)
            while not stopping.wait(0.2):
                failed = stack.failed()
                if failed:
                    print(f"stickyproxy: {failed}; stopping", file=sys.stderr)
                    return 1
            print("stopping ...", file=out, flush=True)
        print("stopped", file=out, flush=True)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _proxy_port(port: int | None) -> int:
    if port is not None:
        if not port_free(port):
            raise StackError(f"port {port} is busy; choose another with --port")
        return port
    return free_ports(1, PROXY_PORT)


def _print_banner(option: Option, stack: Stack, asked: int, out: TextIO) -> None:
    ports = stack.backend_ports
    lines = [
        f"stickyproxy demo: {option.name} - {option.summary}",
        f"  open     {stack.url}",
    ]
    if stack.admin_url:
        lines.append(
            f"  status   {stack.admin_url}   (metrics: {stack.admin_url}metrics)"
        )
    backends = f"127.0.0.1:{ports[0]}" + (f"..{ports[-1]}" if len(ports) > 1 else "")
    lines.append(f"  backend  {len(ports)} instance(s) on {backends}")
    if stack.redis_url:
        lines.append(f"  redis    {without_password(stack.redis_url)}")
    if option.single and asked != 1:
        lines.append(
            f"           (single runs one instance; --instances {asked} ignored)"
        )
    lines.append(f"  logs     {stack.workdir}  (removed on exit)")
    lines.append("")
    lines.extend(
        textwrap.wrap(option.look_for, 80, initial_indent="What to look for: ")
    )
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), file=out, flush=True)
