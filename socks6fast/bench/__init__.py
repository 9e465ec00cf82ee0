"""``socks6fast bench``: the benchmark suite that ships with the package (benchmarks/README.md).

``main(argv)`` runs one of the commands below; ``socks6fast.cli`` hands it everything
after ``bench``.

- ``socks6fast bench [OPTIONS]`` (``suite.py``): socks6fast's SOCKS 5 and SOCKS 6 paths
  beside direct loopback, Dante and microsocks: throughput, CPU per GiB and per
  connection, memory per idle connection, time to first byte.
- ``socks6fast bench ceiling`` (``ceiling.py``): one stream through socks6fast beside
  the simplest possible splice relay.
- ``socks6fast bench chart FILE.json`` (``cli.py``): the chart of a saved run.

Layout: ``cli.py`` parses and dispatches; ``_systems`` starts the systems under test,
``_measure`` and ``_ttfb`` take one measurement each with the compiled load generator
(``loadgen.c``, package data), ``_procs`` owns every child process and reads /proc,
``_report`` makes the tables and ``_chart`` the chart (matplotlib, optional).
"""

from .cli import main

__all__ = ["main"]
