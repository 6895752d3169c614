"""A real local Redis Cluster: three masters on loopback ports, no replicas.

The integration tests and ``benchmarks/scale_out.py`` run the Redis Cluster path against it.

Started with ``redis-server --cluster-enabled yes`` and joined with ``redis-cli --cluster
create``, in a temporary folder the caller owns; stopped (SHUTDOWN NOSAVE) on exit.
"""

from __future__ import annotations

import contextlib
import functools
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis


@contextlib.contextmanager
def local_cluster(folder: Path, masters: int = 3) -> Iterator[str]:
    """Yield the URL of one node of a fresh cluster (any node routes the client to the rest)."""
    ports = _cluster_ports(masters)
    procs = []
    try:
        for port in ports:
            node = folder / f"node-{port}"
            node.mkdir(parents=True, exist_ok=True)
            procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(node),
                        "--logfile",
                        str(node / "redis.log"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            _wait(functools.partial(_ping, port), f"node {port} to answer")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait(lambda: all(_state(p) == "ok" for p in ports), "the cluster to be ok")
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for port in ports:
            with contextlib.suppress(redis.RedisError, OSError):
                redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).shutdown(nosave=True)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()


def _cluster_ports(n: int) -> list[int]:
    """``n`` distinct free ports whose cluster bus ports (port + 10000) are free and valid too
    (an ephemeral port above 55535 has no bus port: redis-server would refuse to start)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20_000, 45_000)
        if port in ports or port + 10_000 in ports or port - 10_000 in ports:
            continue
        if all(_free(p) for p in (port, port + 10_000)):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ping(port: int) -> bool:
    return bool(redis.Redis(host="127.0.0.1", port=port).ping())


def _state(port: int) -> str:
    info = redis.Redis(host="127.0.0.1", port=port).execute_command("CLUSTER INFO")  # parsed into a dict
    return str(info.get("cluster_state", "")) if isinstance(info, dict) else ""


def _wait(ok: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ok():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.1)
