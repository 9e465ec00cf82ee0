"""Write the seed corpora (``fuzz/corpus/TARGET/``) from the messages of the test suite.

    python -m fuzz seeds

The codec targets get every golden and malformed vector of tests/test_codec.py and
tests/test_socks5.py, behind the control byte that selects their decoder; the state
machine targets get whole conversations put together from the same vectors (a Request
with its initial data and RFC 1929 request; a SOCKS 5 greeting, authentication and
request; Authentication Reply + Operation Reply sequences), behind a few control words.
The files are small and committed; libFuzzer only reads them (new inputs go to
``fuzz/.work/``).
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
from pathlib import Path
from typing import Any

from fuzz import sut
from fuzz.targets import _codec6
from fuzz.targets import socks5 as socks5_target

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
#: Control words of the state-machine targets: each seeds a different reading style and
#: set of answers (see fuzz/targets/server.py and client.py).
CONTROLS = (b"\x00\x00\x00\x00", b"\x01\x02\x03\x04", b"\xff\x10\x20\x30")


def _tests() -> tuple[Any, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        return importlib.import_module("test_codec"), importlib.import_module("test_socks5")
    finally:
        sys.path.pop(0)


def _write(target: str, inputs: list[tuple[str, bytes]]) -> int:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    seen: set[bytes] = set()
    for name, data in inputs:
        if data in seen:
            continue
        seen.add(data)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]
        (folder / f"{slug}-{hashlib.sha1(data).hexdigest()[:8]}").write_bytes(data)
    return len(seen)


def codec_inputs(tc: Any) -> list[tuple[str, bytes]]:
    """Golden, malformed and option vectors behind their decoder's control byte."""
    out: list[tuple[str, bytes]] = []
    for v in tc.MESSAGE_VECTORS:
        wire = tc.h(v.wire)
        out.append((v.name, bytes([_codec6.KINDS.index(v.kind)]) + wire))
        if v.kind == "association" and wire[1] == 3:  # a Datagram: also a UDP datagram's header
            out.append((v.name + "-udp", bytes([_codec6.KINDS.index("datagram_header")]) + wire))
    for b in tc.BAD_VECTORS:
        out.append((b.name, bytes([_codec6.KINDS.index(b.kind)]) + tc.h(b.wire)))
    options = _codec6.KINDS.index("options")
    for name, wire, _ in tc.OPTION_VECTORS:
        out.append((name, bytes([options]) + tc.h(wire)))
    return out


def socks5_inputs(t5: Any) -> list[tuple[str, bytes]]:
    names = {decoder: i for i, (_, decoder, _, _) in enumerate(socks5_target.CODECS)}
    out = [(name, bytes([names[decode]]) + wire) for name, decode, _, wire, _ in t5.STREAM_VECTORS]
    out += [
        (f"error-{i}", bytes([names[decode]]) + wire)
        for i, (decode, wire, _, _) in enumerate(t5.ERROR_VECTORS)
    ]
    udp = names[sut.socks5.decode_udp_header]
    out += [(f"udp-{i}", bytes([udp]) + wire + b"payload") for i, (wire, _) in enumerate(t5.UDP_VECTORS)]
    return out


def server_inputs(tc: Any, t5: Any) -> list[tuple[str, bytes]]:
    """What clients send: Requests (with initial data and the RFC 1929 request when they
    advertise), SOCKS 5 greeting + authentication + request, and the malformed Requests."""
    userpass = sut.socks5.encode_userpass_request(sut.socks5.UserPassRequest(b"alice", b"s3cret"))
    streams: list[tuple[str, bytes]] = []
    for v in tc.MESSAGE_VECTORS:
        if v.kind != "request":
            continue
        wire = tc.h(v.wire)
        initial = b""
        for option in v.message.options:
            if isinstance(option, sut.messages.AuthMethodAdvertisement):
                initial = b"G" * option.initial_data_length
        streams.append((v.name, wire + initial + userpass + b"GET / HTTP/1.0\r\n\r\n"))
    streams += [(b.name, tc.h(b.wire)) for b in tc.BAD_VECTORS if b.kind == "request"]

    def by(decoder: Any) -> list[bytes]:
        return [wire for _, decode, _, wire, _ in t5.STREAM_VECTORS if decode is decoder]

    greetings, requests = by(sut.socks5.decode_greeting), by(sut.socks5.decode_request)
    logins = by(sut.socks5.decode_userpass_request)
    for i, greeting in enumerate(greetings):
        for j, request in enumerate(requests):
            login = logins[(i + j) % len(logins)] if logins else b""
            streams.append((f"socks5-{i}-{j}", greeting + login + request + b"data"))
    streams.append(("version-mismatch", b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"))
    return [(f"{name}-{k}", control + data) for k, control in enumerate(CONTROLS) for name, data in streams]


def client_inputs(tc: Any) -> list[tuple[str, bytes]]:
    """What proxies answer: each Authentication Reply vector followed by each Operation Reply
    vector (and the RFC 1929 reply of the slow exchange, D7)."""
    auth = [(v.name, tc.h(v.wire)) for v in tc.MESSAGE_VECTORS if v.kind == "auth_reply"]
    ops = [(v.name, tc.h(v.wire)) for v in tc.MESSAGE_VECTORS if v.kind == "operation_reply"]
    streams = [(f"{a}+{o}", aw + ow) for a, aw in auth for o, ow in ops]
    streams.append(("slow-userpass", auth[0][1] + b"\x01\x00" + auth[0][1] + ops[0][1]))
    streams.append(("version-mismatch", b"\x06"))
    streams += [(b.name, tc.h(b.wire)) for b in tc.BAD_VECTORS if b.kind in ("auth_reply", "operation_reply")]
    return [(f"{name}-{k}", control + data) for k, control in enumerate(CONTROLS) for name, data in streams]


def main() -> None:
    tc, t5 = _tests()
    codec = codec_inputs(tc)
    counts = {
        "codec_py": _write("codec_py", codec),
        "codec_c": _write("codec_c", codec),
        "codec_diff": _write("codec_diff", codec),
        "socks5": _write("socks5", socks5_inputs(t5)),
        "server": _write("server", server_inputs(tc, t5)),
        "client": _write("client", client_inputs(tc)),
    }
    size = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    print(", ".join(f"{t}: {n}" for t, n in counts.items()) + f"; {size} bytes in {CORPUS}")


if __name__ == "__main__":
    main()
