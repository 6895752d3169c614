"""Real processes the integration tests and the benchmarks both start: a `driftrec` worker that
can be killed (SIGKILL, like a crashed host) or frozen (SIGSTOP), a free loopback port, and the
removal of a run's Redis keys.

Why in the package and not in ``tests/``: the benchmarks measure the same processes the tests
check (``benchmarks/faults.py``, ``scale_out.py``, ``freshness.py`` ...), and a benchmark that
imported the test suite made ``tests/`` a dependency of the measurements.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx

from driftrec.contract.settings import Settings
from driftrec.procs import ProcessGone, parse_prometheus, poll_until, settings_env
from driftrec.storage.client import connect_sync

REPO = Path(__file__).resolve().parents[1]


class WaitFailed(RuntimeError):
    """A condition did not hold in time (or its worker exited); the message has the worker's log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def delete_prefix(settings: Settings, prefix: str | None = None) -> None:
    client = connect_sync(settings)
    chunk: list[bytes] = []

    def unlink() -> None:  # key by key in one pipeline: a cluster refuses a cross-slot UNLINK
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.unlink(key)
        pipe.execute()
        chunk.clear()

    for key in client.scan_iter(match=f"{prefix or settings.key_prefix}:*", count=5000):
        chunk.append(key)
        if len(chunk) >= 5000:
            unlink()
    if chunk:
        unlink()


class WorkerProcess:
    """A real `driftrec worker` (or ``command``, e.g. ``("trainer",)``) subprocess; ``kill()`` sends
    SIGKILL like a crashed host, ``pause()`` SIGSTOP like a host that froze."""

    def __init__(self, settings: Settings, log_path: Path, command: tuple[str, ...] = ("worker",)) -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "driftrec.cli",
                *self.command,
                "--loglevel",
                os.environ.get("DRIFTREC_TEST_LOGLEVEL", "warn"),
            ],
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        wait_for(lambda: self.metrics() is not None, 60, "worker web port", self)
        return self

    def metrics(self) -> dict[str, float] | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.settings.worker_web_port}/metrics", timeout=1.0).text
        except httpx.HTTPError:
            return None
        return parse_prometheus(text)

    def health(self) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], httpx.get(f"{self.url}/healthz", timeout=1.0).json())
        except httpx.HTTPError:
            return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.worker_web_port}"

    def pause(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def wait_for(
    predicate: Callable[[], object],
    timeout_s: float,
    what: str,
    worker: WorkerProcess | None = None,
    interval: float = 0.25,
) -> object:
    def exited() -> str | None:
        proc = worker.proc if worker else None
        return None if proc is None or proc.poll() is None else f"worker exited ({proc.returncode})"

    try:
        return poll_until(predicate, timeout_s, what, interval, gone=exited)
    except (TimeoutError, ProcessGone) as exc:
        raise WaitFailed(f"{exc}\n{worker.log_tail() if worker else ''}") from None
