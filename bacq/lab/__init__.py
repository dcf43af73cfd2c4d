"""A lab of simulated hosts on one machine: network namespaces on a bridge, running bacq for real.

Touches, as root, only what carries the lab's names and addresses (see ``bacq.lab.net``) and its
state directory; ``python -m bacq.lab up|status|down`` (and ``bacq lab``) drive it. See
``bacq.lab.core`` for the hosts. Importing this package imports nothing else (the CLI parser
stays fast): ``Lab``, ``Host`` and ``DEFAULT_STATE_DIR`` load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_STATE_DIR", "Host", "Lab"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bacq.lab import core

        return getattr(core, name)
    raise AttributeError(name)
