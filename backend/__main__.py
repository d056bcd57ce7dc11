"""Command line of the launcher: ``python -m backend --instances 4 --port 3000``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import DEFAULT_SESSION_TTL, host_prefix, valid_instance_id
from .launcher import Launcher
from .log import LEVELS, setup_logging
from .server import port_number, positive_int

#: Most instances one launcher runs.
MAX_INSTANCES = 64


def _instance_count(text: str) -> int:
    count = positive_int(text)
    if count > MAX_INSTANCES:
        raise argparse.ArgumentTypeError(f"{count} is more than {MAX_INSTANCES}")
    return count


def _id_prefix(text: str) -> str:
    # the prefix gets '-<index>' appended, and the whole must stay a valid id
    if len(text) > 60 or not valid_instance_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use 1-60 letters, digits, '.', '_' or '-'"
        )
    return text


def _grace(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 300:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 300] seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the launcher's command line parser."""
    parser = argparse.ArgumentParser(
        prog="stickyproxy-backend",
        description=(
            "Run N instances of the secure-api sample backend on consecutive ports. "
            "Without REDIS_URL each keeps sessions in its own memory, so more than "
            "one instance behind a round-robin balancer shows session drift."
        ),
    )
    parser.add_argument(
        "--instances", type=_instance_count, default=1, help="default: 1"
    )
    parser.add_argument(
        "--port", type=port_number, default=3000, help="first port (default: 3000)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument(
        "--id-prefix",
        type=_id_prefix,
        help="instance ids are <prefix>-<index> (default: the host name)",
    )
    parser.add_argument(
        "--session-ttl",
        type=positive_int,
        default=DEFAULT_SESSION_TTL,
        help=f"idle session lifetime in seconds (default: {DEFAULT_SESSION_TTL})",
    )
    parser.add_argument(
        "--grace",
        type=_grace,
        default=5.0,
        help="seconds instances get to stop before they are killed (default: 5)",
    )
    parser.add_argument("--log-level", choices=LEVELS, default="info")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher from the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port == 0 or args.port + args.instances - 1 > 65535:
        parser.error(f"ports {args.port}..{args.port + args.instances - 1} do not fit")

    setup_logging("launcher", args.log_level)
    launcher = Launcher(
        host=args.host,
        port=args.port,
        count=args.instances,
        id_prefix=args.id_prefix or host_prefix(),
        session_ttl=args.session_ttl,
        log_level=args.log_level,
        grace=args.grace,
    )
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
