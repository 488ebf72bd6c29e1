"""Errors that carry their HTTP status.

Every failure a client can cause or should hear about is one of these; the
web layer turns them into the JSON body of SPEC §2 in one place.  Anything
else is a bug and becomes a 500 whose details stay in the log.
"""


class MkisoError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message, code=None, headers=None, details=None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.headers = list(headers or [])
        self.details = dict(details or {})  # more fields of the error body (413: "discs")


class BadRequest(MkisoError):
    status = 400
    code = "bad_request"


class Unauthorized(MkisoError):
    status = 401
    code = "unauthorized"


class Forbidden(MkisoError):
    """A request another web page made through a clerk's browser, or to a host name that is not ours."""

    status = 403
    code = "foreign_origin"


class NotFound(MkisoError):
    status = 404
    code = "not_found"


class MethodNotAllowed(MkisoError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, method, allowed):
        super().__init__(
            "Method %s is not allowed here; use %s." % (method, ", ".join(allowed)),
            headers=[("Allow", ", ".join(allowed))],
        )


class Conflict(MkisoError):
    status = 409
    code = "multiple_patients"


class Cancelled(MkisoError):
    """The job was cancelled (DELETE /api/jobs/{id}) while this request waited for it."""

    status = 409
    code = "cancelled"


class TooLarge(MkisoError):
    status = 413
    code = "disc_too_large"


class UnsupportedMediaType(MkisoError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(MkisoError):
    status = 429
    code = "rate_limited"

    def __init__(self, message, retry_after):
        super().__init__(message, headers=[("Retry-After", str(retry_after))])


class UpstreamFailed(MkisoError):
    status = 502
    code = "upstream_failed"


class Unavailable(MkisoError):
    status = 503
    code = "unavailable"

    def __init__(self, message, code=None, retry_after=None):
        headers = [("Retry-After", str(retry_after))] if retry_after else None
        super().__init__(message, code=code, headers=headers)


class UpstreamTimeout(MkisoError):
    status = 504
    code = "timeout"


class InsufficientStorage(MkisoError):
    status = 507
    code = "insufficient_storage"
