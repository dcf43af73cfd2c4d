"""``bacq lab up|status|down|cut|heal|netem|kill|start|chaos``: simulated hosts (root only).

Touches what ``bacq.lab`` touches; the options and their meaning live in ``bacq.lab.cli``.
"""

from __future__ import annotations

import argparse
from typing import Any

from bacq.commands.common import add_command

__all__ = ["register"]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    from bacq.lab.cli import add_arguments, run

    lab = add_command(
        sub,
        common,
        "lab",
    )
    add_arguments(lab, common)
    lab.set_defaults(func=run)
