"""socks6fast: a SOCKS 6 (draft-olteanu-intarea-socks-6-11) proxy and client library."""

from .constants import (
    AddressType,
    AuthMethod,
    AuthReplyType,
    Command,
    OptionKind,
    ReplyCode,
)
from .errors import (
    AssociationClosedError,
    AuthenticationError,
    ICMPError,
    LocalProtocolError,
    ProtocolError,
    ProxyError,
    RemoteProtocolError,
    Socks6Error,
    VersionMismatchError,
    WireError,
)

__version__ = "0.1.0"

__all__ = [
    "AddressType",
    "AssociationClosedError",
    "AuthMethod",
    "AuthReplyType",
    "AuthenticationError",
    "Command",
    "ICMPError",
    "LocalProtocolError",
    "OptionKind",
    "ProtocolError",
    "ProxyError",
    "RemoteProtocolError",
    "ReplyCode",
    "Socks6Error",
    "VersionMismatchError",
    "WireError",
    "__version__",
]
