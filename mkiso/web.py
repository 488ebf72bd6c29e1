"""The WSGI application: a hand-written routing table and one error funnel.

Routes map a path to a handler and the methods it takes; the legacy PHP
URLs the HIS still calls are declared beside the route they stand for.
Every response carries X-Request-ID and produces one access-log line;
every exception becomes the JSON error body of SPEC §2 in ``_error``.
"""

import logging
import re
import time
import uuid
from contextlib import contextmanager
from urllib.parse import parse_qs

from . import accessions, audit, auth, delivery, errors
from .responses import Response

log = logging.getLogger("mkiso.web")
access_log = logging.getLogger("mkiso.access")

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

REASONS = {
    200: "OK", 206: "Partial Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 416: "Range Not Satisfiable",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 507: "Insufficient Storage",
}


class Route:
    """A path's handler (a method name of Application), its methods and aliases."""

    def __init__(self, handler, methods=("GET",), legacy=(), open_access=False):
        self.handler = handler
        self.methods = tuple(methods) + (("HEAD",) if "GET" in methods else ())
        self.legacy = legacy
        self.open_access = open_access


ROUTES = {
    "/api/health": Route("health", open_access=True),
    "/api/iso/download": Route("download", legacy=("/mkiso.php", "/mkiso2.php")),
    "/api/iso/download-multiple": Route("download_multiple", legacy=("/mkiso_multiple.php",)),
    "/api/iso/print": Route("print_studies", legacy=("/send_rimage_multiple.php",)),
}


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
            response.closer.on_close = lambda sent: self._log_access(request, response, started, sent)
        else:
            self._log_access(request, response, started, response.length)
        return response.body

    def _dispatch(self, request):
        route = self.routes.get(request.path)
        if route is None:
            raise errors.NotFound("There is nothing at %s." % request.path)
        if request.method not in route.methods:
            raise errors.MethodNotAllowed(request.method, route.methods)
        known, request.caller = self.keys.identify(request.header("X-API-Key"))
        request.authorized = self.keys.allows(known)
        if not route.open_access and not request.authorized:
            raise errors.Unauthorized("A valid X-API-Key header is required.")
        return getattr(self, route.handler)(request)

    def _error(self, request, exc):
        payload = {"error": exc.message, "code": exc.code, "request_id": request.request_id}
        if exc.status >= 500:
            log.warning("%s", exc.message, extra={"fields": {"request_id": request.request_id, "status": exc.status}})
        return Response.json(exc.status, payload, exc.headers)

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
        build = not head or bool(server.x_accel_prefix)
        with self._audited(request, "download", wanted, exports=not head) as export:
            iso = self.service.jobs.make_iso(wanted, request.request_id, named_by_patient, build=build,
                                             export=export)
            if server.x_accel_prefix:
                response = delivery.accel_response(iso, server.x_accel_prefix, self.config.paths.work_dir,
                                                   server.x_accel_keep_s)
                export.bytes = iso.size
            else:
                response = delivery.iso_response(request.environ, iso)
                export.bytes = response.length
            if not head:
                try:
                    self.service.audit.record(export, response.status)
                except errors.MkisoError:
                    if response.closer is not None:
                        response.closer.close()
                    iso.cleanup()
                    raise
            return response

    def print_studies(self, request):
        wanted = self._accessions(request, ("accession_number", "accession_numbers"), several=True)
        with self._audited(request, "print", wanted) as export:
            answer = self.service.jobs.print_studies(wanted, request.request_id, export)
            self.service.audit.record(export, 200)
        return Response.json(200, answer)

    @contextmanager
    def _audited(self, request, action, wanted, exports=True):
        """The audit record of one export; a failure is recorded with its status and code here."""
        export = audit.Export(action, request.request_id,
                              audit.client_address(request.environ, self.config.server.trusted_proxies),
                              request.caller, accessions=wanted)
        try:
            yield export
        except Exception as exc:
            if exports and not export.recorded:
                failure = exc if isinstance(exc, errors.MkisoError) else errors.MkisoError("")
                try:
                    self.service.audit.record(export, failure.status, failure.code)
                except errors.MkisoError:
                    pass  # logged; the client hears of the first failure
            raise

    def _accessions(self, request, names, several):
        """Accessions from whichever of ``names`` is given; checked before anything runs."""
        given = [name for name in names if name in request.query]
        if len(given) > 1:
            raise errors.BadRequest("Give either %s or %s, not both." % tuple(given), code="bad_request")
        name = given[0] if given else names[0]
        wanted = accessions.parse(request.param(name), name, several, self.config.limits.max_accessions)
        request.accessions = wanted
        return wanted
