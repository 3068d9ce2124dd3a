"""Kafka TLS and SASL from settings (secrets from the environment or files, never shown), through a TLS/SASL
front relaying to the real embedded broker (tests/kafka_front.py says why Tansu cannot be the endpoint itself),
with aiokafka clients and (slow) the Faust worker; HTTP endpoints bind to loopback by default."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from streams.broker import EmbeddedBroker, free_port
from streams.kafka_auth import client_options, faust_credentials
from streams.settings import Settings, SettingsError
from tests.kafka_front import KafkaFront, make_certificate

PASSWORD = "pa55-Wörd-s3cret"


class Secure(NamedTuple):
    front: KafkaFront
    bootstrap: str
    cafile: Path


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    cert, key = make_certificate(tmp_path)
    port = free_port()
    with EmbeddedBroker(advertised_port=port) as broker, \
            KafkaFront(port, broker.port, tls=(cert, key), users={"svc-reco": PASSWORD}) as front:
        yield Secure(front, f"127.0.0.1:{port}", cert)


def _env(secure: Secure, **extra: str) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": secure.bootstrap, "SLIMSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SLIMSTREAM_KAFKA_SASL_USERNAME": "svc-reco", "SLIMSTREAM_KAFKA_SSL_CAFILE": str(secure.cafile), **extra}


async def _round_trip(settings: Settings, topic: str) -> bytes:
    producer = AIOKafkaProducer(**client_options(settings.kafka), request_timeout_ms=5000)
    await asyncio.wait_for(producer.start(), 20)
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, **client_options(settings.kafka), auto_offset_reset="earliest", group_id=None)
    await asyncio.wait_for(consumer.start(), 20)
    try:
        return (await asyncio.wait_for(consumer.getone(), 20)).value
    finally:
        await consumer.stop()


# ---- settings -------------------------------------------------------------------------------------------

def test_sasl_needs_a_user_and_a_password_and_a_certificate_needs_its_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="needs SLIMSTREAM_KAFKA_SASL_USERNAME"):
        Settings.from_env({"SLIMSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SLIMSTREAM_KAFKA_SASL_USERNAME": "u"})
    with pytest.raises(SettingsError, match="go together"):
        Settings.from_env({"SLIMSTREAM_KAFKA_SSL_CERTFILE": str(tmp_path)})
    with pytest.raises(SettingsError, match="no such file"):
        Settings.from_env({"SLIMSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
                           "SLIMSTREAM_KAFKA_SSL_CAFILE": str(tmp_path / "missing.pem")})
    with pytest.raises(SettingsError, match="SECURITY_PROTOCOL"):
        Settings.from_env({"SLIMSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"})
    plain = Settings.from_env({})
    assert client_options(plain.kafka) == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(plain.kafka) is None


def test_secrets_come_from_files_and_are_never_shown(tmp_path: Path) -> None:
    (tmp_path / "kafka-password").write_text(PASSWORD + "\n")
    (tmp_path / "qdrant-key").write_text("qk-123-secret")
    s = Settings.from_env({"SLIMSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SLIMSTREAM_KAFKA_SASL_USERNAME": "u",
                           "SLIMSTREAM_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "kafka-password"),
                           "QDRANT_URL": "http://q:6333", "QDRANT_API_KEY_FILE": str(tmp_path / "qdrant-key")})
    assert s.kafka.sasl_password is not None and s.kafka.sasl_password.get_secret_value() == PASSWORD
    assert s.qdrant.api_key is not None and s.qdrant.api_key.get_secret_value() == "qk-123-secret"
    shown = repr(s) + str(s) + s.model_dump_json()
    assert PASSWORD not in shown and "qk-123-secret" not in shown
    assert client_options(s.kafka)["sasl_plain_password"] == PASSWORD  # only where a client is built
    assert PASSWORD not in repr(faust_credentials(s.kafka))
    with pytest.raises(SettingsError) as bad:  # a refused secret is not echoed either
        Settings.from_env({"SLIMSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "SLIMSTREAM_KAFKA_SASL_PASSWORD": PASSWORD})
    assert PASSWORD not in str(bad.value)
    with pytest.raises(SettingsError, match="SLIMSTREAM_KAFKA_SASL_PASSWORD_FILE=.*cannot read it"):
        Settings.from_env({"SLIMSTREAM_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "nope")})


def test_http_endpoints_bind_to_loopback_unless_configured() -> None:
    from models.serving.api_server import parse_args

    assert Settings.from_env({}).worker.web_host == "127.0.0.1"
    assert parse_args([]).host == "127.0.0.1"


# ---- clients through TLS + SASL -----------------------------------------------------------------------------

def test_clients_authenticate_over_tls_and_a_wrong_password_or_plaintext_is_refused(secure: Secure) -> None:
    good = Settings.from_env(_env(secure, SLIMSTREAM_KAFKA_SASL_PASSWORD=PASSWORD))
    assert asyncio.run(_round_trip(good, "secure-topic")) == b"hello"
    assert "svc-reco" in secure.front.authenticated

    bad = Settings.from_env(_env(secure, SLIMSTREAM_KAFKA_SASL_PASSWORD="not-it"))
    with pytest.raises(KafkaConnectionError):
        asyncio.run(_round_trip(bad, "secure-topic"))
    assert "svc-reco" in secure.front.refused
    with pytest.raises(KafkaConnectionError):  # no TLS: the front never speaks Kafka in the clear
        asyncio.run(_round_trip(Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": secure.bootstrap}), "secure-topic"))


@pytest.mark.slow
def test_the_worker_runs_over_sasl_ssl_and_never_shows_the_password(
        tmp_path: Path, data_dir: Path, indexed_qdrant: Path, secure: Secure) -> None:
    from tests.conftest import WorkerProcess, worker_env
    from tests.kafka_io import event

    class _Front:  # worker_env wants something with bootstrap_servers
        bootstrap_servers = secure.bootstrap

    (tmp_path / "pw").write_text(PASSWORD)
    env = worker_env(_Front(), data_dir, indexed_qdrant,  # type: ignore[arg-type]
                     **_env(secure, SLIMSTREAM_KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "pw")))
    settings = Settings.from_env(env)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        async def exchange() -> dict:
            producer = AIOKafkaProducer(**client_options(settings.kafka))
            await producer.start()
            try:
                key, value = event("sec-user", "Toy Story (1995)", 1_000_000)
                await producer.send_and_wait(settings.kafka.topic_interactions, value, key=key)
            finally:
                await producer.stop()
            consumer = AIOKafkaConsumer(settings.kafka.topic_recommendations, **client_options(settings.kafka),
                                        auto_offset_reset="earliest", group_id=None)
            await consumer.start()
            try:
                while True:
                    msg = await asyncio.wait_for(consumer.getone(), 120)
                    if msg.value and json.loads(msg.value)["user_id"] == "sec-user":
                        return json.loads(msg.value)
            finally:
                await consumer.stop()

        rec = asyncio.run(exchange())
        assert rec["items"] and rec["window_version"] == 1
        shown = json.dumps(worker.get("/healthz/")) + json.dumps(worker.metrics())
    finally:
        worker.stop()
    assert PASSWORD not in shown and PASSWORD not in worker.log_tail(10_000)
    assert len(secure.front.authenticated) >= 3  # the worker's consumer, producer and the test's clients
