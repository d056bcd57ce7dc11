"""The launcher runs N instances, restarts one that dies and stops them all."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import entry_points

import pytest

from backend.__main__ import main
from backend.config import host_prefix
from tests.backend_support import Process, backend_env, free_ports
from tests.support import RedisServer

STARTED = re.compile(r"instance (\S+) pid (\d+) port (\d+)")


def health(port: int, attempts: int = 50) -> tuple[str, dict[str, object]]:
    """Return the X-Instance-Id and body of /health, retrying while it starts."""
    url = f"http://127.0.0.1:{port}/health"
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = json.loads(response.read())
                return response.headers["X-Instance-Id"], body
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer")


def alive(pid: int) -> bool:
    """Tell whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def started(launcher: Process, instance_id: str, not_pid: int = 0) -> int:
    """Wait for the launcher to report instance_id started, and return its pid."""

    def matches(line: str) -> bool:
        found = STARTED.search(line)
        return (
            found is not None
            and found.group(1) == instance_id
            and int(found.group(2)) != not_pid
        )

    found = STARTED.search(launcher.wait_for(matches))
    assert found is not None
    return int(found.group(2))


def test_launcher_runs_restarts_and_stops_instances(redis: RedisServer) -> None:
    first = free_ports(3)
    env = backend_env({"REDIS_URL": redis.url, "SESSION_SECRET": "launcher-test"})
    command = [
        sys.executable, "-m", "backend",
        "--instances", "3",
        "--port", str(first),
        "--id-prefix", "node",
        "--grace", "5",
    ]  # fmt: skip
    pids: dict[str, int] = {}
    with Process(command, env) as launcher:
        try:
            for index in range(3):
                pids[f"node-{index}"] = started(launcher, f"node-{index}")
            answers = [health(first + index) for index in range(3)]

            # a crashed instance comes back on its port under a new pid
            crashed = pids["node-1"]
            os.kill(crashed, signal.SIGKILL)
            pids["node-1"] = started(launcher, "node-1", not_pid=crashed)
            after_crash = health(first + 1)

            launcher.signal(signal.SIGTERM)
            status = launcher.process.wait(timeout=20)
        finally:
            # never leave an instance behind, even when an assertion failed
            for pid in pids.values():
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        output = launcher.output

    assert [instance for instance, _ in answers] == ["node-0", "node-1", "node-2"]
    assert all(body["store"] == "redis" for _, body in answers)
    assert output.count("[SESSION] Using Redis session store") == 4
    assert f"instance node-1 pid {crashed} exited with status -9" in output
    assert after_crash[0] == "node-1"
    assert status == 0
    assert "all instances stopped" in output
    assert not any(alive(pid) for pid in pids.values())
    assert "launcher-test" not in output
    assert "Traceback" not in output


def test_launcher_stops_on_interrupt() -> None:
    first = free_ports(1)
    command = [
        sys.executable,
        "-m",
        "backend",
        "--instances",
        "1",
        "--port",
        str(first),
    ]
    with Process(command, backend_env()) as launcher:
        pid = 0
        try:
            pid = started(launcher, f"{host_prefix()}-0")
            instance_id, body = health(first)

            launcher.signal(signal.SIGINT)
            status = launcher.process.wait(timeout=20)
        finally:
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        output = launcher.output

    assert status == 0
    assert instance_id == f"{host_prefix()}-0"
    assert body["store"] == "memory"
    assert not alive(pid)
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--instances", "0"], "must be at least 1"),
        (["--instances", "many"], "is not a whole number"),
        (["--instances", "65"], "is more than 64"),
        (["--port", "70000"], "is outside 0..65535"),
        (["--port", "0"], "do not fit"),
        (["--instances", "4", "--port", "65534"], "do not fit"),
        (["--id-prefix", "bad id"], "use 1-60 letters"),
        (["--grace", "0"], "is outside (0, 300]"),
        (["--log-level", "loud"], "invalid choice"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_launcher_rejects_bad_arguments(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)

    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert complaint in err
    assert "Traceback" not in err


def test_console_script_runs_the_launcher() -> None:
    scripts = entry_points(group="console_scripts", name="stickyproxy-backend")

    assert [script.load() for script in scripts] == [main]
