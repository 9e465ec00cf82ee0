"""SOCKS 6 wire codec: the compiled twin when available, else the pure-Python reference.

Strategy (yarl ``_quoting.py``): ``_codec_py`` is the truth; ``_codec_c`` is its
Cython twin with the same names, the same results and the same errors. Set
``SOCKS6FAST_NO_EXTENSIONS=1`` to force the reference. ``IMPLEMENTATION`` says
which one was loaded ("c" or "py").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._extensions import NO_EXTENSIONS

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._codec_py import (
        datagram_header_length,
        decode_association_message,
        decode_auth_reply,
        decode_datagram_header,
        decode_operation_reply,
        decode_options,
        decode_request,
        encode_association_message,
        encode_auth_reply,
        encode_datagram_header,
        encode_operation_reply,
        encode_options,
        encode_request,
        encode_version_mismatch,
    )

    IMPLEMENTATION = "py"
else:
    try:
        from ._codec_c import (
            datagram_header_length,
            decode_association_message,
            decode_auth_reply,
            decode_datagram_header,
            decode_operation_reply,
            decode_options,
            decode_request,
            encode_association_message,
            encode_auth_reply,
            encode_datagram_header,
            encode_operation_reply,
            encode_options,
            encode_request,
            encode_version_mismatch,
        )

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover - a broken install; test_extensions.py fails on it
        from ._codec_py import (
            datagram_header_length,
            decode_association_message,
            decode_auth_reply,
            decode_datagram_header,
            decode_operation_reply,
            decode_options,
            decode_request,
            encode_association_message,
            encode_auth_reply,
            encode_datagram_header,
            encode_operation_reply,
            encode_options,
            encode_request,
            encode_version_mismatch,
        )

        IMPLEMENTATION = "py"

__all__ = [
    "IMPLEMENTATION",
    "NO_EXTENSIONS",
    "datagram_header_length",
    "decode_association_message",
    "decode_auth_reply",
    "decode_datagram_header",
    "decode_operation_reply",
    "decode_options",
    "decode_request",
    "encode_association_message",
    "encode_auth_reply",
    "encode_datagram_header",
    "encode_operation_reply",
    "encode_options",
    "encode_request",
    "encode_version_mismatch",
]
