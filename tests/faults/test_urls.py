"""A URL is not a local path: every entry point refuses ``scheme://...`` by name, creating nothing.

Before, ``save("s3://bucket/x", ...)`` created a local directory ``s3:`` (with
``bucket/x`` under it) and reported success. Any path that starts with a URL
scheme and ``://`` other than an object store torchckpt serves (``file://``
included: give the local path itself) is refused with
:class:`UnsupportedURLError`, a ``ValueError``, naming the URL and its scheme.
"""

from __future__ import annotations

import os
from typing import Any

import ckpt_testutil as cu
import pytest
import torch

import torchckpt as tc
from torchckpt.checkpoint_reader import read_manifest
from torchckpt.errors import CheckpointError, UnsupportedURLError
from torchckpt.storage.writable import check_writable
from torchckpt.tools import export
from torchckpt.verify import verify_checkpoint

# URLs of no object store torchckpt serves (s3://, gs://, az://, memory:// are served: tests/objstore).
URLS = ["http://host/x", "HDFS://namenode/x", "file:///tmp/ckpt", "s3+https://b/x", "ftp://host/ckpt"]

STATE = {"w": torch.ones(3), "step": 1}


def _entry_points(url: str, local: str) -> dict[str, Any]:
    """Every way a path reaches torchckpt, each as a call on ``url``."""

    def async_save() -> None:
        ckpt = tc.make_async_checkpointer(rank_info=tc.RankInfo(0, 1))
        try:
            ckpt.save(url, STATE)
        finally:
            ckpt.close()

    return {
        "sync save": lambda: cu.checkpointer("safetensors").save(url, STATE),
        "async save": async_save,
        "writer": lambda: tc.CheckpointWriter(tc.CheckpointWriterConfig(), tc.RankInfo(0, 1)).write(url, STATE),
        "check_writable": lambda: check_writable(url),
        "load": lambda: cu.checkpointer("safetensors").load(url),
        "read": lambda: cu.reader().read(url),
        "read_manifest": lambda: read_manifest(url),
        "verify": lambda: verify_checkpoint(url),
        "manager": lambda: tc.CheckpointManager(url, async_save=False),
        "export source": lambda: export(url, os.path.join(local, "out.safetensors"), fmt="safetensors"),
        "export destination": lambda: export(local, url, fmt="safetensors"),
    }


@pytest.mark.parametrize("url", URLS)
def test_a_url_is_refused_by_name_everywhere_and_creates_nothing(url: str, tmp_path, monkeypatch) -> None:
    local = str(tmp_path / "local")
    cu.checkpointer("safetensors").save(local, STATE)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # where "s3:" would be created
    scheme = url.split("://")[0]
    for what, call in _entry_points(url, local).items():
        with pytest.raises(UnsupportedURLError) as info:
            call()
        e = info.value
        assert isinstance(e, ValueError) and isinstance(e, CheckpointError), what
        assert (e.path, e.scheme) == (url, scheme.lower()), what
        assert f"{url}: {scheme.lower()}:// URLs are not supported" in str(e), (what, str(e))
        assert "object stores s3://, gs://, az:// and memory://" in str(e), what
        if scheme.lower() == "file":
            assert "give the local path /tmp/ckpt" in str(e), what
        assert os.listdir(work) == [], f"{what} created {os.listdir(work)}"


def test_local_names_with_a_colon_are_still_paths(tmp_path, monkeypatch) -> None:
    """Only ``scheme://`` is a URL: ``a:b``, ``dir/s3://x`` (two slashes inside a path) are local names."""
    monkeypatch.chdir(tmp_path)
    for path in ("run:1", "ckpts/s3://x", "./s3://y"):
        cu.checkpointer("safetensors").save(path, STATE)
        loaded, _ = cu.reader().read(path)
        assert loaded["step"] == 1, path
    assert os.path.isdir(tmp_path / "run:1") and os.path.isdir(tmp_path / "ckpts" / "s3:" / "x")
