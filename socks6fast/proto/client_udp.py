"""Sans-IO client side of a UDP association (draft-11 section "Handling UDP ASSOCIATE").

Strategy (as `socks6fast.proto.client`): nothing here blocks, reads a clock or opens a
socket. After the UDP ASSOCIATE Request's successful Operation Reply (a `ClientConnection`
in ESTABLISHED), the TCP connection carries the association's control messages, and the
datagrams travel either on that same TCP stream (``transport="tcp"``), as plain UDP
datagrams to the proxy's UDP port (``transport="udp"``; D16: by default the port number
of the TCP listener, on the same address), or over a DTLS connection to the proxy's DTLS
port (``transport="dtls"``, UDP-02: the adapter runs the DTLS layer; each decrypted
datagram is handled here exactly as a plain UDP one). The adapter does this::

    assoc = ClientAssociation(transport="udp", udp_error=True)
    assoc.receive_data(trailing)                   # bytes read past the Operation Reply
    while (event := assoc.next_event()) is NEED_DATA:
        assoc.receive_data(read_tcp(assoc.bytes_needed))     # until AssociationInit
    send_udp(assoc.datagram(b"hello", "192.0.2.1", 53))      # Datagram Header + payload
    # then, on every TCP read: receive_data + next_event() until NEED_DATA;
    # on every UDP datagram from the proxy: receive_datagram(data) -> message or None;
    # and at get_timer(): handle_timer(now) -> bytes to resend (server mode over UDP).

Rules kept here (IDs of docs/conformance.md, decisions of docs/decisions.md):

* UDP-05: a datagram from the proxy whose Message Length exceeds it is dropped silently;
  bytes after Message Length (padding) are ignored. Drops are counted, per reason.
* UDP-06 / UDP-10: server mode, `confirm_datagram`: the empty datagram to the all-zero
  address and port. Over plain UDP it is sent again until the Association Confirmation
  (or a datagram of the association) arrives: `resend_tries` tries in all, the wait
  doubling from `resend_interval`; after the last one `handle_timer` raises TimeoutError.
* UDP-10: the client never sends Error messages: nothing here encodes one.
* UDP-09, section "Reporting ICMP Errors": Error messages are delivered only when the
  client opted in (``udp_error=True``); a proxy that sends them anyway breaks "Proxies MUST
  NOT send Error messages unless the clients have opted in": they are dropped and counted.
* D17: proxy-to-client messages come on the channel the association is mapped to. Over
  TCP the stream is ordered: anything before the Association Initialization, a second
  one, a Confirmation before our first datagram, or a Datagram or Error before the
  Confirmation breaks the draft (RemoteProtocolError). Over UDP a remote datagram can
  overtake the Confirmation (two channels), so a datagram carrying our ID is accepted
  once the ID is known, and it also proves the mapping (no more resends).
* D20: destinations may be domain names (ATYP 3): the proxy resolves them.

States and moves are the `AssociationState` table in `proto/states.py`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from ..constants import DatagramErrorCode, UDPMessageType
from ..errors import ICMPError, LocalProtocolError, RemoteProtocolError, WireError
from . import codec
from .client import address_of
from .messages import (
    AssociationConfirmation,
    AssociationInit,
    Datagram,
    DatagramError,
    DatagramHeader,
)
from .states import (
    NEED_DATA,
    AssociationState,
    AssociationStep,
    NeedData,
    association_transition,
)

__all__ = [
    "DEFAULT_RESEND_INTERVAL",
    "DEFAULT_RESEND_TRIES",
    "MAX_MESSAGE_LENGTH",
    "AssociationEnded",
    "AssociationEvent",
    "ClientAssociation",
    "Transport",
    "icmp_error",
]

Transport: TypeAlias = Literal["tcp", "udp", "dtls"]
"""Where the association's datagrams travel: the TCP connection, plain UDP, or UDP in a
DTLS connection (UDP-02)."""

#: The transports whose datagrams may be lost: the server-mode empty datagram is resent.
_DATAGRAM_TRANSPORTS: Final = ("udp", "dtls")

#: Message Length is a 16-bit field: header plus payload fit in 65535 bytes.
MAX_MESSAGE_LENGTH: Final = 0xFFFF
#: Seconds before the first resend of the server-mode empty datagram over UDP (UDP-10).
DEFAULT_RESEND_INTERVAL: Final = 0.25
#: Empty datagrams sent in all before giving up (waits 0.25+0.5+1+2+4 s: about 8 s).
DEFAULT_RESEND_TRIES: Final = 5

#: Destinations whose Datagram Header `ClientAssociation.datagram` keeps ready.
_HEADER_CACHE_SIZE: Final = 256
#: Server mode (section "Proxying UDP servers"): "an IP address and port consisting of zeroes".
_ZERO_ADDRESS: Final = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class AssociationEnded:
    """`ClientAssociation.next_event`: the TCP connection ended; the association is over."""


AssociationEvent: TypeAlias = (
    AssociationInit | AssociationConfirmation | Datagram | DatagramError | AssociationEnded | NeedData
)
"""What `ClientAssociation.next_event` returns."""


def icmp_error(message: DatagramError) -> ICMPError:
    """The typed exception (`socks6fast.errors.ICMPError` subclass) for an Error message."""
    return ICMPError.for_code(
        DatagramErrorCode(message.error_code), (message.address, message.port), message.reporter_address
    )


class ClientAssociation:
    """The client side of one UDP association, sans-IO.

    Args:
        transport: ``"tcp"`` (datagrams framed on the TCP connection), ``"udp"``
            (datagrams to the proxy's UDP port) or ``"dtls"`` (the same datagrams inside a
            DTLS connection to the proxy's DTLS port; `receive_datagram` takes each
            decrypted one).
        udp_error: the Request carried the UDP Error option asking for reports (UDP-09):
            Error messages are delivered, otherwise dropped.
        resend_interval: seconds before the first resend of the server-mode empty datagram
            over UDP; each later wait doubles (UDP-10).
        resend_tries: empty datagrams sent in all, the first included (at least 1).

    Example (the proxy's bytes scripted)::

        >>> assoc = ClientAssociation(transport="tcp")
        >>> assoc.receive_data(bytes.fromhex("0601000c" "0102030405060708"))  # Init, ID 01..08
        >>> assoc.next_event()
        AssociationInit(association_id=b'\\x01\\x02\\x03\\x04\\x05\\x06\\x07\\x08')
        >>> assoc.datagram(b"hi", "127.0.0.1", 7).hex()  # Datagram, Length 22, ATYP 1, port 7
        '060300160102030405060708010000077f0000016869'
    """

    def __init__(
        self,
        *,
        transport: Transport = "udp",
        udp_error: bool = False,
        resend_interval: float = DEFAULT_RESEND_INTERVAL,
        resend_tries: int = DEFAULT_RESEND_TRIES,
    ) -> None:
        if transport not in ("tcp", "udp", "dtls"):
            raise ValueError(f"transport must be 'tcp', 'udp' or 'dtls', not {transport!r}")
        if resend_tries < 1 or not resend_interval > 0:
            raise ValueError("resend_tries must be at least 1 and resend_interval positive")
        self.transport: Transport = transport
        """Where datagrams travel."""
        self.udp_error = udp_error
        """Error messages are wanted (the client opted in, UDP-09)."""
        self.state = AssociationState.AWAIT_INIT
        """Where the association stands."""
        self.association_id: bytes | None = None
        """The 8-byte Association ID, once the Association Initialization arrived."""
        self.dropped: Counter[str] = Counter()
        """Messages from the proxy dropped silently, by reason (UDP-05, UDP-09)."""
        self.resends = 0
        """Times the server-mode empty datagram was sent again (UDP-10)."""
        self._resend_interval = resend_interval
        self._resend_tries = resend_tries
        self._buffer = bytearray()
        self._eof = False
        self._needed = 0
        self._sent_first = False
        self._mapped = False  # a datagram of ours arrived over UDP: the proxy mapped us
        self._confirm: bytes | None = None  # the empty datagram, while it may be resent
        self._tries = 0
        self._deadline: float | None = None
        self._headers: dict[tuple[str, int], bytes] = {}  # see `datagram`

    # -- the TCP stream (the control channel; the data channel too with transport="tcp")

    @property
    def bytes_needed(self) -> int:
        """Bytes the next message on the TCP stream still needs at least (after NEED_DATA).

        Before the Association Initialization this never asks beyond it, so an adapter
        that reads exactly this many bytes leaves what follows in the socket.
        """
        return max(self._needed, 1)

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the TCP connection; ``b""`` means EOF.

        Raises:
            RemoteProtocolError: data after EOF.
        """
        if data:
            if self._eof:
                raise RemoteProtocolError("data after EOF", None)
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> AssociationEvent:
        """Parse the next message of the TCP stream.

        Returns:
            `AssociationInit` (the ID is known: datagrams may be sent),
            `AssociationConfirmation`, `Datagram` (``transport="tcp"``), `DatagramError`
            (opted in), `AssociationEnded` at EOF between messages (then again on every
            call), or `NEED_DATA`.

        Raises:
            RemoteProtocolError: malformed bytes, a message out of order (see the module
                docstring), EOF inside a message; the state is then ERROR.
            LocalProtocolError: called after an error.
        """
        if self.state is AssociationState.ERROR:
            raise LocalProtocolError("the association failed; close it", None)
        while True:
            try:
                event = self._next_stream_message()
            except WireError as exc:
                self._move(AssociationStep.FAILED)
                raise RemoteProtocolError(f"malformed association message: {exc}", None) from exc
            except RemoteProtocolError:
                self._move(AssociationStep.FAILED)
                raise
            if event is not None:
                return event

    def _next_stream_message(self) -> AssociationEvent | None:
        # One message, NEED_DATA or the end; None: a message was dropped, look again.
        if self.state is AssociationState.CLOSED:
            return AssociationEnded()
        if not self._buffer:
            if self._eof:
                self._move(AssociationStep.ENDED)
                return AssociationEnded()
            self._needed = 4
            return NEED_DATA
        message, n = codec.decode_association_message(self._buffer)
        if message is None:
            if self._eof:
                raise RemoteProtocolError(
                    "the proxy closed the connection inside an association message", None
                )
            self._needed = n
            return NEED_DATA
        del self._buffer[:n]
        self._needed = 0
        if isinstance(message, AssociationInit):
            if self.state is not AssociationState.AWAIT_INIT:
                raise RemoteProtocolError("a second Association Initialization", None)
            self.association_id = message.association_id
            self._move(AssociationStep.INITIALIZED)
            return message
        if self.state is AssociationState.AWAIT_INIT:
            raise RemoteProtocolError(
                f"{type(message).__name__} before the Association Initialization (UDP-01)", None
            )
        message_id = (
            message.header.association_id if isinstance(message, Datagram) else message.association_id
        )
        if message_id != self.association_id:
            if isinstance(message, Datagram | DatagramError):
                # D18 read from our side: a message for an ID that is not ours is dropped.
                self.dropped["unknown association id"] += 1
                return None
            raise RemoteProtocolError("Association Confirmation for another association ID", None)
        if isinstance(message, AssociationConfirmation):
            if self.state is AssociationState.CONFIRMED:
                raise RemoteProtocolError("a second Association Confirmation", None)
            if not self._sent_first:
                raise RemoteProtocolError("Association Confirmation before our first datagram", None)
            self._confirmed()
            return message
        if self.state is not AssociationState.CONFIRMED:
            # Over TCP the Confirmation precedes every relayed message (D17, UDP-04).
            raise RemoteProtocolError(f"{type(message).__name__} before the Association Confirmation", None)
        if isinstance(message, DatagramError):
            return self._error_message(message)
        return message

    # -- plain UDP (transport="udp"), and decrypted DTLS datagrams (transport="dtls")

    def receive_datagram(self, data: bytes) -> Datagram | DatagramError | None:
        """Judge one UDP datagram from the proxy's UDP port.

        Returns:
            The `Datagram` (payload without padding) or `DatagramError`, or None when it
            is dropped: not a Datagram or Error message, malformed, Message Length larger
            than the datagram (UDP-05), another association ID, an Error message we did
            not opt in to, or the association is not open. Drops count in `dropped`.
        """
        if self.association_id is None or self.state not in (
            AssociationState.OPEN,
            AssociationState.CONFIRMED,
        ):
            self.dropped["association not open"] += 1
            return None
        if len(data) < 2 or data[1] not in (UDPMessageType.DATAGRAM, UDPMessageType.ERROR):
            self.dropped["not a datagram"] += 1
            return None
        if len(data) >= 4 and int.from_bytes(data[2:4], "big") > len(data):
            # UDP-05: "If the Message Length is larger than the size of the UDP or DTLS
            # payload, the message MUST be silently ignored."
            self.dropped["message length beyond the datagram"] += 1
            return None
        if data[1] == UDPMessageType.ERROR:
            try:
                # The stream decoder reads exactly Message Length bytes; the rest is padding.
                error, _ = codec.decode_association_message(data)
            except WireError:
                self.dropped["malformed"] += 1
                return None
            if error is None:  # shorter than its own fields say: cut short
                self.dropped["malformed"] += 1
                return None
            assert isinstance(error, DatagramError)
            if error.association_id != self.association_id:
                self.dropped["unknown association id"] += 1
                return None
            self._note_mapped()
            return self._error_message(error)
        try:
            header, header_length = codec.decode_datagram_header(data)
        except WireError:
            self.dropped["malformed"] += 1
            return None
        if header.association_id != self.association_id:
            self.dropped["unknown association id"] += 1
            return None
        self._note_mapped()
        # UDP-05: "Client and proxy implementations MUST ignore the padding."
        return Datagram(header, bytes(data[header_length : header.message_length]))

    # -- sending

    def datagram(self, payload: bytes, host: str, port: int) -> bytes:
        """One Datagram message for ``host:port`` (Datagram Header + payload).

        The same bytes go on the TCP stream (``transport="tcp"``) or in one UDP datagram
        to the proxy's UDP port. ``host`` is an IP literal (``[::1]`` allowed) or a domain
        name the proxy resolves (D20).

        Raises:
            LocalProtocolError: the association is not open (no ID yet, closed, failed),
                the port or name is not valid, or header plus payload exceed 65535 bytes.
        """
        if self.association_id is None or self.state not in (
            AssociationState.OPEN,
            AssociationState.CONFIRMED,
        ):
            raise LocalProtocolError(f"cannot send a datagram in state {self.state.value}", None)
        key = (host, port)
        header = self._headers.get(key)
        if header is None:
            header = self._header_for(host, port)
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()
            self._headers[key] = header
        total = len(header) + len(payload)
        if total > MAX_MESSAGE_LENGTH:
            raise LocalProtocolError(
                f"datagram too long: {len(payload)} bytes of payload, at most "
                f"{MAX_MESSAGE_LENGTH - len(header)} fit a Message Length",
                None,
            )
        self._sent_first = True
        # Only the Message Length differs between datagrams to one destination.
        return header[:2] + total.to_bytes(2, "big") + header[4:] + payload

    def _header_for(self, host: str, port: int) -> bytes:
        # The Datagram Header for ``host:port`` with a Message Length of the header alone;
        # classifying the address (an ``ipaddress`` parse) costs more than the rest of a
        # datagram, hence the per-destination cache of `datagram`.
        assert self.association_id is not None
        address_type, address = address_of(host)
        header_length = codec.datagram_header_length(address_type, address)
        out = bytearray(header_length)
        codec.encode_datagram_header(
            DatagramHeader(self.association_id, address_type, address, port, header_length), out
        )
        return bytes(out)

    def confirm_datagram(self, now: float) -> bytes:
        """Server mode (UDP-06): the empty datagram to the all-zero address and port.

        The proxy confirms the association without relaying anything; remote hosts can
        then send to the bound address first. Over UDP the datagram may be lost, so
        `get_timer` / `handle_timer` send it again until the confirmation (UDP-10).

        Args:
            now: the current time (the resend timer's clock).
        """
        message = self.datagram(b"", _ZERO_ADDRESS, 0)
        # UDP-10 "as over UDP": a DTLS record may be lost too (DTLS does not retransmit it).
        if (
            self.transport in _DATAGRAM_TRANSPORTS
            and self.state is AssociationState.OPEN
            and not self._mapped
        ):
            self._confirm = message
            self._tries = 1
            self._deadline = now + self._resend_interval
        return message

    # -- timer (aioquic get_timer / handle_timer)

    def get_timer(self) -> float | None:
        """When `handle_timer` must be called next (same clock as ``now``), or None."""
        return self._deadline if self._confirm is not None else None

    def handle_timer(self, now: float) -> bytes | None:
        """Resend the server-mode empty datagram if its time came (UDP-10).

        Returns:
            The bytes to send again to the proxy's UDP port, or None (not due, confirmed).

        Raises:
            TimeoutError: the last try went unanswered; the state is then ERROR.
        """
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return None
        assert self._confirm is not None
        if self._tries >= self._resend_tries:
            self._confirm = self._deadline = None
            self._move(AssociationStep.FAILED)
            raise TimeoutError(f"no Association Confirmation after {self._tries} empty datagrams (UDP-10)")
        self._tries += 1
        self.resends += 1
        # The waits double: a proxy that is slow rather than losing packets is not flooded.
        self._deadline = now + self._resend_interval * 2 ** (self._tries - 1)
        return self._confirm

    # -- the end

    def close(self) -> None:
        """The adapter closed the TCP connection: the association is over."""
        if self.state is not AssociationState.CLOSED and self.state is not AssociationState.ERROR:
            self._move(AssociationStep.ENDED)
        self._confirm = self._deadline = None

    # -- internals

    def _move(self, step: AssociationStep) -> None:
        # Every change of state is a row of the table in proto/states.py.
        self.state = association_transition(self.state, step)

    def _confirmed(self) -> None:
        self._move(AssociationStep.CONFIRMED)
        self._confirm = self._deadline = None

    def _note_mapped(self) -> None:
        # Only a mapped association gets datagrams over UDP (section "Handling UDP
        # ASSOCIATE"): the empty datagram arrived, stop resending it.
        self._mapped = True
        self._confirm = self._deadline = None

    def _error_message(self, message: DatagramError) -> DatagramError | None:
        if not self.udp_error:
            # "Proxies MUST NOT send Error messages unless the clients have opted in."
            self.dropped["error message without opt-in"] += 1
            return None
        return message
