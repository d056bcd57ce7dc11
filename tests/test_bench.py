"""The bench tells the options apart: short runs of the real backend and proxy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stickyproxy.bench import BenchSettings, bench
from stickyproxy.bench_results import OptionResult
from stickyproxy.bench_users import NAT_SHARES, nat_address, stable_address
from tests.support import repo_root

FIELDS = {
    "drift_sessions",
    "unauthorized_after_login",
    "ghost_files",
    "requests",
    "errors",
    "rps",
    "p50_ms",
    "p99_ms",
    "max_over_mean",
}


def by_option(results: list[OptionResult]) -> dict[str, OptionResult]:
    """Index results by option name."""
    return {result.option: result for result in results}


def test_stable_clients_drift_only_behind_plain_round_robin(tmp_path: Path) -> None:
    options = ["round_robin", "redis", "single", "ip_hash", "cookie", "learn"]
    if shutil.which("redis-server") is None:
        options.remove("redis")
    json_path, html_path = tmp_path / "bench.json", tmp_path / "bench.html"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = subprocess.run(
        [
            sys.executable, "-m", "stickyproxy", "bench",
            "--options", ",".join(options),
            "--users", "8",
            "--duration", "2",
            "--instances", "3",
            "--json", str(json_path),
            "--html", str(html_path),
        ],
        cwd=repo_root(),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    # one progress line per option, then the table with a row per option
    done = [line for line in result.stderr.splitlines() if " requests, drift " in line]
    assert len(done) == len(options)
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["option", "sessions", "drift", "401"]
    assert [row.split()[0] for row in rows[2:]] == options

    document = json.loads(json_path.read_text())
    assert [item["option"] for item in document] == options
    for item in document:
        assert set(item) >= FIELDS, item
        assert item["requests"] > 50 and item["errors"] == 0, item
    results = {item["option"]: item for item in document}

    broken = results["round_robin"]
    assert broken["drift_sessions"] > 0
    assert broken["unauthorized_after_login"] + broken["ghost_files"] > 0
    for name in set(options) - {"round_robin"}:
        fixed = results[name]
        assert fixed["drift_sessions"] == 0, fixed
        assert fixed["unauthorized_after_login"] == 0, fixed
    if "redis" in results:
        # requests spread over the instances without drifting: one shared store
        assert results["redis"]["spread_sessions"] > 0
        assert results["redis"]["ghost_files"] == 0

    page = html_path.read_text()
    assert page.count("<svg") >= 2 + len(options)
    assert "<script" not in page
    # nothing to fetch: the only URL is the SVG namespace
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {
        "http://www.w3.org/2000/svg"
    }


def test_ip_hash_drifts_when_addresses_change_while_cookie_does_not() -> None:
    settings = BenchSettings(
        options=("ip_hash", "cookie"), users=8, duration=2, profile="churn"
    )
    results = by_option(bench(settings))
    hashed, pinned = results["ip_hash"], results["cookie"]
    assert hashed.drift_sessions > 0 and hashed.unauthorized_after_login > 0, hashed
    assert pinned.drift_sessions == pinned.unauthorized_after_login == 0, pinned
    assert pinned.errors == 0, pinned


def test_ip_hash_is_skewed_behind_nat_while_cookie_spreads_users() -> None:
    settings = BenchSettings(
        options=("ip_hash", "cookie"), users=10, duration=2, profile="nat"
    )
    results = by_option(bench(settings))
    skewed, spread = results["ip_hash"], results["cookie"]
    # seven users share the first /24: ip_hash sends them all to one instance
    assert skewed.max_over_mean >= 1.6, skewed.per_instance
    assert skewed.max_over_mean >= spread.max_over_mean + 0.4, spread.per_instance
    assert skewed.drift_sessions == spread.drift_sessions == 0, results


def test_cookieless_clients_lose_cookie_affinity_but_not_learned_sessions() -> None:
    settings = BenchSettings(
        options=("cookie", "learn"), users=8, duration=2, profile="cookieless"
    )
    results = by_option(bench(settings))
    cookie, learn = results["cookie"], results["learn"]
    assert cookie.drift_sessions > 0 and cookie.unauthorized_after_login > 0, cookie
    assert learn.drift_sessions == learn.unauthorized_after_login == 0, learn


def test_killed_instance_users_are_repinned_and_served() -> None:
    users = 10
    settings = BenchSettings(
        options=("cookie", "learn"), users=users, duration=4, kill_one=True
    )
    for result in bench(settings):
        assert result.killed in result.per_instance, result
        assert result.repinned_sessions, result
        # only requests caught in flight by the kill may fail
        assert result.failover_errors is not None, result
        assert result.failover_errors <= users, result
        assert result.errors == result.failover_errors, result
        assert result.served_after_kill is not None
        assert result.served_after_kill > 20 * users, result


@pytest.mark.parametrize("users", [1, 10, 20, 300])
def test_nat_networks_hold_their_shares_and_stable_users_their_own(users: int) -> None:
    networks = [nat_address(index, users).rsplit(".", 1)[0] for index in range(users)]
    counts = [networks.count(f"198.18.{n}") for n in range(len(NAT_SHARES))]
    assert sum(counts) == users
    assert counts[0] >= users * NAT_SHARES[0] - 1

    own = {stable_address(index).rsplit(".", 1)[0] for index in range(users)}
    assert len(own) == users
