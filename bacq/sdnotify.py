"""systemd's notify protocol (sd_notify) for the services: READY, STATUS, WATCHDOG, STOPPING.

Touches only the datagram socket named by ``$NOTIFY_SOCKET`` (set by systemd for ``Type=notify``
units), the file named by ``$BACQ_READY_FILE`` (set by the devstack and the lab) and reads
``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``. Without ``$NOTIFY_SOCKET`` (a terminal, the devstack,
tests) every notification does nothing, so services call them unconditionally. The protocol is one
``KEY=VALUE`` line per field in a single datagram; a socket name starting with ``@`` is in the
abstract namespace. See sd_notify(3).

Readiness is explicit: a service calls ``ready()`` once it is connected and subscribed. That sends
READY=1 (through the callback ``bacq.cli`` registers with ``on_ready``, which adds the service's
STATUS line) and writes the process id to ``$BACQ_READY_FILE``, which is how the devstack knows a
service is up, whatever the log level.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from bacq.log import get_logger

__all__ = [
    "READY_FILE_ENV",
    "Notifier",
    "also_ready",
    "on_log_event",
    "on_ready",
    "ready",
    "watchdog_interval",
]

log = get_logger("bacq.sdnotify")
READY_FILE_ENV = "BACQ_READY_FILE"  # a file the service writes its pid to once ready
_on_ready: Callable[[], object] | None = None


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec``), or None when none is asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """Sends notifications to systemd; a no-op when the process is not run by systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` fields (``ready=1`` becomes ``READY=1``); False when not sent."""
        if self._sock is None:
            return False
        payload = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            # never block the service: a reader that stopped reading loses notifications
            self._sock.sendto(payload.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:  # systemd gone or socket unreachable: never fatal to the service
            log.warning("sdnotify.failed", error=str(exc))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        fields: dict[str, str | int] = {"ready": 1, "mainpid": os.getpid()}
        if status:
            fields["status"] = status
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        return self.notify(status=text.replace("\n", " "))

    def stopping(self, status: str = "") -> bool:
        fields: dict[str, str | int] = {"stopping": 1}
        if status:
            fields["status"] = status
        return self.notify(**fields)

    def watchdog(self) -> bool:
        return self.notify(watchdog=1)

    async def keepalive(
        self, status: Callable[[], str] | None = None, *, interval: float | None = None
    ) -> None:
        """Ping the watchdog and refresh STATUS from the event loop until cancelled.

        The pings come from this coroutine, so a blocked event loop stops them and systemd
        restarts the service (``WatchdogSec``). STATUS is refreshed every ``interval`` (default:
        the watchdog interval, else 5 s).
        """
        ping = watchdog_interval()
        every = interval or (min(ping, 5.0) if ping else 5.0)
        last = ""
        while True:
            if ping:
                self.watchdog()
            if status is not None:
                text = status()
                if text != last:
                    self.status(text)
                    last = text
            await asyncio.sleep(every)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def on_ready(callback: Callable[[], object] | None) -> None:
    """``ready()`` calls ``callback`` (instead of sending READY=1 itself); None removes it.

    ``bacq.cli`` registers one that sends READY=1 with the service's STATUS line."""
    global _on_ready
    _on_ready = callback


def ready(status: str = "") -> None:
    """The service is connected and subscribed: tell whoever started it (``$BACQ_READY_FILE``
    gets this process's id), then systemd (READY=1). Never fails the service."""
    path = os.environ.get(READY_FILE_ENV)
    if path:
        try:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            os.replace(tmp, path)  # whole or absent: the reader never sees half a pid
        except OSError as exc:
            log.warning("ready_file.failed", path=path, error=str(exc))
    if _on_ready is not None:
        _on_ready()
    else:
        notifier = Notifier()
        notifier.ready(status)
        notifier.close()


def also_ready(callback: Callable[[], object]) -> Callable[[], None]:
    """``callback``, then ``ready()``: for a hook that says the service is ready (a standby)."""

    def both() -> None:
        callback()
        ready()

    return both


def on_log_event(event: str, callback: Callable[[], object]) -> None:
    """Call ``callback`` whenever a log line with this ``event`` is emitted, before it is rendered.

    ``service.ready`` is no longer a log line that readiness hangs on (a service run with
    ``BACQ_LOG_LEVEL=WARNING`` never logs it): for that event this registers ``callback`` with
    ``on_ready``, which the services' explicit ``ready()`` calls. Kept for ``bacq.cli``; new code
    calls ``on_ready``.
    """
    if event == "service.ready":
        on_ready(callback)
        return

    def hook(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event_dict.get("event") == event:
            callback()
        return event_dict

    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[hook, *processors])
