"""``python -m socks6fast.bench`` is ``socks6fast bench``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
