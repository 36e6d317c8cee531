"""Boxes of a tensor (``plan/boxes.py``): intersections, row-major spans, and whether chunks tile a tensor."""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchckpt.plan import boxes
from torchckpt.plan.boxes import Box, intersect, row_major_span, tiling_problem, volume


def _elements(box: Box) -> set[tuple[int, ...]]:
    return set(itertools.product(*(range(o, o + n) for o, n in zip(*box))))


def _flat(shape: tuple[int, ...], index: tuple[int, ...]) -> int:
    out = 0
    for i, n in zip(index, shape):
        out = out * n + i
    return out


# -- intersect, row_major_span, volume -----------------------------------------


def test_intersect_examples() -> None:
    assert intersect(((0, 0), (4, 6)), ((2, 3), (4, 6))) == ((2, 3), (2, 3))
    assert intersect(((0,), (4,)), ((4,), (2,))) is None  # touching is not sharing
    assert intersect(((1, 1), (0, 3)), ((0, 0), (4, 4))) is None  # an empty box shares nothing
    assert intersect(((), ()), ((), ())) == ((), ())  # scalars: the one element
    assert volume(()) == 1 and volume((3, 0, 2)) == 0


def test_row_major_span_examples() -> None:
    assert row_major_span((4, 6), ((1, 0), (2, 6))) == (6, 18)  # whole rows: exactly the box
    assert row_major_span((4, 6), ((1, 2), (2, 3))) == (8, 17)  # partial rows: the rows between too
    assert row_major_span((), ((), ())) == (0, 1)


@st.composite
def shape_and_box(draw: st.DrawFn) -> tuple[tuple[int, ...], Box]:
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    offsets = tuple(draw(st.integers(0, n - 1)) for n in shape)
    sizes = tuple(draw(st.integers(1, n - o)) for o, n in zip(offsets, shape))
    return shape, (offsets, sizes)


@settings(max_examples=200, deadline=None)
@given(shape_and_box(), shape_and_box())
def test_intersect_and_span_agree_with_the_elements(a: tuple[tuple[int, ...], Box], b: tuple[tuple[int, ...], Box]) -> None:
    shape, box = a
    flat = sorted(_flat(shape, i) for i in _elements(box))
    assert row_major_span(shape, box) == (flat[0], flat[-1] + 1)
    other = b[1]
    if len(other[0]) == len(box[0]):
        common = intersect(box, other)
        expected = _elements(box) & _elements(other)
        assert (set() if common is None else _elements(common)) == expected


# -- tiling_problem --------------------------------------------------------------


def test_tiling_examples() -> None:
    rows = [((0, 0), (2, 6)), ((2, 0), (2, 6))]
    assert tiling_problem((4, 6), rows) is None
    assert tiling_problem((4, 6), rows[:1]) == "the chunks hold 12 of its 24 elements (a gap)"
    assert tiling_problem((4, 6), [rows[0], ((1, 0), (2, 6)), ((3, 0), (1, 6))]) == (
        "the chunks at offsets [0, 0] and [1, 0] overlap"
    )
    assert tiling_problem((4, 6), [rows[0], ((3, 0), (2, 6))]) == (
        "the chunk at offsets [3, 0] of sizes [2, 6] lies outside [4, 6] (dimension 0)"
    )
    assert tiling_problem((4, 6), [*rows, ((1, 2), (0, 3))]) is None  # an empty chunk within bounds
    assert "lies outside" in tiling_problem((4, 6), [*rows, ((5, 0), (0, 6))])  # type: ignore[operator]
    assert tiling_problem((4, 6), [((0,), (4,))]) == "a chunk has 1 dimensions, the tensor 2"
    assert tiling_problem((), [((), ())]) is None
    assert tiling_problem((), []) == "the chunks hold 0 of its 1 elements (a gap)"
    assert tiling_problem((), [((), ()), ((), ())]) == "two chunks hold the only element (an overlap)"
    assert tiling_problem((0, 3), []) is None


def test_a_huge_tensor_is_checked_without_touching_its_elements() -> None:
    n = 1 << 40
    halves = [((0, 0), (n // 2, n)), ((n // 2, 0), (n // 2, n))]
    assert tiling_problem((n, n), halves) is None
    assert tiling_problem((n, n), [halves[0], ((n // 2 - 1, 0), (n // 2 + 1, n))]) is not None
    grid = [((i * (n // 64), 0), (n // 64, n)) for i in range(64)]
    assert tiling_problem((n, n), grid) is None
    assert "a gap" in tiling_problem((n, n), grid[1:])  # type: ignore[operator]


@st.composite
def grids(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    """A shape and the boxes of a random grid cut of it (every dimension cut at random points)."""
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    edges = []
    for n in shape:
        inner = draw(st.sets(st.integers(1, n - 1), max_size=3)) if n > 1 else set()
        edges.append([0, *sorted(inner), n])
    spans = [[(e[i], e[i + 1] - e[i]) for i in range(len(e) - 1)] for e in edges]
    out: list[Box] = [(tuple(s[0] for s in cell), tuple(s[1] for s in cell)) for cell in itertools.product(*spans)]
    return shape, draw(st.permutations(out))


@pytest.mark.parametrize("mode", ["grid", "pairwise"])
@settings(max_examples=150, deadline=None)
@given(case=grids(), data=st.data())
def test_random_grids_tile_and_every_change_of_one_box_is_found(
    mode: str, case: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, cut = case
    with mock.patch.object(boxes, "_MAX_CELLS", 1 << 22 if mode == "grid" else 0):
        assert tiling_problem(shape, cut) is None
        i = data.draw(st.integers(0, len(cut) - 1), label="box")
        d = data.draw(st.integers(0, len(shape) - 1), label="dimension")
        (offsets, sizes), rest = cut[i], cut[:i] + cut[i + 1 :]
        assert "a gap" in tiling_problem(shape, rest)  # type: ignore[operator]
        grown = list(sizes)
        grown[d] += 1
        assert tiling_problem(shape, [*rest, (offsets, tuple(grown))]) is not None
        for delta in (-1, 1):
            moved = list(offsets)
            moved[d] += delta
            assert tiling_problem(shape, [*rest, (tuple(moved), sizes)]) is not None
        empty = (offsets, tuple(0 if k == d else s for k, s in enumerate(sizes)))
        assert tiling_problem(shape, [*cut, empty]) is None  # an empty box anywhere within bounds
