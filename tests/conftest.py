"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer, redis_server


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A private redis-server on a free port; tests may stop() and start() it."""
    with redis_server() as server:
        yield server
