"""Retention policies over lists of CheckpointInfo: KeepLast, KeepEvery, KeepBest and their union."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchckpt.errors import ConfigError
from torchckpt.retention import CheckpointInfo, KeepBest, KeepEvery, KeepLast, doomed, preserved


def infos(steps: Sequence[int], metrics: Sequence[dict[str, Any]] | None = None) -> list[CheckpointInfo]:
    metrics = metrics if metrics is not None else [{} for _ in steps]
    return [CheckpointInfo(s, f"/ckpt/step_{s:010d}", dict(m), float(s)) for s, m in zip(steps, metrics)]


def kept(decision: list[bool], checkpoints: Sequence[CheckpointInfo]) -> list[int]:
    return [c.step for c, k in zip(checkpoints, decision) if k]


# -- KeepLast ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, [50]), (2, [40, 50]), (5, [10, 20, 30, 40, 50]), (9, [10, 20, 30, 40, 50])],
)
def test_keep_last(n: int, expected: list[int]) -> None:
    cps = infos([10, 20, 30, 40, 50])
    assert kept(KeepLast(n).should_preserve(cps), cps) == expected


def test_keep_last_empty() -> None:
    assert KeepLast(3).should_preserve([]) == []


# -- KeepEvery ---------------------------------------------------------------


def test_keep_every() -> None:
    cps = infos([0, 5, 10, 15, 20, 25, 30, 99, 100])
    assert kept(KeepEvery(10).should_preserve(cps), cps) == [0, 10, 20, 30, 100]
    assert kept(KeepEvery(1).should_preserve(cps), cps) == [c.step for c in cps]
    assert kept(KeepEvery(1000).should_preserve(cps), cps) == [0]


# -- KeepBest ----------------------------------------------------------------


def test_keep_best_min_and_max() -> None:
    losses = [5.0, 1.0, 3.0, 0.5, 4.0]
    cps = infos([1, 2, 3, 4, 5], [{"loss": v, "acc": -v} for v in losses])
    assert kept(KeepBest(2, "loss").should_preserve(cps), cps) == [2, 4]
    assert kept(KeepBest(2, "loss", mode="min").should_preserve(cps), cps) == [2, 4]
    assert kept(KeepBest(1, "loss", mode="max").should_preserve(cps), cps) == [1]
    assert kept(KeepBest(3, "acc", mode="max").should_preserve(cps), cps) == [2, 3, 4]
    assert kept(KeepBest(10, "loss").should_preserve(cps), cps) == [1, 2, 3, 4, 5]


def test_keep_best_ignores_steps_without_a_usable_metric() -> None:
    metrics: list[dict[str, Any]] = [
        {"loss": 2.0},
        {},  # no metric
        {"loss": math.nan},  # nan never counts as best
        {"loss": "low"},  # not a number
        {"loss": True},  # bools are not metrics
        {"other": 0.0},
        {"loss": 3},  # ints count
    ]
    cps = infos(range(1, len(metrics) + 1), metrics)
    assert kept(KeepBest(5, "loss").should_preserve(cps), cps) == [1, 7]
    assert kept(KeepBest(1, "loss", mode="max").should_preserve(cps), cps) == [7]
    assert KeepBest(2, "missing").should_preserve(cps) == [False] * len(cps)


def test_keep_best_ties_prefer_the_newer_step() -> None:
    cps = infos([1, 2, 3], [{"loss": 1.0}, {"loss": 1.0}, {"loss": 2.0}])
    assert kept(KeepBest(1, "loss").should_preserve(cps), cps) == [2]


# -- union -------------------------------------------------------------------


def test_preserved_without_policies_keeps_everything() -> None:
    cps = infos([1, 2, 3])
    assert preserved(None, cps) == [True, True, True]
    assert preserved([], cps) == [True, True, True]
    assert preserved([], []) == []


def test_preserved_is_the_union() -> None:
    cps = infos(range(1, 11), [{"loss": float(abs(s - 4))} for s in range(1, 11)])
    policies = [KeepLast(2), KeepEvery(5), KeepBest(1, "loss")]
    assert kept(preserved(policies, cps), cps) == [4, 5, 9, 10]


def test_preserved_rejects_a_policy_returning_the_wrong_length() -> None:
    class Broken:
        def should_preserve(self, checkpoints: Sequence[CheckpointInfo]) -> list[bool]:
            return [True]

    with pytest.raises(ValueError, match="decisions"):
        preserved([Broken()], infos([1, 2]))


# -- invalid arguments -------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: KeepLast(0),
        lambda: KeepLast(-1),
        lambda: KeepEvery(0),
        lambda: KeepEvery(-5),
        lambda: KeepBest(0, "loss"),
        lambda: KeepBest(1, "loss", mode="maximum"),
        lambda: KeepBest(1, "loss", mode="MIN"),
    ],
    ids=["last0", "last-1", "every0", "every-5", "best0", "best-mode", "best-MIN"],
)
def test_invalid_arguments_raise_config_error(make: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field in ("n", "n_steps", "mode")


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        KeepLast(0)


# -- properties --------------------------------------------------------------

_steps = st.lists(st.integers(0, 10_000), max_size=40, unique=True).map(sorted)


@st.composite
def _checkpoints(draw: st.DrawFn) -> list[CheckpointInfo]:
    steps = draw(_steps)
    losses = draw(st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6)), min_size=len(steps), max_size=len(steps)))
    return infos(steps, [{} if v is None else {"loss": v} for v in losses])


_policy = st.one_of(
    st.builds(KeepLast, st.integers(1, 50)),
    st.builds(KeepEvery, st.integers(1, 100)),
    st.builds(KeepBest, st.integers(1, 10), st.just("loss"), st.sampled_from(["min", "max"])),
)


@settings(max_examples=200, deadline=None)
@given(cps=_checkpoints(), n=st.integers(1, 50))
def test_keep_last_keeps_exactly_the_last_n(cps: list[CheckpointInfo], n: int) -> None:
    decision = KeepLast(n).should_preserve(cps)
    assert len(decision) == len(cps)
    assert kept(decision, cps) == [c.step for c in cps][-n:]
    assert sum(decision) == min(n, len(cps))


@settings(max_examples=200, deadline=None)
@given(cps=_checkpoints(), policies=st.lists(_policy, max_size=4))
def test_preserved_is_the_union_of_each_policy(cps: list[CheckpointInfo], policies: list[Any]) -> None:
    decision = preserved(policies, cps)
    assert len(decision) == len(cps)
    if not policies:
        assert all(decision)
        return
    each = [p.should_preserve(cps) for p in policies]
    assert decision == [any(d[i] for d in each) for i in range(len(cps))]


@settings(max_examples=200, deadline=None)
@given(cps=_checkpoints(), n=st.integers(1, 10), mode=st.sampled_from(["min", "max"]))
def test_keep_best_keeps_the_n_best_scored(cps: list[CheckpointInfo], n: int, mode: str) -> None:
    decision = KeepBest(n, "loss", mode=mode).should_preserve(cps)
    scored = [c for c in cps if "loss" in c.metrics]
    kept_infos = [c for c, k in zip(cps, decision) if k]
    assert all("loss" in c.metrics for c in kept_infos)
    assert len(kept_infos) == min(n, len(scored))
    rejected = [c for c in scored if c not in kept_infos]
    sign = 1 if mode == "min" else -1
    if kept_infos and rejected:
        worst_kept = max(sign * c.metrics["loss"] for c in kept_infos)
        best_rejected = min(sign * c.metrics["loss"] for c in rejected)
        assert worst_kept <= best_rejected


# -- doomed: the policies plus the guards ----------------------------------------


def test_doomed_never_deletes_the_newest_step() -> None:
    cps = infos([1, 2, 3])
    assert [c.step for c in doomed([KeepEvery(100)], cps)] == [1, 2]  # no policy keeps 3: still kept


def test_doomed_spares_guarded_steps() -> None:
    cps = infos([1, 2, 3, 4])
    assert [c.step for c in doomed([KeepLast(1)], cps, guarded={2})] == [1, 3]


def test_doomed_without_policies_or_checkpoints_deletes_nothing() -> None:
    assert doomed([], infos([1, 2, 3])) == []
    assert doomed(None, infos([1, 2])) == []
    assert doomed([KeepLast(1)], []) == []
