"""Conformance you can count: every requirement ID of docs/conformance.md with the tests that prove it.

Run it from the checkout (it collects the suite with the installed package, as the tests do)::

    .venv/bin/python -m tests.conformance_report        # every ID and its tests
    .venv/bin/python -m tests.conformance_report -q     # the summary and the problems only

tests/test_conformance.py runs the same check inside the test suite. Where the data comes from:

* The requirement IDs, each with its role and status, are the rows of the tables in
  docs/conformance.md (columns ``ID``, ``Role``, ``Status``). ``implemented`` and ``partial``
  are claims; ``not yet`` is not.
* A test proves an ID when it carries ``@pytest.mark.conformance("AUTH-05", ...)`` (class and
  module marks count too). A ``pytest --collect-only --conformance-json=PATH`` run
  (the option and the hook are in tests/conftest.py) writes, for each collected test, its
  marker IDs, its name, its docstring and the comment on its ``def`` line.

The report fails (exit status 1) when:

* an ID that docs/conformance.md claims has no test;
* a marker names an ID that docs/conformance.md does not list (or is not a string);
* a test names an ID in its name (``..._req07``), its docstring (``REQ-07``) or its ``def``
  line comment (``# REQ-07``) without carrying it in its marker, or names an ID (or a decision
  ``Dn``) that docs/conformance.md (docs/decisions.md) does not list.

Tests of IDs that are not implemented yet (codec tests of the UDP messages, for instance) are
listed but not counted. A test counts whether or not it is skipped at run time (a missing
``unshare``, a ``SOCKS6FAST_NO_EXTENSIONS=1`` run): this is a static report, and CI runs
every test.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DOC = ROOT / "docs" / "conformance.md"
DECISIONS_DOC = ROOT / "docs" / "decisions.md"

#: Status words of docs/conformance.md; the first two are claims that need a test.
CLAIMED = ("implemented", "partial")
STATUSES = (*CLAIMED, "not yet")

#: What looks like a requirement ID in prose: two to four capitals, a dash, two digits.
ID_IN_TEXT = re.compile(r"\b[A-Z]{2,4}-\d{2}\b")
#: A decision of docs/decisions.md cited in prose: D1, D14.
DECISION_IN_TEXT = re.compile(r"\bD(\d{1,2})\b")
#: The form a well-formed marker argument takes.
ID_FORMAT = re.compile(r"[A-Z]{2,4}-\d{2}")


class DocError(ValueError):
    """docs/conformance.md or docs/decisions.md cannot be read as the report needs."""


@dataclass(frozen=True)
class Requirement:
    id: str
    role: str
    status: str


@dataclass(frozen=True)
class CollectedTest:
    """What the collection hook records about one collected test (one per parameter set)."""

    nodeid: str
    name: str
    doc: str
    comment: str
    marked: tuple[str, ...]
    bad_marks: tuple[str, ...] = ()

    @property
    def function(self) -> str:
        """The node id without its parameters: one entry per test function in the report."""
        return self.nodeid.split("[", 1)[0]


@dataclass
class Report:
    requirements: dict[str, Requirement]
    tests: dict[str, list[str]] = field(default_factory=dict)  # ID -> test functions
    problems: list[str] = field(default_factory=list)

    def claimed(self) -> list[str]:
        return [r.id for r in self.requirements.values() if r.status in CLAIMED]

    def covered(self) -> list[str]:
        return [i for i in self.claimed() if self.tests.get(i)]

    def not_yet(self) -> list[str]:
        return [r.id for r in self.requirements.values() if r.status not in CLAIMED]

    def summary(self) -> str:
        claimed, covered, not_yet = self.claimed(), self.covered(), self.not_yet()
        tested_not_yet = [i for i in not_yet if self.tests.get(i)]
        functions = {t for ts in self.tests.values() for t in ts}
        return (
            f"{len(self.requirements)} IDs; claimed {len(claimed)}, covered {len(covered)}/{len(claimed)}; "
            f"not yet {len(not_yet)} ({len(tested_not_yet)} with tests, not counted); "
            f"{len(functions)} test functions carry the marker; "
            f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        )

    def render(self, quiet: bool = False) -> str:
        out: list[str] = []
        if not quiet:
            out.append(f"Conformance of socks6fast ({CONFORMANCE_DOC.relative_to(ROOT)}, tests by marker)")
            for req in self.requirements.values():
                tests = self.tests.get(req.id, [])
                counted = "" if req.status in CLAIMED or not tests else " (not counted)"
                noun = "test" if len(tests) == 1 else "tests"
                out.append(f"{req.id:7} {req.role:6} {req.status:11} {len(tests)} {noun}{counted}")
                out += [f"    {t}" for t in tests]
        if self.problems:
            out.append("Problems:")
            out += [f"  - {p}" for p in self.problems]
        out.append("Summary: " + self.summary())
        return "\n".join(out)


# --- docs/conformance.md and docs/decisions.md ------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")]


def parse_requirements(text: str) -> dict[str, Requirement]:
    """The rows of every Markdown table whose header has the columns ID, Role and Status."""
    found: dict[str, Requirement] = {}
    columns: dict[str, int] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("|"):
            columns = None
            continue
        cells = _cells(line)
        lowered = [c.lower() for c in cells]
        if {"id", "role", "status"} <= set(lowered):
            columns = {name: lowered.index(name) for name in ("id", "role", "status")}
            continue
        if columns is None or set(line.strip()) <= set("|-: "):
            continue
        try:
            ident, role, status = (cells[columns[c]] for c in ("id", "role", "status"))
        except IndexError:
            raise DocError(f"line {number}: a row with fewer cells than its header") from None
        if not ID_FORMAT.fullmatch(ident):
            raise DocError(f"line {number}: {ident!r} is not an ID like REQ-01")
        if ident in found:
            raise DocError(f"line {number}: {ident} is listed twice")
        status = status.lower()
        if status not in STATUSES:
            raise DocError(f"line {number}: {ident} has status {status!r}, not one of {', '.join(STATUSES)}")
        found[ident] = Requirement(ident, role, status)
    if not found:
        raise DocError("no table with the columns ID, Role and Status")
    return found


def parse_decisions(text: str) -> set[int]:
    """The decision numbers of docs/decisions.md: its level-2 headings ``## D7. ...``."""
    numbers = {int(m.group(1)) for m in re.finditer(r"^##\s+D(\d+)\b", text, re.MULTILINE)}
    if not numbers:
        raise DocError("no heading like '## D1. ...'")
    return numbers


# --- what a test names ------------------------------------------------------------------------------


def ids_in_name(name: str, prefixes: Iterable[str]) -> set[str]:
    """IDs spelled in a test's name, lower case without the dash: ``test_x_req07`` -> REQ-07."""
    alternatives = "|".join(sorted(p.lower() for p in prefixes))
    if not alternatives:
        return set()
    pattern = re.compile(rf"(?:^|_)({alternatives})_?(\d{{2}})(?=_|$)")
    return {f"{p.upper()}-{n}" for p, n in pattern.findall(name)}


def check(
    requirements: dict[str, Requirement], tests: Sequence[CollectedTest], decisions: set[int]
) -> Report:
    """Match the collected tests against the requirements; collect every problem."""
    report = Report(requirements)
    known = set(requirements)
    prefixes = {i.split("-", 1)[0] for i in known}
    for test in tests:
        where = test.function  # one problem per test function, not one per parameter set
        for bad in test.bad_marks:
            report.problems.append(f"{where}: marker argument {bad} is not an ID string")
        for ident in test.marked:
            if ident not in known:
                report.problems.append(f"{where}: marker names {ident}, which docs/conformance.md lacks")
            elif where not in report.tests.setdefault(ident, []):
                report.tests[ident].append(where)
        prose = f"{test.doc}\n{test.comment}"
        named = ids_in_name(test.name, prefixes) | set(ID_IN_TEXT.findall(prose))
        for ident in sorted(named - known):
            report.problems.append(f"{where}: names {ident}, which docs/conformance.md lacks")
        for ident in sorted((named & known) - set(test.marked)):
            report.problems.append(
                f"{where}: names {ident} without the marker "
                f'(add @pytest.mark.conformance("{ident}"), or reword if it does not prove it)'
            )
        for number in sorted({int(n) for n in DECISION_IN_TEXT.findall(prose)} - decisions):
            report.problems.append(f"{where}: cites D{number}, which docs/decisions.md lacks")
    report.problems = list(dict.fromkeys(report.problems))
    for ident in report.claimed():
        if not report.tests.get(ident):
            status = requirements[ident].status
            report.problems.append(
                f"{ident} is {status} in docs/conformance.md but no test carries its marker"
            )
    return report


# --- collection (the hook tests/conftest.py calls) ---------------------------------------------------


def _def_line_comment(function: Any) -> str:
    """The comments on a test's ``def`` line(s): ``def test_x() -> None:  # REQ-04``."""
    try:
        lines, _ = inspect.getsourcelines(inspect.unwrap(function))
    except (OSError, TypeError):
        return ""
    comments: list[str] = []
    seen_def = False
    try:
        for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent("".join(lines))).readline):
            if token.type == tokenize.NAME and token.string == "def":
                seen_def = True
            elif seen_def and token.type == tokenize.COMMENT:
                comments.append(token.string)
            elif seen_def and token.type == tokenize.NEWLINE:
                break
    except (tokenize.TokenError, SyntaxError):
        pass
    return " ".join(comments)


def describe(item: Any) -> dict[str, Any]:
    """One collected pytest item as the JSON record ``CollectedTest`` reads."""
    marked: list[str] = []
    bad: list[str] = []
    for mark in item.iter_markers("conformance"):
        for arg in (*mark.args, *mark.kwargs.values()):
            (marked if isinstance(arg, str) and ID_FORMAT.fullmatch(arg) else bad).append(
                arg if isinstance(arg, str) else repr(arg)
            )
        if not mark.args:
            bad.append("(none: the marker needs at least one ID)")
    function = getattr(item, "obj", None)
    return {
        "nodeid": item.nodeid,
        "name": getattr(item, "originalname", item.name),
        "doc": (inspect.getdoc(function) or "") if function is not None else "",
        "comment": _def_line_comment(function) if function is not None else "",
        "marked": sorted(set(marked)),
        "bad_marks": bad,
    }


def write_collection(items: Iterable[Any], path: str) -> None:
    Path(path).write_text(json.dumps([describe(item) for item in items], indent=1))


def collect(root: Path = ROOT, timeout: float = 280.0) -> list[CollectedTest]:
    """Collect the whole suite in a child pytest and read what the conftest hook wrote.

    ``-P`` keeps the checkout off ``sys.path``, so the child imports the installed package
    (with its compiled modules), as the test run does."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "collected.json"
        command = [
            sys.executable,
            "-P",
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--conformance-json={out}",
            str(root / "tests"),
        ]
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
        )
        if done.returncode != 0 or not out.exists():
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise RuntimeError(f"collecting the suite failed (exit {done.returncode}):\n{tail}")
        records = json.loads(out.read_text())
    return [
        CollectedTest(
            r["nodeid"], r["name"], r["doc"], r["comment"], tuple(r["marked"]), tuple(r["bad_marks"])
        )
        for r in records
    ]


def build_report(root: Path = ROOT) -> Report:
    requirements = parse_requirements((root / "docs" / "conformance.md").read_text())
    decisions = parse_decisions((root / "docs" / "decisions.md").read_text())
    return check(requirements, collect(root), decisions)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance_report",
        description="List each conformance ID of docs/conformance.md with the tests that prove it; "
        "exit 1 when a claimed ID has no test or a test names an ID without its marker.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="the summary and the problems only")
    args = parser.parse_args(argv)
    try:
        report = build_report()
    except (DocError, RuntimeError, OSError) as exc:
        print(f"conformance report: {exc}", file=sys.stderr)
        return 2
    print(report.render(quiet=args.quiet))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
