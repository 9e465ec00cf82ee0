"""The fuzz targets. Each module has ``setup()`` (imports what it checks) and
``test_one_input(data: bytes)`` (one execution: returns, raises a typed error it
swallows itself, or raises anything else, which libFuzzer reports as a crash)."""

#: Target name -> one-line description (``python -m fuzz list``).
TARGETS: dict[str, str] = {
    "codec_py": "SOCKS 6 reference codec (_codec_py): every decoder, round trip, REQ-07 prefixes",
    "codec_c": "SOCKS 6 Cython twin (_codec_c): the same checks as codec_py",
    "socks5": "SOCKS 5 / RFC 1929 codec (socks5.py): every decoder, round trip, prefixes",
    "codec_diff": "differential: the same bytes to _codec_py and _codec_c must give the same result",
    "server": "proxy state machines (ServerConnection, Socks5ServerConnection) fed in chunks",
    "client": "client state machine (ClientConnection, ClientSession) against fuzzed replies",
}
