"""`driftrec …`: every command reads the same settings, so they find each other.

A user's mistake (an unknown dataset, a missing file, no broker or Redis where the settings point,
a bad setting) is one line on stderr and exit status 1 (``main``); a traceback means a bug.
"""

from __future__ import annotations

import enum
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.exceptions import TyperException

from driftrec import __version__
from driftrec.contract.settings import Settings, get_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Online adaptive recommendation over Kafka and Redis. Settings: DRIFTREC_* variables (README).",
)


class UserError(Exception):
    """A mistake the user can fix; ``main`` prints it as one line and exits 1."""


class LogLevel(enum.StrEnum):
    crit = "crit"
    error = "error"
    warn = "warn"
    info = "info"
    debug = "debug"


_PY_LEVEL = {"crit": "CRITICAL", "error": "ERROR", "warn": "WARNING", "info": "INFO", "debug": "DEBUG"}
LOGLEVEL = typer.Option(help="log level (the worker's Faust log too)", case_sensitive=False)


def _logging(level: str = "info") -> None:
    logging.basicConfig(level=_PY_LEVEL.get(level, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("kafka", "aiokafka", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _settings() -> Settings:
    """The settings from the environment; a bad value or an unknown ``DRIFTREC_*`` name is a UserError."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(_problem(err["loc"], err["msg"]) for err in exc.errors())
        hint = "" if "README" in problems else " (see README, Configuration)"
        raise UserError(f"bad setting: {problems}{hint}") from None


def _problem(loc: tuple[int | str, ...], msg: str) -> str:
    """One setting's complaint, named as the variable that sets it, without pydantic's prefix."""
    msg = msg.removeprefix("Value error, ")
    return f"DRIFTREC_{'__'.join(str(part) for part in loc).upper()}: {msg}" if loc else msg


def _need_services(settings: Settings, kafka: bool = True, redis: bool = True) -> None:
    """Fail in about a second, with what to do, where a command would otherwise hang on a
    missing broker or Redis."""
    from driftrec import embedded

    if redis and not embedded.redis_answers(settings):
        raise UserError(
            f"no Redis answers at {settings.redis_url}: run `driftrec up` (starts one on loopback) "
            "or set DRIFTREC_REDIS_URL"
        )
    if kafka and not embedded.kafka_answers(settings):
        raise UserError(
            f"no Kafka broker answers at {settings.kafka_bootstrap}: run `driftrec up` (starts the embedded "
            "broker on loopback) or set DRIFTREC_KAFKA_BOOTSTRAP"
        )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"driftrec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Online adaptive recommendation over Kafka and Redis. Settings: DRIFTREC_* variables (README)."""


@app.command()
def up() -> None:
    """Start the embedded broker and Redis (or check the configured ones) and create the topics."""
    from driftrec.embedded import up as bring_up

    _logging()
    for line in bring_up(_settings()):
        typer.echo(line)


@app.command("settings")
def show_settings(
    markdown: Annotated[bool, typer.Option(help="a Markdown table (the README's 'Every setting')")] = False,
) -> None:
    """Every DRIFTREC_* variable with its default and what it does."""
    from driftrec import settings_doc

    typer.echo(settings_doc.markdown() if markdown else settings_doc.text())


@app.command()
def down() -> None:
    """Stop what `driftrec up` started, nothing else."""
    from driftrec.embedded import down as bring_down

    for line in bring_down(_settings()):
        typer.echo(line)


@app.command()
def worker(
    loglevel: Annotated[LogLevel, LOGLEVEL] = LogLevel.info,
    roles: Annotated[
        str | None,
        typer.Option(help="comma-separated: ingest, trainer (default: env DRIFTREC_WORKER_ROLES, else both)"),
    ] = None,
) -> None:
    """Run a worker: ingest joins the consumer group (start more to scale out); the trainer role
    trains each model while it holds the model's lease and stands by otherwise."""
    settings = _settings()
    if roles is not None:
        chosen = {r.strip() for r in roles.split(",") if r.strip()}
        unknown = chosen - {"ingest", "trainer"}
        if unknown or not chosen:
            raise typer.BadParameter(
                f"unknown role(s) {sorted(unknown)}: choose from ingest, trainer", param_hint="--roles"
            )
        settings = settings.model_copy(update={"worker_roles": frozenset(chosen)})
    _need_services(settings)
    from driftrec.worker import main

    main(settings, loglevel.value)


@app.command()
def trainer(loglevel: Annotated[LogLevel, LOGLEVEL] = LogLevel.info) -> None:
    """Run the trainer role alone: one active trainer per model (lease), the others standby."""
    from driftrec.worker import main

    settings = _settings()
    _need_services(settings)
    main(settings.model_copy(update={"worker_roles": frozenset({"trainer"})}), loglevel.value)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="address to bind (default: env DRIFTREC_SERVING__HOST, else 127.0.0.1)")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="port (default: env DRIFTREC_SERVING__PORT, else 8000)")
    ] = None,
    loglevel: Annotated[LogLevel, LOGLEVEL] = LogLevel.info,
) -> None:
    """Run the HTTP scoring service (OpenAPI at /docs)."""
    from driftrec.serving.app import run_server

    _logging(loglevel.value)
    settings = _settings()
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if update:
        settings = settings.model_copy(update={"serving": settings.serving.model_copy(update=update)})
    # no check for Redis: the service starts without it and answers degraded until it comes
    s = settings.serving
    logging.getLogger("driftrec.serve").info(
        "scoring service listening on http://%s:%d (docs at /docs)", s.host, s.port
    )
    run_server(settings)


@app.command()
def replay(
    source: Annotated[str, typer.Argument(help="ml-100k, taobao-sample, or a JSONL file of events")],
    speed: Annotated[float | None, typer.Option(help="event-seconds per wall second; omit for flat out")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="publish only the first N events (default: all)")] = None,
) -> None:
    """Publish a recorded dataset (sorted by event time) or a JSONL file (in file order) to `events`."""
    from driftrec.streams.datasets import check_source
    from driftrec.streams.replay import replay as run_replay

    _logging()
    settings = _settings()
    check_source(source)
    _need_services(settings, redis=False)
    report = run_replay(settings, source, speed=speed, limit=limit)
    typer.echo(f"published {report.published} events, dead-lettered {report.dead_lettered}, {report.rate:.0f} ev/s")


@app.command()
def evaluate(
    source: Annotated[str, typer.Argument(help="ml-100k, taobao-sample, or a JSONL file of events")] = "ml-100k",
    out: Annotated[Path, typer.Option(help="report folder")] = Path("reports/latest"),
    limit: Annotated[int | None, typer.Option(min=1, help="evaluate only the first N events (default: all)")] = None,
    window: Annotated[int | None, typer.Option(min=1, help="events per test-then-train window (default: 250)")] = None,
    negatives: Annotated[
        int | None, typer.Option(min=0, help="sampled negatives per ranked positive (default: 49)")
    ] = None,
    rank_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="fraction of positives ranked (fixed seed), the rest scored alone (default: 1)"
        ),
    ] = None,
    sync: Annotated[
        bool,
        typer.Option(
            help="score each window with a state that learned every earlier event "
            "(--no-sync: score while learning, as deployed)"
        ),
    ] = True,
    fast_path_only: Annotated[
        bool,
        typer.Option(
            "--fast-path-only",
            help="after each window wait for ingest alone (the memories are current), the model on its real "
            "cadence: the fast path's deployed lag (use a small --window)",
        ),
    ] = False,
    lag_s: Annotated[
        float | None,
        typer.Option(
            "--lag-s",
            min=0.0,
            help="event-time lag protocol: each event is scored once the fast path has learned every event at "
            "least this many seconds older (measured freshness: benchmarks/freshness.py), the model on its real "
            "cadence",
        ),
    ] = None,
) -> None:
    """Prequential (test-then-train) evaluation through the real broker; writes report.json/.html."""
    from driftrec.evaluate import run_evaluation
    from driftrec.streams.datasets import check_source

    _logging()
    settings = _settings()
    check_source(source)
    _need_services(settings)
    chosen = {"window": window, "negatives": negatives, "rank_fraction": rank_fraction}
    options: dict[str, Any] = {k: v for k, v in chosen.items() if v is not None}
    options["fast_path_only"] = fast_path_only
    options["lag_s"] = lag_s
    report_path = run_evaluation(settings, source, out, limit=limit, synchronous=sync, **options)
    typer.echo(f"report: {report_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="report folder")] = Path("reports/demo"),
    limit: Annotated[int | None, typer.Option(min=1, help="replay only the first N events (default: 25,000)")] = None,
) -> None:
    """Everything on the embedded default: up → worker → serve → replay ML-100K → evaluate."""
    from driftrec.evaluate import run_demo

    _logging()
    report_path = run_demo(_settings(), out, limit=limit)
    typer.echo(f"report: {report_path}")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input or environment, not a bug."""
    from driftrec.streams.datasets import DatasetError

    return (UserError, DatasetError, FileNotFoundError, IsADirectoryError, PermissionError)


def main() -> NoReturn:
    """The console entry point: typer's app, with user errors as one line and exit status 1."""
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # a usage error: the usage line and the complaint, status 1
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"driftrec: error: {exc.format_message()}", err=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except _user_errors() as exc:
        message = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.strerror}: {exc.filename}"
        typer.echo(f"driftrec: error: {message}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
