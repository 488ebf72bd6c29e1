"""The WSGI application: a hand-written routing table and one error funnel.

Routes map a path (or, for a job's own paths, a pattern) to a handler and
the methods it takes; the legacy PHP URLs the HIS still calls are declared
beside the route they stand for.  Every download or print is a job
(``registry``): the synchronous endpoints run theirs in the request.
Every response carries X-Request-ID and produces one access-log line;
every exception becomes the JSON error body of SPEC §2 in ``_error``.
"""

import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from urllib.parse import parse_qs

from . import accessions, audit, auth, delivery, errors, metrics
from .registry import ENDED, Job
from .responses import Response

log = logging.getLogger("mkiso.web")
access_log = logging.getLogger("mkiso.access")

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_BODY = 64 * 1024
EVENT_STREAMS = 32  # the server runs this many threads more than server.threads, for them
KEEPALIVE_S = 15
DESK_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "desk.html")
PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                "connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-cache"),
]

REASONS = {
    200: "OK", 202: "Accepted", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 416: "Range Not Satisfiable",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 507: "Insufficient Storage",
}


class Route:
    """A path's handler (a method name of Application), its methods and aliases."""

    def __init__(self, handler, methods=("GET",), legacy=(), open_access=False, token_access=False):
        self.handler = handler
        self.methods = tuple(methods) + (("HEAD",) if "GET" in methods else ())
        self.legacy = legacy
        self.open_access = open_access
        self.token_access = token_access  # the job's download token will do instead of the key


ROUTES = {
    "/": Route("desk_page", open_access=True),
    "/api/health": Route("health", open_access=True),
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
    (re.compile("^/api/jobs/%s/iso$" % JOB_ID), Route("job_iso", token_access=True)),
    (re.compile("^/api/jobs/%s/discs/(?P<number>[1-9][0-9]{0,3})/iso$" % JOB_ID), Route("job_iso", token_access=True)),
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
        self._streams = threading.BoundedSemaphore(EVENT_STREAMS)

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
        response.headers.append(("X-Request-ID", request.request_id))
        start_response("%d %s" % (response.status, REASONS.get(response.status, "")), response.headers)
        if request.method == "HEAD":
            if hasattr(response.body, "close"):
                response.body.close()
            self._log_access(request, response, started, 0)
            return []
        if response.closer is not None:  # logged when sending ends, with what really went out
            sending = time.monotonic()
            response.closer.on_close = lambda sent: self._sent(request, response, started, sending, sent)
        else:
            self._log_access(request, response, started, response.length)
        return response.body

    def _dispatch(self, request):
        route = self._route(request)
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
        payload = dict(exc.details, error=exc.message, code=exc.code, request_id=request.request_id)
        if exc.status >= 500:
            log.warning("%s", exc.message, extra={"fields": {"request_id": request.request_id, "status": exc.status}})
        return Response.json(exc.status, payload, exc.headers)

    def _sent(self, request, response, started, sending, sent):
        """An ISO answer ended: its access line and its metrics (the ``send`` phase, the bytes)."""
        self.service.metrics.phase("send", time.monotonic() - sending)
        self.service.metrics.sent("client", sent)
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
        if response.closer is not None and request.method != "HEAD":
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
        with open(DESK_PAGE, "rb") as handle:
            page = handle.read()
        headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page)))]
        return Response(200, headers + PAGE_HEADERS, [page], len(page))

    # -- synchronous: a job the request waits for ---------------------------

    def download(self, request):
        wanted = self._accessions(request, ("accession_number",), several=False)
        return self._iso_answer(request, wanted, named_by_patient=False)

    def download_multiple(self, request):
        wanted = self._accessions(request, ("accession_numbers", "accession_number"), several=True)
        return self._iso_answer(request, wanted, named_by_patient=True)

    def _iso_answer(self, request, wanted, named_by_patient):
        """The ISO itself, or behind nginx (server.x_accel_prefix) a redirect for nginx to send it.

        A HEAD answered here needs the size only, so the ISO is not written
        (and nothing is exported: no audit line).
        """
        server = self.config.server
        head = request.method == "HEAD"
        job = self._new_job(request, "download", wanted, named_by_patient)
        job.stream = not head and not server.x_accel_prefix  # sent while written (nginx needs it whole)
        iso = self.service.registry.run(job, build=not head or bool(server.x_accel_prefix), audited=not head)
        if server.x_accel_prefix:
            return delivery.accel_response(iso, server.x_accel_prefix, self.config.paths.work_dir,
                                           server.x_accel_keep_s)
        return delivery.iso_response(request.environ, iso)

    def print_studies(self, request):
        wanted = self._accessions(request, ("accession_number", "accession_numbers"), several=True)
        job = self._new_job(request, "print", wanted)
        return Response.json(200, self.service.registry.run(job))

    def _new_job(self, request, action, wanted, named_by_patient=False):
        export = audit.Export(action, request.request_id,
                              audit.client_address(request.environ, self.config.server.trusted_proxies),
                              request.caller, accessions=wanted)
        return Job(action, wanted, export, named_by_patient=named_by_patient)

    # -- jobs (SPEC §9) --------------------------------------------------------

    def jobs(self, request):
        registry = self.service.registry
        if request.method != "POST":
            return Response.json(200, {"jobs": [job.as_dict(registry.keep_s) for job in registry.recent()]})
        body = self._json_body(request)
        action = body.get("action", "download")
        if action not in ("download", "print"):
            raise errors.BadRequest("action must be download or print.")
        if action == "print":
            self.service.jobs.require_publisher()
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
        wanted = accessions.parse(",".join(given), "accessions", True, self.config.limits.max_accessions)
        request.accessions = wanted
        job = self._new_job(request, action, wanted, named_by_patient=len(wanted) > 1)
        job.split = split
        registry.submit(job)
        return Response.json(202, job.as_dict(registry.keep_s), [("Location", "/api/jobs/" + job.id)])

    def _json_body(self, request):
        try:
            length = int(request.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise errors.BadRequest("Content-Length is not a number.")
        if length > MAX_BODY:
            raise errors.BadRequest("The request body is larger than %d bytes." % MAX_BODY)
        try:
            body = json.loads(request.environ["wsgi.input"].read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise errors.BadRequest("The request body is not JSON.")
        if not isinstance(body, dict):
            raise errors.BadRequest("The request body must be a JSON object.")
        return body

    def job(self, request):
        registry = self.service.registry
        if request.method == "DELETE":
            job = registry.cancel(request.match["job_id"])
        else:
            job = registry.get(request.match["job_id"])
        return Response.json(200, job.as_dict(registry.keep_s))

    def job_events(self, request):
        """Server-sent events: the job's JSON now and at each change, until it ends."""
        registry = self.service.registry
        job = registry.get(request.match["job_id"])
        if not self._streams.acquire(blocking=False):
            raise errors.Unavailable("%d event streams are open; try again shortly." % EVENT_STREAMS,
                                     code="busy", retry_after=5)
        headers = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                   ("X-Accel-Buffering", "no")]
        return Response(200, headers, self._events(job), None)

    def _events(self, job):
        registry = self.service.registry
        try:
            last, quiet_since = None, time.monotonic()
            while True:
                updated = job.updated
                current = job.as_dict(registry.keep_s)
                if current != last:
                    yield ("data: %s\n\n" % json.dumps(current, ensure_ascii=False)).encode("utf-8")
                    last, quiet_since = current, time.monotonic()
                    if job.state in ENDED:
                        return
                elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                    yield b": still working\n\n"
                    quiet_since = time.monotonic()
                registry.wait_for_change(job, updated, 0.5)
        finally:
            self._streams.release()

    def job_iso(self, request):
        """A ready job's disc: ``/iso`` when it made one, ``/discs/{n}/iso`` for each of several."""
        registry = self.service.registry
        job = registry.get(request.match["job_id"])
        if not request.authorized:
            token = (request.param("token") or "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(token, job.token.encode("ascii")):
                raise errors.Unauthorized("A valid X-API-Key header or the job's download token is required.")
        if job.state != "ready":
            if job.state in ("failed", "cancelled", "done"):
                raise errors.NotFound("Job %s has no disc (it is %s)." % (job.id, job.state), code="no_disc")
            raise errors.Conflict("The disc of job %s is not ready yet (%s)." % (job.id, job.progress()["phase"]),
                                  code="not_ready")
        number = int(request.match.get("number") or 0)
        if number == 0 and len(job.discs) > 1:
            raise errors.Conflict("Job %s made %d discs; fetch each from /api/jobs/%s/discs/<n>/iso."
                                  % (job.id, len(job.discs), job.id), code="several_discs")
        if number > len(job.discs):
            raise errors.NotFound("Job %s has %d disc%s." % (job.id, len(job.discs), "s" * (len(job.discs) > 1)),
                                  code="no_disc")
        iso = job.discs[max(number, 1) - 1]
        server = self.config.server
        if server.x_accel_prefix:
            return delivery.accel_response(iso, server.x_accel_prefix, self.config.paths.work_dir, None)
        return delivery.iso_response(request.environ, iso, remove=False)

    def studies(self, request):
        wanted = self._accessions(request, ("accession_numbers", "accession_number"), several=True)
        return Response.json(200, {"studies": self.service.jobs.describe(wanted)})

    def _accessions(self, request, names, several):
        """Accessions from whichever of ``names`` is given; checked before anything runs."""
        given = [name for name in names if name in request.query]
        if len(given) > 1:
            raise errors.BadRequest("Give either %s or %s, not both." % tuple(given), code="bad_request")
        name = given[0] if given else names[0]
        wanted = accessions.parse(request.param(name), name, several, self.config.limits.max_accessions)
        request.accessions = wanted
        return wanted
