"""``python -m bacq.lab up|status|down``: see ``bacq.lab.cli``."""

from __future__ import annotations

import sys

from bacq.lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
