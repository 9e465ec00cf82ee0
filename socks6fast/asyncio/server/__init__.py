"""The asyncio SOCKS 6 / SOCKS 5 proxy server: it performs what the sans-IO core decides.

Strategy (aioquic ``asyncio/``): every decision the draft leaves to a proxy (authentication,
sessions and tokens, the rules, Stack options, every reply) is taken by
`socks6fast.proto.server.ServerConnection` (or `Socks5ServerConnection`, D1); this package
reads and writes the client's bytes, checks passwords off the event loop, resolves and dials,
listens for BIND, and hands each established pair of connections to the data plane
(`socks6fast.dataplane.relayer.Relayer`) with the bytes the client sent early in front, and
each UDP association to the UDP data plane (``udp``). One
file per job:

- ``lifecycle``: `Server` (listeners, accept, reload, drain, session expiry) and `serve`;
- ``handler``: `ConnectionHandler`, one per client connection: the loop that performs the
  core's actions, and the connection's log line;
- ``streams``: the client leg during the handshake, plain socket or TLS (TRN-03);
- ``dial``: resolving and connecting, Happy Eyeballs (RFC 8305, STK-04), TFO (CMD-02);
- ``bind``: BIND listening sockets, the backlog listeners a session keeps (CMD-05);
- ``udp``: UDP ASSOCIATE: the association's sockets (Port Parity, the UDP leg's options), the
  UDP data plane of the server (`UdpService`: the engine, the SOCKS 6 UDP ports, the rules and
  the resolver behind its questions), and the TLS-to-engine bridge;
- ``record``: `ConnectionRecord`, the one log line per connection, and `describe_error`, the
  words for a failure's cause in it.
- ``logs``: the JSON log format (``server.log_format = "json"``, issue 14);
- ``metrics``: `ServerMetrics`, the Prometheus collector (counted per finished connection,
  the rest read at scrape time from the engines and the session store), and ``admin``, the
  HTTP listener serving it (``[admin] listen``: ``/metrics``, ``/healthz``).

Where a connection may go (CMD-06) is the core's decision too: the rules see the address the
proxy really connects to (`socks6fast.proto.policy`: 0.0.0.0 is this host, names are checked
with each resolved address, a BIND peer when it connects), and a CONNECT that would reach one
of the proxy's own listeners is refused whatever the rules say (`OwnListeners`). The host's
addresses behind both come from the kernel (`socks6fast.net.localaddr`), read by ``lifecycle``
at start-up and on reload.

Limits: ``max_connections`` (sized against the descriptor limit at start; past it a newcomer
is answered General Failure at once, hardening issue 12 defect 3, see ``lifecycle``), the
handshake timeout (REQ-08), the connect timeout (0x09), the relay idle timeout, the options
cap (D6), password checks (`FailedAuthLimiter`, decided in `socks6fast.proto.auth`: failures
per client address and per user name, checks per second in all; issue 12 defect 5, AUTH-05).
"""

from ...proto.auth import AuthAdmission, FailedAuthLimiter
from .dial import Resolver
from .lifecycle import Server, serve
from .record import ConnectionRecord, describe_error

__all__ = [
    "AuthAdmission",
    "ConnectionRecord",
    "FailedAuthLimiter",
    "Resolver",
    "Server",
    "describe_error",
    "serve",
]
