"""The command line as a user runs it: check, quick mode, signals, reload, workers."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from stickyproxy.cli import main
from tests.proxy_support import aiohttp_upstream
from tests.support import free_port, repo_root, wait_for_port
from tests.test_config import make_certificate, needs_openssl

STICKYPROXY = [sys.executable, "-m", "stickyproxy"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command line to completion and capture its output."""
    return subprocess.run(
        [*STICKYPROXY, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo_root(),
    )


def test_check_accepts_the_shipped_configuration() -> None:
    result = run_cli("check", "-c", "config/stickyproxy.toml")
    assert result.returncode == 0, result.stderr
    assert 'policy = "cookie"' in result.stdout
    assert 'url = "http://127.0.0.1:3003"' in result.stdout


def test_check_refuses_a_broken_file_naming_file_key_and_expectation(
    tmp_path: Path,
) -> None:
    cases = {
        "[groups.app]\n[[groups.app.servers]]\nurl = 'http://a:1'\nweight = 0\n": (
            "groups.app.servers[0].weight",
            "expected an integer >= 1",
        ),
        "[groups.app]\npolicy = 'sticky'\n[[groups.app.servers]]\nurl = 'http://a'\n": (
            "groups.app.policy",
            "expected one of",
        ),
        "[groups.app]\n[[groups.app.servers]]\nurl = 'ftp://a'\n": (
            "groups.app.servers[0].url",
            "expected http://host:port",
        ),
        "[timeouts]\nconect = 3\n": ("timeouts.conect", "unknown key"),
        "[groups.app\n": ("", "is not valid TOML"),
    }
    for text, (key, expected) in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text('[[listeners]]\naddress = "127.0.0.1:8080"\n' + text)
        result = run_cli("check", "-c", str(path))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        message = result.stderr.strip()
        assert len(message.splitlines()) == 1
        assert str(path) in message and key in message and expected in message, message


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = run_cli("check", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("missing.toml: no such file")
    result = run_cli("run")
    assert result.returncode == 2 and "--upstream" in result.stderr
    result = run_cli("run", "--upstream", "http://127.0.0.1:1", "--listen", "nowhere")
    assert result.returncode == 2 and "--listen: expected host:port" in result.stderr
    assert "Traceback" not in result.stderr


def name_app(name: str, delay: float = 0.0) -> web.Application:
    """An upstream that answers with its name, optionally after a delay."""

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", delay)))
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return app


@contextmanager
def proxy_process(*args: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``stickyproxy run`` in a child process; stop it by PID afterwards."""
    process = subprocess.Popen(
        [*STICKYPROXY, "run", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=repo_root(),
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


@asynccontextmanager
async def two_upstreams() -> AsyncIterator[list[str]]:
    async with (
        aiohttp_upstream(name_app("A")) as (a, _),
        aiohttp_upstream(name_app("B")) as (
            b,
            _,
        ),
    ):
        yield [a, b]


async def wait_port(port: int) -> None:
    await asyncio.get_running_loop().run_in_executor(None, wait_for_port, port)


async def test_quick_mode_round_robins_over_two_upstreams() -> None:
    port = free_port()
    async with two_upstreams() as (a, b):
        with proxy_process(
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            a,
            "--upstream",
            b,
            "--policy",
            "round_robin",
            "--admin",
            "",
        ):
            await wait_port(port)
            async with aiohttp.ClientSession() as session:
                names = []
                for _ in range(6):
                    async with session.get(f"http://127.0.0.1:{port}/") as response:
                        names.append(await response.text())
    assert sorted(names) == ["A"] * 3 + ["B"] * 3
    assert names[0] != names[1]


async def test_sigterm_lets_in_flight_requests_finish_then_exits_zero() -> None:
    port = free_port()
    async with two_upstreams() as (a, _):
        with proxy_process(
            "--listen", f"127.0.0.1:{port}", "--upstream", a, "--admin", ""
        ) as proc:
            await wait_port(port)
            async with aiohttp.ClientSession() as session:
                slow = asyncio.ensure_future(
                    session.get(f"http://127.0.0.1:{port}/?delay=1.0")
                )
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                response = await slow
                assert response.status == 200
                assert await response.text() == "A"
                response.release()
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
    assert code == 0


async def test_sighup_applies_a_new_file_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    port = free_port()
    path = tmp_path / "proxy.toml"

    def write(url: str, broken: bool = False) -> None:
        weight = 0 if broken else 1
        path.write_text(
            f'[[listeners]]\naddress = "127.0.0.1:{port}"\n[admin]\naddress = ""\n'
            f'[groups.app]\n[[groups.app.servers]]\nurl = "{url}"\nweight = {weight}\n'
        )

    async with two_upstreams() as (a, b):
        write(a)
        with proxy_process("-c", str(path)) as proc:
            await wait_port(port)
            async with aiohttp.ClientSession() as session:

                async def name() -> str:
                    async with session.get(f"http://127.0.0.1:{port}/") as response:
                        return await response.text()

                assert await name() == "A"
                write(b)
                proc.send_signal(signal.SIGHUP)
                for _ in range(50):
                    if await name() == "B":
                        break
                    await asyncio.sleep(0.1)
                assert await name() == "B"

                write(a, broken=True)
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.5)
                assert await name() == "B"
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=15)
    assert "reload refused" in stderr and "weight" in stderr


async def test_workers_share_one_port() -> None:
    port = free_port()
    async with two_upstreams() as (a, _):
        with proxy_process(
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            a,
            "--workers",
            "2",
            "--admin",
            "",
        ) as proc:
            await wait_port(port)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            for _ in range(50):
                if len(children.read_text().split()) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(children.read_text().split()) == 2
            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    # a fresh connection each time so both workers' sockets are used
                    async with session.get(
                        f"http://127.0.0.1:{port}/", headers={"Connection": "close"}
                    ) as response:
                        assert await response.text() == "A"
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
    assert code == 0
    for pid in children.read_text().split() if children.exists() else []:
        assert not Path(f"/proc/{pid}").exists()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {**os.environ, "STICKYPROXY_POLICY": "least_conn", "STICKYPROXY_WORKERS": "3"}
    result = subprocess.run(
        [*STICKYPROXY, "check", "-c", "config/stickyproxy.toml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo_root(),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert 'policy = "least_conn"' in result.stdout and "workers = 3" in result.stdout
    env["STICKYPROXY_WORKERS"] = "many"
    result = subprocess.run(
        [*STICKYPROXY, "check", "-c", "config/stickyproxy.toml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo_root(),
        env=env,
    )
    assert result.returncode == 2 and "STICKYPROXY_WORKERS" in result.stderr


async def test_workers_share_a_generated_cookie_secret(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "cookie.toml"
    async with two_upstreams() as (a, b):
        path.write_text(
            "[server]\nworkers = 2\nexplain_headers = true\n"
            f'[[listeners]]\naddress = "127.0.0.1:{port}"\n'
            '[admin]\naddress = ""\n[log]\naccess = "off"\n'
            f'[groups.app]\npolicy = "cookie"\n[[groups.app.servers]]\nurl = "{a}"\n'
            f'[[groups.app.servers]]\nurl = "{b}"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "STICKYPROXY_COOKIE_SECRET"}
        process = subprocess.Popen(
            [*STICKYPROXY, "run", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=repo_root(),
            env=env,
        )
        try:
            await wait_port(port)
            await asyncio.sleep(0.5)  # both workers listening
            url = f"http://127.0.0.1:{port}/"
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as response:
                    pinned_to = await response.text()
                    cookie = response.cookies["stickyproxy"].value
                reasons = set()
                for _ in range(20):
                    # a new connection each time, so both workers see the cookie
                    async with session.get(
                        url,
                        headers={
                            "Connection": "close",
                            "Cookie": f"stickyproxy={cookie}",
                        },
                    ) as response:
                        assert await response.text() == pinned_to
                        reasons.add(response.headers["X-Stickyproxy-Reason"])
            assert reasons == {"pinned"}
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20)
    assert "workers share a generated one" in stderr


# configuration errors: one line on stderr, exit 2, never a traceback


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Return the single line a refused configuration prints; check the exit."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("check", b"# \xff\n@LISTENER@@GROUP@", "is not valid UTF-8"),
        (
            "check",
            b"@LISTENER@[groups.app]\n[[groups.app.servers]]\nurl = 'http://[::1'\n",
            "groups.app.servers[0].url: expected http://host:port",
        ),
        (
            "check",
            b"[timeouts]\nclient_header = nan\n@LISTENER@@GROUP@",
            "timeouts.client_header: expected a finite number",
        ),
        (
            "check",
            b"[server]\nworkers = 100000\n@LISTENER@@GROUP@",
            "server.workers: expected an integer <=",
        ),
        (
            "run",
            b"@LISTENER@[groups.app]\npolicy = 'learn'\n[groups.app.learn]\n"
            b"redis_url = 'redis://127.0.0.1:99999'\n"
            b"[[groups.app.servers]]\nurl = 'http://h'\n",
            "groups.app.learn.redis_url: expected a port from 1 to 65535",
        ),
        (
            "run",
            b"[log]\naccess_path = '/nonexistent/a.log'\n@LISTENER@@GROUP@",
            "log.access_path: expected an existing folder",
        ),
        (
            "run",
            b"@LISTENER@tls_cert = '/nonexistent.pem'\ntls_key = '/nonexistent.key'\n"
            b"@GROUP@",
            "listeners[0].tls_cert: cannot read '/nonexistent.pem'",
        ),
    ],
)
def test_a_refused_configuration_is_one_line_and_exit_2(
    tmp_path: Path, command: str, text: bytes, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    # the admin listener stays off, in case a run were wrongly accepted
    listener = (
        f'[admin]\naddress = ""\n[[listeners]]\naddress = "127.0.0.1:{free_port()}"\n'
    )
    group = "[groups.app]\n[[groups.app.servers]]\nurl = 'http://h'\n"
    path.write_bytes(
        text.replace(b"@LISTENER@", listener.encode()).replace(
            b"@GROUP@", group.encode()
        )
    )
    line = one_line_error(run_cli(command, "-c", str(path)))
    assert line.startswith(f"stickyproxy: {path}: ")
    assert expected in line, line


def test_upstreams_from_the_environment_need_no_file() -> None:
    result = subprocess.run(
        [*STICKYPROXY, "check", "--listen", "127.0.0.1:8080"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo_root(),
        env={**os.environ, "STICKYPROXY_UPSTREAMS": "http://127.0.0.1:3000"},
    )
    assert result.returncode == 0, result.stderr
    assert 'url = "http://127.0.0.1:3000"' in result.stdout


def test_listener_and_admin_may_both_take_any_free_port(tmp_path: Path) -> None:
    path = tmp_path / "any.toml"
    path.write_text(
        '[[listeners]]\naddress = "127.0.0.1:0"\n[admin]\naddress = "127.0.0.1:0"\n'
        "[groups.app]\n[[groups.app.servers]]\nurl = 'http://h'\n"
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr


@needs_openssl
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ssl.SSLError(9, "[SSL] PEM lib"),
            "stickyproxy: cannot run: TLS listener 127.0.0.1:8443 ({cert}, {key}):",
        ),
        (
            PermissionError(13, "Permission denied", "/var/log/a.log"),
            "stickyproxy: cannot run: /var/log/a.log: Permission denied",
        ),
    ],
)
def test_an_error_as_the_worker_starts_is_one_line_and_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: OSError,
    expected: str,
) -> None:
    # files checked at load can still change before the worker opens them
    def failing(*args: object) -> int:
        raise error

    monkeypatch.setattr("stickyproxy.cli.run_worker", failing)
    monkeypatch.setattr("stickyproxy.cli.setup_logging", lambda level: None)
    cert, key = make_certificate(tmp_path)
    path = tmp_path / "tls.toml"
    path.write_text(
        '[[listeners]]\naddress = "127.0.0.1:8443"\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n[admin]\naddress = ""\n'
        "[groups.app]\n[[groups.app.servers]]\nurl = 'http://h'\n"
    )
    assert main(["run", "-c", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected.format(cert=cert, key=key)), lines


async def test_sighup_with_a_file_that_does_not_parse_keeps_serving(
    tmp_path: Path,
) -> None:
    port = free_port()
    path = tmp_path / "proxy.toml"
    async with two_upstreams() as (a, _):
        good = (
            f'[[listeners]]\naddress = "127.0.0.1:{port}"\n[admin]\naddress = ""\n'
            f'[groups.app]\n[[groups.app.servers]]\nurl = "{a}"\n'
        )
        path.write_text(good)
        with proxy_process("-c", str(path)) as proc:
            await wait_port(port)
            async with aiohttp.ClientSession() as session:
                for broken in (
                    b"# \xff\n" + good.encode(),
                    good.replace(a, "http://[::1").encode(),
                ):
                    path.write_bytes(broken)
                    proc.send_signal(signal.SIGHUP)
                    await asyncio.sleep(0.5)
                    async with session.get(f"http://127.0.0.1:{port}/") as response:
                        assert await response.text() == "A"
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "Traceback" not in stderr and "never retrieved" not in stderr
    refusals = [line for line in stderr.splitlines() if "reload refused" in line]
    assert len(refusals) == 2
    assert "UTF-8" in refusals[0] and "url" in refusals[1]


async def test_a_second_family_of_workers_cannot_share_a_busy_port() -> None:
    port = free_port()
    async with two_upstreams() as (a, _):
        args = ("--listen", f"127.0.0.1:{port}", "--upstream", a, "--admin", "")
        with proxy_process(*args, "--workers", "2") as first:
            await wait_port(port)
            second = await asyncio.get_running_loop().run_in_executor(
                None, lambda: run_cli("run", *args, "--workers", "2")
            )
            assert first.poll() is None
    assert second.returncode == 2
    assert "cannot listen on" in second.stderr and "Traceback" not in second.stderr


async def test_workers_stop_when_their_supervisor_is_killed() -> None:
    port = free_port()
    async with two_upstreams() as (a, _):
        args = ("--listen", f"127.0.0.1:{port}", "--upstream", a, "--admin", "")
        with proxy_process(*args, "--workers", "2") as supervisor:
            await wait_port(port)
            children = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
            for _ in range(50):
                workers = children.read_text().split()
                if len(workers) == 2:
                    break
                await asyncio.sleep(0.1)
            supervisor.kill()  # no chance to stop its workers itself
            for _ in range(100):
                if not any(Path(f"/proc/{pid}").exists() for pid in workers):
                    break
                await asyncio.sleep(0.1)
    assert len(workers) == 2
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
