"""Shared fixtures of the torchckpt tests (helpers live in ``ckpt_testutil``)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# complex32 tensors warn that ComplexHalf is experimental; the tests use them on purpose.
warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")

import ckpt_testutil


@pytest.fixture(params=ckpt_testutil.FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    """Each on-disk layout in turn."""
    return request.param


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The bytes of every tensor ``torch.empty`` makes while the test runs (a list, filled as they are made)."""
    import torch

    seen: list[int] = []
    real = torch.empty

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = real(*args, **kwargs)
        seen.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "empty", spy)
    yield seen


@pytest.fixture
def ckpt_path(tmp_path) -> str:
    """A checkpoint path (not yet existing) inside a fresh temporary directory."""
    return str(tmp_path / "ckpt")


# -- @pytest.mark.slow: skipped unless --runslow ------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
