"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``) without a library.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace) and, with a watchdog, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).
A message is one datagram of ``KEY=value`` lines.  Outside systemd nothing
is set and every call here does nothing.
"""

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.address = environ.get("NOTIFY_SOCKET", "")
        if self.address.startswith("@"):
            self.address = "\0" + self.address[1:]
        self.watchdog_s = 0.0
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._last_ping = 0.0

    def send(self, *lines):
        """Send one message; a failure is logged, never raised (systemd may be gone)."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    def ready(self):
        self.send("READY=1", "STATUS=listening")

    def stopping(self):
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self, alive):
        """WATCHDOG=1 at half the watchdog interval, and only while ``alive``."""
        if not self.watchdog_s or not alive:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s / 2:
            self._last_ping = now
            self.send("WATCHDOG=1")
