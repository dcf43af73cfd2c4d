"""Crash points for the tests of crash windows. Touches the process's life only.

``crash_point(name)`` ends the process at once (``os._exit``, like a kill -9: nothing is flushed
or closed) when the environment variable ``BACQ_CRASH_AT`` names that point. The tests start a
service with it set to show that the state it left behind is picked up by the next start:

    verifier.decided     the verdict is decided and saved, not yet published
    requester.assigned   the choice of workers is committed, the assignments not yet sent
"""

from __future__ import annotations

import os

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "BACQ_CRASH_AT"
CRASH_EXIT = 70


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT)
