"""``python -m bacq``: the same as the ``bacq`` command."""

import sys

from bacq.cli import main

sys.exit(main())
