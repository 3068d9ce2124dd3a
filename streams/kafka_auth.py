"""How every Kafka client of the project authenticates: one place that turns :class:`KafkaSettings` into
aiokafka's keyword arguments and Faust's ``broker_credentials``, so the worker, the CLI and the retrain job
cannot disagree (a producer that forgot SASL would fail only in production).

TLS: a context from the system's CA store, or ``ssl_cafile``; with ``ssl_certfile``/``ssl_keyfile`` the client
presents its own certificate (mutual TLS). SASL: PLAIN or SCRAM-SHA-256/512 over PLAINTEXT or TLS. The password
is read from its :class:`~pydantic.SecretStr` only here, at the moment a client is built.
"""

from __future__ import annotations

import ssl
from typing import Any

from streams.settings import KafkaSettings


def ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of ``SSL`` / ``SASL_SSL``; None for the plaintext protocols."""
    if not k.security_protocol.endswith("SSL"):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=k.ssl_cafile)
    ctx.check_hostname = k.ssl_check_hostname
    if k.ssl_certfile:
        password = k.ssl_key_password.get_secret_value() if k.ssl_key_password else None
        ctx.load_cert_chain(k.ssl_certfile, k.ssl_keyfile, password=password)
    return ctx


def client_options(k: KafkaSettings) -> dict[str, Any]:
    """``bootstrap_servers`` and the security arguments of an aiokafka producer, consumer or admin client."""
    options: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers, "security_protocol": k.security_protocol}
    ctx = ssl_context(k)
    if ctx is not None:
        options["ssl_context"] = ctx
    if k.security_protocol.startswith("SASL"):
        assert k.sasl_password is not None  # KafkaSettings refuses SASL without one
        options.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                       sasl_plain_password=k.sasl_password.get_secret_value())
    return options


def faust_credentials(k: KafkaSettings) -> Any:
    """Faust's ``broker_credentials`` for the same settings (None: plaintext)."""
    import faust

    ctx = ssl_context(k)
    if k.security_protocol.startswith("SASL"):
        assert k.sasl_password is not None
        return faust.SASLCredentials(username=k.sasl_username, password=k.sasl_password.get_secret_value(),
                                     mechanism=k.sasl_mechanism, ssl_context=ctx)
    if ctx is not None:
        return faust.SSLCredentials(ctx)
    return None


__all__ = ["client_options", "faust_credentials", "ssl_context"]
