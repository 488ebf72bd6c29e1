"""The WSGI application: a hand-written routing table and one error funnel.

Routes map a path (or, for a job's own paths, a pattern) to a handler and
the methods it takes; the legacy PHP URLs the HIS still calls are declared
beside the route they stand for.  Every download or print is a job
(``jobs``): the synchronous endpoints run theirs in the request.
Every response carries X-Request-ID (and ``nosniff``, ``no-referrer``) and
produces one access-log line; every exception becomes the JSON error body
of SPEC §2 in ``_error``.  Before any handler runs, ``origins`` refuses a
request to a host name that is not ours or from another web page (SPEC §9).
"""

import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from urllib.parse import parse_qs

from .. import accessions, audit, errors, metrics
from . import auth, delivery, origins
from .lookups import Lookups
from ..jobs import Job, State
from .responses import Response

log = logging.getLogger(__name__)
access_log = logging.getLogger("mkiso.access")

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_BODY = 64 * 1024  # larger bodies: 413, refused unread by waitress (server.listen)
MAX_NESTING = 16  # a job's body nests 2 deep; deeper is refused before the parser recurses
JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[][{}]')
EVENT_STREAMS = 32  # the server runs this many threads more than server.threads, for them
STREAMS_PER_CALLER = 8  # of those, per caller (key name) and address: twenty clerks' pages fit, no one takes all
STREAM_TICK_S = 0.5  # how often a stream looks whether its client is still there
KEEPALIVE_S = 15
HERE = os.path.dirname(os.path.abspath(__file__))
DESK_PAGE = os.path.join(HERE, "desk.html")
DESK_SCRIPT = os.path.join(HERE, "desk.js")  # at desk.js beside the page: /desk.js, behind nginx /mkiso/desk.js
EVERY_ANSWER = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]


def page_headers(page):
    """The desk page's headers: its script only from its own file, its one style block only by hash."""
    style = page.split(b"<style>", 1)[1].split(b"</style>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(style).digest()).decode("ascii")
    return [
        ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'sha256-%s'; "
                                    "connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'; "
                                    "base-uri 'none'" % digest),
        ("X-Frame-Options", "DENY"), ("Cache-Control", "no-cache"),
    ]

def _static(path, content_type, headers_of):
    """A file of the package as the answer, with the headers ``headers_of(its bytes)`` adds."""
    with open(path, "rb") as handle:
        data = handle.read()
    headers = [("Content-Type", content_type), ("Content-Length", str(len(data)))] + headers_of(data)
    return Response(200, headers, [data], len(data))


REASONS = {
    200: "OK", 202: "Accepted", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
    415: "Unsupported Media Type", 416: "Range Not Satisfiable", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 507: "Insufficient Storage",
}


FORMATS = ("iso", "zip")  # a download's medium (SPEC §13)


class Route:
    """A path's handler (a method name of Application), its methods and aliases.

    ``page``: the desk page and its script, which any web page may link to
    (GET/HEAD even with a foreign Origin).
    """

    def __init__(self, handler, methods=("GET",), legacy=(), open_access=False, token_access=False, page=False):
        self.handler = handler
        self.methods = tuple(methods) + (("HEAD",) if "GET" in methods else ())
        self.legacy = legacy
        self.open_access = open_access
        self.token_access = token_access  # the job's download token will do instead of the key
        self.page = page


ROUTES = {
    "/": Route("desk_page", open_access=True, page=True),
    "/desk.js": Route("desk_script", open_access=True, page=True),
    "/api/health": Route("health", open_access=True),
    "/api/desk": Route("desk_settings", open_access=True),
    "/metrics": Route("metrics_text", open_access=True),
    "/api/iso/download": Route("download", legacy=("/mkiso.php", "/mkiso2.php")),
    "/api/iso/download-multiple": Route("download_multiple", legacy=("/mkiso_multiple.php",)),
    "/api/iso/print": Route("print_studies", legacy=("/send_rimage_multiple.php",)),
    "/api/jobs": Route("jobs", methods=("GET", "POST")),
    "/api/studies": Route("studies"),
}

JOB_ID = r"(?P<job_id>[0-9a-f]{32})"
PATTERN_ROUTES = [
    (re.compile("^/api/jobs/%s$" % JOB_ID), Route("job", methods=("GET", "DELETE"))),
    (re.compile("^/api/jobs/%s/events$" % JOB_ID), Route("job_events")),
    (re.compile("^/api/jobs/%s/(?P<format>iso|zip)$" % JOB_ID), Route("job_iso", token_access=True)),
    (re.compile("^/api/jobs/%s/discs/(?P<number>[1-9][0-9]{0,3})/(?P<format>iso|zip)$" % JOB_ID),
     Route("job_iso", token_access=True)),
]


def _route_table(routes):
    table = {}
    for path, route in routes.items():
        table[path] = route
        for alias in route.legacy:
            table[alias] = route
    return table


class Request:
    """The parts of a WSGI environ a handler needs."""

    def __init__(self, environ):
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        self.path = environ.get("PATH_INFO", "") or "/"
        # Invalid UTF-8 stays visible (surrogate-escaped) for the checks to refuse and show escaped.
        self.query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True, errors="surrogateescape")
        given = environ.get("HTTP_X_REQUEST_ID", "")
        self.request_id = given if SANE_REQUEST_ID.match(given) else uuid.uuid4().hex
        self.accessions = []  # filled by handlers that take them, for the access log
        self.authorized = False  # set by the application from X-API-Key
        self.caller = None  # the name of the caller's key, for the audit trail
        self.match = {}  # what a pattern route matched (the job id)
        self.export = None  # a synchronous download's, audited when its answer ends
        self.code = None  # the error code answered, if any

    def param(self, name):
        """One query parameter's value, or None; given twice is an error."""
        values = self.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise errors.BadRequest("The parameter %s was given more than once." % name)
        return values[0]

    def header(self, name):
        return self.environ.get("HTTP_" + name.upper().replace("-", "_"))


class Application:
    def __init__(self, config, service):
        self.config = config
        self.service = service
        self.routes = _route_table(ROUTES)
        self.keys = auth.Keys(config.auth)
        self.origins = origins.Origins(config.server)
        self._streams = collections.Counter()  # (caller, address) -> open event streams
        self._streams_lock = threading.Lock()
        self.lookups = Lookups(config.limits.max_jobs)
        # An ISO's answer starts while genisoimage writes it only through mkiso's sendfile channel: waitress's
        # stock one would wait for the bytes in its loop thread (server.listen says when it serves).
        self.stream_isos = True

    def __call__(self, environ, start_response):
        started = time.monotonic()
        request = Request(environ)
        try:
            response = self._dispatch(request)
        except errors.MkisoError as exc:
            response = self._error(request, exc)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request.request_id}})
            response = self._error(request, errors.MkisoError(
                "An internal error occurred; the server log has the details under this request id."))
        response.headers += [("X-Request-ID", request.request_id)] + EVERY_ANSWER
        start_response("%d %s" % (response.status, REASONS.get(response.status, "")), response.headers)
        if request.method == "HEAD":
            if hasattr(response.body, "close"):
                response.body.close()
            self._log_access(request, response, started, 0)
            return []
        if response.closer is not None:  # logged when sending ends, with what really went out (a stream too)
            sending = time.monotonic()
            response.closer.on_close = lambda sent: self._sent(request, response, started, sending, sent)
        else:
            self._answered(request, response, started, response.length)
        return response.body

    def _dispatch(self, request):
        self.origins.check_host(request)
        route = self._route(request)
        self.origins.check_origin(request, route.page)
        if request.method not in route.methods:
            raise errors.MethodNotAllowed(request.method, route.methods)
        known, request.caller = self.keys.identify(request.header("X-API-Key"))
        request.authorized = self.keys.allows(known)
        if not (route.open_access or route.token_access or request.authorized):
            raise errors.Unauthorized("A valid X-API-Key header is required.")
        return getattr(self, route.handler)(request)

    def _route(self, request):
        route = self.routes.get(request.path)
        if route is not None:
            return route
        for pattern, route in PATTERN_ROUTES:
            match = pattern.match(request.path)
            if match:
                request.match = match.groupdict()
                return route
        raise errors.NotFound("There is nothing at %s." % request.path)

    def _error(self, request, exc):
        request.code = exc.code
        payload = dict(exc.details, error=exc.message, code=exc.code, request_id=request.request_id)
        if exc.status >= 500:
            log.warning("%s", exc.message, extra={"fields": {"request_id": request.request_id, "status": exc.status}})
        return Response.json(exc.status, payload, exc.headers)

    def _sent(self, request, response, started, sending, sent):
        """An answer sent after its handler returned has ended: a disc's metrics (the ``send`` phase, the
        bytes; an event stream, of no length, is no disc), then as every answer."""
        if response.length is not None:
            self.service.metrics.phase("send", time.monotonic() - sending)
            self.service.metrics.sent("client", sent)
        self._answered(request, response, started, sent)

    def _answered(self, request, response, started, sent):
        """The answer has ended: a synchronous download's audit line (what was really answered and
        sent, SPEC §11), then the access log line."""
        export = request.export
        if export is not None and not export.recorded:
            export.bytes = sent if response.closer is not None else 0  # of the ISO, not of an error body
            export.complete = sent == response.length
            try:
                self.service.audit.record(export, response.status, request.code)
            except errors.MkisoError:
                pass  # logged: the answer has gone already
        self._log_access(request, response, started, sent)

    def _log_access(self, request, response, started, sent):
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes": sent,
            "duration_ms": int((time.monotonic() - started) * 1000),
            "request_id": request.request_id,
        }
        if response.closer is not None and response.length is not None and request.method != "HEAD":
            fields["complete"] = "true" if sent == response.length else "false"
        if request.accessions:
            fields["accessions"] = ",".join(request.accessions)
        access_log.info("request", extra={"fields": fields})

    # -- handlers ---------------------------------------------------------

    def health(self, request):
        strict = request.param("strict")
        if strict not in (None, "", "0", "1"):
            raise errors.BadRequest("strict must be 0 or 1.")
        report = self.service.health.report(detailed=request.authorized)
        degraded = report["status"] != "ok"
        return Response.json(503 if degraded and strict == "1" else 200, report)

    def metrics_text(self, request):
        """Prometheus' text format (SPEC §12); 404 with metrics.enabled false."""
        if not self.config.metrics.enabled:
            raise errors.NotFound("There is nothing at /metrics (metrics.enabled is false).")
        text = self.service.metrics.exposition()
        return Response(200, [("Content-Type", metrics.CONTENT_TYPE), ("Content-Length", str(len(text)))],
                        [text], len(text))

    def desk_page(self, request):
        return _static(DESK_PAGE, "text/html; charset=utf-8", page_headers)

    def desk_script(self, request):
        return _static(DESK_SCRIPT, "text/javascript; charset=utf-8", lambda script: [("Cache-Control", "no-cache")])

    def desk_settings(self, request):
        """What the desk page must know before the clerk types: whether to offer printing and ZIPs, whether
        to ask for a key.  Open, like health: none says more than the page itself would find out."""
        return Response.json(200, {"printing": self.service.publisher is not None, "zip": self.config.zip.enabled,
                                   "key_required": self.keys.enabled})

    # -- synchronous: a job the request waits for ---------------------------

    def download(self, request):
        wanted = self._accessions(request, ("accession_number",), several=False)
        return self._iso_answer(request, wanted, named_by_patient=False)

    def download_multiple(self, request):
        wanted = self._accessions(request, ("accession_numbers", "accession_number"), several=True)
        return self._iso_answer(request, wanted, named_by_patient=True)

    def _format(self, given):
        """The medium asked for (the ``format`` parameter or the body's key): iso (the default) or zip."""
        if given is None:
            return "iso"
        if given not in FORMATS:
            raise errors.BadRequest("The parameter format must be iso or zip.", code="bad_format")
        if given == "zip" and not self.config.zip.enabled:
            raise errors.BadRequest("ZIP downloads are turned off here (zip.enabled is false); ask for the ISO.",
                                    code="zip_disabled")
        return given

    def _iso_answer(self, request, wanted, named_by_patient):
        """The ISO itself, or behind nginx (server.x_accel_prefix) a redirect for nginx to send it.

        A HEAD answered here needs the size only, so the ISO is not written;
        nothing is exported, but the PACS was asked and its answer shown (the
        file name may be the patient's): a ``query`` line, as a lookup has.
        """
        server = self.config.server
        head = request.method == "HEAD"
        medium = self._format(request.param("format")) if request.path in ROUTES else "iso"  # legacy: ISO
        # sent while written, if the channel can (nginx needs it whole)
        stream = self.stream_isos and not head and not server.x_accel_prefix
        job = self._new_job(request, "download", wanted, named_by_patient, stream=stream, format=medium)
        job.export.deferred = stream  # audited when its answer ends; nginx's is audited when handed over
        if head:
            job.export.action, job.export.format = "query", None
        elif server.x_accel_prefix:
            job.export.handed_to = "nginx"
        iso = self.service.jobs.run(job, build=not head or bool(server.x_accel_prefix))
        if job.export.deferred:
            request.export = job.export
        return self._send(request, iso, synchronous=True)

    def _send(self, request, iso, synchronous):
        """The ISO as the answer, or behind nginx (server.x_accel_prefix) a redirect for nginx to send it.

        A synchronous download's ISO goes when its answer ends (behind
        nginx: after server.x_accel_keep_s); a job's stays until the job
        expires.
        """
        server = self.config.server
        if server.x_accel_prefix:
            return delivery.accel_response(iso, server.x_accel_prefix, self.config.paths.work_dir,
                                           server.x_accel_keep_s if synchronous else None)
        if synchronous:
            return delivery.iso_response(request.environ, iso, pending=self.service.pending)
        return delivery.iso_response(request.environ, iso, remove=False)

    def print_studies(self, request):
        wanted = self._accessions(request, ("accession_number", "accession_numbers"), several=True)
        job = self._new_job(request, "print", wanted)
        return Response.json(200, self.service.jobs.run(job))

    def _new_job(self, request, action, wanted, named_by_patient=False, format="iso", **asked):
        """The job of this request; ``asked``: its other settings (``split``, ``stream``), see jobs.Job."""
        return Job(action, wanted, self._export(request, action, wanted, format), named_by_patient=named_by_patient,
                   format=format, **asked)

    def _export(self, request, action, wanted, format="iso"):
        """The audit record of what the request hands out (a download's ``format``: iso or zip)."""
        return audit.Export(action, request.request_id,
                            audit.client_address(request.environ, self.config.server.trusted_proxies),
                            request.caller, accessions=wanted, format=format if action == "download" else None,
                            media=self.config.iso.media)

    # -- jobs (SPEC §9) --------------------------------------------------------

    def jobs(self, request):
        jobs = self.service.jobs
        if request.method != "POST":
            return Response.json(200, {"jobs": [self._job_view(request, job, listed=True) for job in jobs.recent()
                                                if self.keys.sees(request.caller, job.caller)]})
        body = self._json_body(request)
        action = body.get("action", "download")
        if action not in ("download", "print"):
            raise errors.BadRequest("action must be download or print.")
        if action == "print":
            self.service.steps.require_publisher()
        given = body.get("accessions")
        if not isinstance(given, list) or not all(isinstance(item, str) for item in given):
            raise errors.BadRequest("accessions must be a list of accession numbers (strings).",
                                    code="missing_parameter")
        for item in given:
            if "," in item:
                raise errors.BadRequest("Accession number '%s' contains a comma." % accessions.escape(item),
                                        code="bad_accession")
        split = body.get("split", False)
        if not isinstance(split, bool):
            raise errors.BadRequest("split must be true or false.")
        medium = self._format(body.get("format"))
        if action == "print" and medium != "iso":
            raise errors.BadRequest("format is for downloads; a print sends the images.", code="bad_format")
        wanted = accessions.parse(",".join(given), "accessions", True, self.config.limits.max_accessions)
        request.accessions = wanted
        job = self._new_job(request, action, wanted, named_by_patient=len(wanted) > 1, split=split, format=medium)
        jobs.submit(job)
        return Response.json(202, self._job_view(request, job), [("Location", "/api/jobs/" + job.id)])

    def _json_body(self, request):
        """The JSON object in the body; only ``application/json``, which another web page cannot send
        without the browser asking us first (a CORS preflight, which gets no CORS answer)."""
        media_type = request.environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise errors.UnsupportedMediaType("The request body must be application/json, not %s."
                                              % (media_type[:100] or "untyped"))
        try:
            length = int(request.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise errors.BadRequest("Content-Length is not a number.")
        if length > MAX_BODY:
            raise errors.TooLarge("The request body is larger than %d bytes." % MAX_BODY, code="body_too_large")
        try:
            text = request.environ["wsgi.input"].read(length).decode("utf-8")
            if _nesting(text) > MAX_NESTING:
                raise errors.BadRequest("The request body nests deeper than %d levels." % MAX_NESTING)
            body = json.loads(text)
        except (UnicodeDecodeError, ValueError):
            raise errors.BadRequest("The request body is not JSON.")
        if not isinstance(body, dict):
            raise errors.BadRequest("The request body must be a JSON object.")
        return body

    def _job(self, request):
        """The job of the path, if the caller may see it: with named keys, its own (an admin: any)."""
        job = self.service.jobs.get(request.match["job_id"])
        if not self.keys.sees(request.caller, job.caller):
            raise errors.NotFound("There is no job %s of yours." % job.id, code="job_not_found")
        return job

    def _job_view(self, request, job, listed=False):
        """The job's JSON; its download token only for its own caller (a single job: the id is the
        capability; in the list nobody is told apart without named keys, so none is shown there)."""
        own = request.caller == job.caller if self.keys.named else not listed
        return job.as_dict(self.service.jobs.keep_s, token=own)

    def job(self, request):
        job = self._job(request)
        if request.method == "DELETE":
            job = self.service.jobs.cancel(job.id)
        return Response.json(200, self._job_view(request, job))

    def job_events(self, request):
        """Server-sent events: the job's JSON now and at each change, until it ends or the client leaves."""
        job = self._job(request)
        who = (request.caller, audit.client_address(request.environ, self.config.server.trusted_proxies))
        with self._streams_lock:
            if sum(self._streams.values()) >= EVENT_STREAMS:
                raise errors.Unavailable("%d event streams are open; try again shortly." % EVENT_STREAMS,
                                         code="busy", retry_after=5)
            if self._streams[who] >= STREAMS_PER_CALLER:
                raise errors.Unavailable("This caller has %d event streams open already; close one first."
                                         % STREAMS_PER_CALLER, code="busy", retry_after=5)
            self._streams[who] += 1
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                   ("X-Accel-Buffering", "no")]
        gone = request.environ.get("waitress.client_disconnected", lambda: False)
        stream = _Closing(self._events(request, job, gone), lambda: self._stream_ended(who))
        return Response(200, headers, stream, None, closer=stream)  # its log line when it ends: the bytes sent

    def _stream_ended(self, who):
        with self._streams_lock:
            self._streams[who] -= 1
            if not self._streams[who]:
                del self._streams[who]

    def _events(self, request, job, gone):
        """The stream's events; it ends within a tick of its client leaving (waitress reads the
        connection while the request runs, so a close shows in ``gone``)."""
        jobs = self.service.jobs
        last, quiet_since = None, time.monotonic()
        while not gone():
            updated = job.updated
            current = self._job_view(request, job)
            if current != last:
                yield ("data: %s\n\n" % json.dumps(current, ensure_ascii=False)).encode("utf-8")
                last, quiet_since = current, time.monotonic()
                if job.state.ended:
                    return
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                yield b": still working\n\n"
                quiet_since = time.monotonic()
            jobs.wait_for_change(job, updated, STREAM_TICK_S)

    def job_iso(self, request):
        """A ready job's disc: ``/iso`` (``/zip``) when it made one, ``/discs/{n}/iso`` (``/zip``) for each of
        several; the format its job made."""
        job = self.service.jobs.get(request.match["job_id"])
        if not (request.authorized and self.keys.sees(request.caller, job.caller)):
            token = (request.param("token") or "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(token, job.token.encode("ascii")):
                raise errors.Unauthorized("A valid X-API-Key header or the job's download token is required.")
        if job.state is not State.READY:
            if job.state.final:
                raise errors.NotFound("Job %s has no disc (it is %s)." % (job.id, job.state.value), code="no_disc")
            raise errors.Conflict("The disc of job %s is not ready yet (%s)." % (job.id, job.progress()["phase"]),
                                  code="not_ready")
        if request.match["format"] != job.format:
            raise errors.NotFound("Job %s made %s; fetch it from its link, /api/jobs/%s/%s."
                                  % (job.id, "a ZIP" if job.format == "zip" else "an ISO", job.id, job.format),
                                  code="no_disc")
        number = int(request.match.get("number") or 0)
        if number == 0 and len(job.discs) > 1:
            raise errors.Conflict("Job %s made %d discs; fetch each from /api/jobs/%s/discs/<n>/%s."
                                  % (job.id, len(job.discs), job.id, job.format), code="several_discs")
        if number > len(job.discs):
            raise errors.NotFound("Job %s has %d disc%s." % (job.id, len(job.discs), "s" * (len(job.discs) > 1)),
                                  code="no_disc")
        disc = job.discs[max(number, 1) - 1]
        if request.method != "HEAD":
            self._fetching(request, job, disc)
        return self._send(request, disc, synchronous=False)

    def _fetching(self, request, job, disc):
        """Fetching a job's disc is an export of its own: whoever has the link (a token travels) gets
        the images, as often as they like.  Its begun line now, before the first byte; its outcome
        (bytes, complete) when the answer ends, or at once behind nginx, which sends it."""
        export = self._export(request, "download", job.accessions, job.format)
        export.studies, export.images, export.verified = job.export.studies, disc.images, job.export.verified
        if self.config.server.x_accel_prefix:
            export.bytes, export.handed_to = disc.size, "nginx"
            self.service.audit.record(export, 200)
            return
        self.service.audit.begin(export)
        request.export = export

    def studies(self, request):
        """What the PACS holds (for the desk page): it shows patient names, so it is audited (action
        ``query``); ``lookups`` runs it (few at once, behind downloads)."""
        wanted = self._accessions(request, ("accession_numbers", "accession_number"), several=True)
        return Response.json(200, {"studies": self.lookups.run(self._look_up, request, wanted)})

    def _look_up(self, request, wanted):
        with self.service.audit.recording(self._export(request, "query", wanted)) as export:
            return self.service.steps.describe(wanted, export)

    def _accessions(self, request, names, several):
        """Accessions from whichever of ``names`` is given; checked before anything runs."""
        given = [name for name in names if name in request.query]
        if len(given) > 1:
            raise errors.BadRequest("Give either %s or %s, not both." % tuple(given), code="bad_request")
        name = given[0] if given else names[0]
        wanted = accessions.parse(request.param(name), name, several, self.config.limits.max_accessions)
        request.accessions = wanted
        return wanted


class _Closing:
    """An event stream's body whose ``ended`` runs once when the server closes it, even if never iterated
    (a HEAD; a generator's own ``finally`` would not run then).  As a ``Response.closer`` it then tells
    ``on_close`` the bytes it handed to the server: a stream's length is known only at its end."""

    def __init__(self, body, ended):
        self._body = body
        self._ended = ended
        self.sent = 0
        self.on_close = None

    def __iter__(self):
        for chunk in self._body:
            self.sent += len(chunk)
            yield chunk

    def close(self):
        ended, self._ended = self._ended, None
        try:
            self._body.close()
        finally:
            if ended is not None:
                ended()
                if self.on_close is not None:
                    self.on_close(self.sent)


def _nesting(text):
    """How deep the arrays and objects of JSON ``text`` nest (brackets in strings do not count)."""
    depth = deepest = 0
    for token in JSON_TOKEN.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in "]}":
            depth -= 1
    return deepest
