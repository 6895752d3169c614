"""The command line: a user's mistake is one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import socket
import sys

import pytest

from driftrec import __version__, cli
from driftrec.contract.settings import get_settings


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``driftrec <args>`` in-process: (exit status, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["driftrec", *args])
    get_settings.cache_clear()
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    get_settings.cache_clear()
    out = capsys.readouterr()
    return int(stopped.value.code or 0), out.out + out.err


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, capsys, "--version") == (0, f"driftrec {__version__}\n")


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("DRIFTREC_MEMORY__LAMDA", "1", "unknown setting(s) in the environment: DRIFTREC_MEMORY__LAMDA"),
        ("DRIFTREC_REDIS_URL", "notaurl", "DRIFTREC_REDIS_URL: 'notaurl' is not a Redis URL"),
        ("DRIFTREC_KAFKA_BOOTSTRAP", "localhost:x", "DRIFTREC_KAFKA_BOOTSTRAP: 'localhost:x' is not host:port"),
        ("DRIFTREC_STATE_TTL_S", "-1", "DRIFTREC_STATE_TTL_S: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_setting_is_one_line_and_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    status, text = run_cli(monkeypatch, capsys, "up")
    assert status == 1
    assert text.startswith("driftrec: error: bad setting: ") and says in text
    assert text.count("\n") == 1 and "Traceback" not in text and "Value error," not in text


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("replay", "ml-100k", "--limit", "0"), "Invalid value for '--limit'"),
        (("evaluate", "--limit", "-5"), "Invalid value for '--limit'"),
        (("evaluate", "--window", "0"), "Invalid value for '--window'"),
        (("evaluate", "--rank-fraction", "2"), "Invalid value for '--rank-fraction'"),
        (("worker", "--loglevel", "loud"), "'loud' is not one of 'crit', 'error', 'warn', 'info', 'debug'"),
        (("serve", "--port", "0"), "Invalid value for '--port'"),
        (("worker", "--roles", "ingest,bake"), "unknown role(s) ['bake']"),
        (("nosuch",), "No such command 'nosuch'"),
    ],
)
def test_a_bad_option_is_refused_with_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], says: str
) -> None:
    status, text = run_cli(monkeypatch, capsys, *args)
    assert status == 1, text
    assert says in text and "Traceback" not in text


@pytest.mark.integration
def test_no_broker_is_one_line_at_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("DRIFTREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    status, text = run_cli(monkeypatch, capsys, "replay", "ml-100k", "--limit", "5")
    assert status == 1
    assert text == (
        f"driftrec: error: no Kafka broker answers at 127.0.0.1:{port}: run `driftrec up` (starts the embedded "
        "broker on loopback) or set DRIFTREC_KAFKA_BOOTSTRAP\n"
    )


@pytest.mark.integration
def test_an_unknown_dataset_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_need_services", lambda *a, **k: None)
    status, text = run_cli(monkeypatch, capsys, "replay", "/nonexistent/events.jsonl")
    assert status == 1
    assert text.startswith("driftrec: error: unknown dataset '/nonexistent/events.jsonl'") and text.count("\n") == 1
