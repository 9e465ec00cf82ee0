"""The sans-IO protocol core: everything the draft decides, and no socket, loop or clock.

Bytes and completions go in, events and bytes come out (h11 / aioquic style, STYLE.md
section 2). ``tests/test_imports.py`` checks that importing any module here leaves
``asyncio``, ``socket`` and ``ssl`` out of ``sys.modules``.

- ``messages``: frozen dataclasses for every SOCKS 6 message and option.
- ``codec``: the selector of the wire codec (``_codec_c``, compiled from
  ``src_pyx/socks6fast/proto/_codec_c.pyx``, or the reference ``_codec_py``), which
  writes with ``_wire_py``.
- ``socks5``: the RFC 1928 / RFC 1929 codec for SOCKS 5 on the same port.
- ``states``: the state tables of both roles.
- ``stack``: Stack options: the plan of a Request's options and the echo in the reply.
- ``server_wire``: the proxy's message level (bytes in, events out; replies in, bytes out).
- ``server``: ``ServerConnection``, the proxy's side of SOCKS 6: every decision, as
  ``actions`` an adapter performs (``next_action(now)``, completions in);
  ``server_socks5``: ``Socks5ServerConnection``, the same for SOCKS 5; ``server_common``:
  what both share (``ServerContext``, the action queue, the completions).
- ``actions``: the proxy core's actions and the results an adapter reports back.
- ``client``: ``ClientConnection`` / ``ClientSession``, the client's side.
- ``client_flow``: the steps of one client request around its ``ClientConnection``
  (session wait, NOOP for a token, TFO split, retry, close), as generators of actions that
  the blocking and the asyncio client perform.
- ``sessions``, ``auth``, ``policy``: session and idempotence-token bookkeeping,
  credential checks and the failed-attempt limiter, and the rules.
"""
