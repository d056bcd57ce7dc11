"""The docker-compose stack: docker-compose accepts it, and everything it uses ships.

The YAML files are read with the YAML library docker-compose itself runs on (it is a
Python program on Debian), or as JSON from a docker-compose that can print it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from stickyproxy.config import load_config
from stickyproxy.metrics import Metrics, SnapshotCollector, WorkerSnapshot
from tests.support import repo_root

COMPOSE = shutil.which("docker-compose")

pytestmark = pytest.mark.skipif(COMPOSE is None, reason="docker-compose is missing")

ROOT = repo_root()

#: the variables the stack refuses to start without
SECRETS = {"ADMIN_TOKEN": "compose-test-token", "SESSION_SECRET": "compose-test"}


def compose(
    *args: str, secrets: dict[str, str] = SECRETS
) -> subprocess.CompletedProcess[str]:
    """Run docker-compose on the repository's file, with only the given secrets set."""
    assert COMPOSE is not None
    environ = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [COMPOSE, "--project-directory", str(ROOT), "-f", "docker-compose.yml", *args],
        cwd=ROOT,
        env={**environ, **secrets},
        capture_output=True,
        text=True,
        timeout=60,
    )


@cache
def yaml_python() -> str | None:
    """Return the Python that runs docker-compose, if it is a Python program."""
    assert COMPOSE is not None
    first = Path(COMPOSE).read_bytes()[:200].split(b"\n", 1)[0]
    if first.startswith(b"#!") and b"python" in first:
        return first[2:].decode().split()[0]
    return None


def load_yaml(text: str) -> Any:
    """Parse YAML with the library docker-compose runs on."""
    python = yaml_python()
    if python is None:
        pytest.skip("this docker-compose is not a Python program with a YAML parser")
    script = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    result = subprocess.run(
        [python, "-c", script], input=text, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@cache
def normalized() -> dict[str, Any]:
    """Return the compose file as docker-compose resolves it (absolute paths)."""
    if yaml_python() is None:
        result = compose("config", "--format", "json")
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))
    result = compose("config")
    assert result.returncode == 0, result.stderr
    return dict(load_yaml(result.stdout))


@cache
def tracked() -> frozenset[str]:
    """Return the paths git tracks or is about to (staged), relative to the root."""
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return frozenset(result.stdout.split())


def assert_shipped(path: Path) -> None:
    """Assert that path is a file or folder of the repository, with content."""
    relative = path.resolve().relative_to(ROOT).as_posix()
    if path.is_dir():
        prefix = "" if relative == "." else relative + "/"
        assert any(p.startswith(prefix) for p in tracked()), f"{relative} is empty"
    else:
        assert relative in tracked(), f"{relative} is not in the repository"


def test_docker_compose_accepts_the_file() -> None:
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr
    services = set(compose("config", "--services").stdout.split())
    assert services == {"redis", "backend", "stickyproxy", "prometheus", "grafana"}


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_the_stack_refuses_to_start_without_its_secrets(missing: str) -> None:
    secrets = {k: v for k, v in SECRETS.items() if k != missing}
    result = compose("config", "-q", secrets=secrets)
    assert result.returncode != 0
    assert missing in result.stderr


def test_everything_mounted_or_built_is_in_the_repository() -> None:
    services = normalized()["services"]
    builds = 0
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = Path(build["context"] if isinstance(build, dict) else build)
            assert context.resolve() == ROOT, name
            dockerfile = context / (
                build.get("dockerfile", "Dockerfile")
                if isinstance(build, dict)
                else "Dockerfile"
            )
            assert_shipped(dockerfile)
            builds += 1
        for volume in service.get("volumes", []):
            source = (
                volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            )
            kind = volume.get("type", "bind") if isinstance(volume, dict) else "bind"
            if kind == "bind":
                assert Path(source).is_absolute(), (name, source)
                assert_shipped(Path(source))
        # published ports stay on the host's loopback
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port
            assert str(host_ip).startswith("127.0.0.1"), (name, port)
    assert builds == 2

    copied = re.findall(
        r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), re.M
    )
    assert copied
    for sources in copied:
        for source in sources.split():
            assert_shipped(ROOT / source)


def test_prometheus_scrapes_the_proxys_admin_listener_with_the_token() -> None:
    prometheus = load_yaml((ROOT / "config/prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, _, port = target.partition(":")

    services = normalized()["services"]
    assert host in services
    with (ROOT / "config/compose.toml").open("rb") as file:
        admin = tomllib.load(file)["admin"]["address"]
    assert admin == f"0.0.0.0:{port}"
    assert job["metrics_path"] == "/metrics"

    # the token file Prometheus reads is the one its entrypoint writes
    credentials = job["authorization"]["credentials_file"]
    assert credentials in " ".join(services["prometheus"]["command"])


def exported_names() -> set[str]:
    """Return every sample name a scrape of stickyproxy can contain."""
    snapshot: WorkerSnapshot = {
        "index": 0,
        "pid": 1,
        "requests": 0,
        "groups": [
            {
                "name": "app",
                "policy": "learn",
                "sticky": True,
                "drift": 0,
                "redis": {"connected": True, "errors": 0, "latency": 0.001},
                "upstreams": [
                    {
                        "name": "a:1",
                        "id": "a",
                        "state": "up",
                        "admin_state": "up",
                        "healthy": True,
                        "backup": False,
                        "weight": 1,
                        "active": 0,
                        "requests": 0,
                        "pinned": 0,
                    }
                ],
            }
        ],
    }
    families = [
        *Metrics().registry.collect(),
        *SnapshotCollector([snapshot]).collect(),
    ]
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
    }
    return {
        family.name + suffix for family in families for suffix in suffixes[family.type]
    }


def test_the_dashboard_queries_only_what_stickyproxy_exports() -> None:
    dashboard = json.loads(
        (ROOT / "config/grafana/dashboards/stickyproxy.json").read_text()
    )
    expressions = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(expressions) >= 20
    used = {
        name for expr in expressions for name in re.findall(r"stickyproxy_\w+", expr)
    }
    assert used <= exported_names(), used - exported_names()
    # the themes the dashboard is for
    for name in (
        "stickyproxy_requests_total",
        "stickyproxy_upstream_response_seconds_bucket",
        "stickyproxy_upstream_state",
        "stickyproxy_pinned_sessions",
        "stickyproxy_repins_total",
        "stickyproxy_session_drift_total",
        "stickyproxy_redis_connected",
    ):
        assert name in used

    datasources = load_yaml(
        (ROOT / "config/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (datasource,) = datasources["datasources"]
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {datasource["uid"]}
    assert datasource["url"] == "http://prometheus:9090"

    providers = load_yaml(
        (ROOT / "config/grafana/provisioning/dashboards/stickyproxy.yml").read_text()
    )
    grafana = normalized()["services"]["grafana"]
    mounted = {
        (v["target"] if isinstance(v, dict) else v.split(":")[1])
        for v in grafana["volumes"]
    }
    assert providers["providers"][0]["options"]["path"] in mounted


def test_the_compose_configuration_takes_its_token_from_the_environment() -> None:
    config = load_config(
        ROOT / "config/compose.toml", environ={"STICKYPROXY_ADMIN_TOKEN": "x"}
    )
    assert config.admin.token == "x"
    assert config.groups["app"].policy == "learn"
