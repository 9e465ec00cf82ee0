"""Adapters for third-party HTTP clients (issue 15 item 2), each behind its optional extra.

* `socks6fast.contrib.httpx` (``pip install 'socks6fast[httpx]'``): ``AsyncProxyTransport``
  and ``SyncProxyTransport``, in the shape of httpx-socks.
* `socks6fast.contrib.aiohttp` (``pip install 'socks6fast[aiohttp]'``): ``ProxyConnector``,
  in the shape of aiohttp-socks.

Nothing else in socks6fast imports this package (tests/test_layers.py): the proxy and the
client library never pull in httpx or aiohttp.
"""
