"""ISO file names: safe in both forms, never empty."""

import pytest

from mkiso.disc import tree
from mkiso.http import delivery


@pytest.mark.parametrize("person_name, plain, utf8", [
    ("Müller^Jürgen", "MULLER_JURGEN.iso", "M%C3%BCller_J%C3%BCrgen.iso"),
    ("DOE^JANE^^^", "DOE_JANE.iso", "DOE_JANE.iso"),
    ("Yamada^Tarou=山田^太郎", "YAMADA_TAROU.iso", "Yamada_Tarou.iso"),
    ("O'Brien^Seán", "O_BRIEN_SEAN.iso", "O_Brien_Se%C3%A1n.iso"),
])
def test_patient_names(person_name, plain, utf8):
    value = delivery.disposition(tree.patient_stem(person_name), "ACC1")
    assert value == "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (plain, utf8)


@pytest.mark.parametrize("hostile", ["../../etc/passwd", 'a"b', "a\\b", "a\r\nX-Evil: 1", "a/b", "\x00\x1f"])
def test_no_separator_quote_or_control_character(hostile):
    value = delivery.disposition(hostile, "ACC1")
    plain = value.split('filename="')[1].split('"')[0]
    encoded = value.split("filename*=UTF-8''")[1]
    for bad in ("/", "\\", '"', "\r", "\n", "\x00"):
        assert bad not in plain and bad not in encoded
    assert plain.endswith(".iso") and plain != ".iso"


@pytest.mark.parametrize("empty", ["", "^^^", "山田^太郎", "..."])
def test_never_an_empty_name(empty):
    value = delivery.disposition(tree.patient_stem(empty), "ACC-7")
    assert 'filename="ACC-7.iso"' in value


def test_utf8_only_name_falls_back_to_the_accession_in_ascii():
    value = delivery.disposition(tree.patient_stem("山田^太郎"), "ACC-7")
    assert 'filename="ACC-7.iso"' in value
    assert "filename*=UTF-8''%E5%B1%B1%E7%94%B0_%E5%A4%AA%E9%83%8E.iso" in value
