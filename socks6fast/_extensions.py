"""Whether the compiled modules may be used: the one ``SOCKS6FAST_NO_EXTENSIONS`` switch.

Set ``SOCKS6FAST_NO_EXTENSIONS=1`` to run the pure-Python reference codec and the
asyncio relay even where the compiled twins exist (aiohttp's switch of the same name).
Implementations other than CPython never load them.
"""

from __future__ import annotations

import os
import sys
from typing import Final

__all__ = ["NO_EXTENSIONS"]

NO_EXTENSIONS: Final = (
    bool(os.environ.get("SOCKS6FAST_NO_EXTENSIONS")) or sys.implementation.name != "cpython"
)
