"""What the blocking and the asyncio client share, besides the sans-IO core.

Both flavours offer the same classes with the same names, options and return shapes:
`ProxyBase`, `SessionBase` and `BindingBase` hold the state and the accessors, and
`RequestOptions` / `ConnectOptions` are the keyword arguments of every request method.
The steps of a request are in `socks6fast.proto.client_flow`; a flavour adds only how it
performs them (``socks6fast.client``: blocking sockets and a thread lock;
``socks6fast.asyncio.client``: the event loop).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, Self, TypedDict, TypeVar

from .constants import Availability, Command, Parity, StackLeg
from .net.url import ProxyURL, parse_proxy_url, proxy_ssl_context
from .proto.client import ClientConnection, ClientSession, ClientState
from .proto.client_flow import Flow, request
from .proto.client_udp import (
    DEFAULT_RESEND_INTERVAL,
    DEFAULT_RESEND_TRIES,
    ClientAssociation,
    Transport,
)
from .proto.messages import (
    OperationReply,
    Option,
    PortParityOption,
    StackOption,
    UDPErrorOption,
)
from .proto.states import AssociationState

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = [
    "DEFAULT_TIMEOUT",
    "AssociationBase",
    "BindingBase",
    "ConnectOptions",
    "ProxyBase",
    "RequestOptions",
    "SessionBase",
    "UDPAssociateOptions",
]

C = TypeVar("C")
"""A flavour's channel type."""

#: Seconds allowed for connecting to the proxy, TLS and the SOCKS handshake.
DEFAULT_TIMEOUT: Final = 30.0


class RequestOptions(TypedDict, total=False):
    """Keyword arguments of ``bind`` (and, with `ConnectOptions`, ``connect``) in both flavours.

    Every key is optional; the default is given first.
    """

    stack_options: Iterable[StackOption]
    """``()``. Stack options from `socks6fast.proto.messages`; what the proxy applied
    comes back in the Operation Reply's options (D9)."""
    idempotent: bool
    """False. Spend an idempotence token (IDM-05); needs a session with ``tokens``."""
    tfo: bool
    """False. TCP Fast Open to the proxy where TRN-02 allows it: the Request alone in
    the SYN, or with the initial data when the request spends a token."""
    timeout: float | None
    """`DEFAULT_TIMEOUT`. Seconds for connecting, TLS and the SOCKS handshake (None: no
    limit); expiry raises ``TimeoutError``."""


class ConnectOptions(RequestOptions, total=False):
    """Keyword arguments of ``connect``, ``connect_tunnel`` and ``open_connection``."""

    initial_data: bytes
    """``b""``. First application bytes, sent in the same write as the Request (CMD-03).
    With credentials up to 2^14 bytes are announced; the rest follows the successful
    Authentication Reply."""


class UDPAssociateOptions(RequestOptions, total=False):
    """Keyword arguments of ``udp_associate`` in both flavours (besides `RequestOptions`)."""

    transport: Transport
    """``"udp"`` for ``socks6://``, ``"dtls"`` for ``socks6+tls://`` (D30). Where the
    datagrams travel (UDP-02): ``"udp"``, plain UDP datagrams to the proxy's UDP port;
    ``"dtls"``, the same datagrams inside a DTLS 1.2 connection to the proxy's DTLS port
    (D16: beside the TLS listener, same address and port number), its certificate and
    host name verified (``proxy_dtls``); ``"tcp"``, framed on the TCP (or TLS) connection
    to the proxy (for a proxy that serves no DTLS; datagrams then wait behind lost
    segments). ``udp_port=`` names another UDP or DTLS port."""
    udp_error: bool
    """False. Ask for ICMP error reports (the UDP Error option, UDP-09): they are raised
    from ``recvfrom`` as `socks6fast.errors.ICMPError` subclasses."""
    port_parity: Parity | None
    """None. Ask for an even or odd bound port (the Port Parity option; the proxy honours
    it only when ``port`` is 0, STK-08)."""
    reserve_port: bool
    """False. With ``port_parity``: also reserve the port's counterpart (RTP/RTCP pairs)."""
    server_mode: bool
    """False. Confirm the association at once with the empty datagram to the all-zero
    address (section "Proxying UDP servers", UDP-06), so that remote hosts can send
    first; ``udp_associate`` returns once the proxy confirmed. Over UDP the empty
    datagram is resent until then (UDP-10)."""
    udp_port: int | None
    """None. The proxy's UDP port (``"dtls"``: its DTLS port); None: the port of its TCP
    (TLS) listener, on the address the TCP connection reached (D16)."""
    proxy_dtls: SSL.Context | bool | None
    """None. ``transport="dtls"``: the DTLS context towards the proxy, the counterpart of
    ``proxy_ssl`` (TRN-03): None (or True) verifies the proxy's certificate against the
    system's CAs and its name against ``proxy_server_hostname`` (default: the URL's host);
    pass ``socks6fast.net.dtls.dtls_client_context(cafile=...)`` for a private CA (or a
    client certificate), or your own ``OpenSSL.SSL.Context``. False is refused."""
    resend_interval: float
    """0.25. Seconds before the first resend of the server-mode empty datagram over UDP;
    each further wait doubles."""
    resend_tries: int
    """5. Empty datagrams sent in all before ``TimeoutError``."""
    max_queue: int
    """1024. asyncio flavour: received datagrams held until ``recvfrom`` takes them; over
    UDP more are dropped (counted in ``dropped``), over TCP reading pauses. (The blocking
    flavour reads only inside ``recvfrom``; the kernel's socket buffers hold the rest.)"""


def udp_request_options(kwargs: UDPAssociateOptions) -> tuple[StackOption, ...]:
    """The Stack options a UDP ASSOCIATE Request carries for ``kwargs`` (UDP Error, Port Parity)."""
    options: list[StackOption] = list(kwargs.get("stack_options", ()))
    if kwargs.get("udp_error", False):
        # Section "UDP Error options": Leg 2, Availability 0x02 "error reporting is desired".
        options.append(UDPErrorOption(StackLeg.PROXY_REMOTE, Availability.DESIRED))
    parity = kwargs.get("port_parity")
    if parity is not None:
        options.append(
            PortParityOption(StackLeg.PROXY_REMOTE, Parity(parity), kwargs.get("reserve_port", False))
        )
    elif kwargs.get("reserve_port", False):
        raise ValueError("reserve_port needs port_parity (the counterpart of an even or odd port)")
    return tuple(options)


def new_association(kwargs: UDPAssociateOptions, *, tls: bool) -> ClientAssociation:
    """The sans-IO association for ``kwargs`` (``tls``: the proxy URL is ``socks6+tls``).

    Raises:
        ValueError: an argument out of range, in one sentence naming it.
    """
    udp_port = kwargs.get("udp_port")
    if udp_port is not None and (isinstance(udp_port, bool) or not 1 <= udp_port <= 65535):
        raise ValueError(f"udp_port must be a port 1-65535, got {udp_port!r}")
    return ClientAssociation(
        # D30: over TLS the datagrams default to DTLS (datagram semantics, still encrypted).
        transport=kwargs.get("transport", "dtls" if tls else "udp"),
        udp_error=kwargs.get("udp_error", False),
        resend_interval=kwargs.get("resend_interval", DEFAULT_RESEND_INTERVAL),
        resend_tries=kwargs.get("resend_tries", DEFAULT_RESEND_TRIES),
    )


class ProxyBase:
    """A SOCKS 6 proxy: its URL and the TLS context towards it.

    The request methods of both flavours (``connect``, ``connect_tunnel``, ``bind``, and
    the asyncio flavour's ``open_connection`` and ``open_bind``) take the same arguments:

    - the destination: ``dest_host`` (an IP literal, or a name the proxy resolves) and
      ``dest_port``; for BIND the desired ``address`` ("0.0.0.0" or "::": any) and
      ``port`` (0: any);
    - ``session=``: a ``Session`` of this proxy (the request joins it), or None;
    - the keyword arguments of `ConnectOptions` (BIND: `RequestOptions`).

    They raise ``socks6fast.ProxyError`` when the proxy refuses (``.reply_code``, REQ-10),
    ``AuthenticationError`` (credentials rejected, no usable method: AUTH-03),
    ``VersionMismatchError`` (not a SOCKS 6 proxy: REQ-02), ``RemoteProtocolError``
    (malformed replies), ``TimeoutError`` (``timeout`` expired) and ``OSError`` for the
    network and TLS.

    Args:
        url: the parsed proxy URL.
        proxy_ssl: TLS context for ``socks6+tls`` (None: a verifying default context).
        proxy_server_hostname: name the proxy certificate is checked against (default:
            the URL's host).

    Raises:
        ValueError: ``proxy_ssl`` given for ``socks6://``, or False for ``socks6+tls``.
    """

    def __init__(
        self,
        url: ProxyURL,
        *,
        proxy_ssl: ssl.SSLContext | bool | None = None,
        proxy_server_hostname: str | None = None,
    ) -> None:
        self.url = url
        """The parsed URL."""
        self.ssl_context = proxy_ssl_context(url, proxy_ssl)
        """The TLS context towards the proxy (None for socks6://)."""
        self.server_hostname = proxy_server_hostname or url.host
        """Name the proxy certificate is checked against."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        proxy_ssl: ssl.SSLContext | bool | None = None,
        proxy_server_hostname: str | None = None,
    ) -> Self:
        """Make a Proxy from ``socks6://[user[:pass]@]host[:port]`` or ``socks6+tls://...``.

        Raises:
            ValueError: bad URL (see `socks6fast.net.url.parse_proxy_url`) or TLS arguments.
        """
        return cls(parse_proxy_url(url), proxy_ssl=proxy_ssl, proxy_server_hostname=proxy_server_hostname)

    def __repr__(self) -> str:
        scheme = "socks6+tls" if self.url.tls else "socks6"
        return f"<{type(self).__name__} {scheme}://{self.url.host}:{self.url.port}>"

    # The steps of each request (socks6fast.proto.client_flow), from a method's arguments.

    def _connect_flow(
        self, host: str, port: int, session: SessionBase[Any] | None, kwargs: ConnectOptions
    ) -> Flow[C, tuple[C, ClientConnection]]:
        initial_data = kwargs.get("initial_data", b"")
        return self._flow(Command.CONNECT, host, port, session, kwargs, initial_data=initial_data)

    def _bind_flow(
        self, address: str, port: int, session: SessionBase[Any] | None, kwargs: RequestOptions
    ) -> Flow[C, tuple[C, ClientConnection]]:
        return self._flow(Command.BIND, address, port, session, kwargs)

    def _udp_flow(
        self, address: str, port: int, session: SessionBase[Any] | None, kwargs: UDPAssociateOptions
    ) -> Flow[C, tuple[C, ClientConnection]]:
        request_kwargs: RequestOptions = {
            "stack_options": udp_request_options(kwargs),
            "idempotent": kwargs.get("idempotent", False),
            "tfo": kwargs.get("tfo", False),
        }
        return self._flow(Command.UDP_ASSOCIATE, address, port, session, request_kwargs)

    def _noop_flow(
        self, options: Iterable[Option], session: SessionBase[Any] | None
    ) -> Flow[C, tuple[C, ClientConnection]]:
        return self._flow(Command.NOOP, "0.0.0.0", 0, session, {}, options=options)

    def _flow(
        self,
        command: Command,
        host: str,
        port: int,
        session: SessionBase[Any] | None,
        kwargs: RequestOptions,
        *,
        initial_data: bytes = b"",
        options: Iterable[Option] = (),
    ) -> Flow[C, tuple[C, ClientConnection]]:
        if session is not None and session.proxy.url != self.url:
            raise ValueError("the session belongs to another proxy")
        return request(
            command,
            host,
            port,
            credentials=self.url.credentials,
            tls=self.url.tls,
            session=None if session is None else session.core,
            initial_data=initial_data,
            options=(*kwargs.get("stack_options", ()), *options),
            idempotent=kwargs.get("idempotent", False),
            tfo=kwargs.get("tfo", False),
        )


P = TypeVar("P", bound=ProxyBase)


class SessionBase(Generic[P]):
    """A SOCKS 6 session: authenticate once, then requests carry only the Session ID.

    The first request carries the Session Request (and the Token Request when ``tokens >
    0``) together with the credentials; the Session ID comes back in either reply (D4) and
    later requests carry it instead of credentials. Requests issued while the first is
    in flight wait for it. ``idempotent=True`` spends the smallest unspent token
    (IDM-05); if no window is known yet, a NOOP establishes the session first. A Session
    Invalid answer (the proxy forgot the session) starts a new one and retries the
    request once, which is safe because the proxy did not act on it. Closing sends a
    NOOP with Session Teardown.

    Args:
        proxy: the proxy the session lives on.
        tokens: idempotence token window to request (0: none).
    """

    def __init__(self, proxy: P, *, tokens: int = 0) -> None:
        self.proxy = proxy
        """The proxy this session lives on."""
        self.core = ClientSession(tokens=tokens)
        """The sans-IO bookkeeping (state, Session ID, token window)."""

    @property
    def session_id(self) -> bytes | None:
        """The Session ID, once granted."""
        return self.core.session_id


class _Closable(Protocol):
    def close(self) -> None: ...


CC = TypeVar("CC", bound=_Closable)


class BindingBase(Generic[CC]):
    """A BIND in progress (CMD-04): the proxy listens; ``accept`` waits for the peer."""

    def __init__(self, channel: CC, conn: ClientConnection) -> None:
        self._channel = channel
        self.connection = conn
        """The sans-IO connection (all replies)."""

    @property
    def reply(self) -> OperationReply:
        """The first Operation Reply: where the proxy listens."""
        assert self.connection.operation_reply is not None
        return self.connection.operation_reply

    @property
    def address(self) -> tuple[str, int]:
        """``(bind address, bind port)`` the peer should connect to."""
        return self.reply.address, self.reply.port

    @property
    def peer_reply(self) -> OperationReply | None:
        """The second Operation Reply once a peer connected (else None)."""
        return self.connection.peer_reply

    @property
    def peer_address(self) -> tuple[str, int] | None:
        """``(address, port)`` of the connecting host, once known."""
        reply = self.connection.peer_reply
        return None if reply is None else (reply.address, reply.port)

    def close(self) -> None:
        """Stop waiting: close the connection to the proxy (the proxy stops listening)."""
        self._channel.close()

    def _close_unless_accepted(self) -> None:
        # Leaving a ``with`` block: the accepted channel belongs to the caller now.
        if self.connection.state is not ClientState.ESTABLISHED:
            self.close()


class AssociationBase(Generic[CC]):
    """A UDP association (UDP ASSOCIATE), what both flavours share: replies and accessors."""

    def __init__(self, channel: CC, conn: ClientConnection, core: ClientAssociation) -> None:
        self._channel = channel
        self.connection = conn
        """The sans-IO connection (the replies)."""
        self.core = core
        """The sans-IO association (state, ID, drop counts)."""

    @property
    def reply(self) -> OperationReply:
        """The Operation Reply: the bound address and the Stack options the proxy applied (D9)."""
        assert self.connection.operation_reply is not None
        return self.connection.operation_reply

    @property
    def bound(self) -> tuple[str, int]:
        """``(address, port)`` the proxy relays from and receives remote datagrams on."""
        return self.reply.address, self.reply.port

    @property
    def id(self) -> bytes:
        """The 8-byte Association ID (UDP-01)."""
        assert self.core.association_id is not None
        return self.core.association_id

    @property
    def transport(self) -> Transport:
        """``"udp"``, ``"dtls"`` or ``"tcp"``: where the datagrams travel."""
        return self.core.transport

    @property
    def udp_error(self) -> bool:
        """True when the proxy said it will report ICMP errors (its UDP Error option echo)."""
        return any(
            isinstance(o, UDPErrorOption) and o.availability == Availability.DESIRED
            for o in self.reply.options
        )

    @property
    def port_parity(self) -> PortParityOption | None:
        """The proxy's Port Parity answer (the parity obtained, whether the pair is reserved)."""
        return next((o for o in self.reply.options if isinstance(o, PortParityOption)), None)

    @property
    def confirmed(self) -> bool:
        """True once the proxy confirmed the association (after the first datagram)."""
        return self.core.state is AssociationState.CONFIRMED

    @property
    def dropped(self) -> int:
        """Datagrams from the proxy dropped silently (see ``core.dropped`` for the reasons)."""
        return sum(self.core.dropped.values())
