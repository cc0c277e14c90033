"""Local launcher: runs the three services as separate processes against one Redis.

`opd demo` uses it: an embedded Redis unless REDIS_URL is set, one learner, M teachers and
N rollouts, each started with exactly the command a container runs (`service_command`),
logs under <run_dir>/logs/. Children run in their own sessions so Ctrl-C reaches only the
launcher, which then stops them in order (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("learner", "teacher", "rollout")


def service_command(service: str, flags: dict[str, object] | None = None) -> list[str]:
    """The command line that starts one service (`python -m services.<name> --flag value`)."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    args = [sys.executable, "-m", f"services.{service}"]
    for key, value in (flags or {}).items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):  # implicit flags: --reset / --no-reset
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Launcher:
    """Starts and stops service processes; every child shares `env`."""

    env: dict[str, str]
    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, service: str, name: str, flags: dict[str, object]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(service_command(service, flags), stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                    start_new_session=True)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def failed(self) -> list[Child]:
        """Children that exited with an error."""
        return [c for c in self.children if c.proc.poll() not in (None, 0)]

    def raise_if_failed(self) -> None:
        """Raise with the log tail of the first child that exited with an error."""
        for child in self.failed():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{self.tail(child)}")

    def stop(self, names: list[str] | None = None, grace_s: float = 20.0) -> None:
        """SIGTERM the named children (all by default), wait, SIGKILL stragglers."""
        targets = [c for c in self.children if names is None or c.name in names]
        for c in targets:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in targets:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    def tail(self, child: Child, lines: int = 30) -> str:
        text = child.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])
