"""The sample backend behaves as the deployment guide describes it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import quote, unquote

import pytest
import redis as redis_sync
from aiohttp.test_utils import TestServer

import backend.store
from backend.app import make_app
from backend.config import DEFAULT_SESSION_SECRET, Settings, settings_from_env
from backend.cookies import new_session_id, sign, unsign
from backend.files import MAX_CONTENT_BYTES
from backend.identity import normalize_user_id
from backend.server import main as server_main
from tests.backend_support import Api, Instance, client_session
from tests.support import RedisServer, free_port

REDIS_LINE = "[SESSION] Using Redis session store"
MEMORY_LINE = (
    "[SESSION] Using MemoryStore (set REDIS_URL to use Redis for PM2 clusters)"
)
FALLBACK_LINE = "Redis connection failed, falling back to MemoryStore"
GUEST_ID = "alice_contoso.com#EXT#@fabrikam.onmicrosoft.com"
SECRET = "test-secret-not-for-production"


@pytest.fixture(params=["memory", "redis"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[Api]:
    """A client of one in-process instance, with its store in memory or in Redis."""
    redis_url = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        redis_url = server.url
    settings = Settings(instance_id="solo", redis_url=redis_url, session_secret=SECRET)
    async with TestServer(make_app(settings)) as app, client_session() as http:
        yield Api(http, f"http://{app.host}:{app.port}")


def by_id(files: list[dict[str, object]]) -> list[dict[str, object]]:
    """Return file records in id order, for comparisons that ignore list order."""
    return sorted(files, key=lambda f: str(f["id"]))


# start-up: which store, said in the words of the guide


def test_startup_uses_redis_when_reachable(redis: RedisServer) -> None:
    env = {"REDIS_URL": redis.url, "SESSION_SECRET": SECRET}
    with Instance("with-redis", env) as instance:
        output = instance.output

    assert REDIS_LINE in output
    assert "MemoryStore" not in output
    assert "SESSION_SECRET is not set" not in output
    assert SECRET not in output


def test_startup_uses_memory_without_redis_url() -> None:
    with Instance("no-redis") as instance:
        output = instance.output

    assert MEMORY_LINE in output
    assert "Redis session store" not in output
    # the default secret is public, so using it deserves a warning
    assert "WARNING backend.session: [SESSION] SESSION_SECRET is not set" in output


async def test_startup_falls_back_to_memory_when_redis_unreachable() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with Instance("lost-redis", {"REDIS_URL": closed}) as instance:
        async with client_session() as http:
            api = Api(http, instance.url)
            health = await api.call("GET", "/health")
            await api.login("bob@contoso.com")
            me = await api.call("GET", "/api/me")
        output = instance.output

    assert FALLBACK_LINE in output
    assert REDIS_LINE not in output
    assert health.body["store"] == "memory"
    assert health.body["storeReachable"] is True
    assert me.status == 200


def test_settings_come_from_flags_then_environment() -> None:
    env = {"INSTANCE_ID": "from-env", "REDIS_URL": "redis://h:1/0"}

    flagged = settings_from_env(host="::1", port=3001, instance_id="flag", environ=env)
    from_env = settings_from_env(host="127.0.0.1", port=3001, environ=env)
    bare = settings_from_env(host="127.0.0.1", port=3002, environ={"REDIS_URL": ""})

    assert flagged.instance_id == "flag"
    assert from_env.instance_id == "from-env"
    assert from_env.redis_url == "redis://h:1/0"
    assert bare.instance_id.endswith("-3002")
    assert bare.redis_url is None
    assert bare.session_secret == DEFAULT_SESSION_SECRET
    assert bare.default_secret


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--port", "http"], "is not a port number"),
        (["--port", "-1"], "is outside 0..65535"),
        (["--instance-id", "no spaces"], "use 1-64 letters"),
        (["--session-ttl", "0"], "must be at least 1"),
    ],
)
def test_server_rejects_bad_arguments(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        server_main(argv)

    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert complaint in err
    assert "Traceback" not in err


# the API on one instance, with either store


async def test_login_files_trash_and_restore(api: Api) -> None:
    login = await api.login("carol@contoso.com", "contoso")
    assert login.body == {
        "userId": "carol@contoso.com",
        "tenantId": "contoso",
        "instance": "solo",
    }

    first = (await api.upload("a.txt", "hello")).body["file"]
    second = (
        await api.call("POST", "/api/files", {"name": "big.iso", "size": 4_000_000})
    ).body["file"]
    assert first["size"] == 5
    assert first["content"] == "hello"
    assert second["size"] == 4_000_000
    assert "content" not in second

    # two uploads may share a millisecond, and then the list orders them by id
    listed = await api.call("GET", "/api/files")
    assert by_id(listed.body["files"]) == by_id([first, second])

    deleted = await api.call("DELETE", f"/api/files/{first['id']}")
    assert deleted.status == 200
    assert deleted.body["file"]["deletedAt"]
    listed = await api.call("GET", "/api/files")
    trash = await api.call("GET", "/api/files/trash")
    assert [f["id"] for f in listed.body["files"]] == [second["id"]]
    assert [f["id"] for f in trash.body["files"]] == [first["id"]]

    restored = await api.call("POST", f"/api/files/{first['id']}/restore")
    assert restored.status == 200
    assert restored.body["file"] == first
    listed = await api.call("GET", "/api/files")
    trash = await api.call("GET", "/api/files/trash")
    assert by_id(listed.body["files"]) == by_id([first, second])
    assert trash.body["files"] == []


async def test_every_api_call_needs_a_session(api: Api) -> None:
    calls = [
        ("GET", "/api/me"),
        ("GET", "/api/files"),
        ("POST", "/api/files"),
        ("GET", "/api/files/trash"),
        ("DELETE", "/api/files/" + "0" * 32),
        ("POST", "/api/files/" + "0" * 32 + "/restore"),
        ("POST", "/api/logout"),
    ]
    for method, path in calls:
        reply = await api.call(method, path)
        assert reply.status == 401, (method, path)
        assert reply.body["error"] == "not authenticated"
        assert reply.headers["Content-Type"].startswith("application/json")


async def test_login_issues_a_new_session_id(api: Api) -> None:
    await api.login("dave@contoso.com")
    planted = api.cookie
    assert planted is not None

    # logging in with a session cookie already set must not keep its id
    await api.login("dave@contoso.com")
    assert api.cookie is not None
    assert api.cookie != planted
    assert unsign(api.cookie, SECRET) != unsign(planted, SECRET)

    fresh = api.cookie
    api.cookie = planted
    assert (await api.call("GET", "/api/me")).status == 401
    api.cookie = fresh
    assert (await api.call("GET", "/api/me")).status == 200


async def test_session_cookie_is_signed_http_only_and_lax(api: Api) -> None:
    reply = await api.login("erin@contoso.com")

    header = reply.headers["Set-Cookie"]
    assert header.startswith("connect.sid=s%3A")
    assert "HttpOnly" in header
    assert "Path=/" in header
    assert "SameSite=Lax" in header
    assert api.cookie is not None
    assert unquote(api.cookie).startswith("s:")


async def test_tampered_cookie_is_refused(api: Api) -> None:
    await api.login("frank@contoso.com")
    assert api.cookie is not None
    genuine = unquote(api.cookie)
    session_id, _, signature = genuine[2:].rpartition(".")
    other_id = new_session_id()
    forged = [
        # the id swapped for another, signature kept
        f"s:{other_id}.{signature}",
        # the signature changed in its first character
        f"s:{session_id}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}",
        # no signature at all
        f"s:{session_id}",
        session_id,
        # a genuine-looking cookie signed with another secret
        unquote(sign(session_id, "someone-elses-secret")),
    ]
    for value in forged:
        api.cookie = quote(value, safe="")
        reply = await api.call("GET", "/api/me")
        assert reply.status == 401, value
        assert reply.body["error"] == "invalid session cookie"

    api.cookie = quote(genuine, safe="")
    assert (await api.call("GET", "/api/me")).status == 200


async def test_logout_ends_the_session(api: Api) -> None:
    await api.login("gina@contoso.com")
    old = api.cookie

    reply = await api.call("POST", "/api/logout")
    assert reply.status == 200
    assert api.cookie is None

    api.cookie = old
    assert (await api.call("GET", "/api/me")).status == 401


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (GUEST_ID, "alice@contoso.com"),
        ("Alice_Contoso.com#EXT#@Fabrikam.onmicrosoft.com", "alice@contoso.com"),
        ("john_doe_contoso.com#EXT#@fabrikam.onmicrosoft.com", "john_doe@contoso.com"),
        ("  Alice@Contoso.com ", "alice@contoso.com"),
        ("alice@contoso.com", "alice@contoso.com"),
        ("nounderscore#EXT#@fabrikam.onmicrosoft.com", "nounderscore"),
    ],
)
def test_normalize_user_id(raw: str, expected: str) -> None:
    assert normalize_user_id(raw) == expected
    assert normalize_user_id(expected) == expected


async def test_guest_and_plain_ids_reach_the_same_files(api: Api) -> None:
    guest = await api.login(GUEST_ID, "fabrikam")
    assert guest.body["userId"] == "alice@contoso.com"
    file = (await api.upload("shared.txt")).body["file"]

    await api.login("Alice@Contoso.com", "contoso")
    me = await api.call("GET", "/api/me")
    listed = await api.call("GET", "/api/files")

    assert me.body["userId"] == "alice@contoso.com"
    assert listed.body["files"] == [file]


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"userId": "", "tenantId": "t"}, 400, "userId must not be empty"),
        ({"userId": 7, "tenantId": "t"}, 400, "userId must be a string"),
        ({"userId": "a"}, 400, "tenantId must be a string"),
        ({"userId": "a" * 300, "tenantId": "t"}, 400, "at most 256"),
        ({"userId": "a\nb", "tenantId": "t"}, 400, "control characters"),
        ({"userId": "#EXT#@x", "tenantId": "t"}, 400, "userId must name a user"),
        ({"userId": "a", "tenantId": "t", "role": "admin"}, 400, "unexpected field"),
    ],
)
async def test_login_validates_its_body(
    api: Api, body: dict[str, object], status: int, error: str
) -> None:
    reply = await api.call("POST", "/api/login", body)

    assert reply.status == status
    assert error in reply.body["error"]
    assert api.cookie is None


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"size": 3}, 400, "name must be a string"),
        ({"name": " ", "size": 3}, 400, "name must name a file"),
        ({"name": "..", "size": 3}, 400, "name must name a file"),
        ({"name": "a/b", "size": 3}, 400, "must not contain"),
        ({"name": "x" * 256, "size": 3}, 400, "at most 255"),
        ({"name": "a"}, 400, "give size or content"),
        ({"name": "a", "size": -1}, 400, "size must be between"),
        ({"name": "a", "size": True}, 400, "size must be an integer"),
        ({"name": "a", "size": 1.5}, 400, "size must be an integer"),
        ({"name": "a", "content": 5}, 400, "content must be a string"),
        ({"name": "a", "content": "abc", "size": 4}, 400, "does not match"),
        ({"name": "a", "content": "\ud800"}, 400, "valid Unicode"),
        ({"name": "a", "size": 1, "owner": "x"}, 400, "unexpected field"),
        (
            {"name": "a", "content": "x" * (MAX_CONTENT_BYTES + 1)},
            413,
            "content must be at most",
        ),
    ],
)
async def test_upload_validates_its_body(
    api: Api, body: dict[str, object], status: int, error: str
) -> None:
    await api.login("hank@contoso.com")

    reply = await api.call("POST", "/api/files", body)

    assert reply.status == status
    assert error in reply.body["error"]
    assert (await api.call("GET", "/api/files")).body["files"] == []


async def test_requests_with_bad_bodies_get_clear_errors(api: Api) -> None:
    await api.login("ivy@contoso.com")
    json_type = {"Content-Type": "application/json"}

    not_json = await api.call(
        "POST", "/api/files", data=b"name=a", headers={"Content-Type": "text/plain"}
    )
    broken = await api.call("POST", "/api/files", data=b"{", headers=json_type)
    not_object = await api.call("POST", "/api/files", data=b"[1]", headers=json_type)
    too_big = await api.call(
        "POST", "/api/files", data=b" " * (200 * 1024), headers=json_type
    )

    assert (not_json.status, not_json.body["error"]) == (
        415,
        "content type must be application/json",
    )
    assert (broken.status, broken.body["error"]) == (400, "body is not valid JSON")
    assert (not_object.status, not_object.body["error"]) == (
        400,
        "body must be a JSON object",
    )
    assert too_big.status == 413
    assert "error" in too_big.body


async def test_unknown_files_are_not_found(api: Api) -> None:
    await api.login("jack@contoso.com")
    file = (await api.upload("only.txt")).body["file"]
    missing = "f" * 32

    replies = [
        await api.call("DELETE", f"/api/files/{missing}"),
        await api.call("DELETE", "/api/files/not-an-id"),
        await api.call("POST", f"/api/files/{missing}/restore"),
        # a listed file is not in the trash, so it cannot be restored
        await api.call("POST", f"/api/files/{file['id']}/restore"),
    ]

    for reply in replies:
        assert reply.status == 404
        assert reply.body["error"] == "no such file"


async def test_files_belong_to_their_user(api: Api) -> None:
    await api.login("kate@contoso.com")
    file = (await api.upload("private.txt")).body["file"]

    await api.login("leo@contoso.com")
    listed = await api.call("GET", "/api/files")
    stolen = await api.call("DELETE", f"/api/files/{file['id']}")

    assert listed.body["files"] == []
    assert stolen.status == 404


async def test_concurrent_uploads_are_all_kept(api: Api) -> None:
    await api.login("mia@contoso.com")

    replies = await asyncio.gather(
        *(
            api.call("POST", "/api/files", {"name": f"f{i}", "size": i})
            for i in range(30)
        )
    )

    assert [r.status for r in replies] == [201] * 30
    listed = await api.call("GET", "/api/files")
    assert sorted(f["name"] for f in listed.body["files"]) == sorted(
        f"f{i}" for i in range(30)
    )


async def test_racing_first_logins_keep_both_uploads(api: Api) -> None:
    other = Api(api.http, api.base)

    async def first_visit(client: Api, name: str) -> None:
        await client.login("nora@contoso.com")
        await client.upload(name)

    await asyncio.gather(first_visit(api, "one.txt"), first_visit(other, "two.txt"))

    assert api.cookie != other.cookie
    listed = await api.call("GET", "/api/files")
    assert sorted(f["name"] for f in listed.body["files"]) == ["one.txt", "two.txt"]


async def test_file_count_is_limited_per_user(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend.store, "MAX_FILES_PER_USER", 2)
    await api.login("olga@contoso.com")
    kept = (await api.upload("a.txt")).body["file"]
    await api.upload("b.txt")

    full = await api.call("POST", "/api/files", {"name": "c.txt", "size": 1})
    await api.call("DELETE", f"/api/files/{kept['id']}")
    # trashed files still count, so trashing does not make room
    still_full = await api.call("POST", "/api/files", {"name": "c.txt", "size": 1})

    assert (full.status, full.body["error"]) == (409, "at most 2 files per user")
    assert still_full.status == 409


async def test_file_listings_log_the_session(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    await api.login(GUEST_ID, "fabrikam")
    assert api.cookie is not None
    session_id = unsign(api.cookie, SECRET)

    with caplog.at_level(logging.INFO, logger="backend.session"):
        await api.call("GET", "/api/files")
        await api.call("GET", "/api/files/trash")
        await api.call("GET", "/api/me")

    expected = (
        f"[SESSION DEBUG] UserID: alice@contoso.com | SessionID: {session_id} "
        "| TenantID: fabrikam"
    )
    debug = [
        r.getMessage() for r in caplog.records if "SESSION DEBUG" in r.getMessage()
    ]
    assert debug == [expected, expected]
    assert all(api.cookie not in r.getMessage() for r in caplog.records)


async def test_every_response_names_the_instance(api: Api) -> None:
    replies = [
        await api.call("GET", "/"),
        await api.call("GET", "/health"),
        await api.call("GET", "/api/me"),
        await api.call("GET", "/no/such/page"),
        await api.call("PUT", "/api/login"),
    ]

    assert [r.status for r in replies] == [200, 200, 401, 404, 405]
    assert all(r.headers["X-Instance-Id"] == "solo" for r in replies)
    assert replies[3].body == {"error": "not found"}
    assert replies[4].body == {"error": "method not allowed"}
    assert replies[4].headers["Allow"] == "POST"


async def test_page_is_self_contained(api: Api) -> None:
    page = await api.call("GET", "/")

    assert page.headers["Content-Type"].startswith("text/html")
    assert "X-Instance-Id" in page.text
    assert "/api/files/trash" in page.text
    assert "<script src" not in page.text
    assert "<link" not in page.text
    assert "http://" not in page.text and "https://" not in page.text


async def test_health_reports_the_store(api: Api) -> None:
    reply = await api.call("GET", "/health")

    assert reply.status == 200
    assert reply.body["status"] == "ok"
    assert reply.body["store"] in {"memory", "redis"}
    assert reply.body["storeReachable"] is True
    assert reply.body["instance"] == "solo"


async def test_redis_sessions_expire_when_idle(redis: RedisServer) -> None:
    settings = Settings(
        instance_id="ttl", redis_url=redis.url, session_secret=SECRET, session_ttl=600
    )
    async with TestServer(make_app(settings)) as app, client_session() as http:
        api = Api(http, f"http://{app.host}:{app.port}")
        await api.login("nina@contoso.com")
        assert api.cookie is not None
        key = f"backend:session:{unsign(api.cookie, SECRET)}"

        inspect = redis_sync.Redis.from_url(redis.url)
        try:
            # shorten the lifetime by hand; the next request must renew it
            inspect.expire(key, 5)
            await api.call("GET", "/api/me")
            renewed = inspect.ttl(key)
            inspect.delete(key)
            gone = await api.call("GET", "/api/me")
        finally:
            inspect.close()

    assert 590 <= renewed <= 600
    assert gone.status == 401


async def test_memory_sessions_expire_when_idle() -> None:
    settings = Settings(instance_id="ttl", session_secret=SECRET, session_ttl=1)
    async with TestServer(make_app(settings)) as app, client_session() as http:
        api = Api(http, f"http://{app.host}:{app.port}")
        await api.login("omar@contoso.com")

        # requests closer together than the lifetime keep the session alive
        for _ in range(3):
            await asyncio.sleep(0.5)
            assert (await api.call("GET", "/api/me")).status == 200
        await asyncio.sleep(1.2)
        expired = await api.call("GET", "/api/me")

    assert expired.status == 401


# several instances, addressed alternately as a round-robin balancer would


async def test_memory_instances_drift_apart() -> None:
    with Instance("mem-a") as a, Instance("mem-b") as b:
        async with client_session() as http:
            api = Api(http, a.url)
            await api.login("pat@contoso.com")
            await api.upload("report.txt")
            on_a = await api.call("GET", "/api/files", base=a.url)
            on_b = await api.call("GET", "/api/files", base=b.url)

            # a new login on b gives b a session, but b never saw the upload
            await api.login("pat@contoso.com", base=b.url)
            files_on_b = await api.call("GET", "/api/files", base=b.url)
            back_on_a = await api.call("GET", "/api/files", base=a.url)
        output_a = a.output

    assert on_a.status == 200
    assert [f["name"] for f in on_a.body["files"]] == ["report.txt"]
    assert on_b.status == 401
    assert on_b.headers["X-Instance-Id"] == "mem-b"
    assert files_on_b.status == 200
    assert files_on_b.body["files"] == []
    assert back_on_a.status == 401
    assert "[SESSION DEBUG] UserID: pat@contoso.com | SessionID: " in output_a


async def test_redis_instances_share_sessions_and_files(redis: RedisServer) -> None:
    env = {"REDIS_URL": redis.url, "SESSION_SECRET": SECRET}
    with Instance("red-a", env) as a, Instance("red-b", env) as b:
        async with client_session() as http:
            api = Api(http, a.url)
            await api.login(GUEST_ID, "fabrikam", base=a.url)
            file = (await api.upload("report.txt", base=b.url)).body["file"]
            on_a = await api.call("GET", "/api/files", base=a.url)
            deleted = await api.call("DELETE", f"/api/files/{file['id']}", base=b.url)
            trash_a = await api.call("GET", "/api/files/trash", base=a.url)
            restored = await api.call(
                "POST", f"/api/files/{file['id']}/restore", base=b.url
            )
            me_a = await api.call("GET", "/api/me", base=a.url)

    assert on_a.body["files"] == [file]
    assert on_a.headers["X-Instance-Id"] == "red-a"
    assert deleted.status == 200
    assert deleted.headers["X-Instance-Id"] == "red-b"
    assert [f["id"] for f in trash_a.body["files"]] == [file["id"]]
    assert restored.status == 200
    assert me_a.body["userId"] == "alice@contoso.com"


async def test_redis_outage_answers_503_and_recovers(redis: RedisServer) -> None:
    env = {"REDIS_URL": redis.url, "SESSION_SECRET": SECRET}
    with Instance("out-a", env) as a, Instance("out-b", env) as b:
        async with client_session() as http:
            api = Api(http, a.url)
            await api.login("quinn@contoso.com")
            await api.upload("before.txt")

            redis.stop()
            started = time.monotonic()
            during = [
                await api.call("GET", "/api/files", base=a.url),
                await api.call("GET", "/api/me", base=b.url),
                await api.call("POST", "/api/files", {"name": "x", "size": 1}),
                await api.call(
                    "POST", "/api/login", {"userId": "quinn", "tenantId": "t"}
                ),
            ]
            outage_seconds = time.monotonic() - started
            health = await api.call("GET", "/health", base=b.url)

            redis.start()
            # the restarted Redis keeps nothing, so the old session is gone; a
            # new login must work on both instances without restarting them
            relogin = None
            for _ in range(50):
                relogin = await api.call(
                    "POST",
                    "/api/login",
                    {"userId": "quinn@contoso.com", "tenantId": "contoso"},
                    base=b.url,
                )
                if relogin.status == 200:
                    break
                await asyncio.sleep(0.2)
            await api.upload("after.txt", base=b.url)
            after = await api.call("GET", "/api/files", base=a.url)
            health_after = await api.call("GET", "/health", base=a.url)
        output_a = a.output

    for reply in during:
        assert reply.status == 503
        assert reply.body == {"error": "session store unavailable"}
    assert outage_seconds < 8
    assert health.status == 200
    assert health.body["storeReachable"] is False
    assert health.body["status"] == "degraded"
    assert relogin is not None and relogin.status == 200
    assert [f["name"] for f in after.body["files"]] == ["after.txt"]
    assert health_after.body["storeReachable"] is True
    assert "Redis unreachable" in output_a
    assert "Redis reachable again" in output_a
