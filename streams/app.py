"""The Faust application: one per process, configured from :class:`streams.settings.Settings`.

Layout after faust's ``examples/fastapi_project``: the app and its topics/tables live here, the agents
in ``agents/`` import them and register themselves on import (``agents/__init__.py``).
"""

from __future__ import annotations

import functools
import socket

import faust
from faust.tables import TableManager

from streams.faust_compat import commit_bookkeeping_only_on_success
from streams.faust_resume import reread_uncommitted_after_recovery
from streams.kafka_auth import faust_credentials
from streams.kafka_compat import leave_group_from_generation_zero, probe_changelog_ends
from streams.settings import Settings
from streams.topics import WINDOWS_TABLE


def broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in bootstrap_servers.split(",") if h.strip())


def _set_fetch_max_wait(ms: int) -> None:
    """Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no setting to change it; on
    Tansu every caught-up event would wait most of that (see ``KafkaSettings.consumer_fetch_max_wait_ms``). Wrap the
    one method that builds the consumer and set aiokafka's own attribute before the consumer starts."""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    original = getattr(cls._create_worker_consumer, "__wrapped__", cls._create_worker_consumer)

    @functools.wraps(original)
    def create(self, transport):  # type: ignore[no-untyped-def]
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms  # read by AIOKafkaConsumer.start() when it builds its Fetcher
        return consumer

    cls._create_worker_consumer = create  # type: ignore[method-assign]


class EagerTableManager(TableManager):
    """Faust's table manager sleeps a second before it registers the tables' changelog channels, for tables
    declared after the app started. Every table here is declared at import (``windows`` below), so that second
    was only start-up latency, paid on every restart before the group join."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def web_url(settings: Settings) -> str:
    """Where the other workers reach this one's web server (Faust's ``canonical_url``: the partition assignor
    hands it out, and a request for a user owned elsewhere is proxied there). Faust's default, the host name,
    does not reach a server bound to loopback."""
    w = settings.worker
    if w.web_url:
        return w.web_url
    host = socket.gethostname() if w.web_host in ("0.0.0.0", "::", "") else w.web_host
    return f"http://{host}:{w.web_port}"


def create_app(settings: Settings) -> faust.App:
    _set_fetch_max_wait(settings.kafka.consumer_fetch_max_wait_ms)
    leave_group_from_generation_zero()  # a stopped worker leaves its group on Tansu too (streams/kafka_compat.py)
    commit_bookkeeping_only_on_success()  # a failed commit is committed again later (streams/faust_compat.py)
    reread_uncommitted_after_recovery()  # records dropped as streams resume are read again (streams/faust_resume.py)
    if settings.kafka.probe_log_end:
        probe_changelog_ends(settings.kafka)  # recovery reads to the true end of a changelog on Tansu too
    extra = {}
    if settings.kafka.one_record_per_batch:
        # aiokafka always admits the first record into a new batch, so a 1-byte limit means one record per
        # batch: Tansu's ListOffsets answer (last batch base + 1) is then the true end of the changelog.
        extra["producer_max_batch_size"] = 1
    return faust.App(
        settings.kafka.app_id,
        broker=broker_url(settings.kafka.bootstrap_servers),
        broker_credentials=faust_credentials(settings.kafka),  # TLS / SASL, as every other client (kafka_auth)
        store=f"{settings.worker.table_store}://",  # memory: rebuilt from the changelog; rocksdb: kept on disk
        datadir=str(settings.data.data_dir / "faust"),  # Faust's own scratch dir; not ./<app_id>-data in the cwd
        processing_guarantee="at_least_once",  # Tansu has no InitProducerId; effects are idempotent instead
        topic_partitions=settings.kafka.topic_partitions,
        topic_replication_factor=settings.kafka.topic_replication,
        topic_allow_declare=False,  # streams.topics.ensure_topics creates everything up front
        broker_session_timeout=settings.kafka.broker_session_timeout_s,
        broker_rebalance_timeout=settings.kafka.broker_rebalance_timeout_s,
        broker_heartbeat_interval=settings.kafka.broker_heartbeat_interval_s,
        producer_linger=settings.kafka.producer_linger_ms / 1000.0,
        broker_commit_every=100,
        broker_commit_interval=1.0,
        web_enabled=settings.worker.web_enabled,
        web_port=settings.worker.web_port,
        web_bind=settings.worker.web_host,
        canonical_url=web_url(settings),
        TableManager=EagerTableManager,
        web_in_thread=False,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        **extra,
    )


# The worker process's settings, read once here: Faust's agents and tables are declared at import time, so the
# app they hang off must exist when this module is imported (faust's own layout); everything else gets them
# passed from here.
settings = Settings.from_env()
app = create_app(settings)


def _bytes_topic(name: str, partitions: int | None = None) -> faust.TopicT:
    """Keys and values stay bytes: the agents validate and serialise with the pydantic contracts themselves,
    so a malformed record reaches the agent (and the dead-letter topic) instead of failing in Faust's codec."""
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=partitions or settings.kafka.topic_partitions)


interactions_topic = _bytes_topic(settings.kafka.topic_interactions)
recommendations_topic = _bytes_topic(settings.kafka.topic_recommendations)
dead_letter_topic = _bytes_topic(settings.kafka.topic_dead_letter)
drift_topic = _bytes_topic(settings.kafka.topic_drift, partitions=1)  # written only; model-updates: agents/model_updates.py

# user_id -> WindowState as a JSON dict. Co-partitioned with interactions.
windows = app.Table(
    WINDOWS_TABLE, default=None, partitions=settings.kafka.topic_partitions,
    schema=faust.Schema(key_type=str, value_type=None, key_serializer="json", value_serializer="json"),
)
