"""In-memory pairs: a `ClientConnection` against the proxy's sans-IO core, no sockets.

The shape of aioquic's tests/test_connection.py: `client_and_server()` builds both ends and
`transfer()` moves bytes between them until neither has anything more to say. The proxy's
core (`socks6fast.proto.server`) asks for actions; `ScriptedIO` performs them the way the
asyncio server would, except that what the outside world answers is scripted: names resolve
from a table, a dial connects (or fails with a given error) at once, a BIND peer connects at
once. Passwords are checked by the real `UserStore` (cheap scrypt parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from socks6fast.constants import AddressType
from socks6fast.proto.actions import (
    Action,
    ApplyClientOptions,
    Associate,
    AwaitPeer,
    CheckCredentials,
    Claim,
    Close,
    Dial,
    Dialed,
    EndSession,
    HoldBacklog,
    Listen,
    Listening,
    OpenAssociation,
    OpenedAssociation,
    Relay,
    Resolve,
    Send,
    Target,
)
from socks6fast.proto.associations import AssociationTable
from socks6fast.proto.auth import UserStore, hash_password
from socks6fast.proto.client import ClientConnection, ClientEvent, ClientSession
from socks6fast.proto.policy import Policy
from socks6fast.proto.server import (
    ServerConnection,
    ServerContext,
    Socks5ServerConnection,
    server_connection,
)
from socks6fast.proto.sessions import MemorySessionStore, Session, SessionLimits
from socks6fast.proto.socks5 import UserPassRequest
from socks6fast.proto.stack import AppliedLeg, LegOptions
from socks6fast.proto.states import NEED_DATA, PAUSED

#: scrypt parameters that make a check cost about a millisecond (tests only).
FAST_SCRYPT = {"n": 2**8, "r": 8, "p": 1}
ALICE = UserPassRequest(b"alice", b"wonderland")
#: The proxy's own address on its remote legs (the reply names it).
PROXY_LOCAL = ("192.0.2.10", 40000)
#: The host that connects to a BIND listener.
BIND_PEER = ("198.51.100.7", 5555)


def make_context(
    *,
    users: dict[str, str] | None = None,
    policy: Policy | None = None,
    sessions: bool = False,
    session_limits: SessionLimits | None = None,
    dns_resolver: tuple[str, int] | None = None,
    handshake_timeout: float | None = 10.0,
    max_options_length: int = 16384,
    udp: bool = True,
    max_associations_per_client: int = 0,
) -> ServerContext:
    """A core context: ``users`` maps names to clear-text passwords (hashed here, cheaply)."""
    store = UserStore({name: hash_password(pw, **FAST_SCRYPT) for name, pw in (users or {}).items()})
    return ServerContext(
        users=store,
        policy=policy,
        sessions=MemorySessionStore(session_limits) if sessions or session_limits else None,
        max_options_length=max_options_length,
        handshake_timeout=handshake_timeout,
        connect_timeout=10.0,
        dns_resolver=dns_resolver,
        associations=AssociationTable(max_associations_per_client) if udp else None,
    )


def applied_as_asked(options: LegOptions) -> AppliedLeg | None:
    """What a kernel that takes every value as asked reads back (None: nothing asked)."""
    if options.empty:
        return None
    return AppliedLeg(tos=options.tos, ttl=options.ttl, no_fragmentation=options.no_fragmentation)


@dataclass
class ScriptedIO:
    """Performs the proxy core's actions in memory, as ``socks6fast.asyncio.server`` would."""

    context: ServerContext = field(default_factory=make_context)
    client_ip: str = "192.0.2.1"
    now: float = 100.0
    names: dict[str, list[Target]] = field(default_factory=dict)
    """Name -> resolved addresses; a name not here does not resolve."""
    dial_error: BaseException | None = None
    """The error every dial fails with, or None: dials connect."""
    syn_acked: bool = True
    """The remote host acknowledges data in the SYN (TFO)."""
    mptcp: bool = False
    """Remote legs run MPTCP when asked."""

    server: ServerConnection | Socks5ServerConnection | None = None
    """The core connection, once the first bytes arrived."""
    performed: list[Action] = field(default_factory=list)
    """Every action performed, in order (Send included)."""
    to_client: bytearray = field(default_factory=bytearray)
    """Bytes written to the client and not yet delivered."""
    relayed: Relay | None = None
    """The hand-off to the relay, once it happened."""
    closed: Close | None = None
    """The close, once it happened."""
    ended_sessions: list[Session] = field(default_factory=list)
    """Sessions whose listeners the adapter was told to close (EndSession, D4 teardown)."""
    after_handoff: bytearray = field(default_factory=bytearray)
    """Bytes the client sent once the relay took over (the relay carries them)."""
    holding: bool = False
    """A BIND backlog listener is held (the first connection stays open) until `release`."""
    associated: Associate | None = None
    """UDP ASSOCIATE: the hand-off to the UDP data plane, once it happened."""
    udp_port: int = 6000
    """The port a UDP ASSOCIATE's remote-facing socket gets when any port will do."""

    @property
    def finished(self) -> bool:
        """Relayed or closed."""
        return self.relayed is not None or self.closed is not None or self.associated is not None

    @property
    def sent(self) -> list[bytes]:
        """The data of every `Send`, one entry per write."""
        return [a.data for a in self.performed if isinstance(a, Send)]

    def receive(self, data: bytes) -> None:
        """Bytes from the client (b"": EOF); then perform until the core needs more."""
        if self.server is None:
            if not data:
                return
            self.server = server_connection(self.context, self.client_ip, data, self.now)
        else:
            self.server.receive_data(data)
        self.run()

    def expire(self) -> None:
        """The handshake timer fires (REQ-08)."""
        assert self.server is not None
        deadline = self.server.get_timer()
        assert deadline is not None, "no handshake timer runs now"
        self.now = deadline
        self.run()

    def release(self) -> None:
        """The client closes the initial connection of a held backlog listener (CMD-05)."""
        assert self.holding
        self.holding = False
        self.run()

    def run(self) -> None:
        conn = self.server
        assert conn is not None
        while not self.finished and not self.holding:
            action = conn.next_action(self.now)
            if action is NEED_DATA:
                return
            assert action is not PAUSED
            self.performed.append(action)
            self._perform(conn, action)
        if self.finished and self.associated is None:  # an association lives until `end` (UDP-07)
            ended = conn.connection_ended(self.now)
            if ended is not None:
                self.ended_sessions.append(ended)

    def _perform(self, conn: ServerConnection | Socks5ServerConnection, action: Action) -> None:
        if isinstance(action, Send):
            self.to_client += action.data
        elif isinstance(action, Close):
            self.closed = action
        elif isinstance(action, Relay):
            self.relayed = action
        elif isinstance(action, ApplyClientOptions):
            assert isinstance(conn, ServerConnection)
            conn.client_options_applied(applied_as_asked(action.options))
        elif isinstance(action, CheckCredentials):
            creds = action.credentials
            conn.credentials_checked(self.context.users.authenticate(creds.username, creds.password))
        elif isinstance(action, EndSession):
            self.ended_sessions.append(action.session)
        elif isinstance(action, Resolve):
            if action.host in self.names:
                conn.resolved(self.names[action.host])
            else:
                conn.resolve_failed(
                    OSError(-2, "Name or service not known"), f"cannot resolve {action.host!r}"
                )
        elif isinstance(action, Dial):
            self._dial(conn, action)
        elif isinstance(action, Listen):
            host = "192.0.2.10" if action.near_client else action.host
            local = (host, action.port or 5000)
            if action.session is not None:
                action.session.listeners[local] = object()  # a handle kept for claims (CMD-05)
            conn.listening(Listening(local, applied_as_asked(action.options), False, action.tfo))
        elif isinstance(action, Claim):
            conn.listening(Listening(("192.0.2.10", 5000), None, False, False))
        elif isinstance(action, AwaitPeer):
            conn.peer_accepted(*BIND_PEER, False)
        elif isinstance(action, OpenAssociation):
            host = "192.0.2.10" if action.near_client else action.host
            port = action.port or self.udp_port
            if action.parity:  # a scripted kernel that always has a port of each parity free
                port = port + (port % 2 != (0 if action.parity == 1 else 1))
            opened = OpenedAssociation(
                (host, port),
                applied_as_asked(action.options),
                parity=bool(action.parity),
                reserved=object() if action.reserve else None,
                reserved_port=(port + 1 if port % 2 == 0 else port - 1) if action.reserve else 0,
                client_facing=(host, 7000) if action.socks5 else None,
            )
            conn.association_opened(opened)
        elif isinstance(action, Associate):
            self.associated = action
        else:
            assert isinstance(action, HoldBacklog)
            self.holding = True

    def _dial(self, conn: ServerConnection | Socks5ServerConnection, action: Dial) -> None:
        if self.dial_error is not None:
            conn.dial_failed(self.dial_error, f"connect to {action.host}:{action.port}: {self.dial_error}")
            return
        if action.address_type == AddressType.DOMAIN_NAME:
            assert action.targets, "a name is dialled only with its resolved addresses"
        conn.dial_finished(
            Dialed(
                local=PROXY_LOCAL,
                applied=applied_as_asked(action.options),
                mptcp=self.mptcp and action.multipath,
                syn_sent=len(action.tfo_payload),
                syn_data_acked=bool(action.tfo_payload) and self.syn_acked,
            )
        )


def client_and_server(
    *,
    session: ClientSession | None = None,
    credentials: UserPassRequest | None = None,
    io: ScriptedIO | None = None,
) -> tuple[ClientConnection, ScriptedIO]:
    """A fresh client connection and the proxy side it talks to (aioquic's helper)."""
    return ClientConnection(session=session, credentials=credentials), io if io is not None else ScriptedIO()


def transfer(client: ClientConnection, io: ScriptedIO) -> list[ClientEvent]:
    """Move bytes both ways until neither side moves; the client's events, in order.

    The client's errors (ProxyError, AuthenticationError, ...) propagate. When the proxy
    closed, the client sees EOF after the last byte.
    """
    events: list[ClientEvent] = []
    eof_sent = False
    while True:
        moved = False
        if io.to_client:
            client.receive_data(bytes(io.to_client))
            io.to_client.clear()
            moved = True
        elif io.closed is not None and not eof_sent:
            client.receive_data(b"")
            eof_sent = moved = True
        while True:
            event = client.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            events.append(event)
        out = client.data_to_send()
        if out and io.relayed is not None:
            io.after_handoff += out
        elif out and io.closed is None:
            io.receive(out)
            moved = True
        if not moved:
            return events
