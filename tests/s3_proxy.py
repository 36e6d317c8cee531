"""A loopback HTTP proxy in front of an S3 server that answers chosen requests with faults, for the fault tests.

:class:`FaultProxy` listens on a free port of 127.0.0.1 and forwards each
HTTP/1.1 request of a client (keep-alive: many requests per connection) to
the upstream server, and its answer back, unchanged (the ``Host`` header too:
a SigV4 signature made for the proxy's address stays valid). A test arms
*faults* from its own thread (:meth:`FaultProxy.fail`, :meth:`FaultProxy.reset`);
each request is matched against them in the order they were armed, and the
first matching fault that has uses left acts instead of the upstream:

- ``fail``: answer the status (500, 503, 403, ...) with an S3-style XML error
  body, after reading the request's body (the connection stays usable);
- ``reset``: close the client's socket with a TCP reset, optionally after
  forwarding the request's head and its first ``after_body_bytes`` body
  bytes to the upstream (which then sees a connection cut mid-request), or
  after forwarding the whole request and relaying the answer's head and its
  first ``after_answer_bytes`` body bytes (0: the request was served, its
  answer is lost).

Bodies: requests and answers with ``Content-Length`` or chunked transfer
coding (relayed as they come); an answer without either, to a request that
may have one, is read to the upstream's close. Every socket wait has a
timeout (:data:`IO_TIMEOUT_S`); :meth:`FaultProxy.close` stops every thread.

Every request is logged (:attr:`FaultProxy.log`: method, target, what was
done), so that a test can assert its faults were really hit.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["Fault", "FaultProxy", "Request", "error_body"]

#: Longest wait on any socket: a request's next bytes, the upstream's answer, an idle keep-alive client.
IO_TIMEOUT_S = 60.0
#: Longest head (request line or status line and headers) accepted.
MAX_HEAD_BYTES = 64 << 10
_BLOCK = 256 << 10

#: The S3 error code sent with each status unless the fault names one.
ERROR_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    409: "OperationAborted",
    412: "PreconditionFailed",
    500: "InternalError",
    503: "SlowDown",
}
_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict", 412: "Precondition Failed",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


def error_body(code: str, message: str) -> bytes:
    """An S3 error document (what S3 sends with a 4xx or 5xx answer)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>fault-proxy</RequestId><HostId>fault-proxy</HostId></Error>"
    ).encode()


@dataclass
class Fault:
    """One armed fault: what it matches, what it does, how often.

    Attributes:
        method: The HTTP method it matches (None: any).
        pattern: A regular expression searched in the request target (path and query; None: any).
        action: ``"fail"`` or ``"reset"``.
        status: The status ``fail`` answers.
        code: The S3 error code of the body (default by status).
        times: How many requests it acts on (None: every matching request).
        after_body_bytes: For ``reset``: forward the head and this many body bytes first (None: forward nothing).
        after_answer_bytes: For ``reset``: forward the request, relay the answer's head and this many
            body bytes, then reset (None: do not forward the whole request).
        hits: How many requests it acted on so far.
    """

    method: str | None
    pattern: str | None
    action: str
    status: int = 500
    code: str | None = None
    times: int | None = 1
    after_body_bytes: int | None = None
    after_answer_bytes: int | None = None
    hits: int = 0
    _regex: re.Pattern[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ("fail", "reset"):
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.after_body_bytes is not None and self.after_answer_bytes is not None:
            raise ValueError("a reset comes after part of the request or after part of the answer, not both")
        self._regex = re.compile(self.pattern) if self.pattern is not None else None

    def matches(self, method: str, target: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        return self._regex is None or self._regex.search(target) is not None


@dataclass(frozen=True)
class Request:
    """One request the proxy saw: its method, target, what was done (``forward``, ``fail 503``, ``reset``), headers.

    Header names are lower case.
    """

    method: str
    target: str
    outcome: str
    headers: dict[str, str] = field(default_factory=dict, compare=False)


class _Closed(Exception):
    """The peer closed the connection between requests (a normal end of a keep-alive connection)."""


class _Conn:
    """A socket with a read buffer: heads by line, bodies by length or chunk."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(IO_TIMEOUT_S)

    def _fill(self) -> bool:
        data = self.sock.recv(_BLOCK)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> bytes:
        """The head up to and including the blank line (raises _Closed at a clean end before any byte)."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD_BYTES:
                raise ConnectionError("HTTP head too long")
            if not self._fill():
                if self.buf:
                    raise ConnectionError("connection closed inside an HTTP head")
                raise _Closed
        end = self.buf.index(b"\r\n\r\n") + 4
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def exactly(self, n: int) -> Iterator[bytes]:
        """The next ``n`` bytes, in blocks as they arrive."""
        while n > 0:
            if not self.buf and not self._fill():
                raise ConnectionError(f"connection closed with {n} bytes of a body missing")
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            yield piece

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD_BYTES or not self._fill():
                raise ConnectionError("bad or truncated chunked body")
        end = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def chunked(self) -> Iterator[bytes]:
        """A chunked body, raw (size lines, data, trailers), in pieces."""
        while True:
            size_line = self.line()
            yield size_line
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the blank line
                    trailer = self.line()
                    yield trailer
                    if trailer == b"\r\n":
                        return
            yield from self.exactly(size + 2)

    def to_close(self) -> Iterator[bytes]:
        while True:
            if self.buf:
                piece, self.buf = self.buf, b""
                yield piece
            if not self._fill():
                return


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


def _body(conn: _Conn, headers: dict[str, str], *, request: bool) -> Iterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return conn.chunked()
    if "content-length" in headers:
        return conn.exactly(int(headers["content-length"]))
    return iter(()) if request else conn.to_close()


def _alive(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection is still open (the server may have closed it meanwhile)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (SO_LINGER 0), not an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    Call order: construct (it listens and serves at once), arm faults with
    :meth:`fail` / :meth:`reset` from any thread, :meth:`clear`, :meth:`close` (also ``with``).
    """

    def __init__(self, upstream: str) -> None:
        m = re.fullmatch(r"http://([^:/]+):(\d+)/?", upstream)
        if m is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (m.group(1), int(m.group(2)))
        self.upstream_endpoint = f"http://{m.group(1)}:{m.group(2)}"
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.log: list[Request] = []
        self._socks: set[socket.socket] = set()
        self._busy = 0  # requests read and not yet answered (or cut)
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)
        self.port = int(self._listener.getsockname()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- the test's side ---------------------------------------------------

    def fail(
        self, status: int, *, method: str | None = None, path: str | None = None, times: int | None = 1,
        code: str | None = None,
    ) -> Fault:  # fmt: skip
        """Answer the next ``times`` requests matching ``method`` and ``path`` (a regex) with ``status``."""
        return self._arm(Fault(method, path, "fail", status=status, code=code, times=times))

    def reset(
        self, *, method: str | None = None, path: str | None = None, times: int | None = 1,
        after_body_bytes: int | None = None, after_answer_bytes: int | None = None,
    ) -> Fault:  # fmt: skip
        """Reset the connection of the next ``times`` matching requests (see the module)."""
        return self._arm(
            Fault(method, path, "reset", times=times, after_body_bytes=after_body_bytes,
                  after_answer_bytes=after_answer_bytes)
        )  # fmt: skip

    def _arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Disarm every fault: forward everything from now on."""
        with self._lock:
            self._faults.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """The requests seen so far, those matching ``method`` and ``path`` (a regex)."""
        with self._lock:
            seen = list(self.log)
        return [
            r for r in seen if (method is None or r.method == method) and (path is None or re.search(path, r.target))
        ]

    def wait_idle(self, timeout_s: float = IO_TIMEOUT_S, settle_s: float = 0.2) -> None:
        """Wait until no request has been in progress for ``settle_s`` (the upstream answered all it got).

        Raises:
            TimeoutError: Requests were still in progress after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        idle_since: float | None = None
        while True:
            now = time.monotonic()
            with self._lock:
                busy = self._busy
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= settle_s:
                return
            if now > deadline:
                raise TimeoutError(f"the fault proxy still had {busy} requests in progress after {timeout_s}s")
            time.sleep(0.01)

    def close(self) -> None:
        """Stop listening and cut every connection; the serving threads end."""
        with self._lock:
            self._closed = True
            socks = list(self._socks)
        self._listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5.0)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving -------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name="fault-proxy-conn", daemon=True).start()

    def _track(self, sock: socket.socket, on: bool) -> None:
        with self._lock:
            if on:
                self._socks.add(sock)
            else:
                self._socks.discard(sock)

    def _serve(self, sock: socket.socket) -> None:
        client = _Conn(sock)
        upstream: _Conn | None = None
        self._track(sock, True)
        try:
            while not self._closed:
                try:
                    head = client.head()
                except (_Closed, OSError):
                    return
                with self._lock:
                    self._busy += 1
                try:
                    upstream = self._one(client, head, upstream)
                finally:
                    with self._lock:
                        self._busy -= 1
                if client.sock.fileno() < 0:
                    return
        except OSError:
            return
        finally:
            self._track(sock, False)
            if upstream is not None:
                self._track(upstream.sock, False)
                upstream.sock.close()
            if sock.fileno() >= 0:
                sock.close()

    def _choose(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(method, target):
                    f.hits += 1
                    return f
            return None

    def _record(self, method: str, target: str, outcome: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.log.append(Request(method, target, outcome, headers))

    def _one(self, client: _Conn, head: bytes, upstream: _Conn | None) -> _Conn | None:
        """Serve one request whose head was read; return the upstream connection to keep (None: closed)."""
        first, headers = _parse_head(head)
        parts = first.split(" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("?", "?")
        fault = self._choose(method, target)
        body = _body(client, headers, request=True)
        if fault is not None and fault.action == "fail":
            for _ in body:
                pass
            self._record(method, target, f"fail {fault.status}", headers)
            self._answer_error(client.sock, fault, method)
            return upstream
        if fault is not None:  # reset
            self._record(method, target, "reset", headers)
            if fault.after_answer_bytes is not None:
                self._forward(client, head, body, method, upstream, cut_after=fault.after_answer_bytes)
                return None
            if fault.after_body_bytes is not None:
                self._forward_part(head, body, fault.after_body_bytes, upstream)
                upstream = None
            _reset(client.sock)
            return upstream
        self._record(method, target, "forward", headers)
        return self._forward(client, head, body, method, upstream)

    def _answer_error(self, sock: socket.socket, fault: Fault, method: str) -> None:
        code = fault.code or ERROR_CODES.get(fault.status, "InternalError")
        body = error_body(code, f"injected by the fault proxy ({fault.status})")
        head = (
            f"HTTP/1.1 {fault.status} {_REASONS.get(fault.status, 'Error')}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "x-amz-request-id: fault-proxy\r\n\r\n"
        )
        sock.sendall(head.encode() + (b"" if method == "HEAD" else body))

    def _connect(self) -> _Conn:
        sock = socket.create_connection(self.upstream, timeout=IO_TIMEOUT_S)
        self._track(sock, True)
        return _Conn(sock)

    def _forward_part(self, head: bytes, body: Iterator[bytes], nbytes: int, upstream: _Conn | None) -> None:
        """Send the head and the first ``nbytes`` body bytes upstream, then cut that connection."""
        if upstream is not None:
            self._track(upstream.sock, False)
            upstream.sock.close()
        conn = self._connect()
        try:
            conn.sock.sendall(head)
            sent = 0
            for piece in body:
                if sent >= nbytes:
                    break
                conn.sock.sendall(piece[: nbytes - sent])
                sent += min(len(piece), nbytes - sent)
        finally:
            self._track(conn.sock, False)
            _reset(conn.sock)

    def _forward(
        self, client: _Conn, head: bytes, body: Iterator[bytes], method: str, upstream: _Conn | None,
        *, cut_after: int | None = None,
    ) -> _Conn | None:  # fmt: skip
        """Relay the request upstream and the answer back; return the upstream connection if it stays open.

        ``cut_after``: relay the answer's head and only this many body bytes, then reset both connections.
        """
        if upstream is not None and not _alive(upstream.sock):
            self._track(upstream.sock, False)
            upstream.sock.close()
            upstream = None
        if upstream is None:
            upstream = self._connect()
        try:
            upstream.sock.sendall(head)
            for piece in body:
                upstream.sock.sendall(piece)
            answer = upstream.head()
        except _Closed:  # a kept-alive upstream connection the server had closed: the client sees a reset
            self._track(upstream.sock, False)
            upstream.sock.close()
            _reset(client.sock)
            return None
        status_line, rheaders = _parse_head(answer)
        status = int(status_line.split(" ")[1])
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if cut_after is not None:
            self._cut_answer(client, upstream, answer, b"" if no_body else _body(upstream, rheaders, request=False),
                             cut_after)  # fmt: skip
            return None
        client.sock.sendall(answer)
        if not no_body:
            for piece in _body(upstream, rheaders, request=False):
                client.sock.sendall(piece)
        keep = rheaders.get("connection", "").lower() != "close" and status_line.startswith("HTTP/1.1") and (
            no_body or "content-length" in rheaders or "chunked" in rheaders.get("transfer-encoding", "").lower()
        )
        if not keep:
            self._track(upstream.sock, False)
            upstream.sock.close()
            if not no_body and "content-length" not in rheaders and "chunked" not in rheaders.get(
                "transfer-encoding", ""
            ).lower():
                client.sock.close()  # the answer ended at the close: so must the client's connection
            return None
        return upstream

    def _cut_answer(self, client: _Conn, upstream: _Conn, head: bytes, body: Iterable[bytes], nbytes: int) -> None:
        """Relay the answer's head (when ``nbytes`` > 0) and ``nbytes`` of its body, then reset both connections."""
        try:
            if nbytes > 0:
                client.sock.sendall(head)
                sent = 0
                for piece in body:
                    if sent >= nbytes:
                        break
                    client.sock.sendall(piece[: nbytes - sent])
                    sent += min(len(piece), nbytes - sent)
        finally:
            self._track(upstream.sock, False)
            _reset(upstream.sock)
            _reset(client.sock)
