"""Shared fixtures of the torchckpt tests (helpers live in ``ckpt_testutil``)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# complex32 tensors warn that ComplexHalf is experimental; the tests use them on purpose.
warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")

import ckpt_testutil  # noqa: E402


@pytest.fixture(params=ckpt_testutil.FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    """Each on-disk layout in turn."""
    return request.param


@pytest.fixture
def ckpt_path(tmp_path) -> str:
    """A checkpoint path (not yet existing) inside a fresh temporary directory."""
    return str(tmp_path / "ckpt")
