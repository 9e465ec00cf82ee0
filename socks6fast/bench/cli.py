"""The ``socks6fast bench`` command line: the suite by default, or a named subcommand.

The suite's options come straight after ``bench`` (``socks6fast bench --quick``), so
the subcommands are picked by their first word rather than by argparse subparsers,
which would make the suite a subcommand of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import _chart, ceiling, suite

#: Exit status of a usage error or of a chart that cannot be drawn (the argparse convention).
EXIT_USAGE = 2


def chart_main(argv: Sequence[str]) -> int:
    """``socks6fast bench chart FILE.json [--png PATH]``: draw the chart of a saved run."""
    parser = argparse.ArgumentParser(
        prog="socks6fast bench chart",
        description="Draw the chart of a run saved by `socks6fast bench` (needs socks6fast[bench]).",
    )
    parser.add_argument("json", type=Path, metavar="FILE.json", help="results written by socks6fast bench")
    parser.add_argument("--png", type=Path, help="chart path (default: FILE with .png)")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.json.read_text())
        if not isinstance(results, dict) or "measured_systems" not in results or "meta" not in results:
            raise ValueError("not the results of socks6fast bench")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"socks6fast bench: error: {args.json}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    png: Path = args.png or args.json.with_suffix(".png")
    try:
        _chart.draw(results, png)
    except _chart.ChartError as exc:
        print(f"socks6fast bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {png}")
    return 0


#: The subcommands, by the word that follows ``bench``.
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "ceiling": ceiling.main,
    "chart": chart_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``socks6fast bench ...`` (``argv`` is what follows ``bench``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:])
    return suite.main(args)
