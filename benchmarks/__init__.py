"""Benchmarks of socks6fast; `socks6fast bench` runs ``benchmarks.bench.main`` (see README.md here)."""
