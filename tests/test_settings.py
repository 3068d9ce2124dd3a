"""The settings object: sections, the environment variable names users set, validation, explicit overrides."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from streams.settings import SECTIONS, Settings, SettingsError, StudentSettings, TeacherSettings

ROOT = Path(__file__).resolve().parents[1]

# Every variable a deployment could set before settings were split into sections: the names are the
# interface (README, docker-compose.yml, the Dockerfile, people's manifests), so they must all still be read.
ENV_NAMES = frozenset({
    "KAFKA_BOOTSTRAP_SERVERS", "QDRANT_API_KEY", "QDRANT_PATH",
    "QDRANT_URL", "SLIMSTREAM_APP_ID", "SLIMSTREAM_BROKER_HEARTBEAT_INTERVAL_S",
    "SLIMSTREAM_BROKER_REBALANCE_TIMEOUT_S", "SLIMSTREAM_BROKER_SESSION_TIMEOUT_S", "SLIMSTREAM_COLLECTION_ITEMS",
    "SLIMSTREAM_COLLECTION_RATIONALES", "SLIMSTREAM_CONSUMER_FETCH_MAX_WAIT_MS", "SLIMSTREAM_DATASET",
    "SLIMSTREAM_DATA_DIR", "SLIMSTREAM_DRIFT_CHECK_EVERY_S", "SLIMSTREAM_DRIFT_COOLDOWN_S",
    "SLIMSTREAM_DRIFT_GENRE_JS", "SLIMSTREAM_DRIFT_GENRE_PSI", "SLIMSTREAM_DRIFT_HIT_RATE_DROP",
    "SLIMSTREAM_DRIFT_MIN_EVENTS", "SLIMSTREAM_DRIFT_RATIONALE_DISTANCE", "SLIMSTREAM_DRIFT_WINDOW_EVENTS",
    "SLIMSTREAM_ENCODER_BATCH_SIZE", "SLIMSTREAM_ENCODER_MODEL_DIR", "SLIMSTREAM_ENCODER_THREADS",
    "SLIMSTREAM_EVENT_MAX_AGE_S", "SLIMSTREAM_EVENT_MAX_FUTURE_S", "SLIMSTREAM_EVENT_MIN_TIMESTAMP",
    "SLIMSTREAM_EVENT_TIME_MODE", "SLIMSTREAM_FAST_PATH_BATCH_MAX", "SLIMSTREAM_FAST_PATH_BATCH_WAIT_S",
    "SLIMSTREAM_FAST_PATH_RECENT_ITEMS", "SLIMSTREAM_KAFKA_BOOTSTRAP_SERVERS", "SLIMSTREAM_MAX_EVENT_BYTES",
    "SLIMSTREAM_ONE_RECORD_PER_BATCH", "SLIMSTREAM_PRODUCER_LINGER_MS", "SLIMSTREAM_PROMPT_MAX_ITEMS",
    "SLIMSTREAM_QDRANT_API_KEY", "SLIMSTREAM_QDRANT_PATH", "SLIMSTREAM_QDRANT_URL",
    "SLIMSTREAM_RATIONALE_BACKLOG_MAX", "SLIMSTREAM_RATIONALE_WEIGHT", "SLIMSTREAM_RECENCY_DECAY",
    "SLIMSTREAM_RANKER", "SLIMSTREAM_RANKER_SEARCH", "SLIMSTREAM_RANKER_DEADLINE_S", "SLIMSTREAM_RETRAIN_RANKER",
    "SLIMSTREAM_RETRAIN_RANKER_MINUTES", "SLIMSTREAM_RETRAIN_RANKER_ITEMS", "SLIMSTREAM_RETRAIN_RANKER_MIN_USERS",
    "SLIMSTREAM_RECENT_EVENT_IDS", "SLIMSTREAM_REGISTRY_DIR", "SLIMSTREAM_RETRAIN_BATCH_SIZE",
    "SLIMSTREAM_RETRAIN_GATE_MARGIN", "SLIMSTREAM_RETRAIN_GATE_METRIC", "SLIMSTREAM_RETRAIN_HOLDOUT_EVENTS",
    "SLIMSTREAM_RETRAIN_HOLDOUT_USERS", "SLIMSTREAM_RETRAIN_LR", "SLIMSTREAM_RETRAIN_MAX_EVENTS",
    "SLIMSTREAM_RETRAIN_MAX_SEQ_LEN", "SLIMSTREAM_RETRAIN_MAX_STEPS", "SLIMSTREAM_RETRAIN_MAX_USERS",
    "SLIMSTREAM_RETRAIN_REPLAY_FRACTION", "SLIMSTREAM_RETRAIN_SAMPLES", "SLIMSTREAM_RETRAIN_SEED",
    "SLIMSTREAM_RETRAIN_TARGETS", "SLIMSTREAM_RETRAIN_TEACHER_MAX_TOKENS", "SLIMSTREAM_RETRAIN_TEMPERATURE",
    "SLIMSTREAM_RETRAIN_WINDOW_SIZE", "SLIMSTREAM_STUDENT_API_KEY", "SLIMSTREAM_STUDENT_BACKEND",
    "SLIMSTREAM_STUDENT_BATCH_SIZE", "SLIMSTREAM_STUDENT_BATCH_WAIT_S", "SLIMSTREAM_STUDENT_CONCURRENCY",
    "SLIMSTREAM_STUDENT_CONNECT_TIMEOUT_S", "SLIMSTREAM_STUDENT_DEADLINE_S", "SLIMSTREAM_STUDENT_GGUF_FILE",
    "SLIMSTREAM_STUDENT_LORA_ROOT", "SLIMSTREAM_STUDENT_MAX_NEW_TOKENS", "SLIMSTREAM_STUDENT_MODEL_DIR",
    "SLIMSTREAM_STUDENT_MODEL_VERSION", "SLIMSTREAM_STUDENT_SERVED_MODEL", "SLIMSTREAM_STUDENT_THREADS",
    "SLIMSTREAM_STUDENT_NICE", "SLIMSTREAM_STUDENT_RATIONALE_MAX_CHARS",
    "SLIMSTREAM_STUDENT_RETRY_BASE_S", "SLIMSTREAM_STUDENT_RETRY_MAX_S", "SLIMSTREAM_WEB_URL",
    "SLIMSTREAM_STUDENT_URL", "SLIMSTREAM_TEACHER_API_KEY", "SLIMSTREAM_TEACHER_BACKOFF_BASE_S",
    "SLIMSTREAM_TEACHER_BACKOFF_MAX_S", "SLIMSTREAM_TEACHER_CONNECT_TIMEOUT_S", "SLIMSTREAM_TEACHER_MAX_CONCURRENCY",
    "SLIMSTREAM_TEACHER_MAX_RETRIES", "SLIMSTREAM_TEACHER_MAX_TOKENS", "SLIMSTREAM_TEACHER_MODEL",
    "SLIMSTREAM_TEACHER_PRICE_COMPLETION_PER_1K", "SLIMSTREAM_TEACHER_PRICE_PROMPT_PER_1K", "SLIMSTREAM_TEACHER_TIMEOUT_S",
    "SLIMSTREAM_TEACHER_URL", "SLIMSTREAM_TOPIC_DEAD_LETTER", "SLIMSTREAM_TOPIC_DRIFT",
    "SLIMSTREAM_TOPIC_INTERACTIONS", "SLIMSTREAM_TOPIC_MODEL_UPDATES", "SLIMSTREAM_TOPIC_PARTITIONS",
    "SLIMSTREAM_TOPIC_RECOMMENDATIONS", "SLIMSTREAM_TOPIC_REPLICATION", "SLIMSTREAM_TOP_K",
    "SLIMSTREAM_WEB_ENABLED", "SLIMSTREAM_WEB_HOST", "SLIMSTREAM_WEB_PORT",
    "SLIMSTREAM_WINDOW_SIZE", "SLIMSTREAM_WORKER_LOG_LEVEL", "SLIMSTREAM_TABLE_STORE",
    "SLIMSTREAM_KAFKA_SECURITY_PROTOCOL", "SLIMSTREAM_KAFKA_SASL_MECHANISM", "SLIMSTREAM_KAFKA_SASL_USERNAME",
    "SLIMSTREAM_KAFKA_SASL_PASSWORD", "SLIMSTREAM_KAFKA_SSL_CAFILE", "SLIMSTREAM_KAFKA_SSL_CERTFILE",
    "SLIMSTREAM_KAFKA_SSL_KEYFILE", "SLIMSTREAM_KAFKA_SSL_KEY_PASSWORD", "SLIMSTREAM_KAFKA_SSL_CHECK_HOSTNAME",
    "SLIMSTREAM_API_TOKEN", "SLIMSTREAM_API_MAX_EVENTS", "SLIMSTREAM_API_MAX_BODY_BYTES", "SLIMSTREAM_API_MAX_K",
    "SLIMSTREAM_API_CACHE_USERS", "SLIMSTREAM_API_RECENT_RECOMMENDATIONS", "SLIMSTREAM_API_PUBLISH_TIMEOUT_S",
    "SLIMSTREAM_PREFERENCE_MODE", "SLIMSTREAM_AB_ENABLED", "SLIMSTREAM_AB_STUDENT_B", "SLIMSTREAM_AB_RANKER_B",
    "SLIMSTREAM_AB_SHARE_B", "SLIMSTREAM_AB_SALT", "SLIMSTREAM_PROBE_LOG_END",
    "SLIMSTREAM_QDRANT_DEADLINE_S", "SLIMSTREAM_ENCODER_DEADLINE_S",
})


def test_every_historical_variable_is_still_read_and_nothing_else() -> None:
    names = [e for _, _, envs in Settings.env_names() for e in envs]
    assert len(names) == len(set(names)), "two settings read the same variable"
    assert set(names) == ENV_NAMES


def test_every_variable_the_readme_documents_is_a_setting() -> None:
    documented = set(re.findall(r"`((?:SLIMSTREAM|KAFKA|QDRANT)_[A-Z0-9_]*)`", (ROOT / "README.md").read_text()))
    assert documented and documented <= ENV_NAMES | set(Settings.secret_file_env_names())


def test_sections_read_their_variables() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "k:1", "SLIMSTREAM_STUDENT_MAX_NEW_TOKENS": "64",
           "SLIMSTREAM_PROMPT_MAX_ITEMS": "7", "SLIMSTREAM_MAX_EVENT_BYTES": "1024", "SLIMSTREAM_EVENT_TIME_MODE": "replay",
           "QDRANT_URL": "http://q:6333", "SLIMSTREAM_DATA_DIR": "/tmp/x", "SLIMSTREAM_WORKER_LOG_LEVEL": "debug",
           "SLIMSTREAM_RETRAIN_WINDOW_SIZE": "", "SLIMSTREAM_TEACHER_API_KEY": "sk-secret"}
    s = Settings.from_env(env)
    assert s.kafka.bootstrap_servers == "k:1" and s.student.max_new_tokens == 64 and s.student.prompt_max_items == 7
    assert s.events.max_bytes == 1024 and s.events.time_mode == "replay" and s.qdrant.url == "http://q:6333"
    assert s.data.data_dir == Path("/tmp/x") and s.worker.log_level == "debug"
    assert s.retrain.window_size is None, "an empty variable means unset"
    assert s.qdrant_path == Path("/tmp/x/qdrant") and s.registry_path == Path("/tmp/x/registry")
    assert "sk-secret" not in repr(s) and s.teacher.api_key.get_secret_value() == "sk-secret"  # type: ignore[union-attr]
    # An override wins over the environment; the rest still comes from it.
    o = Settings.from_env(env, student={"max_new_tokens": 32})
    assert o.student.max_new_tokens == 32 and o.student.prompt_max_items == 7
    # Defaults, the environment aside.
    assert Settings() == Settings.from_env({}) and isinstance(Settings().student, StudentSettings)


def test_bad_values_and_unknown_sections_are_refused() -> None:
    with pytest.raises(SettingsError, match="SLIMSTREAM_STUDENT_MAX_NEW_TOKENS='4': Input should be greater"):
        Settings.from_env({"SLIMSTREAM_STUDENT_MAX_NEW_TOKENS": "4"})  # below the minimum of 8
    with pytest.raises(SettingsError, match="SLIMSTREAM_EVENT_TIME_MODE"):
        Settings.from_env({"SLIMSTREAM_EVENT_TIME_MODE": "sometimes"})
    with pytest.raises(TypeError, match="unknown settings sections"):
        Settings.from_env({}, studnet={"threads": 1})
    with pytest.raises(ValidationError):
        Settings().updated(student={"no_such_field": 1})
    with pytest.raises(ValidationError):
        Settings().updated(worker={"window_size": 0})  # validated again, not copied blindly
    s = Settings().updated(kafka={"bootstrap_servers": "b:2"}, retrain={"max_steps": 3})
    assert (s.kafka.bootstrap_servers, s.retrain.max_steps, s.kafka.app_id) == ("b:2", 3, "slimstream")
    with pytest.raises(ValidationError):
        s.kafka.app_id = "x"  # type: ignore[misc]  # frozen


def test_the_teacher_section_is_a_chat_endpoint() -> None:
    t = TeacherSettings.from_env({"SLIMSTREAM_TEACHER_URL": "http://t/v1", "SLIMSTREAM_TEACHER_PRICE_PROMPT_PER_1K": "2"})
    assert t.url == "http://t/v1" and t.cost(500, 0) == 1.0
    assert set(SECTIONS) == set(Settings.model_fields)


def test_cli_reports_a_bad_variable_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "topics"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "SLIMSTREAM_TOPIC_PARTITIONS": "zero"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("slimstream: error: bad setting in the environment: SLIMSTREAM_TOPIC_PARTITIONS='zero'")
    assert proc.stderr.count("\n") == 1, proc.stderr
