"""Run one backend instance: ``python -m backend.server --port 3000``.

REDIS_URL, SESSION_SECRET and INSTANCE_ID come from the environment; the
instance stops cleanly on SIGINT or SIGTERM and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from .app import make_app
from .config import DEFAULT_SESSION_TTL, Settings, settings_from_env, valid_instance_id
from .log import LEVELS, SERVER, setup_logging

logger = logging.getLogger(SERVER)


def port_number(text: str) -> int:
    """Parse a TCP port for argparse."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0..65535")
    return port


def instance_id(text: str) -> str:
    """Parse an instance id for argparse."""
    if not valid_instance_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    return text


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser of one instance."""
    parser = argparse.ArgumentParser(
        prog="python -m backend.server",
        description="Run one instance of the secure-api sample backend.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument("--port", type=port_number, default=3000, help="default: 3000")
    parser.add_argument(
        "--instance-id",
        type=instance_id,
        help="name sent in X-Instance-Id (default: $INSTANCE_ID or <hostname>-<port>)",
    )
    parser.add_argument(
        "--session-ttl",
        type=positive_int,
        default=DEFAULT_SESSION_TTL,
        help=f"idle session lifetime in seconds (default: {DEFAULT_SESSION_TTL})",
    )
    parser.add_argument("--log-level", choices=LEVELS, default="info")
    return parser


async def serve(settings: Settings) -> int:
    """Serve until SIGINT or SIGTERM; return the exit status."""
    runner = web.AppRunner(make_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            logger.error(
                "cannot listen on %s:%d: %s", settings.host, settings.port, exc
            )
            return 1

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        # the launcher and the tests wait for this line before sending requests
        for address in runner.addresses:
            host, port = address[0], address[1]
            shown = f"[{host}]" if ":" in host else host
            logger.info(
                "instance %s listening on http://%s:%d",
                settings.instance_id,
                shown,
                port,
            )
        await stop.wait()
        logger.info("instance %s stopping", settings.instance_id)
    finally:
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one instance from the command line."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_env(
            host=args.host,
            port=args.port,
            instance_id=args.instance_id,
            session_ttl=args.session_ttl,
        )
    except ValueError as exc:
        print(f"backend.server: error: {exc}", file=sys.stderr)
        return 2

    setup_logging(settings.instance_id, args.log_level)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
