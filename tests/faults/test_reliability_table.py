"""``docs/reliability.md`` stays true: every test it names exists, and every fault test file is named.

The table has one section per group of scenarios (``## Crashes`` ...), each a
markdown table ``| Scenario | Tests | Outcome asserted |``. A test cell lists
pytest node ids (``tests/faults/test_x.py::test_y``, ``...::TestClass::test_y``,
``...::test_y[param]``) separated by ``<br>`` or ``, ``, in backticks or not;
``TODO`` marks a row whose tests are still to be listed.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from functools import cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE = os.path.join(ROOT, "docs", "reliability.md")
FAULTS = os.path.join(ROOT, "tests", "faults")
GROUPS = ["Crashes", "I/O errors", "Bad input at load", "Concurrency and resources", "Power loss"]
TODO = "TODO"


@dataclass(frozen=True)
class Row:
    group: str
    line: int
    scenario: str
    tests: tuple[str, ...]
    outcome: str
    todo: bool


def split_cell(cell: str) -> list[str]:
    """The entries of a test cell: split at ``<br>`` (any spelling) and commas, backticks stripped."""
    parts = re.split(r"<br\s*/?>|,\s+", cell, flags=re.IGNORECASE)
    return [p.strip().strip("`").strip() for p in parts if p.strip().strip("`").strip()]


def _cells(line: str) -> list[str]:
    body = line.strip()
    body = body.removeprefix("|").removesuffix("|")
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def parse_table(text: str) -> list[Row]:
    """The rows of every group's table (header and separator lines skipped)."""
    rows: list[Row] = []
    group = None
    for number, line in enumerate(text.splitlines(), start=1):
        heading = re.match(r"^##\s+(.+?)\s*$", line)
        if heading:
            group = heading.group(1)
            continue
        if not line.lstrip().startswith("|") or group is None:
            continue
        cells = _cells(line)
        if all(re.fullmatch(r":?-+:?", c) for c in cells) or cells[0].lower() == "scenario":
            continue
        assert len(cells) == 3, f"docs/reliability.md:{number}: expected 3 cells, got {len(cells)}: {line!r}"
        scenario, tests, outcome = cells
        entries = split_cell(tests)
        todo = TODO in entries
        rows.append(Row(group, number, scenario, tuple(e for e in entries if e != TODO), outcome, todo))
    return rows


@cache
def _rows() -> list[Row]:
    with open(TABLE, encoding="utf-8") as f:
        return parse_table(f.read())


@cache
def defined_names(file: str) -> dict[str, set[str]]:
    """``{top-level test function or class: its methods}`` of a test module, read with ``ast`` (not imported)."""
    with open(file, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=file)
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def check_node_id(node_id: str) -> str | None:
    """None when ``node_id`` names a test that exists, else what is wrong with it."""
    match = re.fullmatch(r"(tests/[\w/.-]+\.py)((?:::\w+)+)(\[[^\]]*\])?", node_id)
    if match is None:
        return f"{node_id!r} is not a pytest node id (tests/...py::test_name)"
    path, parts = match.group(1), match.group(2).split("::")[1:]
    file = os.path.join(ROOT, path)
    if not os.path.isfile(file):
        return f"{node_id}: no file {path}"
    names = defined_names(file)
    if parts[0] not in names:
        return f"{node_id}: {path} defines no {parts[0]}"
    if len(parts) == 2 and parts[1] not in names[parts[0]]:
        return f"{node_id}: {parts[0]} has no method {parts[1]}"
    if len(parts) > 2:
        return f"{node_id}: nested classes are not supported"
    if not parts[-1].startswith("test"):
        return f"{node_id}: {parts[-1]} is not a test"
    return None


# ---------------------------------------------------------------------------- the parser itself


def test_split_cell_accepts_every_separator() -> None:
    cell = "`tests/a.py::test_x`<br>tests/a.py::test_y<BR/>`tests/b.py::T::test_z[p-1]`, tests/c.py::test_w , TODO"
    assert split_cell(cell) == [
        "tests/a.py::test_x",
        "tests/a.py::test_y",
        "tests/b.py::T::test_z[p-1]",
        "tests/c.py::test_w",
        "TODO",
    ]
    assert split_cell("  ") == []


def test_parse_table_reads_groups_rows_and_todo() -> None:
    text = (
        "# title\n\n| not | a | row |\n\n## Crashes\n\n| Scenario | Tests | Outcome asserted |\n|---|---|---|\n"
        "| kill | `tests/x.py::test_a`<br>TODO | old loads |\n\n## Power loss\n\n| Scenario | Tests | Outcome |\n"
        "| :-- | :-: | --: |\n| cut | tests/y.py::test_b, tests/y.py::test_c | intact |\n"
    )
    rows = parse_table(text)
    assert [(r.group, r.scenario, r.tests, r.outcome, r.todo) for r in rows] == [
        ("Crashes", "kill", ("tests/x.py::test_a",), "old loads", True),
        ("Power loss", "cut", ("tests/y.py::test_b", "tests/y.py::test_c"), "intact", False),
    ]
    with pytest.raises(AssertionError, match="3 cells"):
        parse_table("## G\n| a | b |\n")


def test_check_node_id_finds_what_is_missing() -> None:
    me = "tests/faults/test_reliability_table.py"
    assert check_node_id(f"{me}::test_check_node_id_finds_what_is_missing") is None
    assert check_node_id(f"{me}::test_split_cell_accepts_every_separator[x-1]") is None
    assert check_node_id(f"{me}::Row") is not None  # a class that is no test class
    assert "defines no" in (check_node_id(f"{me}::test_no_such_test") or "")
    assert "no file" in (check_node_id("tests/faults/test_no_such_file.py::test_x") or "")
    assert "not a pytest node id" in (check_node_id("test_x") or "")


# ---------------------------------------------------------------------------- the table


def test_every_group_has_rows_and_every_row_is_complete() -> None:
    rows = _rows()
    assert [g for g in GROUPS if not any(r.group == g for r in rows)] == [], "a group without rows"
    assert sorted({r.group for r in rows} - set(GROUPS)) == [], "a group that is not one of the five"
    for r in rows:
        where = f"docs/reliability.md:{r.line} ({r.scenario!r})"
        assert r.scenario, f"{where}: empty scenario"
        assert r.outcome, f"{where}: empty outcome"
        assert r.tests or r.todo, f"{where}: empty test cell"
    scenarios = [r.scenario for r in rows]
    assert len(scenarios) == len(set(scenarios)), "a scenario listed twice"


def test_every_named_test_exists() -> None:
    problems = [f"docs/reliability.md:{r.line}: {p}" for r in _rows() for t in r.tests if (p := check_node_id(t))]
    assert problems == []


def test_every_proven_scenario_has_a_fault_test() -> None:
    """RELIABILITY: each scenario is proven by a test under tests/faults/ (unit tests may add to it)."""
    lacking = [r.scenario for r in _rows() if r.tests and not any(t.startswith("tests/faults/") for t in r.tests)]
    assert lacking == []


def test_no_row_is_todo_and_every_fault_test_file_is_named() -> None:
    todo = [f"{r.group}: {r.scenario}" for r in _rows() if r.todo]
    if todo:
        pytest.skip(f"{len(todo)} rows of docs/reliability.md still list TODO: " + "; ".join(todo))
    named = {t.split("::", 1)[0] for r in _rows() for t in r.tests}
    files = sorted(
        f"tests/faults/{name}"
        for name in os.listdir(FAULTS)
        if name.startswith("test_") and name.endswith(".py") and name != os.path.basename(__file__)
    )
    assert [f for f in files if f not in named] == [], "fault test files no row names"
