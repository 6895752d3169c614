"""Child `driftrec` processes (worker, scoring service) started with a given settings object.

Why here and not in ``tests/``: the evaluation and the demo start the very same processes the
integration tests do, so the environment that makes a subprocess see a settings object lives in
one place (``driftrec.harness`` builds the tests' and benchmarks' worker processes on it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, SecretStr
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_fixed

from driftrec.contract.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(sorted(value) if isinstance(value, list) else value)  # complex fields are JSON
    return str(value)


def _reveal_secrets(model: BaseModel, dumped: dict[str, object]) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = field.alias or name
        if isinstance(value, SecretStr):
            dumped[key] = value.get_secret_value()
        elif isinstance(value, BaseModel) and isinstance(dumped.get(key), dict):
            _reveal_secrets(value, dumped[key])  # type: ignore[arg-type]  # a section's dump is a dict


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a `driftrec` subprocess see exactly these settings.

    Every field is passed (nested sections as ``DRIFTREC_<SECTION>__<FIELD>``), so a child agrees
    with its parent on the broker, Redis, prefixes, ports *and* every model/serving knob.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTREC_")}
    dumped = settings.model_dump(mode="json", by_alias=True)
    _reveal_secrets(settings, dumped)  # JSON dumps mask them; a child needs the real ones
    for name, value in dumped.items():
        if isinstance(value, dict):
            for field, inner in value.items():
                if inner is not None:
                    env[f"DRIFTREC_{name.upper()}__{field.upper()}"] = _env_value(inner)
        elif value is not None:
            env[f"DRIFTREC_{name.upper()}"] = _env_value(value)
    return env


T = TypeVar("T")


class ProcessGone(RuntimeError):
    """The process a wait depended on ended first."""


def poll_until(
    predicate: Callable[[], T],
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
    gone: Callable[[], str | None] | None = None,
) -> T:
    """``predicate()``'s first truthy value, asked every ``interval_s``; ``TimeoutError`` after
    ``timeout_s``, ``ProcessGone`` as soon as ``gone()`` says why waiting is pointless."""

    def attempt() -> T:
        if gone is not None and (why := gone()) is not None:
            raise ProcessGone(f"{why} while waiting for {what}")
        return predicate()

    retrying = Retrying(
        stop=stop_after_delay(timeout_s), wait=wait_fixed(interval_s), retry=retry_if_result(lambda value: not value)
    )
    try:
        return retrying(attempt)
    except RetryError:
        raise TimeoutError(f"{what}: not within {timeout_s:.0f} s") from None


class ChildProcess:
    """One `python -m driftrec.cli …` subprocess in its own session (so Ctrl-C is ours to relay)."""

    def __init__(self, name: str, argv: list[str], settings: Settings, log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], object], timeout_s: float = 90.0) -> ChildProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "driftrec.cli", *self.argv],
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            poll_until(ready, timeout_s, f"{self.name} to be ready", 0.2, gone=self.exit_reason)
        except ProcessGone as exc:
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from None
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from None
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_reason(self) -> str | None:
        """How the child ended (``None`` while it runs): its exit code or the signal that killed it."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"{self.name} was killed by {signal.Signals(-code).name}"
        return f"{self.name} exited with code {code}"

    def stop(self, timeout_s: float = 20.0) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def parse_prometheus(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, keyed as it is printed: ``name{label="v",...}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def worker_metrics(settings: Settings) -> dict[str, float] | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{settings.worker_web_port}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return None
    return parse_prometheus(text)


def serving_url(settings: Settings) -> str:
    host = settings.serving.host
    host = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
    return f"http://{host}:{settings.serving.port}"


def serving_healthy(settings: Settings) -> dict | None:
    try:
        resp = httpx.get(f"{serving_url(settings)}/healthz", timeout=1.0)
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


def start_worker(settings: Settings, log_path: Path) -> ChildProcess:
    return ChildProcess("worker", ["worker", "--loglevel", "warn"], settings, log_path).start(
        lambda: worker_metrics(settings) is not None
    )


def start_server(settings: Settings, log_path: Path) -> ChildProcess:
    return ChildProcess("scoring service", ["serve"], settings, log_path).start(lambda: serving_healthy(settings))


class RedisServer:
    """A private ``redis-server`` on loopback that can be killed, restarted and frozen, for the
    fault tests and ``benchmarks/faults.py``. It keeps an append-only file fsynced on every write,
    so a SIGKILL and restart loses no acknowledged write: what such a test measures is driftrec's
    loss, not Redis's."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)]
        argv += ["--logfile", str(self.folder / "redis.log")]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll_until(self.ping, timeout_s, f"redis-server on port {self.port}", 0.05)
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5).ping())
        except (redis.RedisError, OSError):
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
