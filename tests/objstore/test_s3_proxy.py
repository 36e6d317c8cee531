"""The fault proxy of the object store fault tests, on its own: it relays exactly, and its faults do what they say."""

from __future__ import annotations

import http.client
import os
from collections.abc import Iterator
from typing import Any

import pytest
from s3_proxy import FaultProxy
from s3_testutil import MotoServer


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.endpoint) as p:
        yield p


def _conn(proxy: FaultProxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)


#: moto answers an anonymous GET of a private object with 403, and checks no signature: any will do.
AUTH = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20250101/us-east-1/s3/aws4_request, "
                         "SignedHeaders=host, Signature=0"}  # fmt: skip


def _call(
    conn: http.client.HTTPConnection, method: str, path: str, body: Any = None, *,
    headers: dict[str, str] | None = None, encode_chunked: bool = False,
) -> tuple[int, bytes, http.client.HTTPResponse]:  # fmt: skip
    conn.request(method, path, body=body, headers={**AUTH, **(headers or {})}, encode_chunked=encode_chunked)
    resp = conn.getresponse()
    return resp.status, resp.read(), resp


def test_relays_bodies_exactly_on_one_kept_alive_connection(proxy: FaultProxy, moto_server: MotoServer) -> None:
    bucket = moto_server.bucket()
    data = os.urandom(3 << 20)
    conn = _conn(proxy)
    assert _call(conn, "PUT", f"/{bucket}/a", data)[0] == 200  # Content-Length
    assert _call(conn, "PUT", f"/{bucket}/b", iter([data[:1000], data[1000:]]), encode_chunked=True)[0] == 200
    status, got, _ = _call(conn, "GET", f"/{bucket}/a")
    assert status == 200 and got == data
    status, got, _ = _call(conn, "GET", f"/{bucket}/b")
    assert status == 200 and got == data
    status, got, _ = _call(conn, "GET", f"/{bucket}/a", headers={"Range": "bytes=10-19"})
    assert status == 206 and got == data[10:20]
    status, got, resp = _call(conn, "HEAD", f"/{bucket}/a")
    assert status == 200 and got == b"" and resp.getheader("Content-Length") == str(len(data))
    conn.close()
    assert [r.outcome for r in proxy.requests()] == ["forward"] * 6
    (chunked,) = proxy.requests("PUT", r"/b$")
    assert chunked.headers["transfer-encoding"] == "chunked"


def test_fail_answers_the_next_matching_requests_with_an_s3_error(proxy: FaultProxy, moto_server: MotoServer) -> None:
    bucket = moto_server.bucket()
    fault = proxy.fail(503, method="PUT", path=r"/x$", times=2)
    conn = _conn(proxy)
    for _ in range(2):
        status, body, _ = _call(conn, "PUT", f"/{bucket}/x", b"data")
        assert status == 503 and b"<Code>SlowDown</Code>" in body
    assert _call(conn, "PUT", f"/{bucket}/y", b"other")[0] == 200  # no match: forwarded
    assert _call(conn, "PUT", f"/{bucket}/x", b"data")[0] == 200  # used up: forwarded, same connection
    assert fault.hits == 2
    assert [r.outcome for r in proxy.requests("PUT")] == ["fail 503", "fail 503", "forward", "forward"]
    conn.close()


def test_reset_cuts_the_connection_before_or_after_the_upstream_served_it(
    proxy: FaultProxy, moto_server: MotoServer
) -> None:
    bucket = moto_server.bucket()
    proxy.reset(method="PUT", path=r"/lost$", after_answer_bytes=0)
    proxy.reset(method="PUT", path=r"/cut$", after_body_bytes=10)
    proxy.reset(method="GET", path=r"/short$", after_answer_bytes=5)
    for key in ("lost", "cut"):
        conn = _conn(proxy)
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _call(conn, "PUT", f"/{bucket}/{key}", b"0123456789" * 100)
        conn.close()
    proxy.wait_idle()
    conn = _conn(proxy)
    assert _call(conn, "GET", f"/{bucket}/lost")[0] == 200  # served, its answer lost
    assert _call(conn, "GET", f"/{bucket}/cut")[0] == 404  # never complete
    assert _call(conn, "PUT", f"/{bucket}/short", b"0123456789")[0] == 200
    conn.close()
    conn = _conn(proxy)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        _call(conn, "GET", f"/{bucket}/short")  # 5 of 10 body bytes, then a reset
    conn.close()
