"""A real S3 API server on loopback for the object store tests: moto's server mode, started and stopped here.

:class:`MotoServer` runs ``python -m moto.server`` on a free port of
127.0.0.1 in a subprocess (so that a test can stop it mid-save), waits until it
answers, and makes buckets with a plain HTTP ``PUT /<bucket>``.
:func:`s3_env` is the environment a client needs to reach it (the standard
``AWS_*`` variables, which torchckpt's client reads, as boto3 does).
"""

from __future__ import annotations

import http.client
import os
import secrets
import socket
import subprocess
import sys
import time

__all__ = ["MotoServer", "free_port", "s3_env"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def s3_env(endpoint: str) -> dict[str, str]:
    """The ``AWS_*`` variables that point a client at ``endpoint`` with moto's test credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


class MotoServer:
    """moto's S3 server on 127.0.0.1, in a subprocess of its own.

    Call order: :meth:`start` (waits up to ``start_timeout_s`` for it to answer),
    :meth:`bucket` any number of times, :meth:`stop` (also ``with``).
    """

    def __init__(self, port: int | None = None, *, start_timeout_s: float = 60.0) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode} before answering")
            try:
                self._request("GET", "/")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"moto server on {self.endpoint} did not answer within {self._timeout_s}s")

    def _request(self, method: str, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def bucket(self, name: str | None = None) -> str:
        """Make a bucket (a fresh random name by default); return its name."""
        name = name or f"test-{secrets.token_hex(6)}"
        status = self._request("PUT", f"/{name}")
        if status != 200:
            raise RuntimeError(f"creating bucket {name} on {self.endpoint}: HTTP {status}")
        return name

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
