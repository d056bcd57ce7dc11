"""Compare the options against session drift by driving simulated users through each.

Each option gets a fresh stack (the real backend launcher and the real proxy, as
processes on loopback) and the same users for the same time. The proxy believes
X-Forwarded-For from loopback here, so that every simulated user can present its own
address. Options run one after the other, so they never compete for the CPU.

With ``kill_one`` the busiest instance is killed with SIGKILL, by PID, at 35% of the
run. The launcher would restart it within a second, as PM2 would, which is too soon
to see anyone fail over; so the bench stops the launcher (SIGSTOP) just before the
kill and lets it go on (SIGCONT) at 70% of the run, when it restarts the instance,
empty. Errors from the kill on count as failover errors.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from stickyproxy.bench_report import render_html, render_table
from stickyproxy.bench_results import Kill, OptionResult, summarise
from stickyproxy.bench_stack import REDIS_MISSING, Stack, StackError
from stickyproxy.bench_users import Observations, Profile, drive
from stickyproxy.demo import OPTIONS, option_stack

#: the order a default run takes: the broken setup first, then the fixes
DEFAULT_OPTIONS = tuple(OPTIONS)

#: shares of the run after which the instance is killed, and may restart
KILL_AT = 0.35
RESUME_AT = 0.70

#: times a stack is started before the bench gives up on an option
START_ATTEMPTS = 2

#: seconds between two progress updates
PROGRESS_INTERVAL = 0.25


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """What to run: which options, how many users, how long, how clients behave."""

    #: None runs every option, leaving redis out when no Redis can be had
    options: tuple[str, ...] | None = None
    users: int = 20
    #: seconds per option
    duration: float = 8.0
    profile: Profile = "stable"
    #: backend instances of every option but single
    instances: int = 3
    kill_one: bool = False
    #: Redis for the redis option; None starts a private redis-server
    redis_url: str | None = None

    def describe(self) -> str:
        """Return the settings as one line for reports."""
        kill = ", one instance killed mid-run" if self.kill_one else ""
        return (
            f"{self.users} users, profile {self.profile}, {self.duration:g} s per "
            f"option, {self.instances} instances{kill}"
        )


def chosen_options(settings: BenchSettings, warn: TextIO | None) -> list[str]:
    """Return the options to run; raise StackError when a requested one cannot run."""
    redis_available = bool(settings.redis_url) or shutil.which("redis-server")
    if settings.options is not None:
        if "redis" in settings.options and not redis_available:
            raise StackError(REDIS_MISSING)
        return list(settings.options)
    if redis_available:
        return list(DEFAULT_OPTIONS)
    if warn is not None:
        print(f"bench: skipping redis: {REDIS_MISSING}", file=warn)
    return [name for name in DEFAULT_OPTIONS if name != "redis"]


def run_bench(
    settings: BenchSettings,
    json_path: str | None,
    html_path: str | None,
    out: TextIO | None = None,
    progress: TextIO | None = None,
) -> int:
    """Run the bench, print the table, write the reports; return the exit status."""
    out = out or sys.stdout
    progress = progress or sys.stderr
    with _sigterm_interrupts():
        try:
            results = bench(settings, progress)
        except KeyboardInterrupt:
            print(
                "bench: interrupted; every process it started is stopped", file=progress
            )
            return 130

    print(render_table(results), file=out, flush=True)
    reports = []
    if json_path:
        document = [result.as_json() for result in results]
        reports.append((json_path, json.dumps(document, indent=2) + "\n"))
    if html_path:
        reports.append((html_path, render_html(results, settings.describe())))
    for path, text in reports:
        try:
            Path(path).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"stickyproxy: cannot write {path}: {exc.strerror}", file=progress)
            return 1
        print(f"bench: wrote {path}", file=progress)
    return 0


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so that the stack in use is stopped."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bench(
    settings: BenchSettings, progress: TextIO | None = None
) -> list[OptionResult]:
    """Run every chosen option in turn and return their results."""
    run_id = f"bench-{secrets.token_hex(3)}"
    results = []
    for name in chosen_options(settings, progress):
        result = run_option(name, settings, f"{run_id}-{name}", progress)
        results.append(result)
        if progress is not None:
            print(_done_line(result), file=progress, flush=True)
    return results


def run_option(
    name: str, settings: BenchSettings, run_id: str, progress: TextIO | None
) -> OptionResult:
    """Start the option's stack, drive the users through it, stop it, count."""
    import uvloop

    if progress is not None and progress.isatty():
        print(f"\rbench: {name:<12} starting\033[K", end="", file=progress, flush=True)
    with _started_stack(name, settings, progress) as stack:
        stores = discover_stores(stack)
        observations = Observations(time.monotonic())
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            kill = runner.run(
                _run_users(stack, settings, observations, run_id, progress)
            )
            elapsed = time.monotonic() - observations.started

        # what the proxy said about its upstreams explains surprising figures
        stack.stop()
        events = stack.proxy_events()

    return summarise(
        name,
        settings.profile,
        settings.users,
        settings.duration,
        sorted(stores),
        stores,
        observations,
        elapsed,
        kill,
        events,
    )


def _started_stack(
    name: str, settings: BenchSettings, progress: TextIO | None
) -> Stack:
    """Return the option's stack, started; a second attempt takes other free ports."""
    for attempt in range(1, START_ATTEMPTS + 1):
        stack = option_stack(
            OPTIONS[name],
            settings.instances,
            admin=False,
            trust_loopback=True,
            access_log=False,
            redis_url=settings.redis_url,
        )
        try:
            stack.start()
        except BaseException as exc:
            stack.cleanup()
            # a port found free may be taken by another program before we bind it
            if not isinstance(exc, StackError) or attempt == START_ATTEMPTS:
                raise
            if progress is not None:
                print(f"bench: {name}: {exc}; trying again", file=progress)
            continue
        return stack
    raise AssertionError("unreachable: the last attempt returns or raises")


def discover_stores(stack: Stack) -> dict[str, str]:
    """Return each instance's session store: its own id, or "redis" shared by all."""
    return {
        instance: "redis" if kind == "redis" else instance
        for instance, kind in stack.instance_stores().items()
    }


async def _run_users(
    stack: Stack,
    settings: BenchSettings,
    observations: Observations,
    run_id: str,
    progress: TextIO | None,
) -> Kill | None:
    """Drive the users; meanwhile show progress and, if asked, kill an instance."""
    assert stack.config is not None
    group = next(iter(stack.config.groups.values()))
    users = asyncio.create_task(
        drive(
            observations,
            stack.url,
            settings.users,
            settings.duration,
            settings.profile,
            run_id,
            group.cookie.name,
        ),
        name="users",
    )
    started = observations.started
    kill_at = started + KILL_AT * settings.duration
    resume_at = started + RESUME_AT * settings.duration
    killed: tuple[str, float] | None = None
    resumed = 0.0
    show = progress is not None and progress.isatty()

    while not users.done():
        await asyncio.wait({users}, timeout=PROGRESS_INTERVAL)
        now = time.monotonic()
        if settings.kill_one and killed is None and now >= kill_at:
            killed = _kill_busiest(stack, observations), time.monotonic()
        if killed is not None and not resumed and now >= resume_at:
            stack.resume_restarts()
            resumed = time.monotonic()
        if show and progress is not None:
            line = _progress_line(stack.name, observations, now - started)
            print(f"\r{line}\033[K", end="", file=progress, flush=True)

    if show and progress is not None:
        print("\r\033[K", end="", file=progress, flush=True)
    users.result()
    if killed is None:
        return None
    return Kill(killed[0], killed[1], resumed or time.monotonic())


def _kill_busiest(stack: Stack, observations: Observations) -> str:
    """Kill the instance that served most so far; the launcher may not restart it."""
    busiest = observations.per_instance.most_common(1)
    pids = stack.instance_pids()
    victim = busiest[0][0] if busiest else min(pids)
    stack.pause_restarts()
    stack.kill_instance(victim)
    return victim


def _progress_line(name: str, obs: Observations, elapsed: float) -> str:
    return (
        f"bench: {name:<12} {elapsed:5.1f}s  {obs.requests} requests  "
        f"{obs.unauthorized} x 401  {obs.errors} errors"
    )


def _done_line(result: OptionResult) -> str:
    line = (
        f"bench: {result.option:<12} {result.requests} requests, "
        f"drift {result.drift_sessions}/{result.sessions} sessions, "
        f"{result.unauthorized_after_login} x 401, {result.ghost_files} ghosts, "
        f"{result.errors} errors"
    )
    if result.killed is not None:
        line += (
            f"; killed {result.killed}: {result.repinned_sessions} re-pinned, "
            f"{result.failover_errors} failover errors"
        )
    return line
