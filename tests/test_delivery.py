"""ISO file names: safe in both forms, never empty."""

import json

import pytest

from mkiso.disc import tree
from mkiso.http import application, delivery


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


@pytest.mark.parametrize("person_name, plain, utf8", [
    ("Smith\u202egnp^Jane", "SMITHGNP_JANE.iso", "Smithgnp_Jane.iso"),  # RLO: would show as "Smith...osi.png"
    ("M\u00fcller\u2066\u2067\u2068\u2069\u200e\u200f\u061c^J\u00fcrgen", "MULLER_JURGEN.iso",
     "M%C3%BCller_J%C3%BCrgen.iso"),  # isolates, marks: bidi controls all
    ("Do\u200be\u200d^\ufeffJane\u00ad", "DOE_JANE.iso", "Doe_Jane.iso"),  # zero-width space, joiner, BOM, soft hyphen
    ("Doe\U000e0041\ue000\udce9\u0378^Jane", "DOE_JANE.iso", "Doe_Jane.iso"),  # tag, private use, surrogate, unassigned
    ("Doe\x9b31m\u2028Jane\u2029X\x85", "DOE_31M_JANE_X.iso", "Doe_31m_Jane_X.iso"),  # C1 CSI, line/para separators
])
def test_invisible_and_bidi_characters_are_dropped_from_both_names(person_name, plain, utf8):
    value = delivery.disposition(tree.patient_stem(person_name), "ACC1")
    assert value == "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (plain, utf8)


@pytest.mark.parametrize("invisible", ["\u202e", "\u202e^\u200b", "\u2066\u2069^\ue000", "\U000e0001"])
def test_a_name_of_invisible_characters_only_falls_back_to_the_accession(invisible):
    value = delivery.disposition(tree.patient_stem(invisible), "ACC-7")
    assert value == "attachment; filename=\"ACC-7.iso\"; filename*=UTF-8''ACC-7.iso"


def test_a_download_named_by_the_patient_api_carries_no_override(make_service, wsgi_call):
    """The name comes from outside (the patient API here, the PACS otherwise) as the HIS typed it."""
    from test_patients import PatientApiServer
    server = PatientApiServer([(200, json.dumps({"patient": {"name": "Müller\u202e-Lüdenscheid^Jürgen\u200b"}}), 0)])
    try:
        service = make_service(patient_api={"url": server.url, "name_field": "patient.name"})
        response = wsgi_call(application.Application(service.config, service), "/api/iso/download-multiple",
                             query="accession_numbers=MR.180505.026,ACC1002")
    finally:
        server.close()
    assert response.status == 200, response.body
    assert response.header("Content-Disposition") == \
        "attachment; filename=\"MULLER-LUDENSCHEID_JURGEN.iso\"; " \
        "filename*=UTF-8''M%C3%BCller-L%C3%BCdenscheid_J%C3%BCrgen.iso"
