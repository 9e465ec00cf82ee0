"""An aiohttp connector through a SOCKS 6 proxy, in the shape of aiohttp-socks (issue 15 item 2).

Example::

    import aiohttp
    from socks6fast.contrib.aiohttp import ProxyConnector

    connector = ProxyConnector.from_url("socks6://alice:s3cret@127.0.0.1:1080")
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get("https://example.com/") as response:
            print(response.status, await response.text())

How: `ProxyConnector` is an ``aiohttp.TCPConnector`` (``limit=``, ``limit_per_host=``,
``keepalive_timeout=``, ``ssl=`` mean what they mean there) that resolves nothing itself
(the proxy resolves the destination's name) and opens each connection as a SOCKS 6
CONNECT; for ``https://`` the TLS handshake with the destination, with the context aiohttp
chose (its ``ssl=`` argument, verifying by default), runs inside the tunnel. aiohttp's
keep-alive pool then reuses the tunnels.

What is reused across requests: the pooled tunnels, and one `socks6fast.asyncio.Session`
per connector: the first CONNECT carries the 0-RTT credentials and the Session Request
(and the Token Request, ``tokens``); later ones carry the Session ID only (SES-02) and,
once the proxy advertised a window, spend the smallest unspent idempotence token (IDM-05,
IDM-03). A session the proxy forgot is replaced and the CONNECT retried once. Closing the
connector tears the session down (SES-05).

Errors: a refusal by the proxy raises `ProxyError` (an ``aiohttp.ClientConnectionError``
naming the reply code; ``.reply_code``, and the `socks6fast.ProxyError` as ``__cause__``);
a proxy that cannot be reached raises ``aiohttp.ClientProxyConnectionError``; a handshake
past the connect timeout ``aiohttp.ConnectionTimeoutError`` (aiohttp's own mapping).

Needs the ``aiohttp`` extra (``pip install 'socks6fast[aiohttp]'``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Any, Self

try:
    import aiohttp
    from aiohttp.abc import AbstractResolver, ResolveResult
    from aiohttp.client_proto import ResponseHandler
except ImportError as exc:  # pragma: no cover - exercised in a venv without the extra
    raise ImportError(
        "socks6fast.contrib.aiohttp needs aiohttp: install it with pip install 'socks6fast[aiohttp]'"
    ) from exc

from ..asyncio.client import Proxy, Session, Socks6StreamWriter
from ..constants import ReplyCode
from ..errors import ProxyError as Socks6ProxyError
from ..errors import Socks6Error
from ..proto.client import SessionState

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ClientRequest

__all__ = ["ProxyConnector", "ProxyError"]

#: Default idempotence token window per connector (IDM-02; 0: no tokens).
DEFAULT_TOKENS = 16


class ProxyError(aiohttp.ClientConnectionError):
    """The SOCKS 6 proxy refused the CONNECT (or broke the protocol).

    Attributes:
        reply_code: the proxy's `socks6fast.ReplyCode`, or None (authentication failure,
            version mismatch, protocol error).
    """

    def __init__(self, message: str, reply_code: ReplyCode | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class _NoResolver(AbstractResolver):
    """Hands the host name through: the proxy resolves it (no local DNS query)."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [{"hostname": host, "host": host, "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


class _ResponseHandler(ResponseHandler):
    # Holds the StreamWriter: since Python 3.11.5 a StreamWriter closes its transport when
    # it is garbage-collected (aiohttp-socks issue 27).
    def __init__(self, loop: asyncio.AbstractEventLoop, writer: Socks6StreamWriter) -> None:
        super().__init__(loop)
        self.socks6_writer = writer


class ProxyConnector(aiohttp.TCPConnector):
    """An ``aiohttp.TCPConnector`` whose connections are SOCKS 6 tunnels.

    Args:
        proxy: the proxy URL (``socks6://`` or ``socks6+tls://``, with ``user:pass@``) or a
            `socks6fast.asyncio.Proxy`.
        proxy_ssl: TLS context towards a ``socks6+tls`` proxy (None: verifying default).
        proxy_server_hostname: name the proxy certificate is checked against.
        tokens: idempotence token window to ask the proxy for (0: none).
        tfo: TCP Fast Open to the proxy (TRN-02).
        **kwargs: ``aiohttp.TCPConnector``'s (``ssl=`` is TLS to the destination); not
            ``resolver`` (the proxy resolves).
    """

    def __init__(
        self,
        proxy: str | Proxy,
        *,
        proxy_ssl: ssl.SSLContext | None = None,
        proxy_server_hostname: str | None = None,
        tokens: int = DEFAULT_TOKENS,
        tfo: bool = False,
        **kwargs: Any,
    ) -> None:
        if "resolver" in kwargs:
            raise ValueError("ProxyConnector takes no resolver: the SOCKS 6 proxy resolves names")
        if isinstance(proxy, str):
            proxy = Proxy.from_url(proxy, proxy_ssl=proxy_ssl, proxy_server_hostname=proxy_server_hostname)
        super().__init__(resolver=_NoResolver(), **kwargs)
        self.session = Session(proxy, tokens=tokens)
        """The SOCKS 6 session every connection of this connector joins."""
        self._socks6_tfo = tfo

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Self:
        """The connector for ``socks6://[user[:pass]@]host[:port]`` or ``socks6+tls://...``.

        Raises:
            ValueError: a bad URL (one sentence, `socks6fast.net.url.parse_proxy_url`).
        """
        return cls(url, **kwargs)

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list[Any],
        req: ClientRequest,
        timeout: aiohttp.ClientTimeout,
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        # aiohttp's hook for "open a transport to this address": the address is the name our
        # resolver handed through.
        host, port = addr_infos[0][4][0], addr_infos[0][4][1]
        dest_ssl = kwargs.get("ssl")
        context = dest_ssl if isinstance(dest_ssl, ssl.SSLContext) else None
        server_hostname = kwargs.get("server_hostname") or host
        core = self.session.core
        # IDM-05: spend a token only where the proxy advertised one (no NOOP round trip first).
        idempotent = core.state is SessionState.ACTIVE and core.available_token() is not None
        try:
            _reader, writer = await self.session.open_connection(
                host, port, idempotent=idempotent, tfo=self._socks6_tfo, timeout=timeout.sock_connect
            )
        except Socks6ProxyError as exc:
            raise ProxyError(f"SOCKS 6 CONNECT to {host}:{port} failed: {exc}", exc.reply_code) from exc
        except Socks6Error as exc:
            raise ProxyError(f"SOCKS 6 CONNECT to {host}:{port} failed: {exc}") from exc
        except TimeoutError:
            raise  # aiohttp turns it into ConnectionTimeoutError
        except OSError as exc:  # the proxy is unreachable, or its TLS failed
            raise aiohttp.ClientProxyConnectionError(req.connection_key, exc) from exc
        if context is not None:
            # TLS with the destination inside the tunnel, with aiohttp's context; its errors
            # are aiohttp's usual ones.
            try:
                async with asyncio.timeout(timeout.sock_connect):
                    await writer.start_tls(context, server_hostname=server_hostname)
            except BaseException as exc:
                writer.close()
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise aiohttp.ClientConnectorCertificateError(req.connection_key, exc) from exc
                if isinstance(exc, ssl.SSLError):
                    raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from exc
                if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                    raise client_error(req.connection_key, exc) from exc
                raise
        transport = writer.transport
        protocol = _ResponseHandler(self._loop, writer)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return transport, protocol  # type: ignore[return-value]

    async def close(self, *, abort_ssl: bool = False) -> None:
        """Close the pooled connections, then tear the SOCKS 6 session down (SES-05)."""
        try:
            await super().close()
        finally:
            await self.session.aclose(timeout=5.0)
