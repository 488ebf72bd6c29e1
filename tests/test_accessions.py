"""Accession numbers checked on their own, without a service: the privacy gate in front of every C-FIND.

A value that slips through here can make the PACS match (and send) far more
than one study, so every refusal is pinned down with its message and code.
"""

import pytest

from mkiso import accessions, errors


NOT_ASCII = "contains a character that is not printable ASCII (a control character, invalid UTF-8 or a look-alike)."
WILDCARD = "contains a wildcard (* or ?); only exact numbers are accepted."


def refusal(call, *args):
    """The BadRequest that ``call(*args)`` raises: always a 400."""
    with pytest.raises(errors.BadRequest) as caught:
        call(*args)
    assert caught.value.status == 400
    return caught.value


# -- escape ----------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [
    ("ACC-1.2_3 x", "ACC-1.2_3 x"),  # printable ASCII stays as it is
    ("A\\B", "A\\x5cB"),  # a backslash is escaped too: a typed "\\x41" cannot pass for an escaped byte
    ("A\x1b[2J\x00", "A\\x1b[2J\\x00"),  # control characters cannot reach a log or terminal
    ("A\x7f", "A\\x7f"),
    ("ACC\udcff1", "ACC\\xff1"),  # invalid UTF-8 arrives surrogate-escaped: its raw byte is shown
    ("\u0410CC1", "\\xd0\\x90CC1"),  # Cyrillic A looks like A: its UTF-8 bytes tell it apart
    ("\uff21", "\\xef\\xbc\\xa1"),  # fullwidth A
])
def test_escape_shows_every_byte_that_is_not_printable_ascii_as_hex(value, shown):
    """What a message shows must be plain ASCII whatever the client sent, and say which bytes it was."""
    assert accessions.escape(value) == shown


# -- check -----------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ("", "An accession number is empty."),
    ("   ", "An accession number is empty."),
    ("A" * 17, "Accession number '%s' is longer than 16 characters." % ("A" * 17)),
    ("ACC*", "Accession number 'ACC*' " + WILDCARD),
    ("*", "Accession number '*' " + WILDCARD),
    ("AC?1", "Accession number 'AC?1' " + WILDCARD),
    ("ACC\\1", "Accession number 'ACC\\x5c1' contains a backslash."),
    ("ACC\x001", "Accession number 'ACC\\x001' " + NOT_ASCII),
    ("\tACC1", "Accession number '\\x09ACC1' " + NOT_ASCII),
    ("ACC\x7f", "Accession number 'ACC\\x7f' " + NOT_ASCII),
    ("ACC\udcff1", "Accession number 'ACC\\xff1' " + NOT_ASCII),
    ("\u0410CC1", "Accession number '\\xd0\\x90CC1' " + NOT_ASCII),
    ("ACC\u00a01", "Accession number 'ACC\\xc2\\xa01' " + NOT_ASCII),
    ("-ACC1", "Accession number '-ACC1' must not start with '-'."),
    (" --help", "Accession number '--help' must not start with '-'."),
])
def test_check_refuses_what_could_match_more_than_one_study(value, message):
    """Each refusal names the value (escaped) and the rule, so a clerk can see what to correct."""
    error = refusal(accessions.check, value)
    assert error.code == "bad_accession"
    assert error.message == message


@pytest.mark.parametrize("value, expected", [
    ("ACC1", "ACC1"),
    ("  ACC1 ", "ACC1"),  # spaces around are trimmed: DICOM pads SH values with them
    ("A" * 16, "A" * 16),  # the longest an SH value may be
    (" %s " % ("A" * 16), "A" * 16),  # the length is counted after trimming
    ("MR.180505.026", "MR.180505.026"),
    ("ACC 1", "ACC 1"),  # a space inside is part of the number
    ("ACC-1", "ACC-1"),  # only a leading '-' reads as an option
])
def test_check_accepts_and_trims_exact_numbers(value, expected):
    assert accessions.check(value) == expected


# -- parse -----------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "", "   "])
@pytest.mark.parametrize("several", [False, True])
def test_parse_refuses_a_missing_or_empty_parameter(raw, several):
    """No accession must never become "match everything"."""
    error = refusal(accessions.parse, raw, "accession_number", several, 20)
    assert error.code == "missing_parameter"
    assert error.message == "The parameter accession_number is missing or empty."


@pytest.mark.parametrize("raw", ["ACC1,ACC2", "ACC1,", ",ACC1", ","])
def test_parse_of_one_refuses_a_comma_rather_than_guess(raw):
    """Where one accession is expected, "A,B" is neither A nor B: the client is told to use the other URL."""
    error = refusal(accessions.parse, raw, "accession_number", False, 20)
    assert error.code == "bad_accession"
    assert error.message == ("accession_number takes one accession number here; "
                             "use download-multiple for several.")


def test_parse_of_one_trims_and_checks_it():
    assert accessions.parse(" ACC1 ", "accession_number", False, 20) == ["ACC1"]
    assert refusal(accessions.parse, "ACC*", "accession_number", False, 20).code == "bad_accession"


@pytest.mark.parametrize("raw, expected", [
    ("ACC1,ACC2", ["ACC1", "ACC2"]),
    ("ACC2,ACC1", ["ACC2", "ACC1"]),  # the client's order is kept
    (" ACC1 , ACC2 ", ["ACC1", "ACC2"]),
    ("ACC1,,ACC2,", ["ACC1", "ACC2"]),  # blanks between commas are ignored
    (",  ,ACC1, ,", ["ACC1"]),
    ("ACC1,ACC2,ACC1", ["ACC1", "ACC2"]),  # duplicates collapse, the first place kept
    ("ACC2,ACC1, ACC2 ,ACC1", ["ACC2", "ACC1"]),  # after trimming, too
    ("acc1,ACC1", ["acc1", "ACC1"]),  # an exact match key: case matters
])
def test_parse_of_several_splits_trims_and_collapses(raw, expected):
    assert accessions.parse(raw, "accession_numbers", True, 20) == expected


@pytest.mark.parametrize("raw", [",", ",,,", " , , "])
def test_parse_of_several_refuses_only_commas_and_blanks(raw):
    error = refusal(accessions.parse, raw, "accession_numbers", True, 20)
    assert error.code == "missing_parameter"
    assert error.message == "The parameter accession_numbers holds no accession number."


@pytest.mark.parametrize("raw, message", [
    ("ACC1,ACC*", "Accession number 'ACC*' " + WILDCARD),
    ("ACC1,-x", "Accession number '-x' must not start with '-'."),
    ("ACC\udcfe1,ACC2", "Accession number 'ACC\\xfe1' " + NOT_ASCII),
])
def test_parse_of_several_refuses_all_for_one_bad_number(raw, message):
    """One bad number refuses the request: exporting the others would be a disc the client did not ask for."""
    error = refusal(accessions.parse, raw, "accession_numbers", True, 20)
    assert (error.code, error.message) == ("bad_accession", message)


def test_parse_allows_the_limit_and_refuses_one_more():
    numbers = ["ACC%d" % number for number in range(1, 5)]
    assert accessions.parse(",".join(numbers[:3]), "accession_numbers", True, 3) == numbers[:3]
    error = refusal(accessions.parse, ",".join(numbers), "accession_numbers", True, 3)
    assert error.code == "too_many_accessions"
    assert error.message == "4 accession numbers were given; at most 3 are allowed (limits.max_accessions)."


def test_the_limit_counts_numbers_not_repetitions():
    """A number given twice is one study to export, so it counts once."""
    assert accessions.parse("ACC1,ACC2,ACC1,,ACC2", "accession_numbers", True, 2) == ["ACC1", "ACC2"]
