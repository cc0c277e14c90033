"""Redis connections of the services: a retrying client, a fail-fast probe, start-up wait.

`connect` is what every service talks to Redis through (exponential-backoff retries across
drops and restarts); `probe_client` + `ping` answer within seconds for health probes and
start-up checks, and turn errors no retry can fix (wrong or missing password, bad database)
into `RedisFatal` with one line saying what to check; `wait_for_redis` blocks a starting
service until the server answers.

    from shared.redis_client import connect
    client = connect("redis://:PASSWORD@127.0.0.1:6379/0")
"""

from __future__ import annotations

import logging
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger("opd.redis")


def connect(url: str) -> redis.Redis:
    """Client that retries with exponential backoff across connection drops and restarts."""
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=60,  # above every blocking read here (<= 3 s): a half-open connection errors and is retried
        socket_keepalive=True,
    )


class RedisFatal(RuntimeError):
    """A Redis error that retrying cannot fix: wrong password, no password, bad database."""


def probe_client(url: str, timeout_s: float = 2.0) -> redis.Redis:
    """A client without retries, for start-up checks and the health probe: each call answers
    within `timeout_s` instead of retrying for minutes like the services' client."""
    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(), 0), socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s)


def ping(client: redis.Redis) -> None:
    """PING; errors no retry can fix raise RedisFatal with the cause, unreachability propagates."""
    where = "{host}:{port}/{db}".format(**{k: client.connection_pool.connection_kwargs.get(k)
                                           for k in ("host", "port", "db")})
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as e:
        raise RedisFatal(f"Redis at {where} refused this client ({e}): check the password in REDIS_URL "
                         "(redis://:PASSWORD@host:port/db)") from None
    except redis.ResponseError as e:  # NOAUTH, a database index out of range, ...
        raise RedisFatal(f"Redis at {where} answered an error: {e}: check REDIS_URL") from None


def wait_for_redis(url: str, timeout_s: float = 30.0) -> None:
    """Block until the server answers PING; RedisFatal at once for errors retrying cannot fix,
    or after `timeout_s` of unreachability."""
    client = probe_client(url)
    deadline = time.monotonic() + timeout_s
    next_note = time.monotonic() + 5
    while True:
        try:
            return ping(client)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() > deadline:
                raise RedisFatal(f"Redis unreachable for {timeout_s:.0f} s: {e}") from None
            if time.monotonic() > next_note:
                log.warning("waiting for Redis: %s", e)
                next_note = time.monotonic() + 5
            time.sleep(0.2)
