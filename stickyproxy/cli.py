"""The ``stickyproxy`` command line: run, check, and the tools built on them."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import FrameType

from stickyproxy import __version__
from stickyproxy.config import (
    Config,
    Overrides,
    describe,
    environment_upstreams,
    load_config,
)
from stickyproxy.errors import ConfigError
from stickyproxy.log import setup_logging


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML configuration file")
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="public listener (repeatable); overrides the file's listeners",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URL",
        help="upstream http://host:port (repeatable); replaces the file's groups",
    )
    parser.add_argument("--policy", help="selection policy of the group(s)")
    parser.add_argument("--workers", type=int, help="worker processes (SO_REUSEPORT)")
    parser.add_argument(
        "--admin", metavar="HOST:PORT", help="admin listener; '' disables"
    )
    parser.add_argument("--access-log", choices=("combined", "json", "off"))
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="believe forwarding headers from these peers (repeatable)",
    )


def _overrides(args: argparse.Namespace) -> Overrides:
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers", "", "expected an integer >= 1")
    return Overrides(
        listen=tuple(args.listen),
        upstreams=tuple(args.upstream),
        policy=args.policy,
        workers=args.workers,
        admin=args.admin,
        access_log=args.access_log,
        log_level=args.log_level,
        trusted_proxies=tuple(args.trusted_proxy),
    )


def _load(args: argparse.Namespace) -> tuple[Config, Overrides]:
    overrides = _overrides(args)
    path = args.config
    if path is None and not overrides.upstreams and not environment_upstreams():
        raise ConfigError(
            "<flags>",
            "",
            "give a configuration file (-c FILE), at least one --upstream URL "
            "or STICKYPROXY_UPSTREAMS",
        )
    return load_config(path, overrides), overrides


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="stickyproxy",
        description="A reverse proxy built around sticky routing.",
    )
    parser.add_argument(
        "--version", action="version", version=f"stickyproxy {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy")
    _add_config_flags(run)
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--control-dir", default=None, help=argparse.SUPPRESS)

    check = commands.add_parser("check", help="validate a configuration and print it")
    _add_config_flags(check)
    _add_tool_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            config, _ = _load(args)
            sys.stdout.write(describe(config))
            return 0
        if args.command == "run":
            return _run(args)
        if args.command in ("demo", "bench"):
            return _run_tool(args)
    except ConfigError as exc:
        print(f"stickyproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


def _run(args: argparse.Namespace) -> int:
    config, overrides = _load(args)
    setup_logging(config.log.level)
    if config.workers > 1 and args.worker_index is None:
        return _supervise(config, sys.argv[1:] if args is not None else [])
    if args.worker_index is not None:
        _stop_with_supervisor()
    try:
        return run_worker(
            config, args.config, overrides, args.worker_index or 0, args.control_dir
        )
    except OSError as exc:
        # the configuration was checked, but files can change before they are used
        print(
            f"stickyproxy: cannot run: {_describe_os_error(config, exc)}",
            file=sys.stderr,
        )
        return 2


def _describe_os_error(config: Config, exc: OSError) -> str:
    """Say in one line which file or listener an error at start concerns."""
    tls = [listener for listener in config.listeners if listener.tls]
    if isinstance(exc, ssl.SSLError) and tls:
        listeners = ", ".join(
            f"{listener.address} ({listener.tls_cert}, {listener.tls_key})"
            for listener in tls
        )
        # an SSLError made outside OpenSSL has no reason
        reason = getattr(exc, "reason", None) or exc
        return f"TLS listener {listeners}: {reason}"
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _stop_with_supervisor() -> None:
    """Ask Linux to send this worker SIGTERM when its supervisor dies.

    A supervisor killed outright (the OOM killer, SIGKILL) cannot stop its workers,
    and orphaned workers would keep serving on the shared port unsupervised.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    set_parent_death_signal = 1  # PR_SET_PDEATHSIG
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(set_parent_death_signal, signal.SIGTERM)
    # the supervisor may have died before the request took effect
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(
    config: Config,
    config_path: str | None,
    overrides: Overrides,
    index: int = 0,
    control_dir: str | None = None,
) -> int:
    """Run one worker on uvloop until it is told to stop."""
    import uvloop

    from stickyproxy.server import serve

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config, config_path, overrides, index, control_dir))


#: a worker exiting with status 2 this soon after its start has a setup error
STARTUP_SECONDS = 5.0


def _supervise(config: Config, argv: list[str]) -> int:
    """Start the workers, restart one that dies, pass signals on, stop them all.

    The workers share a private control directory: their metric files, which one
    scrape adds up, and the sockets the admin listener reaches each of them on.
    """
    from prometheus_client.multiprocess import mark_process_dead

    from stickyproxy.metrics import METRICS_SUBDIR
    from stickyproxy.server import check_listeners_free

    # the workers bind with SO_REUSEPORT, which would share a port already in use
    check_listeners_free(config)
    control_dir = tempfile.mkdtemp(prefix="stickyproxy-")
    metrics_dir = os.path.join(control_dir, METRICS_SUBDIR)
    os.mkdir(metrics_dir)
    environ = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    unsigned = [
        name
        for name, group in config.groups.items()
        if group.policy == "cookie" and not group.cookie.secret
    ]
    if unsigned:
        # one secret for the whole family, so that every worker honours every pin
        environ["STICKYPROXY_COOKIE_SECRET"] = secrets.token_urlsafe(32)
        print(
            "stickyproxy: no cookie secret for "
            + ", ".join(unsigned)
            + "; the workers share a generated one, and pins will not survive "
            "a restart (set STICKYPROXY_COOKIE_SECRET)",
            file=sys.stderr,
        )
    command = [sys.executable, "-m", "stickyproxy", *argv, "--control-dir", control_dir]
    workers: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    stopping = False
    status = 0

    def spawn(index: int) -> None:
        started[index] = time.monotonic()
        workers[index] = subprocess.Popen(
            [*command, "--worker-index", str(index)], env=environ
        )

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for process in workers.values():
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for index in range(config.workers):
        spawn(index)

    while not stopping:
        time.sleep(0.2)
        for index, process in list(workers.items()):
            if process.poll() is not None and not stopping:
                code = process.returncode
                if code == 2 and time.monotonic() - started[index] < STARTUP_SECONDS:
                    # a worker that cannot start (it said why) would fail again
                    stopping, status = True, 2
                    forward(signal.SIGTERM, None)
                    break
                print(
                    f"stickyproxy: worker {index} exited ({code}); restarting",
                    file=sys.stderr,
                )
                # its live gauges (open connections) must stop counting
                mark_process_dead(process.pid, metrics_dir)  # type: ignore[no-untyped-call]
                time.sleep(0.5)
                spawn(index)
    deadline = time.monotonic() + config.timeouts.grace + 5
    for process in workers.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(control_dir, ignore_errors=True)
    return status


def _add_tool_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add the demo and the bench, which run the sample backend behind the proxy."""
    from stickyproxy.demo import DEFAULT_INSTANCES, DEFAULT_OPTION, OPTIONS

    redis_help = "Redis for the redis option (default: $REDIS_URL, else a private one)"
    demo = commands.add_parser(
        "demo", help="run the sample backend behind the proxy, as one option"
    )
    demo.add_argument(
        "--option",
        choices=tuple(OPTIONS),
        default=DEFAULT_OPTION,
        help=f"how the instances are run and balanced (default: {DEFAULT_OPTION})",
    )
    demo.add_argument(
        "--instances",
        type=_bounded(1, 64),
        default=DEFAULT_INSTANCES,
        help=f"backend instances (default: {DEFAULT_INSTANCES})",
    )
    demo.add_argument(
        "--port", type=_bounded(1, 65535), help="proxy port (default: 8080 if free)"
    )
    demo.add_argument(
        "--backend-port",
        type=_bounded(1, 65535),
        default=3000,
        help="first instance's port, if it and the next ones are free (default: 3000)",
    )
    demo.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help=redis_help
    )

    bench = commands.add_parser(
        "bench", help="drive simulated users through each option and compare them"
    )
    bench.add_argument(
        "--options",
        type=_option_list,
        default=None,
        help=f"comma-separated, in order (default: {','.join(OPTIONS)})",
    )
    bench.add_argument(
        "--users",
        type=_bounded(1, 1000),
        default=20,
        help="simulated users (default: 20)",
    )
    bench.add_argument(
        "--duration", type=_seconds, default=8.0, help="seconds per option (default: 8)"
    )
    bench.add_argument(
        "--profile",
        choices=("stable", "nat", "churn", "cookieless"),
        default="stable",
        help="how clients present themselves (default: stable)",
    )
    bench.add_argument(
        "--instances",
        type=_bounded(1, 16),
        default=3,
        help="backend instances per option, but single (default: 3)",
    )
    bench.add_argument(
        "--kill-one", action="store_true", help="kill one instance mid-run (by PID)"
    )
    bench.add_argument(
        "--json",
        metavar="FILE",
        default="stickyproxy-bench.json",
        help="one object per option (default: %(default)s; '' writes none)",
    )
    bench.add_argument(
        "--html",
        metavar="FILE",
        default="stickyproxy-bench.html",
        help="report with charts (default: %(default)s; '' writes none)",
    )
    bench.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help=redis_help
    )


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.5 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{value} is outside 0.5..3600 seconds")
    return value


def _option_list(text: str) -> tuple[str, ...]:
    from stickyproxy.demo import OPTIONS

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in OPTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected names among {', '.join(OPTIONS)}, got {text!r}"
        )
    return names


def _run_tool(args: argparse.Namespace) -> int:
    from stickyproxy.bench_stack import StackError

    try:
        if args.command == "demo":
            from stickyproxy.demo import run_demo

            return run_demo(
                args.option,
                args.instances,
                args.port,
                args.redis_url,
                backend_port=args.backend_port,
            )

        from stickyproxy.bench import BenchSettings, run_bench

        settings = BenchSettings(
            options=args.options,
            users=args.users,
            duration=args.duration,
            profile=args.profile,
            instances=args.instances,
            kill_one=args.kill_one,
            redis_url=args.redis_url,
        )
        return run_bench(settings, args.json, args.html)
    except StackError as exc:
        print(f"stickyproxy: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
