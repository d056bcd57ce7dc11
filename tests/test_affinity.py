"""Unit tests of the cookie and learn policies on a real pool, without sockets."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stickyproxy import affinity
from stickyproxy.affinity import (
    CAUSES,
    REASONS,
    CookieAffinity,
    CookiePin,
    CookieSigner,
    LearnedAffinity,
    key_id,
    parse_session_cookie,
)
from stickyproxy.config import (
    CookieConfig,
    GroupConfig,
    LearnConfig,
    OnPinnedDown,
    ServerConfig,
    load_config,
)
from stickyproxy.errors import PinnedUnavailable
from stickyproxy.policies import build_policy
from stickyproxy.selection import RequestView
from stickyproxy.upstreams import Pool, Selection, Upstream

SECRET = "unit-test-secret"
NOW = 1_800_000_000.0


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_pool(
    policy: str = "cookie",
    cookie: CookieConfig | None = None,
    learn: LearnConfig | None = None,
    on_pinned_down: OnPinnedDown = "repin",
    size: int = 3,
) -> Pool:
    """Return a pool of upstreams on 10.0.0.x:800x with the given sticky options."""
    servers = tuple(
        ServerConfig(f"http://10.0.0.{n}:800{n}") for n in range(1, size + 1)
    )
    group = GroupConfig(
        name="app",
        servers=servers,
        policy=policy,  # type: ignore[arg-type]
        on_pinned_down=on_pinned_down,
        cookie=cookie or CookieConfig(secret=SECRET),
        learn=learn or LearnConfig(),
    )
    return Pool(group)


def cookie_policy(
    clock: Clock | None = None,
    on_pinned_down: OnPinnedDown = "repin",
    **options: object,
) -> CookieAffinity:
    """Return a cookie policy over a fresh pool; options override CookieConfig."""
    config = replace(CookieConfig(secret=SECRET), **options)  # type: ignore[arg-type]
    pool = make_pool(cookie=config, on_pinned_down=on_pinned_down)
    return CookieAffinity(pool, clock=clock or Clock())


def request(cookie: str = "", secure: bool = False, *more: str) -> RequestView:
    """Return a request view carrying the given Cookie header lines."""
    headers = [(b"Host", b"app.test")]
    headers += [(b"Cookie", line.encode()) for line in (cookie, *more) if line]
    return RequestView("192.0.2.1", "GET", "/", "app.test", headers, secure)


def set_cookie(lines: Sequence[bytes]) -> tuple[str, str, list[str]]:
    """Return the name, value and attributes of the one Set-Cookie line."""
    assert len(lines) == 1
    line = lines[0].decode()
    assert line.startswith("Set-Cookie: ") and line.endswith("\r\n")
    pair, *attributes = line[len("Set-Cookie: ") : -2].split("; ")
    name, _, value = pair.partition("=")
    return name, value, attributes


def place(policy: CookieAffinity, view: RequestView) -> tuple[Selection, str]:
    """Select, answer, and return the selection and the cookie value set."""
    selection = policy.select(view)
    assert selection is not None
    _, value, _ = set_cookie(policy.on_response(view, selection, []))
    return selection, value


# the cookie policy


def test_first_request_is_placed_and_pinned_by_a_signed_cookie() -> None:
    policy = cookie_policy()
    first, value = place(policy, request())
    assert (first.reason, first.cause) == ("new", "")

    for _ in range(20):
        view = request(f"stickyproxy={value}")
        again = policy.select(view)
        assert again is not None
        assert (again.upstream, again.reason, again.cause) == (
            first.upstream,
            "pinned",
            "",
        )
        # a valid pin needs no new cookie
        assert policy.on_response(view, again, []) == ()


def cookie_id(policy: CookieAffinity, upstream: Upstream) -> str:
    """Return the id the policy's cookies give an upstream."""
    return policy.signer.cookie_id(upstream.id)


def test_cookie_value_names_the_upstream_by_opaque_id_only() -> None:
    policy = cookie_policy()
    selection, value = place(policy, request())
    upstream = selection.upstream
    assert value.split(".")[2] == cookie_id(policy, upstream)
    for revealing in (upstream.host, str(upstream.port), upstream.name, "10.0.0"):
        assert revealing not in value
    assert len(value) <= affinity.MAX_COOKIE_LENGTH


def written_id(policy: CookieAffinity, upstream: Upstream) -> str:
    """Return the upstream id in the cookie the policy sets for an upstream."""
    _, value, _ = set_cookie([policy.set_cookie_line(upstream, False)])
    return value.split(".")[2]


def test_cookie_id_cannot_be_derived_without_the_secret() -> None:
    one, other = cookie_policy(), cookie_policy(secret="another-secret")
    for upstream in one.pool:
        # the pool's own id hashes the group and URL, which anyone can guess
        public = hashlib.sha256(f"app\0{upstream.config.url}".encode()).hexdigest()
        ids = {written_id(one, upstream), written_id(other, upstream)}
        assert len(ids) == 2
        assert not any(i in public for i in ids)

    # the same secret gives the same ids, so pins survive a restart
    again = cookie_policy()
    assert [written_id(again, u) for u in again.pool] == [
        written_id(one, u) for u in one.pool
    ]
    _, value = place(one, request())
    assert again.select(request(f"stickyproxy={value}")).reason == "pinned"  # type: ignore[union-attr]
    voided = other.select(request(f"stickyproxy={value}"))
    assert voided is not None and voided.cause == "invalid"


def test_signer_round_trip_and_format() -> None:
    signer = CookieSigner("k1")
    value = signer.sign("0123456789ab", 1_700_000_000)
    version, kid, written_id, issued, signature = value.split(".")
    assert (version, kid, written_id, issued) == (
        "v1",
        key_id("k1"),
        signer.cookie_id("0123456789ab"),
        "1700000000",
    )
    assert written_id != "0123456789ab" and len(written_id) == 12
    assert len(signature) == 22
    assert signer.verify(value) == CookiePin(key_id("k1"), written_id, 1_700_000_000)


def tampered_variants(policy: CookieAffinity, value: str) -> dict[str, str]:
    """Return ways to damage a valid cookie value, by name."""
    other = next(u for u in policy.pool if cookie_id(policy, u) not in value)
    version, kid, upstream_id, issued, signature = value.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return {
        "signature": ".".join((version, kid, upstream_id, issued, flipped)),
        "upstream": ".".join(
            (version, kid, cookie_id(policy, other), issued, signature)
        ),
        "issued": ".".join(
            (version, kid, upstream_id, str(int(issued) - 1), signature)
        ),
        "version": ".".join(("v2", kid, upstream_id, issued, signature)),
        "truncated": value[:-1],
        "garbage": "not-a-cookie",
        "non_ascii": value[:-1] + "\xe9",
        "upper_hex": ".".join((version, kid, upstream_id.upper(), issued, signature)),
    }


@pytest.mark.parametrize(
    "variant",
    [
        "signature",
        "upstream",
        "issued",
        "version",
        "truncated",
        "garbage",
        "non_ascii",
        "upper_hex",
    ],
)
def test_tampered_cookie_is_replaced_by_a_fresh_one(variant: str) -> None:
    policy = cookie_policy()
    _, value = place(policy, request())
    bad = tampered_variants(policy, value)[variant]

    view = request(f"stickyproxy={bad}")
    selection = policy.select(view)
    assert selection is not None
    assert (selection.reason, selection.cause) == ("repinned", "invalid")
    _, fresh, _ = set_cookie(policy.on_response(view, selection, []))
    assert policy.signer.verify(fresh) is not None
    assert cookie_id(policy, selection.upstream) in fresh


def malformed_requests(policy: CookieAffinity, clock: Clock) -> dict[str, RequestView]:
    """Return a request per cause of a void cookie, all from one policy and clock."""
    valid = policy.signer.sign(policy.pool.upstreams[0].id, int(clock.now))
    old = policy.signer.sign(policy.pool.upstreams[0].id, int(clock.now) - 7200)
    gone = policy.signer.sign("ffffffffffff", int(clock.now))
    return {
        "expired": request(f"stickyproxy={old}"),
        "unknown_upstream": request(f"stickyproxy={gone}"),
        "empty": request("stickyproxy="),
        "oversized": request(f"stickyproxy={valid}{'x' * 256}"),
        "duplicated": request(f"stickyproxy={valid}; stickyproxy={valid}"),
        "duplicated_lines": request(
            f"stickyproxy={valid}", False, f"stickyproxy={valid}"
        ),
        "invalid": request("stickyproxy=v1.zzzzzzzz.0123456789ab.1.sig"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "unknown_upstream",
        "empty",
        "oversized",
        "duplicated",
        "duplicated_lines",
        "invalid",
    ],
)
def test_void_cookie_is_never_an_error_and_says_why(case: str) -> None:
    clock = Clock()
    policy = cookie_policy(clock, server_max_age=3600)
    view = malformed_requests(policy, clock)[case]

    selection = policy.select(view)
    assert selection is not None
    cause = case.removesuffix("_lines")
    assert (selection.reason, selection.cause) == ("repinned", cause)
    assert selection.cause in CAUSES and selection.reason in REASONS
    _, fresh, _ = set_cookie(policy.on_response(view, selection, []))

    # the fresh cookie pins from now on
    again = policy.select(request(f"stickyproxy={fresh}"))
    assert again is not None
    assert (again.upstream, again.reason) == (selection.upstream, "pinned")


def test_cookie_expires_on_the_server_even_when_verified_before() -> None:
    clock = Clock()
    policy = cookie_policy(clock, server_max_age=600)
    _, value = place(policy, request())
    assert policy.select(request(f"stickyproxy={value}")).reason == "pinned"  # type: ignore[union-attr]

    clock.now += 601
    selection = policy.select(request(f"stickyproxy={value}"))
    assert selection is not None
    assert (selection.reason, selection.cause) == ("repinned", "expired")


def test_cookie_from_the_future_is_invalid() -> None:
    clock = Clock()
    policy = cookie_policy(clock)
    value = policy.signer.sign(policy.pool.upstreams[0].id, int(clock.now) + 3600)
    selection = policy.select(request(f"stickyproxy={value}"))
    assert selection is not None
    assert selection.cause == "invalid"


def test_signature_is_checked_once_per_distinct_cookie() -> None:
    class CountingSigner(CookieSigner):
        calls = 0

        def verify(self, value: str) -> CookiePin | None:
            CountingSigner.calls += 1
            return super().verify(value)

    policy = cookie_policy()
    policy.signer = CountingSigner(SECRET)
    _, value = place(policy, request())
    for _ in range(10):
        policy.select(request(f"stickyproxy={value}"))
    assert CountingSigner.calls == 1


def test_pin_is_refreshed_past_half_its_lifetime() -> None:
    clock = Clock()
    policy = cookie_policy(clock, server_max_age=1000)
    _, value = place(policy, request())

    clock.now += 400
    view = request(f"stickyproxy={value}")
    selection = policy.select(view)
    assert selection is not None
    assert policy.on_response(view, selection, []) == ()

    clock.now += 200
    selection = policy.select(view)
    assert selection is not None and selection.reason == "pinned"
    _, fresh, _ = set_cookie(policy.on_response(view, selection, []))
    assert fresh.split(".")[3] == str(int(clock.now))
    assert cookie_id(policy, selection.upstream) in fresh


def test_key_rotation_accepts_old_keys_and_signs_with_the_new_one() -> None:
    old = cookie_policy(secret="old-secret")
    selection, value = place(old, request())

    rotated = cookie_policy(secret="new-secret", verify_secrets=("old-secret",))
    view = request(f"stickyproxy={value}")
    pinned = rotated.select(view)
    assert pinned is not None
    assert (pinned.upstream.id, pinned.reason) == (selection.upstream.id, "pinned")

    # the answer replaces the old-key cookie with one signed by the new key, which
    # also names the upstream anew
    _, fresh, _ = set_cookie(rotated.on_response(view, pinned, []))
    assert fresh.split(".")[1] == key_id("new-secret") != key_id("old-secret")
    assert fresh.split(".")[2] == cookie_id(rotated, selection.upstream)
    assert fresh.split(".")[2] != value.split(".")[2]
    again = rotated.select(request(f"stickyproxy={fresh}"))
    assert again is not None
    assert (again.upstream.id, again.reason) == (selection.upstream.id, "pinned")

    unknown_key = cookie_policy(secret="new-secret")
    voided = unknown_key.select(view)
    assert voided is not None
    assert (voided.reason, voided.cause) == ("repinned", "invalid")


def test_default_cookie_attributes() -> None:
    policy = cookie_policy()
    selection = policy.select(request())
    assert selection is not None
    name, _, attributes = set_cookie(policy.on_response(request(), selection, []))
    assert name == "stickyproxy"
    assert attributes == ["Path=/", "HttpOnly", "SameSite=Lax"]


@pytest.mark.parametrize(
    ("options", "secure_request", "expected"),
    [
        ({}, True, ["Path=/", "HttpOnly", "Secure", "SameSite=Lax"]),
        ({"secure": "always"}, False, ["Path=/", "HttpOnly", "Secure", "SameSite=Lax"]),
        ({"secure": "never"}, True, ["Path=/", "HttpOnly", "SameSite=Lax"]),
        ({"samesite": "None"}, True, ["Path=/", "HttpOnly", "Secure", "SameSite=None"]),
        ({"samesite": "None"}, False, ["Path=/", "HttpOnly"]),
        (
            {"samesite": "Strict", "httponly": False},
            False,
            ["Path=/", "SameSite=Strict"],
        ),
        (
            {"path": "/app", "domain": "example.test", "max_age": 3600},
            False,
            [
                "Path=/app",
                "Domain=example.test",
                "Max-Age=3600",
                "HttpOnly",
                "SameSite=Lax",
            ],
        ),
    ],
)
def test_cookie_attributes_follow_options_and_request_security(
    options: dict[str, Any], secure_request: bool, expected: list[str]
) -> None:
    policy = cookie_policy(**options)
    view = request(secure=secure_request)
    selection = policy.select(view)
    assert selection is not None
    _, _, attributes = set_cookie(policy.on_response(view, selection, []))
    assert attributes == expected


def test_custom_cookie_name_and_strip() -> None:
    assert cookie_policy().strip_cookie is None
    policy = cookie_policy(name="route", strip=True)
    assert policy.strip_cookie == b"route"
    selection, value = place(policy, request())
    pinned = policy.select(request(f"other=1; route={value}"))
    assert pinned is not None and pinned.upstream == selection.upstream


def test_draining_upstream_keeps_its_pins_and_takes_no_new_clients() -> None:
    policy = cookie_policy()
    selection, value = place(policy, request())
    draining = selection.upstream
    draining.set_admin_state("drain")

    pinned = policy.select(request(f"stickyproxy={value}"))
    assert pinned is not None
    assert (pinned.upstream, pinned.reason) == (draining, "pinned")
    for _ in range(30):
        fresh = policy.select(request())
        assert fresh is not None and fresh.upstream is not draining


@pytest.mark.parametrize("how", ["down", "unhealthy", "tried", "full"])
def test_pin_down_repins_and_sets_a_new_cookie(how: str) -> None:
    policy = cookie_policy()
    selection, value = place(policy, request())
    pinned = selection.upstream
    exclude = []
    if how == "down":
        pinned.set_admin_state("down")
    elif how == "unhealthy":
        pinned.set_healthy(False)
    elif how == "tried":
        exclude.append(pinned)
    else:
        pinned.max_conns, pinned.active = 1, 1

    view = request(f"stickyproxy={value}")
    moved = policy.select(view, exclude)
    assert moved is not None
    assert (moved.reason, moved.cause) == ("repinned", "pin_down")
    assert moved.upstream is not pinned
    _, fresh, _ = set_cookie(policy.on_response(view, moved, []))
    assert cookie_id(policy, moved.upstream) in fresh


@pytest.mark.parametrize("mode", ["strict", "wait"])
def test_pin_down_in_strict_and_wait_groups_raises(mode: OnPinnedDown) -> None:
    policy = cookie_policy(on_pinned_down=mode)
    selection, value = place(policy, request())
    selection.upstream.set_healthy(False)

    with pytest.raises(PinnedUnavailable) as raised:
        policy.select(request(f"stickyproxy={value}"))
    assert raised.value.wait == (mode == "wait")
    assert raised.value.retry_after >= 1

    # an invalid cookie is no pin: it is placed anew even in a strict group
    placed = policy.select(request("stickyproxy=forged"))
    assert placed is not None and placed.cause == "invalid"


def test_no_upstream_at_all_gives_none() -> None:
    policy = cookie_policy()
    for upstream in policy.pool:
        upstream.set_admin_state("down")
    assert policy.select(request()) is None


def test_pinned_counts_count_pins_issued() -> None:
    policy = cookie_policy()
    issued = [place(policy, request())[0].upstream.name for _ in range(6)]
    _, value = place(policy, request())
    pinned_view = request(f"stickyproxy={value}")
    pinned = policy.select(pinned_view)
    assert pinned is not None
    policy.on_response(pinned_view, pinned, [])

    counts = policy.pinned_counts()
    assert sum(counts.values()) == 7
    for name in issued:
        assert counts[name] >= 1


def test_missing_secret_generates_one_per_process_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(affinity, "_generated_secret", "")
    caplog.set_level(logging.WARNING, logger="stickyproxy.affinity")
    first = cookie_policy(secret="")
    second = cookie_policy(secret="")

    warnings = [r for r in caplog.records if r.name == "stickyproxy.affinity"]
    assert len(warnings) == 1
    assert "restart" in warnings[0].getMessage()
    assert first.signer.kid == second.signer.kid
    assert affinity._generated_secret not in warnings[0].getMessage()

    # a cookie from one policy instance (a reload) stays valid in the other
    _, value = place(first, request())
    pinned = second.select(request(f"stickyproxy={value}"))
    assert pinned is not None and pinned.reason == "pinned"


def test_secret_comes_from_the_environment_when_the_file_has_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[[listeners]]\naddress = "127.0.0.1:0"\n[groups.app]\npolicy = "cookie"\n'
        '[[groups.app.servers]]\nurl = "http://127.0.0.1:9"\n'
        '[groups.b]\npolicy = "cookie"\n[groups.b.cookie]\nsecret = "own"\n'
        '[[groups.b.servers]]\nurl = "http://127.0.0.1:9"\n'
        '[[routes]]\ngroup = "app"\n'
    )
    config = load_config(path, environ={"STICKYPROXY_COOKIE_SECRET": "from-env"})
    assert config.groups["app"].cookie.secret == "from-env"
    assert config.groups["b"].cookie.secret == "own"


def test_registry_builds_sticky_policies_with_their_fallback() -> None:
    cookie = build_policy(
        make_pool("cookie", CookieConfig(secret="x", fallback="random"))
    )
    assert isinstance(cookie, CookieAffinity)
    assert cookie.fallback.name == "random"
    learn = build_policy(make_pool("learn", learn=LearnConfig(fallback="round_robin")))
    assert isinstance(learn, LearnedAffinity)
    assert learn.fallback.name == "round_robin"


# the learn policy


def learn_policy(
    clock: Clock | None = None,
    on_pinned_down: OnPinnedDown = "repin",
    **options: object,
) -> LearnedAffinity:
    """Return a learn policy (in memory) over a fresh pool."""
    config = replace(LearnConfig(), **options)  # type: ignore[arg-type]
    pool = make_pool("learn", learn=config, on_pinned_down=on_pinned_down)
    return LearnedAffinity(pool, clock=clock or Clock())


def answer(policy: LearnedAffinity, view: RequestView, *set_cookies: str) -> Selection:
    """Select for the request and let the upstream answer with Set-Cookie lines."""
    selection = policy.select(view)
    assert selection is not None
    headers = [(b"Content-Type", b"text/plain")]
    headers += [(b"Set-Cookie", line.encode()) for line in set_cookies]
    assert policy.on_response(view, selection, headers) == ()
    return selection


def test_learn_pins_a_session_the_upstream_created() -> None:
    policy = learn_policy()
    login = answer(policy, request(), "connect.sid=s%3Aabc.def; Path=/; HttpOnly")
    assert login.reason == "new"

    for _ in range(20):
        selection = answer(policy, request("connect.sid=s%3Aabc.def"))
        assert (selection.upstream, selection.reason) == (login.upstream, "pinned")
    assert policy.pinned_counts() == {login.upstream.name: 1}


def test_learn_table_holds_hashes_not_session_ids() -> None:
    policy = learn_policy()
    answer(policy, request(), "connect.sid=secret-session-id")
    keys = list(policy.table._pins)
    assert len(keys) == 1
    assert "secret-session-id" not in keys[0]
    assert len(keys[0]) == 32


@pytest.mark.parametrize(
    "clearing",
    [
        "connect.sid=; Path=/",
        "connect.sid=s1; Max-Age=0",
        "connect.sid=; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
        'connect.sid=""; Path=/',
    ],
)
def test_learn_forgets_a_session_the_upstream_clears(clearing: str) -> None:
    policy = learn_policy()
    answer(policy, request(), "connect.sid=s1")
    logout = answer(policy, request("connect.sid=s1"), clearing)
    assert logout.reason == "pinned"

    after = answer(policy, request("connect.sid=s1"), "connect.sid=s2")
    assert after.reason == "new"
    assert len(policy.table) == 1


def test_set_cookie_parsing() -> None:
    names = ("connect.sid", "JSESSIONID")
    assert parse_session_cookie(b"connect.sid=abc; Path=/", names) == (
        "connect.sid",
        "abc",
        False,
    )
    assert parse_session_cookie(b"other=abc", names) is None
    assert parse_session_cookie(b"garbage", names) is None
    assert parse_session_cookie(b' JSESSIONID = "q" ; max-age=-1', names) == (
        "JSESSIONID",
        "q",
        True,
    )
    # Max-Age wins over an Expires in the past
    both = b"JSESSIONID=q; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=60"
    assert parse_session_cookie(both, names) == ("JSESSIONID", "q", False)
    assert parse_session_cookie(b"JSESSIONID=q; Expires=nonsense", names) == (
        "JSESSIONID",
        "q",
        False,
    )


HUGE = "9" * 5000


@pytest.mark.parametrize(
    ("attributes", "clears"),
    [
        (f"Max-Age={HUGE}", False),
        (f"Max-Age=-{HUGE}", True),
        (f"Max-Age=000{HUGE}", False),
        ("Max-Age=-0", True),
        ("Max-Age=0000", True),
        ("Max-Age=--5", False),
        ("Max-Age=\xb2", False),
        ("Max-Age=-\xb9", False),
        ("Max-Age=-", False),
        ("Max-Age=+5", False),
        ("Max-Age=1e9", False),
        (f"Expires={HUGE}", False),
        ("Expires=Sat, 01 Jan 2000 99999999999999999999:00:00 GMT", False),
        ("Expires=Sat, 01 Jan 99999999999999999999 00:00:00 GMT", False),
        ("Expires=Sat, 01 Jan 2000 00:00:00 +99999999999999999999", False),
        ("Expires=Sat, 01 Jan 2000 00:00:99999999999999 GMT", False),
        ("Expires=Mon, 01 Jan 0001 00:00:00 -0000", True),
        ("Expires=Fri, 31 Dec 9999 23:59:59 -0000", False),
        ("Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=-\xb2", True),
        ("Max-Age=60; Max-Age=--1", False),
        ("Max-Age=0; Max-Age=9\xb2", True),
        ("Expires=Thu, 01 Jan 1970 00:00:00 GMT; Expires=31 Feb 99999999999", True),
        (f"Expires={HUGE}; Max-Age={HUGE}", False),
    ],
)
def test_absurd_max_age_and_expires_never_raise(attributes: str, clears: bool) -> None:
    line = f"connect.sid=s1; Path=/; {attributes}"
    parsed = parse_session_cookie(line.encode("latin-1"), ("connect.sid",))
    assert parsed == ("connect.sid", "s1", clears)

    policy = learn_policy()
    answer(policy, request(), line)
    assert len(policy.table) == (0 if clears else 1)


def test_learn_table_is_bounded_least_recently_used_first() -> None:
    policy = learn_policy(max_entries=2)
    first = answer(policy, request(), "connect.sid=a")
    answer(policy, request(), "connect.sid=b")
    answer(policy, request("connect.sid=a"))
    answer(policy, request(), "connect.sid=c")

    assert len(policy.table) == 2
    assert answer(policy, request("connect.sid=a")).upstream == first.upstream
    assert answer(policy, request("connect.sid=a")).reason == "pinned"
    assert policy.select(request("connect.sid=b")).reason == "new"  # type: ignore[union-attr]


def test_learn_forgets_idle_sessions() -> None:
    clock = Clock(100.0)
    policy = learn_policy(clock, idle_timeout=60.0)
    answer(policy, request(), "connect.sid=a")
    answer(policy, request(), "connect.sid=b")

    clock.now += 50
    assert answer(policy, request("connect.sid=a")).reason == "pinned"
    clock.now += 50
    assert answer(policy, request("connect.sid=a")).reason == "pinned"
    assert policy.select(request("connect.sid=b")).reason == "new"  # type: ignore[union-attr]
    assert len(policy.table) == 1
    assert sum(policy.pinned_counts().values()) == 1


def test_learn_remembers_where_an_unknown_session_went() -> None:
    policy = learn_policy()
    placed = answer(policy, request("JSESSIONID=from-before-restart"))
    assert placed.reason == "new"
    again = answer(policy, request("JSESSIONID=from-before-restart"))
    assert (again.upstream, again.reason) == (placed.upstream, "pinned")
    assert policy.table.observed == 1


def flood(policy: LearnedAffinity, sessions: int) -> None:
    """Send requests with made-up session ids that no upstream ever sets."""
    for n in range(sessions):
        answer(policy, request(f"connect.sid=invented-{n}"))


def test_invented_sessions_cannot_evict_sessions_an_upstream_set() -> None:
    policy = learn_policy(max_entries=8)
    logins = {
        value: answer(policy, request(), f"connect.sid={value}").upstream
        for value in ("a", "b", "c")
    }
    # a session re-pinned away from its lost upstream stays confirmed
    lost = logins["a"]
    lost.set_admin_state("down")
    moved = answer(policy, request("connect.sid=a"))
    assert moved.reason == "repinned"
    logins["a"] = moved.upstream
    lost.set_admin_state("up")

    flood(policy, 1000)
    for value, upstream in logins.items():
        kept = answer(policy, request(f"connect.sid={value}"))
        assert (kept.upstream, kept.reason) == (upstream, "pinned")
    assert policy.table.observed == policy.table.max_observed == 2
    assert len(policy.table) == 3 + 2

    # invented sessions still keep their upstream while they are recent
    recent = answer(policy, request("connect.sid=invented-999"))
    assert recent.reason == "pinned"


def test_observed_session_is_confirmed_once_the_upstream_sets_it() -> None:
    policy = learn_policy(max_entries=8)
    placed = answer(policy, request("connect.sid=old"))
    refreshed = answer(policy, request("connect.sid=old"), "connect.sid=old; Path=/")
    assert (refreshed.upstream, refreshed.reason) == (placed.upstream, "pinned")

    flood(policy, 100)
    kept = answer(policy, request("connect.sid=old"))
    assert (kept.upstream, kept.reason) == (placed.upstream, "pinned")
    assert policy.table.observed == policy.table.max_observed


def test_learn_repins_when_the_pinned_upstream_is_down() -> None:
    policy = learn_policy()
    login = answer(policy, request(), "connect.sid=a")
    login.upstream.set_admin_state("down")

    moved = answer(policy, request("connect.sid=a"))
    assert (moved.reason, moved.cause) == ("repinned", "pin_down")
    assert moved.upstream is not login.upstream

    # the new pin holds, also after the old upstream returns
    login.upstream.set_admin_state("up")
    for _ in range(5):
        kept = answer(policy, request("connect.sid=a"))
        assert (kept.upstream, kept.reason) == (moved.upstream, "pinned")


def test_learn_honours_strict_groups_and_draining() -> None:
    policy = learn_policy(on_pinned_down="strict")
    login = answer(policy, request(), "connect.sid=a")
    login.upstream.set_admin_state("drain")
    assert answer(policy, request("connect.sid=a")).reason == "pinned"

    login.upstream.set_admin_state("down")
    with pytest.raises(PinnedUnavailable) as raised:
        policy.select(request("connect.sid=a"))
    assert not raised.value.wait


def test_learn_pin_to_an_upstream_no_longer_in_the_pool() -> None:
    policy = learn_policy()
    key = policy.session(request("connect.sid=a"))
    assert key is not None
    policy.table.put(key.key, "ffffffffffff")
    selection = policy.select(request("connect.sid=a"))
    assert selection is not None
    assert (selection.reason, selection.cause) == ("repinned", "unknown_upstream")


def test_learn_without_redis_needs_no_lookup() -> None:
    policy = learn_policy()
    assert not policy.needs_lookup(request("connect.sid=a"))
    assert not policy.redis_connected
    assert policy.redis_errors == 0
    assert policy.redis_latency is None


def test_reload_keeps_learned_pins_and_issued_counts() -> None:
    clock = Clock()
    old = learn_policy(clock)
    login = answer(old, request(), "connect.sid=a")
    observed = answer(old, request("connect.sid=b"))
    new = learn_policy(clock, max_entries=10)
    new.adopt(old)
    kept = answer(new, request("connect.sid=a"))
    assert (kept.upstream.id, kept.reason) == (login.upstream.id, "pinned")
    assert new.table.observed == 1
    counts = {login.upstream.name: 1}
    counts[observed.upstream.name] = counts.get(observed.upstream.name, 0) + 1
    assert new.pinned_counts() == counts

    old_cookie = cookie_policy()
    place(old_cookie, request())
    new_cookie = cookie_policy()
    new_cookie.adopt(old_cookie)
    new_cookie.adopt(old)
    assert sum(new_cookie.pinned_counts().values()) == 1
