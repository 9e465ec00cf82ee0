"""Stack options, sans-IO: what a Request asks for and what the Operation Reply echoes (draft-11
section "Stack options"; STK-01..STK-07, D9, D10).

Strategy: `plan_stack_options` sorts a Request's Stack options into a `StackPlan` per leg and
rejects duplicates or contradictions (D10). The adapter applies the plan to real sockets
(``socks6fast.net.stackopts``: ``setsockopt``, then ``getsockopt`` to read back what the kernel
really uses) and reports the read-back values as `AppliedLeg`; `echo_stack_options` then builds
the reply's options from the plan and those values, so the reply carries "the behaviour
actually applied" (D9), never merely what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..constants import Availability, ReplyCode, StackLeg
from ..errors import RemoteProtocolError
from .messages import (
    HappyEyeballsOption,
    IPTOSOption,
    ListenBacklogOption,
    MultipathOption,
    NoFragmentationOption,
    Option,
    PortParityOption,
    StackOption,
    TFOOption,
    TTLOption,
    UDPErrorOption,
)

__all__ = [
    "AppliedLeg",
    "LegOptions",
    "StackPlan",
    "echo_stack_options",
    "plan_stack_options",
]


@dataclass(frozen=True, slots=True)
class LegOptions:
    """IP-level Stack options for one leg (section "Stack options")."""

    tos: int | None = None
    """IP TOS / IPv6 traffic class to set, or None."""
    ttl: int | None = None
    """IP TTL / IPv6 hop limit to set, or None."""
    no_fragmentation: Availability | None = None
    """DESIRED: enforce don't-fragment; NOT_DESIRED: leave the default; None: not asked."""

    @property
    def empty(self) -> bool:
        """True when nothing was asked for this leg."""
        return self.tos is None and self.ttl is None and self.no_fragmentation is None


@dataclass(frozen=True, slots=True)
class StackPlan:
    """What the Stack options of a Request ask for, checked for duplicates (D10)."""

    client: LegOptions = LegOptions()
    """Options for the client-proxy leg."""
    remote: LegOptions = LegOptions()
    """Options for the proxy-remote leg."""
    both_legs: frozenset[str] = frozenset()
    """Names (``"tos"``, ``"ttl"``, ``"no_fragmentation"``) sent once with Leg 3 (both legs):
    the reply echoes them the same way if both legs ended up with the same value."""
    happy_eyeballs: Availability | None = None
    """Happy Eyeballs option (proxy-remote leg), or None."""
    tfo_payload_size: int | None = None
    """TFO option: largest SYN payload (0: any), or None when TFO must not be used (CMD-02)."""
    multipath: Availability | None = None
    """Multipath option, or None (then no MPTCP for CONNECT)."""
    listen_backlog: int | None = None
    """Listen Backlog option (BIND inside a session, CMD-05), or None."""
    udp_error: Availability | None = None
    """UDP Error option (UDP ASSOCIATE only; kept for it)."""
    port_parity: PortParityOption | None = None
    """Port Parity option (UDP ASSOCIATE only; kept for it)."""


def _legs(leg: int) -> tuple[StackLeg, ...]:
    if leg == StackLeg.BOTH:
        return (StackLeg.CLIENT_PROXY, StackLeg.PROXY_REMOTE)
    if leg in (StackLeg.CLIENT_PROXY, StackLeg.PROXY_REMOTE):
        return (StackLeg(leg),)
    return ()


def plan_stack_options(options: tuple[Option, ...]) -> StackPlan:
    """Collect a Request's Stack options into a `StackPlan`.

    Options the proxy does not support (unknown level/code, a proxy-remote-only option
    sent for the client-proxy leg) are silently ignored (section "Stack options", STK-01).

    Raises:
        RemoteProtocolError: two options say something about the same thing on the same
            leg ("MUST NOT contradict one another or contain duplicate information", D10);
            reply code GENERAL_FAILURE (STK-02).
    """
    seen: set[tuple[type, StackLeg]] = set()
    legs: dict[StackLeg, LegOptions] = {
        StackLeg.CLIENT_PROXY: LegOptions(),
        StackLeg.PROXY_REMOTE: LegOptions(),
    }
    both: set[str] = set()
    plan = StackPlan()
    for option in options:
        kind = type(option)
        if isinstance(option, (IPTOSOption, TTLOption, NoFragmentationOption)):
            applies_to = _legs(option.leg)
        elif isinstance(option, _REMOTE_ONLY):
            # These options only exist for the proxy-remote leg (their figures fix Leg = 2).
            applies_to = (StackLeg.PROXY_REMOTE,) if StackLeg.PROXY_REMOTE in _legs(option.leg) else ()
        else:
            continue  # UnknownStackOption, or not a Stack option at all
        for leg in applies_to:
            if (kind, leg) in seen:
                raise RemoteProtocolError(
                    f"duplicate or contradictory stack options ({kind.__name__})", ReplyCode.GENERAL_FAILURE
                )
            seen.add((kind, leg))
            if isinstance(option, IPTOSOption):
                legs[leg] = replace(legs[leg], tos=option.tos)
            elif isinstance(option, TTLOption):
                legs[leg] = replace(legs[leg], ttl=option.ttl)
            elif isinstance(option, NoFragmentationOption):
                legs[leg] = replace(legs[leg], no_fragmentation=option.availability)
            elif isinstance(option, HappyEyeballsOption):
                plan = replace(plan, happy_eyeballs=option.availability)
            elif isinstance(option, TFOOption):
                plan = replace(plan, tfo_payload_size=option.payload_size)
            elif isinstance(option, MultipathOption):
                plan = replace(plan, multipath=option.availability)
            elif isinstance(option, ListenBacklogOption):
                plan = replace(plan, listen_backlog=option.backlog)
            elif isinstance(option, UDPErrorOption):
                plan = replace(plan, udp_error=option.availability)
            else:
                plan = replace(plan, port_parity=option)
        # Only IP-level options (TOS, TTL, No Fragmentation) can really cover both legs; a
        # proxy-remote-only option (Happy Eyeballs, TFO, Multipath, Listen Backlog, UDP
        # Error, Port Parity) sent with Leg 3 applies to its one leg and is echoed with Leg 2
        # (section "Stack options": their figures fix Leg = 2), so it is not recorded here.
        if applies_to and option.leg == StackLeg.BOTH and kind in _IP_OPTION_NAMES:
            both.add(_IP_OPTION_NAMES[kind])
    return replace(
        plan,
        client=legs[StackLeg.CLIENT_PROXY],
        remote=legs[StackLeg.PROXY_REMOTE],
        both_legs=frozenset(both),
    )


_REMOTE_ONLY = (
    HappyEyeballsOption,
    TFOOption,
    MultipathOption,
    ListenBacklogOption,
    UDPErrorOption,
    PortParityOption,
)
_IP_OPTION_NAMES: dict[type, str] = {
    IPTOSOption: "tos",
    TTLOption: "ttl",
    NoFragmentationOption: "no_fragmentation",
}


@dataclass(frozen=True, slots=True)
class AppliedLeg:
    """What one socket really uses, read back with getsockopt after applying a `LegOptions`."""

    tos: int | None = None
    """IP TOS / traffic class in use, or None when it was not asked for."""
    ttl: int | None = None
    """TTL / hop limit in use, or None when it was not asked for."""
    no_fragmentation: Availability | None = None
    """DESIRED when don't-fragment is enforced, NOT_DESIRED when not; None when not asked."""


def _echo_ip(plan: StackPlan, client: AppliedLeg | None, remote: AppliedLeg | None) -> list[StackOption]:
    out: list[StackOption] = []
    if client is None and remote is None:
        return out  # nothing was applied on either leg (the common request without options)
    for name in ("tos", "ttl", "no_fragmentation"):
        values: dict[StackLeg, object] = {}
        if client is not None and getattr(plan.client, name) is not None:
            values[StackLeg.CLIENT_PROXY] = getattr(client, name)
        if remote is not None and getattr(plan.remote, name) is not None:
            values[StackLeg.PROXY_REMOTE] = getattr(remote, name)
        if (
            name in plan.both_legs
            and len(values) == 2
            and values[StackLeg.CLIENT_PROXY] == values[StackLeg.PROXY_REMOTE]
        ):
            values = {StackLeg.BOTH: values[StackLeg.CLIENT_PROXY]}
        for leg, value in values.items():
            if value is None:
                continue  # could not even be read back: unsupported here, so not echoed
            if name == "tos":
                assert isinstance(value, int)
                out.append(IPTOSOption(leg, value))
            elif name == "ttl":
                assert isinstance(value, int)
                out.append(TTLOption(leg, value))
            else:
                assert isinstance(value, Availability)
                out.append(NoFragmentationOption(leg, value))
    return out


def echo_stack_options(
    plan: StackPlan,
    *,
    client: AppliedLeg | None = None,
    remote: AppliedLeg | None = None,
    happy_eyeballs: Availability | None = None,
    tfo_payload_size: int | None = None,
    multipath: Availability | None = None,
    listen_backlog: int | None = None,
    udp_error: Availability | None = None,
    port_parity: PortParityOption | None = None,
) -> tuple[StackOption, ...]:
    """The Stack options of an Operation Reply: one per supported option the client sent,
    carrying what was actually done (D9, STK-01).

    Args:
        plan: what the client asked for.
        client: the client-proxy leg's read-back values, or None if nothing was applied there.
        remote: the proxy-remote leg's read-back values, or None (no remote socket).
        happy_eyeballs: DESIRED if Happy Eyeballs was attempted, NOT_DESIRED if not; None
            to leave the option out (an IP destination: "silently ignore", STK-04).
        tfo_payload_size: bytes of SYN payload the remote host accepted (0: TFO did not
            carry data); None to leave the option out.
        multipath: DESIRED when MPTCP is in use (or will be accepted, first BIND reply).
        listen_backlog: the backlog actually used (0 without one, CMD-05).
        udp_error: DESIRED when Datagram Error messages will be sent (UDP-09), NOT_DESIRED
            when not ("will not be performed").
        port_parity: the parity and reservation actually applied (STK-08): parity 0 and
            reserve 0 when the request's parity was not honoured.
    """
    out = _echo_ip(plan, client, remote)
    remote_leg = StackLeg.PROXY_REMOTE
    if happy_eyeballs is not None and plan.happy_eyeballs is not None:
        out.append(HappyEyeballsOption(remote_leg, happy_eyeballs))
    if tfo_payload_size is not None and plan.tfo_payload_size is not None:
        out.append(TFOOption(remote_leg, tfo_payload_size))
    if multipath is not None and plan.multipath is not None:
        out.append(MultipathOption(remote_leg, multipath))
    if listen_backlog is not None and plan.listen_backlog is not None:
        out.append(ListenBacklogOption(remote_leg, listen_backlog))
    if udp_error is not None and plan.udp_error is not None:
        out.append(UDPErrorOption(remote_leg, udp_error))
    if port_parity is not None and plan.port_parity is not None:
        out.append(PortParityOption(remote_leg, port_parity.parity, port_parity.reserve))
    return tuple(out)
