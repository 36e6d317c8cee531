"""Helpers of the object store fault tests: states whose values tell them apart, a small retry budget, what a URL holds.

Importable by name from the tests of this directory and from the child
script they start (``s3_crash_child.py``; ``tests`` and ``tests/objstore``
are on its ``PYTHONPATH``). Module level, no pytest.
"""

from __future__ import annotations

import http.client
import os
import re
from datetime import timedelta
from typing import Any

import torch

import torchckpt as tc
from torchckpt.format.manifest import MANIFEST_NAME
from torchckpt.storage import object_client
from torchckpt.storage.object_storage import ObjectStorage

OBJSTORE_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.dirname(OBJSTORE_DIR)
REPO_DIR = os.path.dirname(TESTS_DIR)

#: The client's retries for tests of persistent faults: 2 retries after 10-50 ms, 5 s at most per request.
FAST_RETRIES: dict[str, Any] = {
    "max_retries": 2,
    "retry_timeout": timedelta(seconds=5),
    "backoff": {"init_backoff": timedelta(milliseconds=10), "max_backoff": timedelta(milliseconds=50), "base": 2.0},
}


def const_state(value: int, mib: float, *, tensors: int = 4) -> dict[str, Any]:
    """About ``mib`` MiB in ``tensors`` float32 tensors, every element equal to ``value`` (a mix of two shows)."""
    n = max(1, int(mib * (1 << 20)) // 4 // tensors)
    return {
        "model": {f"w{i}": torch.full((n,), float(value)) for i in range(tensors)},
        "tag": torch.full((8,), value, dtype=torch.int64),
        "step": value,
    }


def random_state(seed: int, mib: float, *, tensors: int = 4) -> dict[str, Any]:
    """About ``mib`` MiB of seeded random float32 values (every byte differs between seeds)."""
    n = max(1, int(mib * (1 << 20)) // 4 // tensors)
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"w{i}": torch.rand(n, generator=g) + seed for i in range(tensors)},
        "tag": torch.full((8,), seed, dtype=torch.int64),
        "step": seed,
    }


def writer(fmt: str = "safetensors") -> tc.CheckpointWriter:
    """A one-rank writer of ``fmt``."""
    return tc.CheckpointWriter(tc.CheckpointWriterConfig(format=fmt), tc.RankInfo(0, 1))


def load(url: str) -> dict[str, Any]:
    """The checkpoint at ``url``, every checksum verified."""
    state, missing = tc.CheckpointReader(tc.RankInfo(0, 1)).read(url)
    assert missing == []
    return state


def committed(url: str) -> tuple[str, str] | None:
    """The generation the marker at ``url`` names and the marker's ETag (None: nothing committed)."""
    got = ObjectStorage(url).read_marker(MANIFEST_NAME)
    return None if got is None else (got[1], got[2])


def use_fast_retries(monkeypatch: Any) -> None:
    """Shrink the client's retry budget (:data:`FAST_RETRIES`) for the stores made from now on in this test.

    The stores are cached per bucket: the cache is replaced by an empty one
    (``monkeypatch`` restores both afterwards).
    """
    monkeypatch.setattr(object_client, "RETRY_CONFIG", FAST_RETRIES)
    monkeypatch.setattr(object_client, "_stores", {})


def multipart_uploads(endpoint: str, bucket: str) -> list[str]:
    """The keys of the multipart uploads begun and neither completed nor aborted in ``bucket`` (moto: no auth)."""
    m = re.fullmatch(r"http://([^:/]+):(\d+)/?", endpoint)
    assert m is not None, endpoint
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=30)
    try:
        conn.request("GET", f"/{bucket}?uploads")
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200, f"listing the multipart uploads of {bucket}: HTTP {resp.status}: {body[:300]}"
    return re.findall(r"<Upload>.*?<Key>(.*?)</Key>", body, flags=re.S)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a child Python that imports torchckpt, the test helpers and these."""
    env = dict(os.environ)
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(
        [OBJSTORE_DIR, TESTS_DIR, os.path.join(REPO_DIR, "src"), env.get("PYTHONPATH", "")]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env

