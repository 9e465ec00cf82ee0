"""The data plane: what moves bytes once the control plane has said yes.

- ``engine``: the selector: the native splice engine (``_relay_c``, compiled from
  ``src_pyx/socks6fast/dataplane/_relay_c.pyx``) where it runs, else none.
- ``relayer``: ``Relayer``, which hands a relayed pair to the engine, or relays it with
  asyncio protocols when the engine is unavailable (``SOCKS6FAST_NO_EXTENSIONS=1``,
  not Linux).
"""
