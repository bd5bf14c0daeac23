"""Minimal sd_notify(3): READY=1, STATUS=..., WATCHDOG=1 over $NOTIFY_SOCKET.

Runs in the daemon. Every call is a no-op when ``NOTIFY_SOCKET`` is unset (not under
systemd), and a failure to send is logged once, never raised: readiness reporting must not
take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self.address = address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 else 0.0
        if pid and pid != str(os.getpid()):
            self.watchdog_s = 0.0  # the watchdog is meant for another process
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify failed socket=%r error=%s", self.address, exc)
                self._warned = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
