"""Smoke test of the throughput benchmark: one short run of every part, real servers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MISSING = [tool for tool in ("nginx", "haproxy", "wrk") if shutil.which(tool) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed"
)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the benchmark once with one-second runs and read its JSON."""
    output = tmp_path_factory.mktemp("bench") / "throughput.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.throughput",
            "--quick",
            "--duration=1",
            "--warmup=0",
            "--repeat=1",
            "--connections=50",
            "--policies=round_robin",
            "--idle-connections=100",
            f"--output={output}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    loaded: dict[str, Any] = json.loads(output.read_text())
    return loaded


def test_every_proxy_answers_under_load(result: dict[str, Any]) -> None:
    cell = result["summary"]["round_robin"]["50"]
    for proxy in ("nginx", "haproxy", "stickyproxy"):
        numbers = cell[proxy]
        assert numbers["requests"] > 0
        assert numbers["errors"] == 0
        assert numbers["requests_per_second"] > 0
        assert 0 < numbers["p50_ms"] <= numbers["p99_ms"]
        assert numbers["cpu_us_per_request"] > 0
        assert numbers["rss_peak_kib"] > 0
    assert cell["stickyproxy_to_nginx"]["cpu_us_per_request"] > 0


def test_idle_connections_are_held_and_measured(result: dict[str, Any]) -> None:
    for proxy, memory in result["idle_memory"]["round_robin"].items():
        assert memory["connections"] == 100, proxy
        assert memory["held_kib"] > 0


def test_workers_and_selection_are_reported(result: dict[str, Any]) -> None:
    assert result["workers"]["two_to_one"]["50"] > 0
    for size in ("4", "100", "1000"):
        assert result["selection_us"]["policy round_robin"][size] > 0
        assert result["selection_us"]["policy cookie"][size] > 0
    assert result["targets"]
    assert all(isinstance(target["met"], bool) for target in result["targets"])
