"""``python -m usercouch``: the command line (see :mod:`usercouch.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
