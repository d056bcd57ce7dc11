"""Logger names of the backend and the one function that sets logging up."""

from __future__ import annotations

import logging
import sys

#: Start-up, shutdown and unexpected failures of an instance.
SERVER = "backend.server"
#: Session store choice, session debug lines and store outages.
SESSION = "backend.session"
#: The launcher that runs and restarts instances.
LAUNCHER = "backend.launcher"

LEVELS = ("debug", "info", "warning", "error")


def setup_logging(ident: str, level: str = "info") -> None:
    """Send backend records to stderr as one plain line each, tagged with ident."""
    # ident is a checked instance id or a fixed word, so it holds no '%' to escape
    fmt = f"%(asctime)s {ident} %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("backend")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
