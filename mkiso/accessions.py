"""Accession numbers from the query string, checked before any tool sees them.

An accession is a DICOM SH value used as an exact match key.  A wildcard,
an empty value or a missing key would make the PACS match (and a C-MOVE
send) the whole archive, so this is a privacy gate, not a nicety: at most
16 characters, no ``*`` or ``?``, no backslash, no control characters, no
leading ``-`` (it would read as an option to a tool).
"""

from . import errors

MAX_LENGTH = 16


def escape(value):
    """The value as printable ASCII: other bytes as \\xNN (invalid UTF-8 arrives surrogate-escaped)."""
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x5C else "\\x%02x" % byte for byte in raw)


def check(accession):
    """Return the trimmed accession or raise BadRequest saying what is wrong."""
    value = accession.strip(" ")
    shown = "'%s'" % escape(value)
    if not value:
        raise errors.BadRequest("An accession number is empty.", code="bad_accession")
    if len(value) > MAX_LENGTH:
        raise errors.BadRequest(
            "Accession number %s is longer than %d characters." % (shown, MAX_LENGTH), code="bad_accession")
    if "*" in value or "?" in value:
        raise errors.BadRequest(
            "Accession number %s contains a wildcard (* or ?); only exact numbers are accepted." % shown,
            code="bad_accession")
    if "\\" in value:
        raise errors.BadRequest("Accession number %s contains a backslash." % shown, code="bad_accession")
    if any(not 0x20 <= ord(char) <= 0x7E for char in value):
        raise errors.BadRequest(
            "Accession number %s contains a character that is not printable ASCII "
            "(a control character, invalid UTF-8 or a look-alike)." % shown, code="bad_accession")
    if value.startswith("-"):
        raise errors.BadRequest("Accession number %s must not start with '-'." % shown, code="bad_accession")
    return value


def parse(raw, parameter, several, limit):
    """The accessions of one query parameter value.

    With ``several`` a comma separates accessions; blanks between commas are
    ignored, duplicates collapse (first order kept) and at most ``limit``
    remain.  Without it a comma is refused rather than guessed at.
    """
    if raw is None or not raw.strip():
        raise errors.BadRequest("The parameter %s is missing or empty." % parameter, code="missing_parameter")
    if not several:
        if "," in raw:
            raise errors.BadRequest(
                "%s takes one accession number here; use download-multiple for several." % parameter,
                code="bad_accession")
        return [check(raw)]
    accessions = []
    for item in raw.split(","):
        if not item.strip():
            continue
        value = check(item)
        if value not in accessions:
            accessions.append(value)
    if not accessions:
        raise errors.BadRequest("The parameter %s holds no accession number." % parameter, code="missing_parameter")
    if len(accessions) > limit:
        raise errors.BadRequest(
            "%d accession numbers were given; at most %d are allowed (limits.max_accessions)."
            % (len(accessions), limit), code="too_many_accessions")
    return accessions
