"""`driftrec …`: every command reads the same settings, so they find each other."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from driftrec.contract.settings import get_settings

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Online adaptive recommendation over Kafka and Redis."
)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("kafka", "aiokafka", "httpx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@app.command()
def up() -> None:
    """Start the embedded broker and Redis (or check the configured ones) and create the topics."""
    from driftrec.embedded import up as bring_up

    _logging()
    for line in bring_up(get_settings()):
        typer.echo(line)


@app.command()
def down() -> None:
    """Stop what `driftrec up` started, nothing else."""
    from driftrec.embedded import down as bring_down

    for line in bring_down(get_settings()):
        typer.echo(line)


@app.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="crit, error, warn, info, debug")] = "info",
    roles: Annotated[
        str | None, typer.Option(help="comma-separated: ingest, trainer (default: DRIFTREC_WORKER_ROLES, both)")
    ] = None,
) -> None:
    """Run a worker: ingest joins the consumer group (start more to scale out); the trainer role
    trains each model while it holds the model's lease and stands by otherwise."""
    from driftrec.worker import main

    settings = get_settings()
    if roles is not None:
        chosen = {r.strip() for r in roles.split(",") if r.strip()}
        unknown = chosen - {"ingest", "trainer"}
        if unknown or not chosen:
            raise typer.BadParameter(
                f"unknown role(s) {sorted(unknown)}: choose from ingest, trainer", param_hint="--roles"
            )
        settings = settings.model_copy(update={"worker_roles": frozenset(chosen)})
    main(settings, loglevel)


@app.command()
def trainer(loglevel: Annotated[str, typer.Option(help="crit, error, warn, info, debug")] = "info") -> None:
    """Run the trainer role alone: one active trainer per model (lease), the others standby."""
    from driftrec.worker import main

    main(get_settings().model_copy(update={"worker_roles": frozenset({"trainer"})}), loglevel)


@app.command()
def serve() -> None:
    """Run the HTTP scoring service."""
    from driftrec.serving.app import run_server

    _logging()
    run_server(get_settings())


@app.command()
def replay(
    source: Annotated[str, typer.Argument(help="ml-100k, taobao-sample, or a JSONL file of events")],
    speed: Annotated[float | None, typer.Option(help="event-seconds per wall second; omit for flat out")] = None,
    limit: Annotated[int | None, typer.Option(help="publish only the first N events")] = None,
) -> None:
    """Publish a recorded dataset to the `events` topic in event-time order."""
    from driftrec.streams.replay import replay as run_replay

    _logging()
    report = run_replay(get_settings(), source, speed=speed, limit=limit)
    typer.echo(f"published {report.published} events, dead-lettered {report.dead_lettered}, {report.rate:.0f} ev/s")


@app.command()
def evaluate(
    source: Annotated[str, typer.Argument(help="ml-100k, taobao-sample, or a JSONL file of events")] = "ml-100k",
    out: Annotated[Path, typer.Option(help="report folder")] = Path("reports/latest"),
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N events")] = None,
    sync: Annotated[
        bool,
        typer.Option(
            help="score each window with a state that learned every earlier event "
            "(--no-sync: score while learning, as deployed)"
        ),
    ] = True,
) -> None:
    """Prequential (test-then-train) evaluation through the real broker; writes report.json/.html."""
    from driftrec.evaluate import run_evaluation

    _logging()
    report_path = run_evaluation(get_settings(), source, out, limit=limit, synchronous=sync)
    typer.echo(f"report: {report_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="report folder")] = Path("reports/demo"),
    limit: Annotated[int | None, typer.Option(help="replay only the first N events")] = None,
) -> None:
    """Everything on the embedded default: up → worker → serve → replay ML-100K → evaluate."""
    from driftrec.evaluate import run_demo

    _logging()
    report_path = run_demo(get_settings(), out, limit=limit)
    typer.echo(f"report: {report_path}")


if __name__ == "__main__":
    app()
