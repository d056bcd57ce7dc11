"""Run several backend instances as processes, restart those that die, stop them all.

Each instance is ``python -m backend.server`` on its own port; the environment
(REDIS_URL, SESSION_SECRET) passes through unchanged, so all instances share a
store only when REDIS_URL names a reachable Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from .log import LAUNCHER

logger = logging.getLogger(LAUNCHER)

#: Seconds between looks at the instances.
POLL_INTERVAL = 0.2
#: First and longest wait before restarting an instance that exited.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
#: An instance that ran this long before exiting restarts after the first delay.
STABLE_AFTER = 10.0


@dataclass(slots=True)
class Instance:
    """One instance the launcher owns: its name, port and current process."""

    instance_id: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    failures: int = 0


class Launcher:
    """Keep instances on consecutive ports running until asked to stop."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        count: int,
        id_prefix: str,
        session_ttl: int,
        log_level: str,
        grace: float,
    ) -> None:
        self.host = host
        self.session_ttl = session_ttl
        self.log_level = log_level
        self.grace = grace
        self.instances = [
            Instance(f"{id_prefix}-{index}", port + index) for index in range(count)
        ]
        self._stopping = False

    def _command(self, instance: Instance) -> list[str]:
        return [
            sys.executable,
            "-m",
            "backend.server",
            "--host", self.host,
            "--port", str(instance.port),
            "--instance-id", instance.instance_id,
            "--session-ttl", str(self.session_ttl),
            "--log-level", self.log_level,
        ]  # fmt: skip

    def _start(self, instance: Instance) -> None:
        """Start the instance's process and say which pid serves which port."""
        try:
            process = subprocess.Popen(
                self._command(instance), stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            # counts as a crash: the next attempt waits longer
            logger.error("instance %s could not start: %s", instance.instance_id, exc)
            self._schedule_restart(instance, time.monotonic())
            return

        instance.process = process
        instance.started_at = time.monotonic()
        logger.info(
            "instance %s pid %d port %d",
            instance.instance_id,
            process.pid,
            instance.port,
        )

    def _schedule_restart(self, instance: Instance, now: float) -> float:
        """Set when an exited instance starts again, doubling the wait each time."""
        if instance.started_at and now - instance.started_at >= STABLE_AFTER:
            instance.failures = 0
        instance.failures += 1
        doubling = 2.0 ** min(instance.failures - 1, 16)
        delay = min(RESTART_DELAY * doubling, MAX_RESTART_DELAY)
        instance.restart_at = now + delay
        instance.process = None
        return delay

    def _check(self, instance: Instance, now: float) -> None:
        """Notice an exited instance, or restart one whose wait is over."""
        process = instance.process
        if process is None:
            if now >= instance.restart_at:
                self._start(instance)
            return

        status = process.poll()
        if status is None:
            return
        delay = self._schedule_restart(instance, now)
        logger.warning(
            "instance %s pid %d exited with status %d; restarting in %.1fs",
            instance.instance_id,
            process.pid,
            status,
            delay,
        )

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # only set a flag: the loop notices it within one poll interval
        self._stopping = True

    def run(self) -> int:
        """Run until SIGINT or SIGTERM, then stop every instance; return 0."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

        logger.info(
            "launcher pid %d starting %d instance(s) on %s ports %d..%d",
            os.getpid(),
            len(self.instances),
            self.host,
            self.instances[0].port,
            self.instances[-1].port,
        )
        for instance in self.instances:
            self._start(instance)

        while not self._stopping:
            time.sleep(POLL_INTERVAL)
            now = time.monotonic()
            for instance in self.instances:
                if self._stopping:
                    break
                self._check(instance, now)

        self.stop_all()
        return 0

    def stop_all(self) -> None:
        """Terminate every instance, and kill those still running after the grace."""
        logger.info("stopping %d instance(s)", len(self.instances))
        running = [i for i in self.instances if i.process is not None]
        for instance in running:
            assert instance.process is not None
            if instance.process.poll() is None:
                instance.process.terminate()

        deadline = time.monotonic() + self.grace
        for instance in running:
            assert instance.process is not None
            try:
                instance.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "instance %s pid %d ignored SIGTERM for %.1fs; killing it",
                    instance.instance_id,
                    instance.process.pid,
                    self.grace,
                )
                instance.process.kill()
                instance.process.wait()
            instance.process = None
        logger.info("all instances stopped")
