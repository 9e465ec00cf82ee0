"""``python -m socks6fast``: the ``socks6fast`` command (see `socks6fast.cli`)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
