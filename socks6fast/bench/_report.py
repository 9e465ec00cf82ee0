"""Turn the collected samples into medians, the target ratios, a text table and a README block."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _sessions
from ._ttfb import MODES

FAST = ("socks6fast-s6", "socks6fast-s5")
#: What each UDP row's client speaks (``System.udp``), for the UDP table.
UDP_TRANSPORT = {
    "none": "no proxy",
    "s6udp": "SOCKS 6, plain UDP",
    "s6tcp": "SOCKS 6, datagrams on TCP",
    "s5": "SOCKS 5 UDP",
    "s6py": "SOCKS 6, plain UDP (Python client)",
    "s6dtls": "SOCKS 6, DTLS (Python client)",
}
#: The issue 10 targets for SOCKS 6 over plain UDP (issue 10, "Speed").
UDP_CPU_US = 6.0
UDP_VS_DANTE = 3.0
UDP_VS_DIRECT = 0.5
UDP_LARGE_OVER_SMALL = 1.15
#: Issue 11's target: proxy CPU per 64-B DTLS echo at most this many times the plain-UDP
#: figure. Compared with ``socks6fast-s6py`` (plain UDP, the same Python client at a like
#: rate); udpgen.c's ``socks6fast-s6`` offers several times the rate, and a proxy's CPU per
#: datagram falls as its batches fill.
DTLS_OVER_UDP = 3.0
README_BEGIN = "<!-- bench:results:begin -->"
README_END = "<!-- bench:results:end -->"
#: The UDP rows get a block of their own, so a `--tests udp` run does not replace the TCP tables.
README_UDP_BEGIN = "<!-- bench:udp-results:begin -->"
README_UDP_END = "<!-- bench:udp-results:end -->"
#: Results keys of the TCP tests (the "tcp" part of the tables).
TCP_KEYS = ("bulk", "connections", "latency", "idle", "ttfb")

Results = dict[str, Any]


def median_of(samples: list[dict[str, Any]], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(samples: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Median of each key over the rounds, plus the raw samples."""
    out: dict[str, Any] = {k: median_of(samples, k) for k in keys}
    out["samples"] = samples
    return out


# ------------------------------------------------------------------ targets


def _get(d: Any, *path: str) -> float | None:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d if isinstance(d, (int, float)) else None


def targets(res: Results) -> list[dict[str, Any]]:
    """The issue's targets, evaluated for every socks6fast path that was measured."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, limit: float, unit: str = "", issue: int = 4) -> None:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out.append(
            {"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "ok": ok, "issue": issue}
        )

    bulk = res.get("bulk", {})
    for fast in FAST:
        if fast not in res.get("measured_systems", []):
            continue
        if "1" in bulk:
            one = _get(bulk, "1", fast, "gbps")
            add(
                f"{fast} single stream / direct",
                _ratio(one, _get(bulk, "1", "direct", "gbps")),
                ">=",
                0.75,
                "x",
            )
            add(
                f"{fast} single stream / Dante", _ratio(one, _get(bulk, "1", "dante", "gbps")), ">=", 3.0, "x"
            )
        for streams in sorted(bulk, key=int):
            add(
                f"{fast} proxy CPU, {streams} stream{'s' if streams != '1' else ''}",
                _get(bulk, streams, fast, "proxy_cpu_s_per_gib"),
                "<=",
                0.25,
                "s/GiB",
            )
        if "connections" in res:
            add(
                f"{fast} proxy CPU per connection",
                _get(res, "connections", fast, "proxy_us_per_conn"),
                "<=",
                200,
                "us",
            )
        if "idle" in res:
            add(f"{fast} resident per idle connection", _get(res, "idle", fast, "kib_rss"), "<=", 12, "KiB")
    udp = res.get("udp", {})
    echo = udp.get("echo", {})
    fast = "socks6fast-s6"
    if echo and fast in res.get("measured_systems", []):
        # Issue 10 "Speed": the 64-byte closed-loop echo through SOCKS 6 over plain UDP.
        small, large = min(echo, key=int), max(echo, key=int)
        cpu = _get(echo, small, fast, "proxy_us_per_echo")
        rate = _get(echo, small, fast, "echoes_per_s")
        add(f"UDP {fast} proxy CPU per {small}-B echo", cpu, "<=", UDP_CPU_US, "us", 10)
        add(
            f"UDP {fast} echoes/s / Dante ({small} B)",
            _ratio(rate, _get(echo, small, "dante", "echoes_per_s")),
            ">=",
            UDP_VS_DANTE,
            "x",
            10,
        )
        add(
            f"UDP {fast} echoes/s / direct ({small} B)",
            _ratio(rate, _get(echo, small, "direct", "echoes_per_s")),
            ">=",
            UDP_VS_DIRECT,
            "x",
            10,
        )
        if large != small:
            add(
                f"UDP {fast} proxy CPU per echo, {large} B / {small} B",
                _ratio(_get(echo, large, fast, "proxy_us_per_echo"), cpu),
                "<=",
                UDP_LARGE_OVER_SMALL,
                "x",
                10,
            )
    dtls = "socks6fast-s6dtls"
    if echo and dtls in res.get("measured_systems", []):
        small = min(echo, key=int)
        add(
            f"UDP {dtls} proxy CPU per {small}-B echo / socks6fast-s6py",
            _ratio(
                _get(echo, small, dtls, "proxy_us_per_echo"),
                _get(echo, small, "socks6fast-s6py", "proxy_us_per_echo"),
            ),
            "<=",
            DTLS_OVER_UDP,
            "x",
            11,
        )
    ttfb = res.get("ttfb", {})
    if ttfb:
        s5 = _get(ttfb, "socks5", "socks6fast-s5", "ms")
        s5a = _get(ttfb, "socks5-userpass", "socks6fast-s5", "ms")
        add(
            "TTFB SOCKS6 / SOCKS5, no auth",
            _ratio(_get(ttfb, "socks6", "socks6fast-s6", "ms"), s5),
            "<=",
            0.5,
            "x",
        )
        add(
            "TTFB SOCKS6 0-RTT / SOCKS5, username/password",
            _ratio(_get(ttfb, "socks6-userpass", "socks6fast-s6", "ms"), s5a),
            "<=",
            0.4,
            "x",
        )
        add(
            "TTFB SOCKS6 in a session / SOCKS5 username/password",
            _ratio(_get(ttfb, "socks6-session", "socks6fast-s6", "ms"), s5a),
            "<=",
            0.4,
            "x",
        )
        # The same goals met by SOCKS6's best mode for each authentication case: TCP Fast Open
        # with the Request and the payload in the SYN, which draft-11 allows when the request
        # spends an idempotence token inside a session (rows present when TFO could be used).
        if "socks6-tfo-token" in ttfb or "socks6-tfo-token-userpass" in ttfb:
            add(
                "TTFB best SOCKS6 (TFO + token in a session) / SOCKS5, no auth",
                _ratio(_get(ttfb, "socks6-tfo-token", "socks6fast-s6", "ms"), s5),
                "<=",
                0.5,
                "x",
            )
            add(
                "TTFB best SOCKS6 (TFO + token in a session, username/password) / SOCKS5 username/password",
                _ratio(_get(ttfb, "socks6-tfo-token-userpass", "socks6fast-s6", "ms"), s5a),
                "<=",
                0.4,
                "x",
            )
        # Issue 15 item 1: a SOCKS 5 app through the gateway, in round trips of the delayed
        # gateway-proxy leg (SOCKS 5 straight to the proxy needs about 3, 4 with a password).
        for mode, what in (("gateway-socks5", "no auth"), ("gateway-socks5-userpass", "username/password")):
            if mode in ttfb:
                add(
                    f"TTFB SOCKS5 app via the gateway, {what}, round trips of the gateway-proxy leg",
                    _get(ttfb, mode, "socks6fast-s6", "round_trips"),
                    "<=",
                    1.2,
                    "RT",
                    15,
                )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ------------------------------------------------------------------ text table


def _f(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def markdown_tables(res: Results, part: str = "all") -> str:
    """Markdown tables of the medians (also printed to the terminal): ``part`` "all", or "tcp"
    (every test but UDP, and the issue #4 targets) or "udp" (the UDP tables and their targets)."""
    if part == "udp":
        res = {k: v for k, v in res.items() if k not in TCP_KEYS}
    elif part == "tcp":
        res = {k: v for k, v in res.items() if k != "udp"}
    if part != "all":
        udp_part = part == "udp"
        res["targets"] = [t for t in res.get("targets", []) if (t.get("issue") == 10) == udp_part]
    systems = [s for s in res["measured_systems"]]
    lines: list[str] = []
    bulk = res.get("bulk", {})
    if bulk:
        counts = sorted(bulk, key=int)
        head = ["system"] + [f"{c} stream{'s' if c != '1' else ''} Gbit/s" for c in counts]
        head += [f"proxy CPU s/GiB ({c})" for c in counts] + [f"machine CPU s/GiB ({c})" for c in counts]
        lines += ["Bulk throughput through each proxy to a local sink (median of rounds):", ""]
        lines += _md_table(
            head,
            [
                [s]
                + [_f(_get(bulk, c, s, "gbps")) for c in counts]
                + [_f(_get(bulk, c, s, "proxy_cpu_s_per_gib")) for c in counts]
                + [_f(_get(bulk, c, s, "machine_cpu_s_per_gib")) for c in counts]
                for s in systems
                if any(s in bulk[c] for c in counts)
            ],
        )
        lines.append("")
    conn = res.get("connections", {})
    lat = res.get("latency", {})
    if conn or lat:
        c = res["options"]["concurrency"]
        lines += [
            f"Connections: CONNECT, 64 bytes each way, the target closes first; {c} at a time, and 1 at a "
            "time for the unloaded latency:",
            "",
        ]
        lines += _md_table(
            [
                "system",
                f"conn/s (c={c})",
                "proxy CPU us/conn",
                "machine CPU us/conn",
                f"p50 ms (c={c})",
                f"p99 ms (c={c})",
                "p50 ms (c=1)",
                "p99 ms (c=1)",
            ],
            [
                [
                    s,
                    _f(_get(conn, s, "conn_per_s"), 0),
                    _f(_get(conn, s, "proxy_us_per_conn"), 0),
                    _f(_get(conn, s, "machine_us_per_conn"), 0),
                    _f(_get(conn, s, "p50_ms"), 3),
                    _f(_get(conn, s, "p99_ms"), 3),
                    _f(_get(lat, s, "p50_ms"), 3),
                    _f(_get(lat, s, "p99_ms"), 3),
                ]
                for s in systems
                if s in conn or s in lat
            ],
        )
        lines.append("")
    idle = res.get("idle", {})
    if idle:
        n = res["options"]["idle_conns"]
        lines += [f"Memory per idle relayed connection ({n} open, each confirmed by a 1-byte echo):", ""]
        lines += _md_table(
            ["system", "RSS KiB/conn", "PSS KiB/conn"],
            [[s, _f(_get(idle, s, "kib_rss")), _f(_get(idle, s, "kib_pss"))] for s in systems if s in idle],
        )
        lines.append("")
    ttfb = res.get("ttfb", {})
    if ttfb:
        d = res["options"]["delay_ms"]
        cols = [s for s in systems if any(s in ttfb.get(m, {}) for m, _ in MODES)]
        lines += [
            f"Time to first byte, ms (round trips in brackets), client-proxy one-way delay {d:g} ms, "
            "TCP handshake round trip emulated:",
            "",
        ]
        rows = []
        for mode, label in MODES:
            if mode not in ttfb:
                continue
            row = [label]
            for s in cols:
                v = _get(ttfb, mode, s, "ms")
                rt = _get(ttfb, mode, s, "round_trips")
                row.append("" if v is None else f"{v:.1f} ({rt:.2f})" if rt is not None else f"{v:.1f}")
            rows.append(row)
        lines += _md_table(["mode"] + cols, rows)
        lines.append("")
        lines += _tfo_lines(res)
    lines += udp_tables(res)
    lines += _sessions.tables(res)
    tg = res.get("targets", [])
    if tg:
        issues = sorted({t.get("issue", 4) for t in tg})
        title = {(4,): "issue #4", (10,): "issue #10, UDP", (10, 11): "UDP: issue #10; DTLS: issue #11"}.get(
            tuple(issues), "issue #4; UDP: issues #10, #11"
        )
        lines += [f"Targets ({title}):", ""]
        lines += _md_table(
            ["target", "measured", "goal", "met"],
            [
                [
                    t["target"],
                    "-" if t["value"] is None else f"{_sig(t['value'])} {t['unit']}".strip(),
                    f"{t['op']} {t['limit']:g} {t['unit']}".strip(),
                    {True: "yes", False: "NO", None: "n/a"}[t["ok"]],
                ]
                for t in tg
            ],
        )
        lines.append("")
    skipped = [(n, s["reason"]) for n, s in res["systems"].items() if s["reason"]]
    if skipped:
        lines += ["Notes:", ""] + [f"- {n}: {r}" for n, r in skipped] + [""]
    return "\n".join(lines)


def udp_tables(res: Results) -> list[str]:
    """The UDP test's tables: echo at each size (with idle memory and the one-in-flight round trip
    beside the first), then one-way packets per second; skipped systems and why."""
    udp = res.get("udp", {})
    if not udp:
        return []
    o = res["options"]
    echo = udp.get("echo", {})
    systems = [
        s
        for s in res["measured_systems"]
        if any(s in echo[z] for z in echo) or s in udp.get("pps", {}) or s in udp.get("latency", {})
    ]
    transport = {n: UDP_TRANSPORT.get(str(v.get("udp", "")), "") for n, v in res["systems"].items()}
    lines: list[str] = []
    lat, idle = udp.get("latency", {}), udp.get("idle", {})
    if echo or lat:
        lines += [
            f"UDP echo through UDP ASSOCIATE (closed loop, {o['udp_flows']} flows x {o['udp_inflight']} in "
            "flight; CPU in microseconds per echo: the proxy's processes, all threads, and the whole "
            f"machine; round trip at 1 in flight, 64 B; memory per idle association, {o['udp_idle']} open):",
            "",
        ]
        head = ["system", "transport"]
        for z in sorted(echo, key=int):
            head += [f"echoes/s ({z} B)", f"proxy us/echo ({z} B)", f"machine us/echo ({z} B)"]
            head += [f"loss ({z} B)"]
        head += ["p50 us (1x1)", "p99 us (1x1)", "RSS KiB/assoc", "PSS KiB/assoc"]
        rows = []
        for s in systems:
            row = [s, transport.get(s, "")]
            for z in sorted(echo, key=int):
                row += [
                    _f(_get(echo, z, s, "echoes_per_s"), 0),
                    _f(_get(echo, z, s, "proxy_us_per_echo")),
                    _f(_get(echo, z, s, "machine_us_per_echo")),
                    _f(_get(echo, z, s, "loss"), 4),
                ]
            row += [
                _f(_get(lat, s, "p50_us"), 0),
                _f(_get(lat, s, "p99_us"), 0),
                _f(_get(idle, s, "kib_rss")),
                _f(_get(idle, s, "kib_pss")),
            ]
            rows.append(row)
        lines += _md_table(head, rows) + [""]
        floor = [(z, _get(echo, z, "direct", "server_us_per_echo")) for z in sorted(echo, key=int)]
        if all(v is not None for _z, v in floor) and floor:
            each = ", ".join(f"{v:.2f} µs at {z} B" for z, v in floor)
            lines += [
                f"The echo server (recvmmsg/sendmmsg, 64 at a time) spent {each} per echo in the direct "
                "rows: a relay receives and sends twice per echo, so about twice that is the floor of any "
                "relay built on these system calls on this machine.",
                "",
            ]
    pps = udp.get("pps", {})
    if pps:
        lines += [
            f"UDP one way, open loop ({o['udp_flows']} senders, {o['udp_pps_size']}-B datagrams, "
            f"{o['udp_pps_batch']} per sendmmsg) into a counting sink; CPU per datagram that arrived:",
            "",
        ]
        lines += _md_table(
            ["system", "transport", "arrived pkt/s", "sent pkt/s", "loss", "proxy us/pkt", "machine us/pkt"],
            [
                [
                    s,
                    transport.get(s, ""),
                    _f(_get(pps, s, "pps"), 0),
                    _f(_get(pps, s, "sent_per_s"), 0),
                    _f(_get(pps, s, "loss"), 3),
                    _f(_get(pps, s, "proxy_us_per_packet")),
                    _f(_get(pps, s, "machine_us_per_packet")),
                ]
                for s in systems
                if s in pps
            ],
        )
        lines.append("")
    hs = udp.get("dtls_handshakes", {})
    if hs:
        lines += [
            "DTLS handshakes with the proxy's DTLS port (cookie exchange, handshake, hand-off to the "
            "UDP engine, close; the Python client):",
            "",
        ]
        lines += _md_table(
            ["system", "handshakes/s", "proxy us/handshake"],
            [
                [s, _f(_get(hs, s, "handshakes_per_s"), 0), _f(_get(hs, s, "proxy_us_per_handshake"), 0)]
                for s in hs
            ],
        )
        lines.append("")
    for name, why in udp.get("skipped", {}).items():
        lines.append(f"UDP: {name} skipped: {why}.")
    if udp.get("skipped"):
        lines.append("")
    return lines


def _tfo_lines(res: Results) -> list[str]:
    """One line on what the TFO rows proved (or why they are missing), below the TTFB table."""
    info = res.get("ttfb_tfo", {})
    if info and not info.get("enabled"):
        return [f"{info.get('note') or 'TFO rows skipped'}.", ""]
    checks = [
        (label, s, row["tfo"])
        for mode, label in MODES
        for s, row in res.get("ttfb", {}).get(mode, {}).items()
        if isinstance(row, dict) and "tfo" in row
    ]
    if not checks:
        return []
    parts = []
    for label, _system, c in checks:
        if "requests" not in c:
            parts.append(f"{label}: NOT VERIFIED: {c['problems']}")
            continue
        tokens = f", {c['tokens_accepted']}/{c['requests']} tokens accepted" if "tokens_accepted" in c else ""
        verdict = "" if c["verified"] else f" (NOT VERIFIED: {c['problems']})"
        parts.append(
            f"{label}: first bytes in the SYN in {c['timed_in_syn']}/{c['timed_samples']} timed samples, "
            f"proxy took data in the SYN {c['proxy_syn_data']}/{c['proxy_tfo']}, "
            f"{c['target_connections']} target connections for {c['requests']} requests"
            f"{' + 1 session setup' if 'tokens_accepted' in c else ''}{tokens}{verdict}"
        )
    out = ["TFO rows, checked on every request (the client's, the shim's and the target's counters):", ""]
    out += [f"- {p}" for p in parts]
    if info.get("note"):
        out.append(f"- {info['note']}")
    return out + [""]


def _sig(v: float) -> str:
    """About four significant digits (0.5003, 12.82, 267), enough to see which side of a limit."""
    return (
        f"{v:.0f}"
        if abs(v) >= 100
        else f"{v:.2f}"
        if abs(v) >= 10
        else f"{v:.4f}"
        if abs(v) < 1
        else f"{v:.3f}"
    )


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = (
        [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        if rows
        else [len(h) for h in head]
    )
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*r) for r in rows]
    return out


# ------------------------------------------------------------------ README


def _literal(block: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: block


def update_readme(readme: Path, res: Results) -> list[str]:
    """Write the tables between the results markers in ``readme``: the TCP tests' between the
    ``bench:results`` markers, the UDP test's between the ``bench:udp-results`` ones, each only
    when the run has them (a block without its markers is appended). Returns the parts written."""
    meta = res["meta"]
    relays = {s.get("relay") for s in res.get("systems", {}).values() if s.get("relay")}
    relay = f" socks6fast relay path: {', '.join(sorted(relays))}." if relays else ""
    text = readme.read_text() if readme.exists() else ""
    written = []
    parts = (("tcp", README_BEGIN, README_END, "Latest results"), ("udp", README_UDP_BEGIN, README_UDP_END,
             "Latest UDP results"))  # fmt: skip
    for part, begin, end, heading in parts:
        if not (any(k in res for k in TCP_KEYS) if part == "tcp" else "udp" in res):
            continue
        block = "\n".join(
            [
                begin,
                f"Produced by `{meta['command']}` on {meta['date']}, {meta['machine']['summary']}; "
                f"load average before the run {meta['loadavg_start']} (1, 5, 15 min: other work on this "
                f"shared machine); the run took {meta['elapsed_s']:.0f} s.{relay}",
                "",
                markdown_tables(res, part).rstrip(),
                end,
            ]
        )
        if begin in text and end in text:
            # A function as the replacement: the block is taken literally (no backslash escapes).
            text = re.sub(re.escape(begin) + ".*?" + re.escape(end), _literal(block), text, flags=re.S)
        else:
            text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
        written.append(part)
    readme.write_text(text)
    return written
