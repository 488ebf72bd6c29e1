"""Logging to stderr for journald, as key=value text or one JSON object a line.

Callers pass structured fields with ``extra={"fields": {...}}``; both
formats render them.  Patient names and IDs are never given as fields at
INFO: accession numbers and request ids are what an operator searches by.
"""

import json
import logging
import sys
import time

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _quote(value):
    """A field value for a text line; anything unprintable (C1, U+2028 ...) is \\u-escaped."""
    text = str(value)
    if not text.isprintable():
        return json.dumps(text)
    if text == "" or any(c in text for c in ' "=\\'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _timestamp(record):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".%03dZ" % record.msecs


class TextFormatter(logging.Formatter):
    def format(self, record):
        parts = [_timestamp(record), "level=" + record.levelname, "logger=" + record.name]
        parts.append("msg=" + _quote(record.getMessage()))
        for key, value in getattr(record, "fields", {}).items():
            parts.append("%s=%s" % (key, _quote(value)))
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False, default=str)
        return line if line.isprintable() else json.dumps(entry, default=str)  # no raw C1 or U+2028


class Stopwatch:
    """Milliseconds per phase of a piece of work, as log fields (``find_ms=...``).

    They end up on the line that closes the work; the benchmark reads its
    phase split from there.  ``on_lap(phase, seconds)``, if given, is told
    each lap as it ends (the metrics' phase histograms): one clock for both.
    """

    def __init__(self, on_lap=None):
        self.fields = {}
        self._on_lap = on_lap
        self._last = time.monotonic()

    def lap(self, phase):
        """The time since the last lap goes to ``phase`` (added up when a phase comes again, disc by disc)."""
        now = time.monotonic()
        key = phase + "_ms"
        self.fields[key] = self.fields.get(key, 0) + int((now - self._last) * 1000)
        if self._on_lap is not None:
            self._on_lap(phase, now - self._last)
        self._last = now


def setup(level="info", fmt="text", stream=None):
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # waitress logs every queue-depth warning at WARNING; keep it, but not its INFO chatter.
    logging.getLogger("waitress").setLevel(max(LEVELS[level], logging.WARNING))
