"""Socket helpers shared by the I/O adapters: no protocol decision lives here.

- ``tfo``: TCP Fast Open on real sockets (``TCP_FASTOPEN_CONNECT``, ``TCP_FASTOPEN``, the
  SYN-data check), for the client and the server alike.
- ``stackopts``: Stack options applied to real sockets with ``setsockopt`` and read back
  (draft section "Stack options", D9), and MPTCP sockets.
- ``url``: proxy URLs (``socks6://``, ``socks6+tls://``) and the client's TLS context.
- ``dtls``: DTLS endpoints over memory BIOs (pyOpenSSL), sans-IO in shape: stateless
  cookies, handshake caps, retransmission timers, the client's certificate checks (issue 11).
- ``localaddr``: this host's addresses, read from the kernel (rtnetlink), for the
  ``@local`` rule destination and the loop check.
"""
