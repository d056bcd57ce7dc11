"""Simulated users for the bench: each a browser with its own cookies and address.

A user does what a person does in the backend's page: log in, list the files, upload
one, delete the oldest, look in the trash, restore it, list again; a few rounds make
a session, then the person logs out and in again. A 401 ends the session (the person
logs in again); any other failure is counted and the person carries on after a short
pause. Every answer's X-Instance-Id is recorded with the session it belongs to.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import aiohttp

Profile = Literal["stable", "nat", "churn", "cookieless"]
PROFILES: tuple[str, ...] = get_args(Profile)

#: rounds of list, upload, delete, trash, restore, list in one session
ROUNDS_PER_SESSION = 3
#: sessions one person has before the browser is used by someone new
SESSIONS_PER_PERSON = 8
#: seconds a person waits after a failure before the next step
ERROR_PAUSE = 0.2
#: seconds one request may take
REQUEST_TIMEOUT = 10.0
#: how NAT users are spread over networks: most share the first
NAT_SHARES = (0.7, 0.2, 0.1)
#: requests between two address changes of a churning user, at least and at most
CHURN_EVERY = (3, 8)

INSTANCE_HEADER = "X-Instance-Id"
SESSION_COOKIE = "connect.sid"


def stable_address(index: int) -> str:
    """Return user index's own address, in a /24 network no other user shares."""
    return f"10.{1 + index // 250}.{index % 250}.10"


def nat_address(index: int, users: int) -> str:
    """Return the address of user index behind one of a few shared /24 networks."""
    position = (index + 0.5) / users
    network, total = 0, NAT_SHARES[0]
    while position >= total and network + 1 < len(NAT_SHARES):
        network += 1
        total += NAT_SHARES[network]
    return f"198.18.{network}.{1 + index % 250}"


def mobile_address(rng: random.Random) -> str:
    """Return a random carrier-grade NAT address, as a phone changing networks gets."""
    return f"100.{rng.randrange(64, 128)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


@dataclass(slots=True)
class SessionTrace:
    """One login session: when each answer came and which instance gave it."""

    user: int
    #: (monotonic time, instance id, status) of every answer carrying the header
    answers: list[tuple[float, str, int]] = field(default_factory=list)


@dataclass(slots=True)
class Observations:
    """Everything the users of one option saw, for the summary to count."""

    started: float
    requests: int = 0
    unauthorized: int = 0
    errors: int = 0
    #: monotonic times of the errors, to tell those after a kill
    error_times: list[float] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)
    #: ids of uploaded files a later listing or action did not find
    ghosts: set[str] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)
    per_instance: Counter[str] = field(default_factory=Counter)
    sessions: list[SessionTrace] = field(default_factory=list)

    def failed(self, kind: str) -> None:
        """Count one failure that is neither a 401 after login nor a ghost."""
        self.errors += 1
        self.error_times.append(time.monotonic())
        self.error_kinds[kind] += 1


@dataclass(slots=True)
class Reply:
    """A status and the decoded JSON body (None when there is none)."""

    status: int
    body: Any


class User:
    """One simulated browser: its cookies, its address and the person using it."""

    def __init__(
        self,
        index: int,
        users: int,
        profile: Profile,
        base_url: str,
        run_id: str,
        observations: Observations,
        affinity_cookie: str,
        seed: int = 1,
    ) -> None:
        self.index = index
        self.profile = profile
        self.base_url = base_url.rstrip("/")
        self.run_id = run_id
        self.obs = observations
        self.affinity_cookie = affinity_cookie
        self.rng = random.Random(seed * 100_003 + index)
        if profile == "nat":
            self.address = nat_address(index, users)
        elif profile == "churn":
            self.address = mobile_address(self.rng)
        else:
            self.address = stable_address(index)
        self._until_move = self.rng.randint(*CHURN_EVERY)
        self.person = 0
        self.sessions = 0
        self.uploads = 0
        #: what the person's listing and trash should hold: id -> name
        self.files: dict[str, str] = {}
        self.trash: dict[str, str] = {}
        self.trace: SessionTrace | None = None
        #: the last answer's time, instance and status, for the login to claim
        self._last_answer: tuple[float, str, int] | None = None

    @property
    def user_id(self) -> str:
        """Return the id the current person logs in with, unique to this run."""
        return f"{self.run_id}-u{self.index}-p{self.person}"

    async def live(self, deadline: float) -> None:
        """Work in sessions until the deadline; the browser stays the same."""
        jar = aiohttp.CookieJar(unsafe=True)
        connector = aiohttp.TCPConnector(limit=2)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(
            cookie_jar=jar, connector=connector, timeout=timeout
        ) as http:
            while time.monotonic() < deadline:
                if self.sessions >= SESSIONS_PER_PERSON:
                    self._next_person()
                await self._session(http, deadline)

    def _next_person(self) -> None:
        self.person += 1
        self.sessions = 0
        self.files.clear()
        self.trash.clear()

    async def _session(self, http: aiohttp.ClientSession, deadline: float) -> None:
        self.sessions += 1
        self.trace = None
        body = {"userId": self.user_id, "tenantId": "bench"}
        reply = await self._call(http, "POST", "/api/login", body)
        if reply is None:
            return
        if reply.status != 200:
            await self._failed(f"login {reply.status}")
            return

        # the login's own answer opened the trace; it belongs to the session
        trace = SessionTrace(self.index)
        if self._last_answer is not None:
            trace.answers.append(self._last_answer)
        self.trace = trace
        self.obs.sessions.append(trace)
        steps = (
            self._list,
            self._upload,
            self._delete,
            self._list_trash,
            self._restore,
            self._list,
        )
        for _ in range(ROUNDS_PER_SESSION):
            for step in steps:
                if time.monotonic() >= deadline:
                    return
                # a 401 ends the session: the person has to log in again
                if not await step(http):
                    return
        if time.monotonic() < deadline:
            await self._expect(http, "POST", "/api/logout", None, 200)

    async def _call(
        self, http: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> Reply | None:
        """Send one request as this browser; None after a transport failure."""
        self._last_answer = None
        headers = {"X-Forwarded-For": self.address}
        started = time.perf_counter()
        try:
            async with http.request(
                method, self.base_url + path, json=body, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
                instance = response.headers.get(INSTANCE_HEADER)
        except TimeoutError:
            await self._failed("timeout")
            return None
        except aiohttp.ClientError as exc:
            await self._failed(type(exc).__name__)
            return None
        finally:
            self._after_request(http)

        self.obs.requests += 1
        self.obs.latencies_ms.append((time.perf_counter() - started) * 1000)
        if instance is not None:
            self.obs.per_instance[instance] += 1
            self._last_answer = (time.monotonic(), instance, status)
            if self.trace is not None:
                self.trace.answers.append(self._last_answer)
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = None
        return Reply(status, decoded)

    def _after_request(self, http: aiohttp.ClientSession) -> None:
        if self.profile == "cookieless":
            # such a client keeps the application's cookie and drops the proxy's
            http.cookie_jar.clear(lambda morsel: morsel.key == self.affinity_cookie)
        elif self.profile == "churn":
            self._until_move -= 1
            if self._until_move <= 0:
                self.address = mobile_address(self.rng)
                self._until_move = self.rng.randint(*CHURN_EVERY)

    async def _failed(self, kind: str) -> None:
        self.obs.failed(kind)
        await asyncio.sleep(ERROR_PAUSE)

    async def _expect(
        self,
        http: aiohttp.ClientSession,
        method: str,
        path: str,
        body: Any,
        status: int,
        missing_file: str | None = None,
    ) -> Reply | bool | None:
        """Send a request of the session; False on a 401, None on another failure.

        A 404 for missing_file, a file this person holds, means the instance that
        answered does not have it: a ghost, not an error.
        """
        reply = await self._call(http, method, path, body)
        if reply is None:
            return None
        if reply.status == status:
            return reply
        if reply.status == 401:
            self.obs.unauthorized += 1
            return False
        if reply.status == 404 and missing_file is not None:
            self.obs.ghosts.add(missing_file)
            return None
        await self._failed(f"{method} {reply.status}")
        return None

    def _check_listing(self, reply: Reply, expected: dict[str, str]) -> None:
        listed = reply.body.get("files", []) if isinstance(reply.body, dict) else []
        present = {item.get("id") for item in listed if isinstance(item, dict)}
        self.obs.ghosts.update(set(expected) - present)

    async def _list(self, http: aiohttp.ClientSession) -> bool:
        reply = await self._expect(http, "GET", "/api/files", None, 200)
        if isinstance(reply, Reply):
            self._check_listing(reply, self.files)
        return reply is not False

    async def _list_trash(self, http: aiohttp.ClientSession) -> bool:
        reply = await self._expect(http, "GET", "/api/files/trash", None, 200)
        if isinstance(reply, Reply):
            self._check_listing(reply, self.trash)
        return reply is not False

    async def _upload(self, http: aiohttp.ClientSession) -> bool:
        self.uploads += 1
        name = f"notes-{self.uploads}.txt"
        body = {"name": name, "content": f"written by user {self.index}"}
        reply = await self._expect(http, "POST", "/api/files", body, 201)
        if isinstance(reply, Reply) and isinstance(reply.body, dict):
            record = reply.body.get("file", {})
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                self.files[record["id"]] = name
        return reply is not False

    async def _delete(self, http: aiohttp.ClientSession) -> bool:
        if not self.files:
            return True
        file_id = next(iter(self.files))
        path = f"/api/files/{file_id}"
        reply = await self._expect(http, "DELETE", path, None, 200, file_id)
        if isinstance(reply, Reply):
            self.trash[file_id] = self.files.pop(file_id)
        return reply is not False

    async def _restore(self, http: aiohttp.ClientSession) -> bool:
        if not self.trash:
            return True
        file_id = next(iter(self.trash))
        path = f"/api/files/{file_id}/restore"
        reply = await self._expect(http, "POST", path, None, 200, file_id)
        if isinstance(reply, Reply):
            self.files[file_id] = self.trash.pop(file_id)
        return reply is not False


async def drive(
    observations: Observations,
    base_url: str,
    users: int,
    duration: float,
    profile: Profile,
    run_id: str,
    affinity_cookie: str,
) -> None:
    """Run users against base_url for duration seconds, recording what they see."""
    deadline = time.monotonic() + duration
    population = [
        User(index, users, profile, base_url, run_id, observations, affinity_cookie)
        for index in range(users)
    ]
    async with asyncio.TaskGroup() as group:
        for user in population:
            group.create_task(user.live(deadline), name=f"user-{user.index}")
