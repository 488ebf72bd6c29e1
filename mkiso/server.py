"""``mkiso-server``: command line, waitress, signals.

The main loop is waitress's own asyncore loop, run a slice at a time so that
SIGTERM/SIGINT can stop accepting at once, let running requests finish up to
``timeouts.shutdown_s``, and then take the children and temp files down.

The cheap open paths (``/api/health``, ``/metrics``) are served by a small
pool of their own (``waitress_adapter.Pools``): a flood of them queues
there, never in front of a download.  What mkiso uses of waitress beyond
its public API is all in ``waitress_adapter``.  A request body over ``application.MAX_BODY`` is refused by waitress
with 413 from its Content-Length, before a byte of it is read or spooled.

Under systemd (``Type=notify``) it says READY=1 once listening, WATCHDOG=1
from that loop while the loop turns and the receiver is alive (down for
less than the watchdog interval), and STOPPING=1 on the way out.
"""

import argparse
import logging
import os
import signal
import sys
import time

from waitress.server import create_server

from . import __version__, config as configuration, jobs, logs, unit
from .http import application, waitress_adapter
from .service import Service
from .systemd import Notifier

log = logging.getLogger(__name__)

CHEAP_PATHS = ("/api/health", "/metrics")
CHEAP_THREADS = 2
CONNECTIONS = 500  # waitress's default 100 let 99 idle connections stop every answer; each costs one fd


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="mkiso-server", description="Patient CD/DVD service for a PACS.")
    parser.add_argument("--config", metavar="PATH", help="YAML configuration (default: $MKISO_CONFIG, else "
                        "./config.yaml where it exists, else %s)" % configuration.INSTALLED_CONFIG)
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration as the installed service would run it, and exit")
    parser.add_argument("--version", action="version", version="mkiso " + __version__)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    path = configuration.config_path(args.config)
    try:
        config = configuration.load(path)
        configuration.check_system(config)
        checked = unit.check(config) if args.check_config else None
    except configuration.ConfigError as exc:
        print("mkiso: configuration error: %s" % exc, file=sys.stderr)
        return 2
    if args.check_config:
        for warning in configuration.unresolved_hosts(config):
            print("mkiso: warning: %s" % warning, file=sys.stderr)
        print("mkiso: configuration %s is valid (checked %s)" % (path, checked))
        return 0
    logs.setup(config.logging.level, config.logging.format)
    os.umask(0o077)  # temp files and ISOs hold patient data
    jobs.limit_arenas()  # before the threads: see jobs.release_heap
    return Server(config).run()


class Server:
    def __init__(self, config):
        self.config = config
        self.service = Service(config)
        self.stop_requested = None
        self.systemd = Notifier()

    def run(self):
        try:
            self.service.start()
        except Exception:
            log.exception("start-up failed; nothing is left running")
            self.service.stop()
            return 1
        if self.service.receiver is not None and not self.service.receiver.wait_ready():
            log.warning("the receiver is not listening yet; health will say why")
        try:
            server, server_map = listen(application.Application(self.config, self.service), self.config.server.host,
                                        self.config.server.port, self.config.server.threads)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", self.config.server.host, self.config.server.port, exc.strerror)
            self.service.stop()
            return 1
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request_stop)
        log.info("listening", extra={"fields": {
            "url": "http://%s:%s/" % (server.effective_host, server.effective_port), "version": __version__}})
        self.systemd.ready()
        try:
            self._loop(server, server_map)
        finally:
            server.task_dispatcher.shutdown(timeout=1)
            self.service.stop()
        log.info("stopped")
        return 0

    def _request_stop(self, signum, frame):
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})

    def _loop(self, server, server_map):
        accepting = True
        while True:
            waitress_adapter.turn(server_map, 0.2)
            if self.stop_requested is None:
                self.systemd.watchdog(self._alive())
                continue
            if accepting:
                self.systemd.stopping()
                waitress_adapter.stop_accepting(server)
                accepting = False
            waited = time.monotonic() - self.stop_requested
            if not waitress_adapter.busy(server) or waited >= self.config.timeouts.shutdown_s:
                return


    def _alive(self):
        receiver = self.service.receiver
        return receiver is None or receiver.down_seconds() < self.systemd.watchdog_s


def listen(app, host, port, threads):
    """(the waitress server for ``app``, the map its loop turns): ``threads`` workers (and one per event
    stream), the cheap paths' own pool, file bodies through sendfile, bodies over application.MAX_BODY refused
    unread."""
    server_map = {}
    server = create_server(
        app, map=server_map, host=host, port=port,
        threads=threads + application.EVENT_STREAMS,  # event streams hold a thread each
        ident="mkiso",
        clear_untrusted_proxy_headers=False,  # X-Forwarded-For: web trusts server.trusted_proxies only
        max_request_body_size=application.MAX_BODY,
        channel_request_lookahead=1,  # a connection stays read while its request runs: a client gone shows
        connection_limit=CONNECTIONS,
        asyncore_use_poll=True,  # select() cannot watch a descriptor above 1023
    )
    if waitress_adapter.adapt(server, CHEAP_PATHS, CHEAP_THREADS) and isinstance(app, application.Application):
        app.stream_isos = False  # waitress's stock channel: each ISO is written whole before it is sent
    return server, server_map

