"""What the proxy's two protocols share, sans I/O: the context every connection consults, the
action queue and the completions both have, and the pure helpers of their decisions.

Strategy (aioquic ``QuicConnection``): a connection of the proxy's core decides everything
the draft leaves to a proxy and says what to do through *actions*, one at a time, from
``next_action(now)``; the adapter performs each and reports how it went through a
*completion* method (`socks6fast.proto.actions` lists both). `_ConnectionBase` holds that
machinery and the completions whose handling is the same for SOCKS 6
(`socks6fast.proto.server.ServerConnection`) and SOCKS 5
(`socks6fast.proto.server_socks5.Socks5ServerConnection`): resolving (the rules again on the
resolved addresses, no loop into our own listeners: CMD-06), dialling, listening, a BIND peer
(the rules see it when it connects), and the end of the connection. What differs (which
reply, in which form) is each protocol's.

Time enters only as ``now``; nothing here reads a clock, opens a socket or waits.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Final

from ..constants import (
    MAX_OPTIONS_LENGTH,
    SOCKS5_VERSION,
    VERSION,
    AddressType,
    Availability,
    Command,
    ReplyCode,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from .actions import (
    Action,
    CheckCredentials,
    Close,
    Dial,
    Dialed,
    Listening,
    OpenAssociation,
    OpenedAssociation,
    Relay,
    Resolve,
    Send,
    Target,
)
from .associations import AssociationTable, Reservation
from .auth import UserStore
from .limits import Admission, ConnectionLimiter
from .messages import (
    Request,
)
from .policy import LocalAddresses, OwnListeners, Policy
from .server_wire import (
    ServerWire,
    Socks5ServerWire,
)
from .sessions import Session, SessionStore, SharedSessionStore
from .socks5 import (
    Socks5Request,
    UserPassRequest,
)
from .states import NEED_DATA, PAUSED, NeedData, Protocol

__all__ = [
    "DNS_PORT",
    "MAX_BIND_BACKLOG",
    "ServerContext",
    "detect_protocol",
    "foreign_protocol",
    "is_dns_request",
    "is_multicast",
    "noop_address_ok",
    "reply_code_for",
    "udp_destination_allowed",
]

#: The DNS service port (section "DNS provided by SOCKS", D13).
DNS_PORT: Final = 53
#: Largest backlog granted to a BIND with a Listen Backlog option (CMD-05).
MAX_BIND_BACKLOG: Final = 128
_UNSPECIFIED: Final = {AddressType.IPV4: "0.0.0.0", AddressType.IPV6: "::"}


class ServerContext:
    """What every connection of one server consults besides its own bytes.

    One per server, shared by its connections; a configuration reload assigns new values in
    place, so a connection still in its handshake decides with the configuration in effect.

    Args:
        users: the configured users (authentication is required when there is one).
        policy: the rules.
        sessions: the in-memory session store, or None when sessions are disabled or shared.
        shared_sessions: a session store shared by processes and hosts (Redis, issue 13 item
            2), asked through the adapter (`AskSessionStore`); None: none. At most one of
            ``sessions`` and ``shared_sessions`` is set.
        max_options_length: cap on a Request's Options Length (D6).
        handshake_timeout: seconds a client has for its handshake messages (REQ-08), or None.
        connect_timeout: seconds to resolve and connect to a destination (CONNECTION_TIMED_OUT).
        dns_resolver: ``(host, port)`` of the DNS server behind the DNS service (D13), or None.
        own_listeners: the proxy's own listeners: a CONNECT into one is refused (CMD-06).
        associations: the live UDP associations, their limits and Port Parity reservations;
            None: UDP ASSOCIATE is turned off (Command Not Supported).
        min_bind_port: lowest port a BIND or UDP ASSOCIATE may name (D25); 0 is always allowed.
        limits: connection and bandwidth limits per user and per client address (issue 14
            item 4); None: no limits.
    """

    __slots__ = (
        "associations",
        "connect_timeout",
        "dns_resolver",
        "handshake_timeout",
        "limits",
        "max_options_length",
        "min_bind_port",
        "own_listeners",
        "policy",
        "sessions",
        "shared_sessions",
        "users",
    )

    def __init__(
        self,
        *,
        users: UserStore | None = None,
        policy: Policy | None = None,
        sessions: SessionStore | None = None,
        shared_sessions: SharedSessionStore | None = None,
        max_options_length: int = MAX_OPTIONS_LENGTH,
        handshake_timeout: float | None = 10.0,
        connect_timeout: float = 10.0,
        dns_resolver: tuple[str, int] | None = None,
        own_listeners: OwnListeners | None = None,
        associations: AssociationTable | None = None,
        min_bind_port: int = 1024,
        limits: ConnectionLimiter | None = None,
    ) -> None:
        self.associations = associations
        self.min_bind_port = min_bind_port
        self.limits = limits
        self.users = users if users is not None else UserStore()
        self.policy = policy if policy is not None else Policy()
        self.sessions = sessions
        self.shared_sessions = shared_sessions
        self.max_options_length = max_options_length
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.dns_resolver = dns_resolver
        self.own_listeners = (
            own_listeners if own_listeners is not None else OwnListeners((), LocalAddresses())
        )


# --- Pure helpers of the decisions --------------------------------------------------


def detect_protocol(first_byte: int) -> Protocol | None:
    """Which protocol a connection starting with ``first_byte`` speaks (D1).

    Returns:
        SOCKS6 for 6, SOCKS5 for 5, None for anything else (Version Mismatch, REQ-01).
    """
    if first_byte == VERSION:
        return Protocol.SOCKS6
    if first_byte == SOCKS5_VERSION:
        return Protocol.SOCKS5
    return None


#: First words of an HTTP/1.x request line (RFC 9110 section 9 methods, and the HTTP/2 preface).
_HTTP_METHODS: Final = (
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
    b"PRI * HTTP/2",
)


def foreign_protocol(data: bytes) -> str | None:
    """Which other protocol a client speaks whose first bytes (not 5 or 6) are ``data``, for
    the log (issue 14): ``"http"`` (a request line), ``"tls"`` (a TLS handshake record, a
    ClientHello on the plain port), ``"socks4"`` (VN 4 with CONNECT or BIND, SOCKS 4/4a); None
    for anything else. It changes nothing in the answer: the Version Mismatch Reply (REQ-01).
    """
    if len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04:
        return "tls"  # ContentType handshake(22), legacy record version 3.x (RFC 8446 5.1)
    if len(data) >= 2 and data[0] == 4 and data[1] in (1, 2):
        return "socks4"
    if data[:1].isupper() and data.startswith(_HTTP_METHODS):
        return "http"
    return None


def noop_address_ok(request: Request) -> bool:
    """NOOP: "Address Type MUST be either 0x01 (IPv4) or 0x04 (IPv6)", address and port 0 (D11)."""
    if request.port != 0 or request.address_type not in _UNSPECIFIED:
        return False
    return ipaddress.ip_address(request.address).is_unspecified


def is_dns_request(request: Request) -> bool:
    """CONNECT to 0.0.0.0:53 or [::]:53 asks for the proxy's DNS service (section "DNS
    provided by SOCKS", D13)."""
    return (
        request.command == Command.CONNECT
        and request.port == DNS_PORT
        and request.address_type in _UNSPECIFIED
        and ipaddress.ip_address(request.address).is_unspecified
    )


# connect()/bind() errno -> Operation Reply code (CMD-01).
_ERRNO_REPLY: Final = {
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.ETIMEDOUT: ReplyCode.CONNECTION_TIMED_OUT,
    errno.EACCES: ReplyCode.NOT_ALLOWED_BY_RULESET,  # a local firewall or route prohibits it
    errno.EPERM: ReplyCode.NOT_ALLOWED_BY_RULESET,
}


def reply_code_for(exc: BaseException) -> ReplyCode:
    """The Operation Reply code for a failed connect or bind (CMD-01): a timeout is 0x09, an
    errno maps to its code, a negative one (getaddrinfo's EAI_* codes: a name given as the
    DNS service's resolver that does not resolve) is host unreachable, anything else is
    General Failure."""
    if isinstance(exc, TimeoutError):
        return ReplyCode.CONNECTION_TIMED_OUT
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno < 0:
            return ReplyCode.HOST_UNREACHABLE
        return _ERRNO_REPLY.get(exc.errno, ReplyCode.GENERAL_FAILURE)
    return ReplyCode.GENERAL_FAILURE


def is_multicast(address_type: int, address: str) -> bool:
    """An IP multicast address: "The use of multicast addresses is permitted for UDP traffic
    only" (draft-11 "Proxying multicast traffic", UDP-08), so CONNECT and BIND refuse one.

    On every CONNECT: a look at the text, not an ``ipaddress`` parse. The codec and the
    resolvers give addresses as ``inet_ntop`` writes them: IPv4 224.0.0.0/4 starts with
    224-239, IPv6 ff00::/8 with "ff" (an IPv4-mapped one ends with the IPv4 form)."""
    if address_type == AddressType.DOMAIN_NAME:
        return False
    if ":" in address:
        if address[:2].lower() == "ff":
            return True
        if "." not in address:
            return False
        address = address.rpartition(":")[2]  # ::ffff:224.0.0.1
    first = address.partition(".")[0]
    return len(first) == 3 and first.isdigit() and 224 <= int(first) <= 239


def udp_destination_allowed(
    policy: Policy, client_ip: str, user: str | None, address: str, port: int, name: str | None = None
) -> bool:
    """The rules' verdict on one UDP association destination (CMD-06 for each datagram's
    destination): an IP address, or a domain name checked by the address it resolved to
    (D20: name patterns match the name, CIDR and ``@local`` entries the address)."""
    if name is not None:
        return policy.check(
            client_ip,
            user,
            Command.UDP_ASSOCIATE,
            AddressType.DOMAIN_NAME,
            name,
            port,
            resolved_address=address,
        )
    address_type = AddressType.IPV6 if ":" in address else AddressType.IPV4
    return policy.check(
        client_ip, user, Command.UDP_ASSOCIATE, address_type, address, port, resolved_address=address
    )


def _format(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address_type_of(host: str) -> AddressType:
    return AddressType.IPV6 if ":" in host else AddressType.IPV4


def _denied_by(rule: int | None) -> str:
    """The log's reason for a refusal by the rules: which one decided (0-based, as
    ``[[rules]]`` entries are counted in config errors)."""
    return f"denied by rules[{rule}]" if rule is not None else "denied by default_action"


def _multipath(in_use: bool) -> Availability:
    return Availability.DESIRED if in_use else Availability.NOT_DESIRED


# --- What both protocols share ----------------------------------------------------------


class _Step(Enum):
    """What a connection waits for; a completion for anything else is the adapter's bug."""

    READ = "a message from the client"
    CLIENT_OPTIONS = "client_options_applied"
    CREDENTIALS = "credentials_checked"
    SESSION = "session_answered or session_store_failed"
    RESOLVE = "resolved or resolve_failed"
    DIAL = "dial_finished or dial_failed"
    LISTEN = "listening or listen_failed"
    PEER = "peer_accepted"
    ASSOCIATE = "association_opened or association_failed"
    DONE = "nothing: the handshake is over"


class _ConnectionBase:
    """The action queue, the completions both protocols share, and the log fields."""

    __slots__ = (
        "_actions",
        "_association",
        "_checked",
        "_ctx",
        "_dial",
        "_relayed",
        "_resume",
        "_step",
        "_unconfirmed",
        "_wire",
        "admission",
        "client_ip",
        "error",
        "protocol_name",
        "released",
        "reply_code",
        "user",
    )

    #: The request, once read (the subclasses say which kind).
    request: Request | Socks5Request | None

    def __init__(self, context: ServerContext, client_ip: str, wire: ServerWire | Socks5ServerWire) -> None:
        self._wire = wire
        self._ctx = context
        self.client_ip = client_ip
        """The client's address as text (the rules, the session and limiter caps)."""
        self._actions: list[Action] = []
        self._step = _Step.READ
        self._resume: Callable[[float], None] | None = None
        self._unconfirmed: int | None = None
        self._checked: tuple[str | None, str] = (None, "")
        self._dial: Dial | None = None
        self._relayed = False
        self._association: bytes | None = None
        self.admission: Admission | None = None
        """The limits this connection counts against (issue 14 item 4), once admitted; its
        ``up``/``down`` buckets are what the adapter hands the relay."""
        self.released: tuple[Reservation, ...] = ()
        """Port Parity reservations whose owner ended with this connection (STK-08): after
        ``connection_ended`` the adapter closes their sockets."""
        self.user: str | None = None
        """The authenticated user (or the session's user); None when anonymous."""
        self.reply_code: int | None = None
        """The code of the last Operation Reply (or SOCKS 5 reply) sent."""
        self.error = ""
        """Why the connection ended early, for the log; empty when it did not."""
        self.protocol_name = "socks6" if isinstance(wire, ServerWire) else "socks5"
        """``"socks6"``, ``"socks5"`` or ``"mismatch"`` (the log's protocol field)."""

    # -- what the adapter calls ------------------------------------------------------

    def next_action(self, now: float) -> Action | NeedData:
        """The next thing to do (see `socks6fast.proto.actions`).

        Args:
            now: the current time, on the clock of every deadline (``loop.time()``).

        Returns:
            An action, or NEED_DATA: read from the client (until `get_timer`), pass what
            arrived to `receive_data` (or nothing when the timer fired), and ask again.

        Raises:
            LocalProtocolError: a completion is still due (the adapter skipped one).
        """
        if self._unconfirmed is not None:
            self.reply_code = self._unconfirmed  # the Send before this call went out
            self._unconfirmed = None
        resume = self._resume
        if resume is not None:
            self._resume = None
            resume(now)
        actions = self._actions
        while not actions:
            if self._step is not _Step.READ:
                raise LocalProtocolError(f"next_action() while waiting for {self._step.value}")
            if not self._read(now):
                return NEED_DATA
        action = actions.pop(0)
        if type(action) is Send:
            self._unconfirmed = action.reply_code
        return action

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client (``b""``: EOF). During `AwaitPeer` these are application
        data, relayed later in order."""
        self._wire.receive_data(data)

    def get_timer(self) -> float | None:
        """The handshake deadline while waiting for the client's bytes, else None (REQ-08)."""
        return self._wire.get_timer()

    def credentials_checked(self, user: str | None, reason: str = "") -> None:
        """The outcome of `CheckCredentials`: the user name, or None and why (for the log;
        empty for a plain wrong password)."""
        self._expect(_Step.CREDENTIALS)
        self._checked = (user, reason)
        self._resume = self._after_credentials

    def resolved(self, targets: Sequence[Target]) -> None:
        """The outcome of `Resolve`: the addresses, in preference order."""
        self._expect(_Step.RESOLVE)
        dial = self._dial
        assert dial is not None
        policy = self._ctx.policy
        if policy.checks_resolved_addresses:
            # A CIDR rule must also stop names that resolve into the network (policy.py).
            targets = [
                t
                for t in targets
                if policy.check(
                    self.client_ip,
                    self.user,
                    Command.CONNECT,
                    AddressType.DOMAIN_NAME,
                    dial.host,
                    dial.port,
                    resolved_address=str(t[1][0]),
                )
            ]
            if not targets:
                self._fail(
                    ReplyCode.NOT_ALLOWED_BY_RULESET, f"{dial.host!r} resolves only to denied addresses"
                )
                return
        if any(is_multicast(AddressType.IPV6, str(t[1][0])) for t in targets):
            # UDP-08: multicast is for UDP only, whatever a name resolves to.
            targets = [t for t in targets if not is_multicast(AddressType.IPV6, str(t[1][0]))]
            if not targets:
                self._fail(
                    ReplyCode.NOT_ALLOWED_BY_RULESET,
                    f"{dial.host!r} resolves only to multicast addresses (UDP only, UDP-08)",
                )
                return
        own = self._ctx.own_listeners
        loops = [(t, own.find(str(t[1][0]), dial.port)) for t in targets]
        if any(listener is not None for _, listener in loops):
            # CMD-06: never a loop through ourselves, whatever the rules.
            targets = [t for t, listener in loops if listener is None]
            if not targets:
                listener = next(listener for _, listener in loops if listener is not None)
                cause = f"loop refused: {dial.host!r} resolves only to this proxy's own listener {listener}"
                self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, cause)
                return
        dial.targets = tuple(targets)
        self._push_step(dial, _Step.DIAL)

    def resolve_failed(self, exc: BaseException, message: str) -> None:
        """`Resolve` failed with ``exc`` (``message`` for the log): past the deadline that is
        CONNECTION_TIMED_OUT, otherwise the name does not resolve: HOST_UNREACHABLE (CMD-01)."""
        self._expect(_Step.RESOLVE)
        timed_out = isinstance(exc, TimeoutError)
        self._fail(ReplyCode.CONNECTION_TIMED_OUT if timed_out else ReplyCode.HOST_UNREACHABLE, message)

    def dial_finished(self, dialed: Dialed) -> None:
        """`Dial` connected."""
        self._expect(_Step.DIAL)
        self._on_dialed(dialed)

    def dial_failed(self, exc: BaseException, message: str) -> None:
        """`Dial` failed with ``exc`` (``message`` for the log); the reply says why (CMD-01)."""
        self._expect(_Step.DIAL)
        self._fail(reply_code_for(exc), message)

    def listening(self, listening: Listening) -> None:
        """`Listen` or `Claim` gave a listener."""
        self._expect(_Step.LISTEN)
        self._on_listening(listening)

    def listen_failed(self, exc: BaseException, message: str) -> None:
        """`Listen` failed with ``exc`` (``message`` for the log); the reply says why."""
        self._expect(_Step.LISTEN)
        self._fail(reply_code_for(exc), message)

    def peer_accepted(self, host: str, port: int, mptcp: bool) -> None:
        """`AwaitPeer`: the remote host at ``host``:``port`` connected (MPTCP or not)."""
        self._expect(_Step.PEER)
        request = self.request
        assert request is not None
        # CMD-06: a BIND's remote host is its peer, unknown until it connects: the rules see it
        # now (`socks6fast.proto.policy`); a refused peer gets a failure as the second reply.
        allowed, rule = self._ctx.policy.decide(
            self.client_ip,
            self.user,
            Command.BIND,
            request.address_type,
            request.address,
            request.port,
            resolved_address=host,
        )
        if allowed:
            self._on_peer(host, port, mptcp)
        else:
            self._fail(
                ReplyCode.NOT_ALLOWED_BY_RULESET,
                f"BIND peer {_format(host, port)} {_denied_by(rule)}",
                echo=False,
            )

    def association_opened(self, opened: OpenedAssociation) -> None:
        """`OpenAssociation` gave its sockets."""
        self._expect(_Step.ASSOCIATE)
        self._on_association(opened)

    def association_failed(self, exc: BaseException, message: str) -> None:
        """`OpenAssociation` failed with ``exc`` (``message`` for the log); the reply says why."""
        self._expect(_Step.ASSOCIATE)
        self._fail(reply_code_for(exc), message)

    def association_refused(self, message: str) -> None:
        """The UDP data plane did not take the association (``message`` for the log); the
        adapter writes `Associate.refusal` (a General Failure reply) and closes."""
        self.error = message
        self.reply_code = ReplyCode.GENERAL_FAILURE

    @property
    def association_id(self) -> bytes | None:
        """The UDP association's ID once the request took a slot (D18), else None."""
        return self._association

    def connection_ended(self, now: float) -> Session | None:
        """The connection is over, however it ended (call it last, always).

        Returns:
            A session that ended with it (D4: the request that would have started it did not
            succeed), whose BIND listeners the adapter closes; else None.
        """
        self._step = _Step.DONE
        self._end_association()
        self._end_limits()
        return None

    def _admit(self, now: float) -> bool:
        """Count the connection against its user's and its address's limits (after the rules
        allowed it); False when a limit refuses it (a failure reply is queued). A limit is a
        rule set for that user or address: Connection not allowed by ruleset (D26)."""
        limiter = self._ctx.limits
        if limiter is None or self.admission is not None:
            return True
        result = limiter.admit(self.client_ip, self.user, now)
        if isinstance(result, str):
            self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, result)
            return False
        self.admission = result
        return True

    def _end_limits(self) -> None:
        admission, limiter = self.admission, self._ctx.limits
        if admission is not None:
            self.admission = None
            if limiter is not None:
                limiter.release(admission)

    def _end_association(self) -> None:
        """UDP-07: the association ends with the connection: its slot is freed and the ports
        it still reserved are released (``released``, for the adapter to close)."""
        association, table = self._association, self._ctx.associations
        if association is not None:
            self._association = None
            if table is not None:
                self.released = tuple(table.close(association))

    def _open_association(self, action: OpenAssociation) -> bool:
        """Take an association slot (the limits) and ask for the sockets; False when refused
        (a failure reply is queued)."""
        table = self._ctx.associations
        if table is None:
            self._fail(ReplyCode.COMMAND_NOT_SUPPORTED, "UDP ASSOCIATE is turned off (udp.enabled = false)")
            return False
        refusal = table.refusal(self.client_ip, self.user)
        if refusal is not None:
            # Not a rule, not a bad request: the proxy will not serve more for this client now.
            self._fail(ReplyCode.GENERAL_FAILURE, refusal)
            return False
        self._association = table.open(self.client_ip, self.user)
        self._push_step(action, _Step.ASSOCIATE)
        return True

    # -- helpers ---------------------------------------------------------------------

    def _expect(self, step: _Step) -> None:
        if self._step is not step:
            raise LocalProtocolError(f"unexpected completion while waiting for {self._step.value}")
        self._step = _Step.READ

    def _push_step(self, action: Action, step: _Step) -> None:
        self._actions.append(action)
        self._step = step

    def _push_send(self, data: bytes, reply_code: int | None = None) -> None:
        actions = self._actions
        if actions and type(last := actions[-1]) is Send:
            # Replies that follow one another leave in one write.
            data = last.data + data
            reply_code = reply_code if reply_code is not None else last.reply_code
            actions.pop()
        actions.append(Send(data, reply_code))

    def _close(self, close: Close) -> None:
        self._actions.append(close)
        self._step = _Step.DONE

    def _relay(self) -> None:
        data, eof = self._wire.trailing_data
        self._relay_bytes(data, eof)

    def _relay_bytes(self, to_remote: bytes, client_eof: bool) -> None:
        self._actions.append(Relay(to_remote, client_eof))
        self._step = _Step.DONE
        self._relayed = True

    def _connect(self, dial: Dial) -> None:
        """Dial the destination; a name is resolved first (`resolved` dials)."""
        self._dial = dial
        if is_multicast(dial.address_type, dial.host):
            self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, f"{dial.host} is multicast: UDP only (UDP-08)")
            return
        if dial.address_type == AddressType.DOMAIN_NAME:
            self._push_step(Resolve(dial.host, dial.port, dial.deadline), _Step.RESOLVE)
            return
        listener = self._ctx.own_listeners.find(dial.host, dial.port)
        if listener is not None:  # CMD-06: never a loop through ourselves, whatever the rules
            cause = f"loop refused: {_format(dial.host, dial.port)} is this proxy's own listener {listener}"
            self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, cause)
            return
        self._actions.append(dial)
        self._step = _Step.DIAL

    def _check(self, credentials: UserPassRequest) -> None:
        self._push_step(CheckCredentials(credentials), _Step.CREDENTIALS)

    def _read(self, now: float) -> bool:
        """Parse what the client sent and act on it; False when more bytes are needed."""
        wire = self._wire
        try:
            event = wire.next_event()
            if event is NEED_DATA:
                wire.handle_timer(now)  # raises once the handshake deadline passed (REQ-08)
                return False
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
            return True
        if event is PAUSED:
            raise LocalProtocolError("nothing to read: the client waits for a reply")
        self._on_event(event, now)
        return True

    # -- what each protocol decides ----------------------------------------------------

    def _on_event(self, event: object, now: float) -> None:
        raise NotImplementedError

    def _after_credentials(self, now: float) -> None:
        raise NotImplementedError

    def _on_dialed(self, dialed: Dialed) -> None:
        raise NotImplementedError

    def _on_listening(self, listening: Listening) -> None:
        raise NotImplementedError

    def _on_peer(self, host: str, port: int, mptcp: bool) -> None:
        raise NotImplementedError

    def _on_association(self, opened: OpenedAssociation) -> None:
        raise NotImplementedError

    def _fail(self, code: ReplyCode, cause: str, *, echo: bool = True) -> None:
        """Answer with failure ``code`` and close; ``cause`` says why in the log (every failure
        names one); ``echo``: the reply echoes the client leg's Stack options (SOCKS 6)."""
        raise NotImplementedError

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        raise NotImplementedError
