"""Fixtures of the object store tests: one moto S3 server per session, a fresh bucket per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from s3_testutil import MotoServer, s3_env


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's S3 server on loopback, for the whole session."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<a fresh bucket>``, the environment pointing the client at the server."""
    for k, v in s3_env(moto_server.endpoint).items():
        monkeypatch.setenv(k, v)
    return f"s3://{moto_server.bucket()}"
