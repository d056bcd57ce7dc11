"""Loading the configuration: what is refused, with which words, and what is not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from stickyproxy.config import (
    MAX_WORKERS,
    Config,
    Overrides,
    environment_upstreams,
    load_config,
)
from stickyproxy.errors import ConfigError

LISTENER = '[[listeners]]\naddress = "127.0.0.1:8080"\n'

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="openssl is not installed"
)


def group(url: str = "http://127.0.0.1:3000", extra: str = "") -> str:
    """Return a group app with one server at url."""
    return f'[groups.app]\n{extra}\n[[groups.app.servers]]\nurl = "{url}"\n'


def load(tmp_path: Path, text: str | bytes, **environ: str) -> Config:
    """Write text to a file and load it with only the given environment."""
    path = tmp_path / "stickyproxy.toml"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return load_config(path, environ=environ)


def refused(tmp_path: Path, text: str | bytes, **environ: str) -> ConfigError:
    """Return the ConfigError loading text raises; fail if it loads."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, **environ)
    assert str(tmp_path / "stickyproxy.toml") in str(caught.value)
    return caught.value


def make_certificate(folder: Path, pass_phrase: str = "") -> tuple[Path, Path]:
    """Write a self-signed certificate and its key; encrypt the key if asked."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    protect = ["-passout", f"pass:{pass_phrase}"] if pass_phrase else ["-nodes"]
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", *protect, "-days", "1",
            "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    error = refused(tmp_path, b"# \xff\n" + (LISTENER + group()).encode())
    assert error.key == ""
    assert error.expected == "is not valid UTF-8 (byte 2)"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://[::1", "expected http://host:port"),
        ("http://::1:80", "expected http://host:port"),
        ("http://[::1]x", "expected http://host:port"),
        ("http://[nothost]:80", "expected http://host:port"),
        ("http://", "expected http://host:port"),
        ("http://h:", "expected http://host:port"),
        ("https://h:1", "expected http://host:port"),
        ("http://h:0", "expected a port from 1 to 65535"),
        ("http://h:65536", "expected a port from 1 to 65535"),
        ("http://h:+80", "expected a port from 1 to 65535"),
        ("http://h:\u0661", "expected a port from 1 to 65535"),
        ("http://a b:1", "without spaces"),
        ("http://h:1\\t", "without spaces"),
        ("http://h:1/app", "without path, query or fragment"),
        ("http://h:1?x=1", "without path, query or fragment"),
        ("http://h:1#top", "without path, query or fragment"),
        ("http://h:1/?", "without path, query or fragment"),
        ("http://-h:1", "expected http://host:port"),
        ("http://h\u00e9:1", "expected http://host:port"),
    ],
)
def test_an_upstream_url_that_is_not_plain_host_and_port_is_refused(
    tmp_path: Path, url: str, expected: str
) -> None:
    error = refused(tmp_path, LISTENER + group(url))
    assert error.key == "groups.app.servers[0].url"
    assert expected in error.expected


def test_a_url_with_credentials_is_refused_without_repeating_them(
    tmp_path: Path,
) -> None:
    error = refused(tmp_path, LISTENER + group("http://user:hunter2@127.0.0.1:1"))
    assert "without user or password" in error.expected
    assert "hunter2" not in str(error)


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("http://app.internal", "http://app.internal"),
        ("http://app-1.internal:8080/", "http://app-1.internal:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("http://[::1]", "http://[::1]"),
        ("HTTP://h:1", "http://h:1"),
    ],
)
def test_plain_upstream_urls_are_accepted(tmp_path: Path, url: str, kept: str) -> None:
    config = load(tmp_path, LISTENER + group(url))
    assert config.groups["app"].servers[0].url == kept


@pytest.mark.parametrize(
    ("key", "table"),
    [
        ("timeouts.client_header", "[timeouts]\nclient_header = {}\n"),
        ("timeouts.grace", "[timeouts]\ngrace = {}\n"),
        ("groups.app.health.interval", "[groups.app.health]\ninterval = {}\n"),
        ("groups.app.pinned_wait", "pinned_wait = {}\n"),
        ("groups.app.hash.bounded_load", "[groups.app.hash]\nbounded_load = {}\n"),
    ],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
def test_a_number_that_is_not_finite_is_refused(
    tmp_path: Path, key: str, table: str, value: str
) -> None:
    setting = table.format(value)
    if key.startswith("groups."):
        # the group's own keys come before its sub-tables
        text = LISTENER + (
            group(extra=setting) if "[" not in setting else group() + setting
        )
    else:
        text = LISTENER + setting + group()
    error = refused(tmp_path, text)
    assert error.key == key
    assert "expected a finite number" in error.expected


def test_a_fail_timeout_that_is_not_finite_is_refused(tmp_path: Path) -> None:
    text = LISTENER + group() + "fail_timeout = nan\n"
    error = refused(tmp_path, text)
    assert error.key == "groups.app.servers[0].fail_timeout"


def test_workers_beyond_the_limit_are_refused_from_every_source(
    tmp_path: Path,
) -> None:
    error = refused(tmp_path, "[server]\nworkers = 100000\n" + LISTENER + group())
    assert error.key == "server.workers"
    assert f"<= {MAX_WORKERS}" in error.expected

    config = load(tmp_path, f"[server]\nworkers = {MAX_WORKERS}\n" + LISTENER + group())
    assert config.workers == MAX_WORKERS

    with pytest.raises(ConfigError, match="STICKYPROXY_WORKERS"):
        load(tmp_path, LISTENER + group(), STICKYPROXY_WORKERS="100000")
    path = tmp_path / "stickyproxy.toml"
    with pytest.raises(ConfigError, match="--workers"):
        load_config(path, Overrides(workers=MAX_WORKERS + 1), environ={})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:99999", "expected a port from 1 to 65535"),
        ("redis://127.0.0.1:0", "expected a port from 1 to 65535"),
        ("redis://:hunter2@127.0.0.1:x/0", "expected a port from 1 to 65535"),
        ("redis://[::1", "the host does not parse"),
        ("redis:///0", "the host is missing"),
        ("redis://h:6379/zero", "the database is not a number"),
        ("redis://h:6379/0/1", "the database is not a number"),
        ("unix://", "the socket path is missing"),
        ("redis://h 1:6379", "without spaces"),
        ("http://h:6379", "expected redis://"),
    ],
)
def test_a_redis_url_the_client_would_refuse_is_refused_at_load(
    tmp_path: Path, url: str, expected: str
) -> None:
    learn = f"policy = 'learn'\n[groups.app.learn]\nredis_url = '{url}'"
    error = refused(tmp_path, LISTENER + group(extra=learn))
    assert error.key == "groups.app.learn.redis_url"
    assert expected in error.expected
    # the url may hold a password: the message never repeats it
    assert "hunter2" not in str(error) and repr(url) not in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/1",
        "redis://:secret@redis:6379/0",
        "rediss://cache.internal",
        "unix:///run/redis.sock",
    ],
)
def test_usual_redis_urls_are_accepted(tmp_path: Path, url: str) -> None:
    learn = f"policy = 'learn'\n[groups.app.learn]\nredis_url = '{url}'"
    config = load(tmp_path, LISTENER + group(extra=learn))
    assert config.groups["app"].learn.redis_url == url


def tls_listener(cert: Path | str, key: Path | str) -> str:
    """Return a TLS listener table for the given files."""
    return LISTENER + f'tls_cert = "{cert}"\ntls_key = "{key}"\n'


def test_missing_tls_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    error = refused(
        tmp_path, tls_listener(tmp_path / "none.pem", tmp_path / "none.key") + group()
    )
    assert error.key == "listeners[0].tls_cert"
    assert f"cannot read '{tmp_path / 'none.pem'}'" in error.expected
    assert "No such file" in error.expected

    error = refused(tmp_path, tls_listener(tmp_path, tmp_path) + group())
    assert "Is a directory" in error.expected


@needs_openssl
def test_a_missing_key_is_refused_naming_the_key(tmp_path: Path) -> None:
    cert, _ = make_certificate(tmp_path)
    error = refused(tmp_path, tls_listener(cert, tmp_path / "none.key") + group())
    assert error.key == "listeners[0].tls_key"


def test_files_that_are_not_pem_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    error = refused(tmp_path, tls_listener(junk, junk) + group())
    assert error.key == "listeners[0].tls_cert"
    assert "expected a PEM certificate and key" in error.expected
    assert str(junk) in error.expected


@needs_openssl
def test_an_encrypted_key_is_refused_without_asking_for_a_pass_phrase(
    tmp_path: Path,
) -> None:
    cert, key = make_certificate(tmp_path, pass_phrase="secret")
    error = refused(tmp_path, tls_listener(cert, key) + group())
    assert "expected an unencrypted key" in error.expected


@needs_openssl
def test_a_readable_certificate_and_key_are_accepted(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    config = load(tmp_path, tls_listener(cert, key) + group())
    assert config.listeners[0].tls_cert == str(cert)


def test_an_access_log_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "access.log"
    error = refused(
        tmp_path, f"[log]\naccess_path = '{missing}'\n" + LISTENER + group()
    )
    assert error.key == "log.access_path"
    assert "expected an existing folder" in error.expected

    error = refused(
        tmp_path, f"[log]\naccess_path = '{tmp_path}'\n" + LISTENER + group()
    )
    assert "expected a file, got the directory" in error.expected


@pytest.mark.skipif(not Path("/proc/version").is_file(), reason="needs /proc")
def test_an_access_log_that_refuses_appending_is_refused(tmp_path: Path) -> None:
    error = refused(
        tmp_path, "[log]\naccess_path = '/proc/version'\n" + LISTENER + group()
    )
    assert "cannot append to '/proc/version'" in error.expected


def test_usable_access_logs_are_accepted_and_not_created(tmp_path: Path) -> None:
    new = tmp_path / "access.log"
    config = load(tmp_path, f"[log]\naccess_path = '{new}'\n" + LISTENER + group())
    assert config.log.access_path == str(new)
    assert not new.exists()

    # with the access log off, its path is never opened
    text = "[log]\naccess = 'off'\naccess_path = '/nowhere/a.log'\n"
    load(tmp_path, text + LISTENER + group())
    load(tmp_path, "[log]\naccess_path = '/dev/stdout'\n" + LISTENER + group())


def test_listener_and_admin_may_both_ask_for_any_port(tmp_path: Path) -> None:
    text = '[[listeners]]\naddress = "127.0.0.1:0"\n[admin]\naddress = "127.0.0.1:0"\n'
    config = load(tmp_path, text + group())
    assert config.admin.address is not None and config.admin.address.port == 0

    text = text.replace(":0", ":8080")
    error = refused(tmp_path, text + group())
    assert error.key == "admin.address"


def test_upstreams_come_from_the_environment_without_a_file() -> None:
    environ = {"STICKYPROXY_UPSTREAMS": "http://127.0.0.1:3000, http://[::1]:3001"}
    assert environment_upstreams(environ) == (
        "http://127.0.0.1:3000",
        "http://[::1]:3001",
    )
    assert environment_upstreams({}) == ()
    config = load_config(None, Overrides(listen=("127.0.0.1:8080",)), environ=environ)
    servers = config.groups["default"].servers
    assert [server.url for server in servers] == list(environment_upstreams(environ))


@pytest.mark.parametrize(
    "value",
    [
        "http://[",
        "http://]",
        "http://[::1]:",
        "http://%",
        "http://h:1:2",
        "http://\x00",
    ],
)
def test_odd_upstream_urls_raise_only_config_errors(value: str) -> None:
    environ = {"STICKYPROXY_UPSTREAMS": value}
    with pytest.raises(ConfigError):
        load_config(None, Overrides(listen=("127.0.0.1:8080",)), environ=environ)
