"""The one exception tree of socks6fast (STYLE.md section 4).

Strategy: the codec raises only ``WireError`` for malformed bytes; the sans-IO
connection turns it into ``RemoteProtocolError`` at its boundary; the adapter
answers with ``exc.reply_code`` and closes. I/O errors stay builtin ``OSError``
subclasses.
"""

from __future__ import annotations

from .constants import ReplyCode


class Socks6Error(Exception):
    """Base class of every error socks6fast raises on purpose."""


class WireError(Socks6Error, ValueError):
    """Malformed or illegal bytes, raised by the codecs only.

    Attributes:
        reply_code: the Operation Reply code a proxy should answer with, or None
            where no reply applies (garbage before a full header, docs/decisions.md D14).
    """

    def __init__(self, message: str, reply_code: ReplyCode | None = ReplyCode.GENERAL_FAILURE) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class ProtocolError(Socks6Error):
    """A protocol rule was broken; ``reply_code`` is what the proxy answers with.

    Abstract: raise ``LocalProtocolError`` or ``RemoteProtocolError``.
    """

    def __init__(self, message: str, reply_code: ReplyCode | None = ReplyCode.GENERAL_FAILURE) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise a subclass")
        super().__init__(message)
        self.reply_code = reply_code


class LocalProtocolError(ProtocolError):
    """We tried to send something the draft forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the draft forbids."""


class ProxyError(Socks6Error):
    """Client side: the proxy refused the request.

    Attributes:
        reply_code: the Operation Reply code the proxy sent, or None when the
            refusal was not an Operation Reply (authentication failure, version
            mismatch).
    """

    def __init__(self, message: str, reply_code: ReplyCode | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class VersionMismatchError(ProxyError):
    """The proxy answered with a Version Mismatch Reply (REQ-02)."""


class AuthenticationError(ProxyError):
    """The proxy rejected our credentials or offered no acceptable method (AUTH-03)."""


class ConfigError(Socks6Error):
    """The configuration is invalid; the message is one sentence naming the offending key."""
