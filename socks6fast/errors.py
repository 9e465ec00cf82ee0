"""The one exception tree of socks6fast (STYLE.md section 4).

Strategy: the codec raises only ``WireError`` for malformed bytes; the sans-IO
connection turns it into ``RemoteProtocolError`` at its boundary; the adapter
answers with ``exc.reply_code`` and closes. I/O errors stay builtin ``OSError``
subclasses.
"""

from __future__ import annotations

from .constants import DatagramErrorCode, ReplyCode


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


class ProxyHeaderError(Socks6Error, ValueError):
    """A PROXY protocol header (HAProxy's v1 text or v2 binary form) that is malformed, too
    long or of an unknown version; raised by `socks6fast.proto.proxy_header` only. The
    listener closes the connection without a reply (proxy-protocol.txt section 2.1: "abort
    the connection")."""


class ConfigError(Socks6Error):
    """The configuration is invalid; the message is one sentence naming the offending key."""


class SessionStoreError(Socks6Error):
    """Proxy side: the shared session store (Redis) did not answer: unreachable, timed out or
    refused the command. The message says which store and why, in one sentence; requests
    that needed the store fail (docs/decisions.md D37)."""


class AssociationClosedError(Socks6Error, ConnectionError):
    """Client side: the UDP association is over (its TCP connection ended or was closed).

    "The UDP association remains active for as long as the TCP connection between the
    client and the proxy is kept open" (section "Handling UDP ASSOCIATE").
    """


class ICMPError(Socks6Error):
    """Client side: the proxy relayed an ICMP error for one of our datagrams (UDP-09).

    Raised from a UDP association's ``recvfrom`` when the client opted in with the UDP
    Error option; one subclass per Error Code (section "Reporting ICMP Errors"). The
    report is not checked by the proxy and may be spurious: the association stays usable.

    Attributes:
        code: the Error Code.
        destination: ``(address, port)`` of the datagram the error is about (the IP and
            UDP headers inside the ICMP payload).
        reporter: address of the host that sent the ICMP error.
    """

    code: DatagramErrorCode = DatagramErrorCode.HOST_UNREACHABLE

    def __init__(self, destination: tuple[str, int], reporter: str) -> None:
        super().__init__(
            f"{self.code.name.lower().replace('_', ' ')}: datagram to {destination[0]} port "
            f"{destination[1]}, reported by {reporter}"
        )
        self.destination = destination
        self.reporter = reporter

    @staticmethod
    def for_code(code: DatagramErrorCode, destination: tuple[str, int], reporter: str) -> ICMPError:
        """The subclass instance for ``code``."""
        return _ICMP_ERRORS[code](destination, reporter)


class NetworkUnreachableError(ICMPError):
    """Error Code 0x01: network unreachable."""

    code = DatagramErrorCode.NETWORK_UNREACHABLE


class HostUnreachableError(ICMPError):
    """Error Code 0x02: host unreachable."""

    code = DatagramErrorCode.HOST_UNREACHABLE


class TTLExpiredError(ICMPError):
    """Error Code 0x03: TTL expired (hop limit exceeded) in transit."""

    code = DatagramErrorCode.TTL_EXPIRED


class DatagramTooBigError(ICMPError):
    """Error Code 0x04: datagram too big (IPv6 only; the path MTU is smaller)."""

    code = DatagramErrorCode.DATAGRAM_TOO_BIG


_ICMP_ERRORS: dict[DatagramErrorCode, type[ICMPError]] = {
    cls.code: cls
    for cls in (NetworkUnreachableError, HostUnreachableError, TTLExpiredError, DatagramTooBigError)
}
