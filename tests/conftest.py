"""Shared fixtures: a real Redis-compatible server on a free loopback port, per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from shared.redis_server import EmbeddedRedis
from shared.streams import Keys, connect


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def client(redis_server: EmbeddedRedis) -> redis.Redis:
    return connect(redis_server.url)


@pytest.fixture
def keys() -> Keys:
    """A fresh run namespace per test, so tests never see each other's streams."""
    return Keys(f"test-{uuid.uuid4().hex[:8]}")
