"""The proxy's decisions for SOCKS 5 on the same port (RFC 1928, RFC 1929 authentication; D1),
sans I/O: the same actions as SOCKS 6 (`socks6fast.proto.server_common`), RFC 1928 replies.
"""

from __future__ import annotations

from ..constants import (
    AddressType,
    AuthMethod,
    Command,
    ReplyCode,
    Socks5Command,
    UserPassStatus,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from .actions import (
    AWAIT_PEER,
    CLOSE,
    LINGER_CLOSE,
    Associate,
    Dial,
    Dialed,
    Listen,
    Listening,
    OpenAssociation,
    OpenedAssociation,
)
from .server_common import (
    _UNSPECIFIED,
    ServerContext,
    _address_type_of,
    _ConnectionBase,
    _denied_by,
    _Step,
    is_multicast,
)
from .server_wire import (
    ConnectionClosed,
    Socks5ServerWire,
)
from .socks5 import (
    Socks5Greeting,
    Socks5MethodSelection,
    Socks5Reply,
    Socks5Request,
    UserPassReply,
    UserPassRequest,
    encode_reply,
)

__all__ = ["Socks5ServerConnection"]


def _socks5_code(code: ReplyCode) -> ReplyCode:
    # RFC 1928 section 6 stops at 0x08: a timeout is reported as host unreachable.
    return ReplyCode.HOST_UNREACHABLE if code == ReplyCode.CONNECTION_TIMED_OUT else code


class Socks5ServerConnection(_ConnectionBase):
    """The proxy's side of one SOCKS 5 connection: the same actions, RFC 1928 replies.

    Args:
        context: the server's users, rules and limits (sessions do not exist in SOCKS 5).
        client_ip: the client's address as text.
        now: the current time (the handshake deadline starts here).
    """

    __slots__ = ("_socks5", "request")

    def __init__(self, context: ServerContext, client_ip: str, now: float) -> None:
        self._socks5 = Socks5ServerWire(handshake_timeout=context.handshake_timeout, now=now)
        _ConnectionBase.__init__(self, context, client_ip, self._socks5)
        self.request: Socks5Request | None = None
        """The request, once read."""

    def abort(self) -> None:
        """An unexpected error (a bug) ends the connection: queue RFC 1928's general failure
        (REP 0x01) if a reply is still due, then a close."""
        self._actions.clear()
        self._resume = None
        try:
            self._reply(ReplyCode.GENERAL_FAILURE)
        except LocalProtocolError:
            pass
        self._close(CLOSE)

    def _on_event(self, event: object, now: float) -> None:
        if type(event) is Socks5Greeting:
            self._select_method(event.methods)
        elif type(event) is UserPassRequest:
            if self._ctx.users.required:
                self._check(event)
            else:
                # No users configured, but the client only offered username/password (e.g.
                # curl with --proxy-user): run the exchange and accept it.
                self._checked = (None, "")
                self._after_credentials(now)
        elif type(event) is Socks5Request:
            self._on_request(event, now)
        else:
            assert type(event) is ConnectionClosed
            self._close(CLOSE)

    def _select_method(self, methods: tuple[int, ...]) -> None:
        method: AuthMethod | None
        if self._ctx.users.required:
            method = AuthMethod.USERNAME_PASSWORD if AuthMethod.USERNAME_PASSWORD in methods else None
        elif AuthMethod.NONE in methods:
            method = AuthMethod.NONE
        else:
            method = AuthMethod.USERNAME_PASSWORD if AuthMethod.USERNAME_PASSWORD in methods else None
        if method is None:
            self.error = "no acceptable authentication method"
            self._push_send(self._socks5.send(Socks5MethodSelection(AuthMethod.NO_ACCEPTABLE_METHODS)))
            self._close(LINGER_CLOSE)
        else:
            self._push_send(self._socks5.send(Socks5MethodSelection(method)))

    def _after_credentials(self, now: float) -> None:
        user, reason = self._checked
        ok = user is not None or not self._ctx.users.required
        status = UserPassStatus.SUCCESS if ok else UserPassStatus.FAILURE
        self._push_send(self._socks5.send(UserPassReply(status)))
        if ok:
            self.user = user
        else:
            # RFC 1929 section 2: on failure the server "MUST close the connection".
            self.error = reason or "authentication failed"
            self._close(LINGER_CLOSE)

    def _on_request(self, request: Socks5Request, now: float) -> None:
        self.request = request
        allowed, rule = self._ctx.policy.decide(
            self.client_ip,
            self.user,
            Command(int(request.command)),
            request.address_type,
            request.address,
            request.port,
        )
        if not allowed:
            self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, _denied_by(rule))
        elif not self._admit(now):
            pass  # over a limit: RFC 1928 REP 0x02, "connection not allowed by ruleset"
        elif request.command == Socks5Command.CONNECT:
            deadline = now + self._ctx.connect_timeout
            self._connect(Dial(request.address_type, request.address, request.port, deadline))
        elif request.command == Socks5Command.BIND and is_multicast(request.address_type, request.address):
            # RFC 1928 BIND's DST.ADDR names the peer expected to connect, which a multicast
            # address can never be; SOCKS 6 BIND refuses it too ("The use of multicast
            # addresses is permitted for UDP traffic only", UDP-08).
            self._fail(ReplyCode.NOT_ALLOWED_BY_RULESET, f"{request.address} is multicast: UDP only (UDP-08)")
        elif request.command == Socks5Command.BIND and request.address_type != AddressType.DOMAIN_NAME:
            # RFC 1928 BIND: DST.ADDR is the expected peer, not a bind address; we bind where
            # the client reached us, on any port.
            unspecified = _UNSPECIFIED[request.address_type]
            self._push_step(Listen(request.address_type, unspecified, 0, near_client=True), _Step.LISTEN)
        elif request.command == Socks5Command.BIND:
            self._fail(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, "BIND to a domain name is not supported")
        else:
            # RFC 1928 section 7, D19: DST.ADDR/DST.PORT name where the client will send from
            # (zeros: not known yet); the relay's sockets are on the address the TCP connection
            # arrived at, in its family.
            self._open_association(
                OpenAssociation(AddressType.IPV4, "0.0.0.0", 0, near_client=True, socks5=True)
            )

    def _reply(self, code: ReplyCode, host: str = "0.0.0.0", port: int = 0) -> None:
        reply = Socks5Reply(code, _address_type_of(host), host, port)
        self._push_send(self._socks5.send(reply), code)

    def _fail(self, code: ReplyCode, cause: str, *, echo: bool = True) -> None:
        self.error = cause
        self._reply(_socks5_code(code))
        self._close(LINGER_CLOSE)

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        self.error = str(exc)
        if exc.reply_code is not None:
            try:
                self._reply(_socks5_code(exc.reply_code))
            except LocalProtocolError:
                pass
        self._close(LINGER_CLOSE)

    def _on_dialed(self, dialed: Dialed) -> None:
        self._reply(ReplyCode.SUCCESS, *dialed.local)
        self._relay()

    def _on_listening(self, listening: Listening) -> None:
        self._reply(ReplyCode.SUCCESS, *listening.local)
        self._push_step(AWAIT_PEER, _Step.PEER)

    def _on_peer(self, host: str, port: int, mptcp: bool) -> None:
        self._reply(ReplyCode.SUCCESS, host, port)
        self._relay()

    def _on_association(self, opened: OpenedAssociation) -> None:
        association_id, request = self._association, self.request
        assert association_id is not None and request is not None and opened.client_facing is not None
        # D19: BND.ADDR/BND.PORT name the association's client-facing UDP socket; datagrams
        # are accepted only from the TCP client's address (and DST.PORT when it is not 0).
        host, port = opened.client_facing
        data = self._socks5.send(Socks5Reply(ReplyCode.SUCCESS, _address_type_of(host), host, port))
        self.reply_code = ReplyCode.SUCCESS
        self._actions.append(
            Associate(
                association_id,
                data,
                b"",
                udp_error=False,
                socks5=True,
                client_address=self.client_ip,
                client_port=request.port,
                refusal=encode_reply(Socks5Reply(ReplyCode.GENERAL_FAILURE, AddressType.IPV4, "0.0.0.0", 0)),
            )
        )
        self._step = _Step.DONE
        self._relayed = True
