"""mkiso's hold on waitress: everything it uses beyond waitress's public API, here and only here.

waitress's public API serves a WSGI app; mkiso needs four things more, and
each reaches into waitress's own classes:

- ``SendfileChannel``: file-backed bodies sent with ``sendfile`` (SPEC §8).
  waitress sends a ``wsgi.file_wrapper`` body by reading it into Python
  buffers, a block at a time, and ``send``-ing those: every byte of a 4 GB
  ISO crosses into user space twice.  This channel hands the ISO's file
  descriptor to the kernel instead, from the file's position, never past
  the answer's length.  Its flush loop is waitress's own ``_flush_some``
  (the same in 2.1, as in Debian 12, and in 3.x) with one more branch: a
  file buffer is sent by the kernel and then advanced through waitress's
  own ``skip``, so the buffer's ``remain``, the file position and the
  channel's byte counts stay exactly as waitress keeps them.  An ISO still
  being written (``delivery.RemovedOnClose``, asked by the names its class
  documents) is sent up to what the file holds; with nothing more to send
  yet the channel is not writable, and the build wakes the loop
  (``pull_trigger``) as the file grows.  A build that failed closes the
  connection: the answer ends short.  A ZIP's body is no one file: the
  channel asks the body for its next ``extent``, a range of a staged file
  (sendfile) or a header from memory (``send`` with MSG_MORE, so that it
  shares a packet with the file's first bytes).
- ``JsonErrorTask``: a request waitress refuses itself (a body over its
  limit: 413; a malformed request: 400) is answered in JSON, as every other
  error of SPEC §2, never having reached the application.
- ``Pools``: the cheap open paths get a thread pool of their own, chosen by
  the path of the connection's parsed request (``channel.requests``).
- ``turn``, ``stop_accepting``, ``busy``: the server's loop run a slice at a
  time, so that a signal stops accepting at once and running answers may
  finish.

``missing`` lists the names these rely on that the installed waitress
lacks; ``adapt`` installs the channel and the pools only when none is
missing, and otherwise keeps waitress's stock channel and one pool, with a
warning naming what is missing: ISOs are then read through Python (an ISO
still being written is read as it grows), never a crash.  The tests check
``missing`` is empty under both waitress versions mkiso runs on.
"""

import errno
import io
import json
import logging
import os
import socket
import time
import uuid

from waitress import wasyncore
from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from .delivery import RemovedOnClose
from .responses import JSON_TYPE

log = logging.getLogger(__name__)

CHUNK = 1 << 30  # bytes asked of the kernel per call; it sends what the socket takes
_GONE = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED}


def _file_descriptor(outbuf):
    if not isinstance(outbuf, ReadOnlyFileBasedBuffer):
        return None
    try:
        return outbuf.file.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _body(outbuf):
    """The ISO answer (delivery.RemovedOnClose) this buffer sends, if it sends one."""
    body = getattr(outbuf, "file", None) if isinstance(outbuf, ReadOnlyFileBasedBuffer) else None
    return body if isinstance(body, RemovedOnClose) else None


class JsonErrorTask(ErrorTask):
    """waitress's answer to a request it refused, as the JSON error body of SPEC §2."""

    CODES = {413: "body_too_large", 431: "headers_too_large"}

    def execute(self):
        error = self.request.error
        self.status = "%d %s" % (error.code, error.reason)
        message = "The request body is larger than %d bytes." % self.channel.adj.max_request_body_size \
            if error.code == 413 else "The request could not be read: %s." % error.reason.lower()
        request_id = uuid.uuid4().hex
        body = json.dumps({"error": message, "code": self.CODES.get(error.code, "bad_request"),
                           "request_id": request_id}).encode("utf-8")
        self.response_headers.extend([("Content-Type", JSON_TYPE), ("X-Request-ID", request_id),
                                      ("Connection", "close")])
        self.close_on_finish = True  # the rest of the request is never read
        self.content_length = len(body)
        self.write(body)


class SendfileChannel(HTTPChannel):
    error_task_class = JsonErrorTask

    def writable(self):
        """waitress's, but not while the next bytes to send are not yet written."""
        if self.will_close or self.close_when_flushed:
            return True
        if not self.total_outbufs_len:
            return False
        head = next((outbuf for outbuf in list(self.outbufs) if len(outbuf)), None)
        return head is None or not self._waiting(head)

    def _waiting(self, outbuf):
        """Whether the next byte of ``outbuf`` is not yet written.

        Asked by the loop thread without the outbuf lock, while a task thread
        may be sending (and closing) this buffer: so no call on its file,
        only numbers; a stale one at worst costs one needless write event.
        """
        body = _body(outbuf)
        if body is None:
            return False
        body.sent_by(self.hang_up, self.server.pull_trigger)  # before looking: growth after the look wakes the loop
        return body.waiting(body.end - outbuf.remain)

    def _flush_some(self, do_close=True):
        """waitress's flush loop, with file buffers sent by the kernel."""
        sent = 0
        dobreak = False
        while True:
            outbuf = self.outbufs[0]
            outbuflen = outbuf.__len__()
            by_kernel = _body(outbuf) is not None or _file_descriptor(outbuf) is not None
            if by_kernel and self._cut(outbuf):
                return False
            while outbuflen > 0:
                if not by_kernel:
                    num_sent = self.send(outbuf.get(self.sendbuf_len), do_close=do_close)
                else:
                    num_sent = self._sendfile(outbuf, do_close)
                if num_sent:
                    outbuf.skip(num_sent, True)
                    outbuflen -= num_sent
                    sent += num_sent
                    self.total_outbufs_len -= num_sent
                else:
                    dobreak = True  # the socket is full (or gone): wait for the next writable
                    break
            else:
                if len(self.outbufs) > 1:  # the last outbuf must stay, writable
                    done = self.outbufs.pop(0)
                    try:
                        done.close()
                    except Exception:
                        self.logger.exception("Unexpected error when closing an outbuf")
                else:
                    dobreak = True
            if dobreak:
                break
        if sent:
            self.last_activity = time.time()
            return True
        return False

    def hang_up(self):
        """End this connection from another thread: shut down, it is closed from the server's loop."""
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # gone already
        self.server.pull_trigger()

    def _cut(self, outbuf):
        """Whether the body was cut off (delivery.Pending); it is told this connection, to cut it later."""
        body = _body(outbuf)
        if body is None:
            return False
        if body.cut_off:
            self.handle_close()
            return True
        body.sent_by(self.hang_up, self.server.pull_trigger)
        return False

    def _sendfile(self, outbuf, do_close):
        """As wasyncore's ``send``: the bytes sent, 0 when the socket is full, the client gone, or the
        file not yet written that far."""
        position = outbuf.file.tell()
        body = _body(outbuf)
        if body is not None and body.failed:
            if do_close:
                self.handle_close()
            return 0
        count = min(outbuf.remain, CHUNK)
        if body is None:
            extent = (outbuf.file.fileno(), position, count)
        else:
            count = body.sendable(position, count)
            if count <= 0:
                return 0
            extent = body.extent(position, count)
        try:
            if isinstance(extent, bytes):  # a ZIP's header: the file's bytes follow
                return self.socket.send(extent, socket.MSG_MORE)
            return os.sendfile(self.socket.fileno(), *extent)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            if do_close:
                self.handle_close()
            return 0


class Pools:
    """waitress's task dispatcher, with the cheap open paths sent to a small pool of their own.

    Each task is a connection with its next request parsed; the path of
    that request picks the pool, so a keep-alive connection's next request
    may go to the other one.
    """

    def __init__(self, main, cheap_paths, cheap_threads):
        self.main = main
        self.cheap_paths = cheap_paths
        self.cheap = ThreadedTaskDispatcher()
        self.cheap.set_thread_count(cheap_threads)

    def add_task(self, channel):
        request = channel.requests[0] if channel.requests else None
        cheap = request is not None and request.error is None and request.command in ("GET", "HEAD") \
            and request.path in self.cheap_paths
        (self.cheap if cheap else self.main).add_task(channel)

    def set_thread_count(self, count):
        self.main.set_thread_count(count)

    def shutdown(self, cancel_pending=True, timeout=5):
        cheap = self.cheap.shutdown(cancel_pending, timeout)
        return self.main.shutdown(cancel_pending, timeout) and cheap


# -- the names relied on ------------------------------------------------------

CHANNEL_NAMES = ("_flush_some", "writable", "send", "handle_close", "error_task_class", "outbufs",
                 "total_outbufs_len", "sendbuf_len", "will_close", "close_when_flushed", "last_activity",
                 "requests", "server", "socket", "logger", "adj")
BUFFER_NAMES = ("file", "remain", "skip", "get")
ERROR_TASK_NAMES = ("execute", "write", "status", "response_headers", "close_on_finish", "content_length",
                    "request", "channel")
REQUEST_NAMES = ("error", "command", "path")
SERVER_NAMES = ("channel_class", "task_dispatcher", "active_channels", "pull_trigger", "accepting",
                "del_channel", "socket")
DISPATCHER_NAMES = ("add_task", "set_thread_count", "shutdown")


def missing(server):
    """The names this module uses that the installed waitress lacks ("HTTPChannel.outbufs", ...).

    Asked of real objects: ``server`` itself, and a channel, an error
    task and a file buffer made for the purpose over a socket pair (the
    channel in a map of its own, closed at once).
    """
    absent = ["server." + name for name in SERVER_NAMES if not hasattr(server, name)]
    absent += ["ThreadedTaskDispatcher." + name for name in DISPATCHER_NAMES
               if not hasattr(ThreadedTaskDispatcher, name)]
    absent += ["wasyncore.loop"] * (not hasattr(wasyncore, "loop"))
    ours, theirs = socket.socketpair()
    try:
        channel = HTTPChannel(server, ours, ("127.0.0.1", 0), server.adj, map={})
        try:
            absent += ["HTTPChannel." + name for name in CHANNEL_NAMES if not hasattr(channel, name)]
            request = channel.parser_class(server.adj)
            request.received(b"GET /api/health HTTP/1.0\r\n\r\n")
            absent += ["HTTPRequestParser." + name for name in REQUEST_NAMES if not hasattr(request, name)]
            task = ErrorTask(channel, request)
            absent += ["ErrorTask." + name for name in ERROR_TASK_NAMES if not hasattr(task, name)]
        finally:
            channel.close()
    except Exception as exc:  # a constructor that changed its arguments
        absent.append("HTTPChannel/ErrorTask (%s)" % exc)
    finally:
        ours.close()
        theirs.close()
    buffer = ReadOnlyFileBasedBuffer(io.BytesIO(b""))
    buffer.prepare()
    absent += ["ReadOnlyFileBasedBuffer." + name for name in BUFFER_NAMES if not hasattr(buffer, name)]
    return absent


def adapt(server, cheap_paths, cheap_threads):
    """Give ``server`` the sendfile channel and the cheap paths' pool, if this waitress has every name
    they use; else leave it stock, with a warning.  Returns what is missing (empty: adapted)."""
    absent = missing(server)
    if absent:
        log.warning("this waitress (%s) lacks what mkiso's sendfile channel and thread pools use (%s): ISOs "
                    "are sent through Python, and health shares the download threads", _version(),
                    ", ".join(absent))
        return absent
    server.channel_class = SendfileChannel  # file-backed bodies leave through sendfile
    server.task_dispatcher = Pools(server.task_dispatcher, cheap_paths, cheap_threads)
    return absent


def _version():
    try:
        from importlib.metadata import version
        return version("waitress")
    except Exception:
        return "unknown version"


# -- the loop -------------------------------------------------------------------

def turn(server_map, timeout):
    """One slice of the server's loop over ``server_map`` (the map given to create_server)."""
    wasyncore.loop(timeout=timeout, map=server_map, use_poll=True, count=1)


def stop_accepting(server):
    """No new connection from now on; those open go on."""
    server.accepting = False
    server.del_channel()
    server.socket.close()


def busy(server):
    """Whether any connection still has a request in hand or bytes to send."""
    for channel in list(getattr(server, "active_channels", {}).values()):
        if getattr(channel, "requests", None) or getattr(channel, "total_outbufs_len", 0):
            return True
    return False
