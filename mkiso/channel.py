"""A waitress channel that sends file-backed bodies with ``sendfile`` (SPEC §8).

waitress sends a ``wsgi.file_wrapper`` body by reading it into Python
buffers, a block at a time, and ``send``-ing those: every byte of a 4 GB
ISO crosses into user space twice.  This channel hands such a body to the
kernel instead: ``os.sendfile`` from the ISO's file descriptor straight to
the socket, from the file's position, never past the answer's length.

Its flush loop is waitress's own (the same in 2.1, as in Debian 12, and in
3.x) with one more branch: a file buffer is sent by the kernel and then
advanced through waitress's own ``skip``, so the buffer's ``remain``, the
file position and the channel's byte counts stay exactly as waitress keeps
them.  Everything else (headers, JSON, a body without a real file
descriptor) is sent as waitress sends it.

A request waitress refuses itself (a body over its limit: 413; a malformed
request: 400) is answered as every other error of SPEC §2, in JSON, never
having reached the application.

An ISO still being written (the body's ``build``) is sent up to what the
file holds; with nothing more to send yet the channel is not writable, and
the build wakes the server's loop (``pull_trigger``) as the file grows.  A
build that failed closes the connection: the answer ends short.
"""

import errno
import io
import json
import os
import time
import uuid

from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from .responses import JSON_TYPE

CHUNK = 1 << 30  # bytes asked of the kernel per call; it sends what the socket takes
_GONE = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED}


def _file_descriptor(outbuf):
    if not isinstance(outbuf, ReadOnlyFileBasedBuffer):
        return None
    try:
        return outbuf.file.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _build(outbuf):
    """The build still writing this buffer's file, if any."""
    return getattr(getattr(outbuf, "file", None), "build", None)


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
        build = _build(outbuf)
        if build is None:
            return False
        build.wake = self.server.pull_trigger  # before looking: growth after the look wakes the loop
        return build.error is None and build.written <= outbuf.file.end - outbuf.remain

    def _flush_some(self, do_close=True):
        """waitress's flush loop, with file buffers sent by the kernel."""
        sent = 0
        dobreak = False
        while True:
            outbuf = self.outbufs[0]
            outbuflen = outbuf.__len__()
            fd = _file_descriptor(outbuf)
            if fd is not None and self._cut(outbuf):
                return False
            while outbuflen > 0:
                if fd is None:
                    num_sent = self.send(outbuf.get(self.sendbuf_len), do_close=do_close)
                else:
                    num_sent = self._sendfile(outbuf, fd, do_close)
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

    def _cut(self, outbuf):
        """Whether the body was cut off (delivery.Pending); it is told this connection, to cut it later."""
        body = outbuf.file
        if getattr(body, "cut_off", False):
            self.handle_close()
            return True
        if hasattr(body, "channel"):
            body.channel = self
        return False

    def _sendfile(self, outbuf, fd, do_close):
        """As wasyncore's ``send``: the bytes sent, 0 when the socket is full, the client gone, or the
        file not yet written that far."""
        position = outbuf.file.tell()
        count = min(outbuf.remain, CHUNK)
        build = _build(outbuf)
        if build is not None:
            if build.error is not None:
                if do_close:
                    self.handle_close()
                return 0
            count = min(count, build.written - position)
            if count <= 0:
                return 0
        try:
            return os.sendfile(self.socket.fileno(), fd, position, count)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            if do_close:
                self.handle_close()
            return 0
