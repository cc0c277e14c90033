"""Shared fixtures: a real Redis-compatible server on a free loopback port, per test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from shared.redis_server import EmbeddedRedis
from shared.keys import Keys
from shared.redis_client import connect


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


class ReplyDroppingProxy:
    """A loopback TCP proxy in front of a Redis server that can lose replies: after arm(marker),
    the next request containing `marker` reaches the server (which runs it), but its reply is
    never delivered: the proxy closes that connection instead, as a network fault would. The
    client then reconnects and retries a command the server already ran."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port, self.armed, self.dropped = target_port, [], 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, password: str | None = None) -> str:
        return f"redis://{':' + password + '@' if password else ''}127.0.0.1:{self.port}/0"

    def arm(self, marker: bytes) -> None:
        with self.lock:
            self.armed.append(marker)

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"drop": False}
            threading.Thread(target=self._pump_requests, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._pump_replies, args=(server, client, state), daemon=True).start()

    def _pump_requests(self, src, dst, state) -> None:
        while data := self._recv(src):
            with self.lock:
                hit = next((m for m in self.armed if m in data), None)
                if hit is not None:
                    self.armed.remove(hit)
                    state["drop"] = True  # set before the server can answer
            dst.sendall(data)
        self._close(src, dst)

    def _pump_replies(self, src, dst, state) -> None:
        while data := self._recv(src):
            if state["drop"]:
                self.dropped += 1
                return self._close(src, dst)
            dst.sendall(data)
        self._close(src, dst)

    @staticmethod
    def _recv(sock) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    @staticmethod
    def _close(*socks) -> None:
        import socket

        for s in socks:
            try:  # shutdown first: it sends FIN at once, even while the other pump blocks in recv
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def lossy(redis_server: EmbeddedRedis) -> Iterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy(redis_server.port)
    yield proxy
    proxy.close()
