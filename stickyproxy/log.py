"""Logger names, logging setup and the access log's two formats."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

ROOT_LOGGER = "stickyproxy"
ACCESS_LOGGER = "stickyproxy.access"
UPSTREAM_LOGGER = "stickyproxy.upstream"
SELECTION_LOGGER = "stickyproxy.selection"
CONFIG_LOGGER = "stickyproxy.config"
SERVER_LOGGER = "stickyproxy.server"
PROXY_LOGGER = "stickyproxy.proxy"
HEALTH_LOGGER = "stickyproxy.health"
AFFINITY_LOGGER = "stickyproxy.affinity"
ADMIN_LOGGER = "stickyproxy.admin"


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send stickyproxy's own (non-access) logs to stderr at the given level."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger(ROOT_LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # the access log has its own writer; keep it out of the diagnostic stream
    access = logging.getLogger(ACCESS_LOGGER)
    access.propagate = False


# as nginx does: quotes, backslashes and control bytes in logged request fields are
# written as \xHH, so that a crafted User-Agent cannot forge fields of the line
_ESCAPES = {
    code: f"\\x{code:02X}" for code in (*range(0x20), 0x22, 0x5C, *range(0x7F, 0x100))
}


def escape(text: str) -> str:
    """Return text safe to place between quotes in a combined-format line."""
    return text.translate(_ESCAPES)


class AccessLog:
    """Write one line per request, combined (nginx's default) or JSON."""

    def __init__(self, fmt: str, stream: TextIO) -> None:
        self.json = fmt == "json"
        self.stream = stream
        self._second = 0
        self._stamp = ""

    def _time(self, now: float) -> str:
        # formatting the date is the costly part; do it once a second
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
        return self._stamp

    def write(
        self,
        client: str,
        method: str,
        target: str,
        version: str,
        status: int,
        sent: int,
        referer: str,
        agent: str,
        upstream: str,
        duration: float,
        reason: str,
    ) -> None:
        """Write the line for one finished request."""
        now = time.time()
        if self.json:
            record = {
                "time": now,
                "client": client,
                "method": method,
                "target": target,
                "status": status,
                "bytes_sent": sent,
                "referer": referer,
                "user_agent": agent,
                "upstream": upstream,
                "duration_ms": round(duration * 1000, 3),
                "reason": reason,
            }
            line = json.dumps(record, separators=(",", ":"))
        else:
            line = (
                f'{client} - - [{self._time(now)}] "{escape(method)} {escape(target)} '
                f'HTTP/{version}" {status} {sent} "{escape(referer) or "-"}" '
                f'"{escape(agent) or "-"}" '
                f"upstream={upstream or '-'} rt={duration:.3f} sel={reason or '-'}"
            )
        self.stream.write(line + "\n")
