"""A TLS and SASL/PLAIN front for the embedded Tansu broker, for the security tests.

Tansu 0.6.0 cannot be the secure endpoint itself: its ``--cert``/``--key`` flags refuse each other (one alone is
ignored and the listener stays plaintext), and its SCRAM needs users that cannot be created on a broker that
already demands authentication, in the only storage engine here (memory). So this front does what a TLS-terminating
proxy and a Kafka broker's SASL layer do, on the wire, and relays everything else to the real broker, which
advertises the front's port so every client connection comes back through it:

* TLS with a certificate made by ``openssl`` for 127.0.0.1 (the client verifies it against that CA file);
* SASL/PLAIN per the Kafka protocol: ApiVersions before authentication is relayed to the broker; SaslHandshake
  (API 17) answers the enabled mechanisms; SaslAuthenticate (API 36, v0/v1) checks ``\\0user\\0password``, and
  a wrong one gets SASL_AUTHENTICATION_FAILED (58) and the connection closed; any other request before
  authentication closes the connection, as a broker does.

What runs for real is the client side: aiokafka's and Faust's TLS and SASL code configured by the settings.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import struct
import subprocess
import threading
from pathlib import Path

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
SASL_AUTHENTICATION_FAILED, UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE = 58, 33, 34


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files), made with the openssl command."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make the test certificate (apt-get install openssl)")
    cert, key = directory / "broker-cert.pem", directory / "broker-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    return await reader.readexactly(size)


def _frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


def _nullable_string(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


class KafkaFront:
    """Listens on ``port``; relays to the broker at ``upstream_port`` once a client has authenticated."""

    def __init__(self, port: int, upstream_port: int, *, tls: tuple[Path, Path] | None = None,
                 users: dict[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.users = users
        self.ssl: ssl.SSLContext | None = None
        if tls is not None:
            self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl.load_cert_chain(str(tls[0]), str(tls[1]))
        self.authenticated: list[str] = []
        self.refused: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kafka-front", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> KafkaFront:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, self.host, self.port, ssl=self.ssl), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        try:
            if self.users is not None and not await self._authenticate(reader, writer, up_reader, up_writer):
                return
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> bool:
        assert self.users is not None
        mechanism = None
        while True:
            request = await _read_frame(reader)
            api_key, api_version, correlation = struct.unpack(">hhi", request[:8])
            client_len = struct.unpack(">h", request[8:10])[0]
            body = request[10 + max(client_len, 0):]
            head = struct.pack(">i", correlation)
            if api_key == API_VERSIONS:  # the broker's own answer: what it supports
                up_writer.write(_frame(request))
                await up_writer.drain()
                writer.write(_frame(await _read_frame(up_reader)))
            elif api_key == SASL_HANDSHAKE:
                n = struct.unpack(">h", body[:2])[0]
                mechanism = body[2:2 + n].decode()
                error = 0 if mechanism == "PLAIN" else UNSUPPORTED_SASL_MECHANISM
                writer.write(_frame(head + struct.pack(">hi", error, 1) + _nullable_string("PLAIN")))
                if error:
                    await writer.drain()
                    return False
            elif api_key == SASL_AUTHENTICATE and mechanism == "PLAIN" and api_version in (0, 1):
                n = struct.unpack(">i", body[:4])[0]
                _, user, password = body[4:4 + n].split(b"\0", 2)
                ok = self.users.get(user.decode()) == password.decode()
                error, message = (0, None) if ok else (SASL_AUTHENTICATION_FAILED, "Authentication failed: "
                                                       "invalid username or password")
                answer = head + struct.pack(">h", error) + _nullable_string(message) + struct.pack(">i", 0)
                if api_version == 1:
                    answer += struct.pack(">q", 0)
                writer.write(_frame(answer))
                await writer.drain()
                (self.authenticated if ok else self.refused).append(user.decode())
                return ok
            else:  # anything else before authentication: a broker closes the connection
                self.refused.append(f"api {api_key} v{api_version} before authentication")
                return False
            await writer.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
