"""Conformance you can count (tests/conformance_report.py): the report over this very suite must
be clean, and its rules hold on made-up documents and tests."""

from __future__ import annotations

import re
from pathlib import Path

import conformance_report as cr
import pytest

DOC = """\
# Some requirements

| ID | Role | Status | What |
|---|---|---|---|
| REQ-01 | proxy | implemented | one |
| REQ-02 | client | partial | two |
| UDP-01 | proxy | not yet | three |

Text between tables ends a table.

| ID | Role | Status | What |
|---|---|---|---|
| AUTH-01 | proxy | Implemented | four |
"""

DECISIONS = {1, 2}


def requirements() -> dict[str, cr.Requirement]:
    return cr.parse_requirements(DOC)


def collected(name: str = "test_x", doc: str = "", comment: str = "", *marked: str) -> cr.CollectedTest:
    """A made-up collected test (one parameter set of it)."""
    return cr.CollectedTest(f"tests/test_fake.py::{name}[py]", name, doc, comment, marked)


def all_marked() -> list[cr.CollectedTest]:
    return [collected("test_a", "", "", "REQ-01", "AUTH-01"), collected("test_b", "REQ-02: b.", "", "REQ-02")]


@pytest.mark.timeout(300)
def test_the_suite_covers_every_claimed_id_and_marks_every_named_one() -> None:
    """The report over the real suite and docs/conformance.md: no problem at all, every
    claimed ID covered, and the marker read through class-free, parametrized and hypothesis
    tests alike."""
    report = cr.build_report()
    assert report.problems == [], report.render(quiet=True)
    assert report.covered() == report.claimed() and len(report.claimed()) >= 40
    assert "tests/test_codec.py::test_version_mismatch_reply_req01" in report.tests["REQ-01"]
    assert "tests/test_server_e2e.py::test_tfo_remote_leg_with_option" in report.tests["STK-06"]
    assert "tests/test_codec_hypothesis.py::test_valid_messages_agree" in report.tests["REQ-07"]


def test_docs_list_every_id_and_decision_in_sequence() -> None:
    """docs/conformance.md numbers each area's IDs 01, 02, ... without a gap; docs/decisions.md
    has D1, D2, ... without a gap (D27 at least: the PROXY protocol); every requirement is
    claimed (UDP ASSOCIATE included, issue 10)."""
    reqs = cr.parse_requirements(cr.CONFORMANCE_DOC.read_text())
    by_prefix: dict[str, list[int]] = {}
    for ident in reqs:
        prefix, number = ident.split("-")
        by_prefix.setdefault(prefix, []).append(int(number))
    assert set(by_prefix) == {"REQ", "AUTH", "CMD", "UDP", "STK", "SES", "IDM", "TRN"}
    for numbers in by_prefix.values():
        assert numbers == list(range(1, len(numbers) + 1))
    assert {r.role for r in reqs.values()} == {"proxy", "client", "both"}
    not_yet = {i for i, r in reqs.items() if r.status == "not yet"}
    assert not_yet == set()
    decisions = cr.parse_decisions(cr.DECISIONS_DOC.read_text())
    assert max(decisions) >= 27 and decisions == set(range(1, max(decisions) + 1)), sorted(decisions)


def test_parse_requirements_reads_every_table() -> None:
    reqs = requirements()
    assert list(reqs) == ["REQ-01", "REQ-02", "UDP-01", "AUTH-01"]
    assert reqs["AUTH-01"] == cr.Requirement("AUTH-01", "proxy", "implemented")
    assert reqs["UDP-01"].status == "not yet"


@pytest.mark.parametrize(
    ("row", "error"),
    [
        ("| REQ-03 | proxy | done | x |", "status 'done'"),
        ("| REQ-1 | proxy | implemented | x |", "not an ID"),
        ("| REQ-02 | proxy |", "fewer cells"),
        ("| REQ-01 | proxy | implemented | again |", "listed twice"),
    ],
    ids=["status", "id", "cells", "twice"],
)
def test_parse_requirements_refuses_a_bad_row(row: str, error: str) -> None:
    bad = "| ID | Role | Status | What |\n|---|---|---|---|\n| REQ-01 | proxy | implemented | x |\n" + row
    with pytest.raises(cr.DocError, match=error):
        cr.parse_requirements(bad)
    with pytest.raises(cr.DocError, match="no table"):
        cr.parse_requirements("# nothing here\n")


def test_clean_input_has_no_problem() -> None:
    report = cr.check(requirements(), all_marked(), DECISIONS)
    assert report.problems == []
    assert report.claimed() == ["REQ-01", "REQ-02", "AUTH-01"] and report.covered() == report.claimed()
    assert report.tests["REQ-01"] == ["tests/test_fake.py::test_a"]  # one entry per function
    assert "UDP-01" in report.render() and report.summary().endswith("0 problems")


def test_a_claimed_id_without_a_test_fails() -> None:
    """Partial counts as a claim; 'not yet' does not."""
    report = cr.check(requirements(), [collected("test_a", "", "", "REQ-01", "AUTH-01")], DECISIONS)
    assert report.problems == ["REQ-02 is partial in docs/conformance.md but no test carries its marker"]
    assert "covered 2/3" in report.summary()


@pytest.mark.parametrize(
    ("name", "doc", "comment"),
    [
        ("test_x", "REQ-01: proves it.", ""),  # docstring
        ("test_x_req01", "", ""),  # name, in lower case without the dash
        ("test_req_01_x", "", ""),
        ("test_x", "", "# REQ-01"),  # comment on the def line
    ],
)
def test_an_id_named_without_the_marker_fails(name: str, doc: str, comment: str) -> None:
    tests = [*all_marked(), collected(name, doc, comment, "AUTH-01")]
    report = cr.check(requirements(), tests, DECISIONS)
    assert len(report.problems) == 1
    expected = rf"tests/test_fake.py::{name}: names REQ-01 without the marker .*"
    assert re.fullmatch(expected, report.problems[0])


def test_unknown_ids_and_decisions_fail() -> None:
    tests = [
        *all_marked(),
        collected("test_m", "", "", "REQ-09"),
        collected("test_d", "AUTH-10 and D3.", "", "AUTH-01"),
        cr.CollectedTest("tests/test_fake.py::test_b", "test_b", "", "", (), ("5",)),
    ]
    report = cr.check(requirements(), tests, DECISIONS)
    assert report.problems == [
        "tests/test_fake.py::test_m: marker names REQ-09, which docs/conformance.md lacks",
        "tests/test_fake.py::test_d: names AUTH-10, which docs/conformance.md lacks",
        "tests/test_fake.py::test_d: cites D3, which docs/decisions.md lacks",
        "tests/test_fake.py::test_b: marker argument 5 is not an ID string",
    ]


def test_tests_of_ids_not_yet_implemented_are_listed_not_counted() -> None:
    tests = [*all_marked(), collected("test_u", "UDP-01.", "", "UDP-01")]
    report = cr.check(requirements(), tests, DECISIONS)
    assert report.problems == [] and report.tests["UDP-01"] == ["tests/test_fake.py::test_u"]
    assert "(not counted)" in report.render() and "not yet 1 (1 with tests, not counted)" in report.summary()


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("test_x_req07", {"REQ-07"}),
        ("test_req06_a_trn02", {"REQ-06", "TRN-02"}),
        ("test_udp_09", {"UDP-09"}),
        ("test_xreq07", set()),  # not a word of the name
        ("test_req070", set()),
        ("test_socks5_req", set()),
    ],
)
def test_ids_in_test_names(name: str, found: set[str]) -> None:
    assert cr.ids_in_name(name, ["REQ", "TRN", "UDP"]) == found


def _sample(
    a: int,  # a parameter's comment counts: it is on the def line
    b: int,
) -> None:  # REQ-01
    # REQ-02 in the body does not
    """The docstring: not a def line comment."""


def test_def_line_comment() -> None:
    comment = cr._def_line_comment(_sample)
    assert "REQ-01" in comment and "parameter" in comment and "REQ-02" not in comment


def test_script_exit_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m tests.conformance_report``: 0 when clean, 1 with problems, 2 when it cannot run."""
    clean = cr.check(requirements(), all_marked(), DECISIONS)
    monkeypatch.setattr(cr, "build_report", lambda: clean)
    assert cr.main([]) == 0
    assert "tests/test_fake.py::test_a" in capsys.readouterr().out
    broken = cr.check(requirements(), [], DECISIONS)
    monkeypatch.setattr(cr, "build_report", lambda: broken)
    assert cr.main(["-q"]) == 1
    out = capsys.readouterr().out
    assert "Problems:" in out and "test_fake" not in out

    def fails() -> cr.Report:
        raise cr.DocError("no table with the columns ID, Role and Status")

    monkeypatch.setattr(cr, "build_report", fails)
    assert cr.main([]) == 2
    assert capsys.readouterr().err == "conformance report: no table with the columns ID, Role and Status\n"


def test_collection_failure_is_reported(tmp_path: Path) -> None:
    """A suite that does not collect (here: no tests/ at all) is an error, not an empty report."""
    with pytest.raises(RuntimeError, match="collecting the suite failed"):
        cr.collect(tmp_path)
