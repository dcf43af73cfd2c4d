"""A lab of simulated hosts on one machine: network namespaces on a bridge, running bacq for real.

Touches, as root, only what carries the lab's names and addresses (see ``bacq.lab.net``) and its
state directory; ``python -m bacq.lab up|status|down`` (and ``bacq lab``) drive it. See
``bacq.lab.core`` for the hosts.
"""

from __future__ import annotations

from bacq.lab.core import DEFAULT_STATE_DIR, Host, Lab

__all__ = ["DEFAULT_STATE_DIR", "Host", "Lab", "main"]


def main(argv: list[str] | None = None) -> int:
    from bacq.lab.cli import main as cli_main

    return cli_main(argv)
