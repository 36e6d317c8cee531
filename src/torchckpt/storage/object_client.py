"""Object stores by URL: which client serves a URL, and what its errors mean.

One client serves every object store: ``obstore`` (Rust's ``object_store``
crate), chosen by measurement (``benchmarks/README.md``, "Object storage"):
its parallel multipart put and parallel ranged gets reach the loopback S3
server's limit from memory without a temporary file, it speaks S3, GCS and
Azure with one API, offers conditional puts (``If-None-Match`` /
``If-Match``) where the store does, and retries 5xx answers, throttling and
dropped connections with exponential backoff itself.

URLs: ``s3://bucket/key``, ``gs://bucket/key``, ``az://container/key`` (also
``abfs://``, ``abfss://``, ``azure://``), and ``memory://name/key`` (a store
held by this process, for tests and for staging: a save to it is not visible
to another process). Credentials, endpoints and regions come from the
standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_ACCOUNT_NAME``, ...) read by the client, plus the
``storage_options`` a caller passes (the client's configuration keys, e.g.
``{"endpoint": "http://127.0.0.1:9000", "allow_http": "true"}``). An
``http://`` endpoint is allowed when the endpoint itself says ``http://``.

Errors: every failure of the client becomes an ``OSError`` whose errno says
what kind it is (``ENOENT`` missing object or bucket, ``EACCES`` refused
credentials, ``EEXIST`` a conditional put lost its race, ``EIO`` the rest) and
whose message names the operation and the URL (:func:`os_error`).
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from ..errors import UnsupportedURLError

__all__ = [
    "OBJECT_SCHEMES",
    "ObjectURL",
    "check_shared",
    "is_connection_error",
    "is_object_url",
    "os_error",
    "parse_object_url",
    "store_for",
]

#: The URL schemes an object store serves, by the client's name for them.
OBJECT_SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "azure": "az",
    "abfs": "abfs",
    "abfss": "abfss",
    "memory": "memory",
}

#: How the client retries: 5xx, throttling (429/503) and dropped connections, with backoff,
#: for at most this long per request (then the error reaches the caller, naming the URL).
RETRY_CONFIG: dict[str, Any] = {
    "max_retries": 8,
    "retry_timeout": timedelta(seconds=120),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=10), "base": 2.0},
}

#: Per-request timeouts: no wait on a store is unbounded.
CLIENT_OPTIONS = {"connect_timeout": "10s", "timeout": "300s"}

#: The environment variables the client reads its configuration from.
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")

_lock = threading.Lock()
_stores: dict[tuple[Any, ...], Any] = {}
_memory: dict[str, Any] = {}


@dataclass(frozen=True)
class ObjectURL:
    """A checkpoint location in an object store.

    Attributes:
        url: The URL as given, normalised (no trailing ``/``).
        scheme: The scheme as given (``s3``, ``gs``, ...).
        bucket: The bucket (container, or memory store name).
        key: The key prefix inside the bucket, without leading or trailing ``/`` ("" at the bucket's root).
    """

    url: str
    scheme: str
    bucket: str
    key: str

    def child(self, name: str) -> str:
        """The key of ``name`` below this location."""
        return f"{self.key}/{name}" if self.key else name

    def url_of(self, key: str) -> str:
        """The URL of an object by its key in the bucket."""
        return f"{self.scheme}://{self.bucket}/{key}"


def is_object_url(path: object) -> bool:
    """Whether ``path`` is a URL of an object store torchckpt serves (``s3://``, ``gs://``, ...)."""
    if not isinstance(path, str) or "://" not in path:
        return False
    return path.split("://", 1)[0].lower() in OBJECT_SCHEMES


def check_shared(path: object, *, why: str) -> None:
    """Refuse a ``memory://`` URL where another process must see the checkpoint.

    Raises:
        UnsupportedURLError: ``path`` is a ``memory://`` URL (says ``why`` it must be shared).
    """
    if is_object_url(path) and OBJECT_SCHEMES[str(path).split("://", 1)[0].lower()] == "memory":
        raise UnsupportedURLError(
            f"{path}: a memory:// checkpoint lives in this process only, and {why}: "
            "save to a local path or an s3://, gs://, az:// URL",
            path=str(path),
            scheme="memory",
        )


def parse_object_url(url: str) -> ObjectURL:
    """Split an object store URL into scheme, bucket and key.

    Raises:
        UnsupportedURLError: Not a URL of an object store, or without a bucket.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in OBJECT_SCHEMES:
        raise UnsupportedURLError(
            f"{url}: {scheme}:// is not an object store torchckpt serves "
            f"(known: {', '.join(sorted(OBJECT_SCHEMES))}://)",
            path=url,
            scheme=scheme,
        )
    if not parts.netloc:
        raise UnsupportedURLError(f"{url}: the URL names no bucket ({scheme}://<bucket>/<key>)", path=url, scheme=scheme)
    if parts.query or parts.fragment:
        raise UnsupportedURLError(f"{url}: a checkpoint URL takes no query or fragment", path=url, scheme=scheme)
    key = parts.path.strip("/")
    if any(p in ("", ".", "..") for p in key.split("/")) and key:
        raise UnsupportedURLError(f"{url}: empty, '.' or '..' parts are not allowed in a key", path=url, scheme=scheme)
    norm = f"{parts.scheme}://{parts.netloc}/{key}" if key else f"{parts.scheme}://{parts.netloc}"
    return ObjectURL(norm, scheme, parts.netloc, key)


def _client():  # type: ignore[no-untyped-def]
    try:
        import obstore
        import obstore.store
    except ImportError as e:  # an optional dependency: say which
        raise UnsupportedURLError(
            "object store URLs need the obstore package: pip install 'torchckpt[object-store]'"
        ) from e
    return obstore


def store_for(loc: ObjectURL, options: Mapping[str, str] | None = None) -> Any:
    """The client's store for the bucket of ``loc``, one per bucket, options and process (connections are reused).

    Args:
        loc: The location.
        options: The client's configuration keys (``endpoint``, ``region``, ``allow_http``, ...),
            on top of what the environment says.

    Raises:
        UnsupportedURLError: obstore is not installed, or rejects a configuration key.
    """
    obstore = _client()
    opts = dict(options or {})
    # The environment is part of the key: another endpoint or other credentials get another client.
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    cache_key = (os.getpid(), loc.scheme.lower(), loc.bucket, tuple(sorted(opts.items())), env)
    with _lock:
        store = _stores.get(cache_key)
        if store is not None:
            return store
        if OBJECT_SCHEMES[loc.scheme.lower()] == "memory":
            store = _memory.setdefault(f"{os.getpid()}/{loc.bucket}", obstore.store.MemoryStore())
        else:
            store = _open(obstore, loc, opts)
        _stores[cache_key] = store
        return store


def _open(obstore: Any, loc: ObjectURL, opts: dict[str, str]) -> Any:
    client = dict(CLIENT_OPTIONS)
    endpoint = opts.get("endpoint") or opts.get("aws_endpoint") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://") or os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true":
        client["allow_http"] = "true"
    for k in ("allow_http", "timeout", "connect_timeout"):
        if k in opts:
            client[k] = opts.pop(k)
    scheme = OBJECT_SCHEMES[loc.scheme.lower()]
    try:
        return obstore.store.from_url(
            f"{scheme}://{loc.bucket}", config=opts or None, client_options=client, retry_config=RETRY_CONFIG
        )
    except Exception as e:
        raise UnsupportedURLError(
            f"{loc.url}: cannot configure the object store client: {_first_line(e)}", path=loc.url, scheme=loc.scheme
        ) from e


#: What a refusal of the credentials says where the client reports it as a generic error (a listing's 403).
_REFUSED = re.compile(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|ExpiredToken|status code: 40[13]\b")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:300] + "..."


def is_connection_error(e: BaseException) -> bool:
    """Whether the client's error ``e`` says that no answer came (a connection failed or timed out), not a refusal.

    The client retries such errors itself except for requests that are not
    idempotent (a conditional put): their caller decides.
    """
    text = str(e)
    return "Server returned non-2xx status code" not in text and (
        "error sending request" in text or "connection" in text.lower() or "timed out" in text.lower()
    )


def os_error(e: BaseException, op: str, url: str) -> OSError:
    """The client's error ``e`` during ``op`` on ``url`` as an ``OSError`` with an errno that says its kind.

    The message names the operation and the URL, and for a missing bucket or
    refused credentials says so in words.
    """
    if isinstance(e, OSError) and e.errno is not None:  # ours, already saying what and where
        return e
    name = type(e).__name__
    text = str(e)
    if "NoSuchBucket" in text or "ContainerNotFound" in text or "The specified bucket does not exist" in text:
        return FileNotFoundError(errno.ENOENT, f"{op} {url}: the bucket does not exist")
    if name == "NotFoundError" or isinstance(e, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, f"{op} {url}: no such object")
    if name in ("PermissionDeniedError", "UnauthenticatedError") or _REFUSED.search(text):
        return PermissionError(errno.EACCES, f"{op} {url}: access denied (check the credentials): {_first_line(e)}")
    if name in ("AlreadyExistsError", "PreconditionError"):
        return FileExistsError(errno.EEXIST, f"{op} {url}: a conditional write lost to another writer")
    return OSError(errno.EIO, f"{op} {url} failed: {_first_line(e)}")
