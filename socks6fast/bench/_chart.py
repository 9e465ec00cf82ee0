"""The chart of a run: one panel of horizontal bars per figure, drawn with matplotlib.

matplotlib is optional (the ``socks6fast[bench]`` extra): a proxy host can run the
suite without it, keep the JSON, and draw the chart elsewhere with ``socks6fast bench
chart FILE.json``. ``unavailable()`` says in one sentence why no chart can be drawn;
``panels()`` needs nothing but the results. The figure is built with matplotlib's
object-oriented API (``Figure``, no ``pyplot``), so no GUI backend is ever chosen.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._report import UDP_CPU_US
from ._systems import UDP_ONLY
from ._ttfb import MODES

#: Colour of each system's bars (matplotlib colour strings).
SYSTEM_COLORS: dict[str, str] = {
    "direct": "#969696",
    "socks6fast-s5": "#326ec8",
    "socks6fast-s6": "#1ea05a",
    "socks6fast-s6tcp": "#78c896",
    "socks6fast-s6metrics": "#0f6e3c",
    "socks6fast-s6w2": "#7fd6a4",
    "dante": "#e68c1e",
    "microsocks": "#8c50aa",
}
OTHER_COLOR = "#646464"
#: Printed when the chart cannot be drawn; one sentence each.
NO_MATPLOTLIB = (
    "matplotlib is not installed, so no chart is drawn (pip install matplotlib, "
    "or install socks6fast with its [bench] extra)."
)


class ChartError(Exception):
    """The chart cannot be drawn here; the message is one sentence."""


@dataclass
class Bar:
    label: str
    value: float | None
    color: str
    note: str = ""
    """Shown instead of a value when ``value`` is None (e.g. "n/a")."""


@dataclass
class Panel:
    title: str
    unit: str
    bars: list[Bar] = field(default_factory=list)
    target: float | None = None
    """Drawn as a dashed red line; the title gives its value."""


def unavailable() -> str | None:
    """Why no chart can be drawn here (one sentence), or None when matplotlib can be imported."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        found = False
    return None if found else NO_MATPLOTLIB


def _get(d: Any, *path: str) -> float | None:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d if isinstance(d, (int, float)) else None


def panels(res: dict[str, Any]) -> list[Panel]:
    """The panels of a run's results (the JSON ``socks6fast bench`` writes), in reading order."""
    # The TCP panels leave out the UDP-only rows (SOCKS 6 datagrams over TCP: _systems.UDP_ONLY).
    every: list[str] = res["measured_systems"]
    systems = [s for s in every if s not in UDP_ONLY]
    out: list[Panel] = []
    bulk = res.get("bulk", {})

    def bar(system: str, value: float | None) -> Bar:
        return Bar(system, value, SYSTEM_COLORS.get(system, OTHER_COLOR), "" if value is not None else "n/a")

    def bars(getter: Callable[[str], float | None], skip_direct: bool = False) -> list[Bar]:
        return [bar(s, getter(s)) for s in systems if not (skip_direct and s == "direct")]

    for c in sorted(bulk, key=int):
        plural = "s" if c != "1" else ""
        gbps = [bar(s, _get(bulk, c, s, "gbps")) for s in systems]
        out.append(Panel(f"Bulk, {c} stream{plural}", "Gbit/s, higher is better", gbps))
    if "1" in bulk:
        out.append(
            Panel(
                "Proxy CPU per GiB relayed, 1 stream",
                "s/GiB, lower is better",
                bars(lambda s: _get(bulk, "1", s, "proxy_cpu_s_per_gib"), True),
                0.25,
            )
        )
    conn = res.get("connections", {})
    if conn:
        out.append(
            Panel(
                "Proxy CPU per connection",
                "µs, lower is better",
                bars(lambda s: _get(conn, s, "proxy_us_per_conn"), True),
                200,
            )
        )
        out.append(
            Panel("Connection rate", "conn/s, higher is better", bars(lambda s: _get(conn, s, "conn_per_s")))
        )
    lat = res.get("latency", {})
    if lat:
        out.append(
            Panel("Latency p99, one at a time", "ms, lower is better", bars(lambda s: _get(lat, s, "p99_ms")))
        )
    idle = res.get("idle", {})
    if idle:
        out.append(
            Panel(
                "Resident memory per idle connection",
                "KiB, lower is better",
                bars(lambda s: _get(idle, s, "kib_rss"), True),
                12,
            )
        )
    ttfb = res.get("ttfb", {})
    if ttfb:
        tb = [
            Bar(f"{s}: {label}", v, SYSTEM_COLORS.get(s, OTHER_COLOR))
            for mode, label in MODES
            for s in systems
            for v in (_get(ttfb, mode, s, "ms"),)
            if v is not None
        ]
        delay = res["options"]["delay_ms"]
        out.append(Panel(f"Time to first byte, {delay:g} ms one way", "ms, lower is better", tb))
    echo = res.get("udp", {}).get("echo", {})
    if echo:
        # Issue 10: the smallest size's echo rate, and its proxy CPU against the 6 µs target.
        z = min(echo, key=int)
        ran = [s for s in every if s in echo[z]]
        out.append(
            Panel(
                f"UDP echo, {z} B",
                "echoes/s, higher is better",
                [bar(s, _get(echo, z, s, "echoes_per_s")) for s in ran],
            )
        )
        out.append(
            Panel(
                f"UDP proxy CPU per {z}-B echo",
                "µs, lower is better",
                [bar(s, _get(echo, z, s, "proxy_us_per_echo")) for s in ran if s != "direct"],
                UDP_CPU_US,
            )
        )
    return out


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def draw(res: dict[str, Any], path: Path) -> None:
    """Draw the chart of ``res`` into ``path`` (PNG, or any format matplotlib knows by suffix).

    Raises:
        ChartError: matplotlib is missing or cannot be imported (one-sentence message).
    """
    try:
        # Optional dependency (the [bench] extra): imported only when a chart is drawn.
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as exc:
        if unavailable():
            raise ChartError(NO_MATPLOTLIB) from None
        raise ChartError(f"matplotlib cannot be imported ({exc}), so no chart is drawn.") from None
    shown = [p for p in panels(res) if p.bars]
    if not shown:
        raise ChartError("the results hold no figure to chart.")
    heights = [0.9 + 0.32 * len(p.bars) for p in shown]
    fig = Figure(figsize=(11, 1.0 + sum(heights)), layout="constrained")
    axes = fig.subplots(len(shown), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    meta = res["meta"]
    fig.suptitle(f"socks6fast bench, {meta['date']}\n{meta['machine']['summary']}", fontsize=11)
    for ax, panel in zip(axes, shown, strict=True):
        y = list(range(len(panel.bars)))
        values = [b.value or 0.0 for b in panel.bars]
        ax.barh(y, values, color=[b.color for b in panel.bars], height=0.7)
        ax.set_yticks(y, [b.label for b in panel.bars], fontsize=8)
        ax.invert_yaxis()  # first system on top
        target = "" if panel.target is None else f"; dashed line: target {_fmt(panel.target)}"
        ax.set_title(f"{panel.title} ({panel.unit}{target})", loc="left", fontsize=10)
        top = max([*values, panel.target or 0.0, 1e-9])
        ax.set_xlim(0, top * 1.18)  # room for the value labels
        for i, b in enumerate(panel.bars):
            text = (b.note or "n/a") if b.value is None else _fmt(b.value)
            ax.text(b.value or 0.0, i, f" {text}", va="center", fontsize=8)
        if panel.target is not None:
            ax.axvline(panel.target, color="#dc1e1e", linestyle="--", linewidth=1.2, zorder=0)
        ax.tick_params(axis="x", labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
