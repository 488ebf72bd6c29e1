"""What a hostile or broken PACS says (issue 30; SPEC §3.10), against the real service over HTTP.

The PACS is the scripted one of ``hostile_pacs`` (real sockets, real
findscu/movescu on mkiso's side, the real receiver); each test makes it say
one wrong thing and reads the service's answer: a 502 naming the attribute,
no traceback, no path, and nothing harmed.
"""

import json
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

from mkiso import demo
from mkiso.dicom import pacs
from mkiso.http import application
from conftest import DCMTK_DIR
from hostile_pacs import HostilePacs


def fetch(url, method="GET", data=None):
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def studies(tmp_path):
    """Two made-up studies as files: ACC-A (three images) and ACC-B (two)."""
    made = {}
    for accession, count in (("ACC-A", 3), ("ACC-B", 2)):
        study = demo.SampleStudy("PAT-9001", "ROE^JANE", accession, series=(count,))
        made[accession] = (study, demo.write_study(study, str(tmp_path / "pacs" / accession)))
    return made


@pytest.fixture
def hostile(studies, receiver_port):
    """The scripted PACS holding ``studies``, sending C-MOVEs to the tests' receiver port."""
    scripted = HostilePacs([path for _, paths in studies.values() for path in paths],
                           {"CDRECORD": receiver_port}, dcmtk_dir=DCMTK_DIR)
    scripted.start(demo.free_port())
    yield scripted
    scripted.stop()


@pytest.fixture
def server(make_service, settings, live_server, hostile):
    """The service against the scripted PACS, served over HTTP as mkiso-server serves it."""

    def start(**overrides):
        settings["pacs"]["port"] = hostile.port
        service = make_service(**overrides)
        return service, live_server(application.Application(service.config, service))

    return start


def refused(status, body, attribute, code="bad_pacs_answer"):
    """The answer is the 502 of SPEC §3.10: its code, the attribute named, no traceback, no path."""
    assert status == 502, body
    answer = json.loads(body)
    assert answer["code"] == code and attribute in answer["error"], answer
    assert "Traceback" not in answer["error"] and "/" not in answer["error"], answer
    return answer


def asked(hostile, command, level=None):
    return [request for request in hostile.requests if request[0] == command and level in (None, request[1])]


# -- the fixture itself: an honest answer makes a disc --------------------------------


def test_the_scripted_pacs_answers_as_a_pacs_does(server, hostile, studies):
    """Unaltered, it answers from its files and a download is a disc of every image."""
    _, base = server()
    status, body = fetch(base + "/api/studies?accession_numbers=ACC-A")
    assert status == 200, body
    [found] = json.loads(body)["studies"]
    study, paths = studies["ACC-A"]
    assert (found["study_uid"], found["images"], found["patient_id"]) == (study.study_uid, len(paths), "PAT-9001")
    status, body = fetch(base + "/api/iso/download?accession_number=ACC-A")
    assert status == 200 and body[32769:32774] == b"CD001"
    assert asked(hostile, "C-MOVE") and asked(hostile, "C-FIND", "IMAGE")


# -- finding 3: a path from the PACS ----------------------------------------------------


def test_a_study_uid_that_is_a_path_removes_nothing(server, hostile, studies, tmp_path):
    """The PACS answers another accession with StudyInstanceUID ``<UID of ACC-A>/../../../victim`` while
    ACC-A's C-MOVE runs (so inbox/STUDY_<UID> exists): the receiver's clean-up of that "study" used to
    remove tmp_path/victim, a folder outside the work dir (tmp_path/work).  Now it is a 502 before
    the UID names anything, and the victim is still there."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("not mkiso's")
    study, _ = studies["ACC-A"]
    hostile_uid = study.study_uid + "/../../../victim"
    honest = hostile.answers

    def find(level, identifier):
        if level == "STUDY" and identifier.get("AccessionNumber") == "ACC-B":
            return [dict(answer, StudyInstanceUID=hostile_uid) for answer in honest(level, identifier)]
        return honest(level, identifier)

    hostile.find = find
    hostile.hold = threading.Event()
    service, base = server()
    inbox = os.path.join(service.work_dir, "inbox", "STUDY_" + study.study_uid)
    assert os.path.realpath(os.path.join(inbox, "..", "..", "..", "victim")) == str(victim)
    answers = {}
    first = threading.Thread(
        target=lambda: answers.setdefault("ACC-A", fetch(base + "/api/iso/download?accession_number=ACC-A")))
    first.start()
    try:
        assert hostile.moving.wait(60), "the C-MOVE of ACC-A did not begin"
        deadline = time.monotonic() + 30
        while not os.path.isdir(inbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.isdir(inbox), "the receiver has no folder for ACC-A's study"
        status, body = fetch(base + "/api/iso/download?accession_number=ACC-B")
        assert (victim / "precious.txt").exists(), "a folder outside the work dir was removed"
        refused(status, body, "StudyInstanceUID")
        assert b"victim" not in body and b".." not in body
        assert not any(hostile_uid in str(request) for request in asked(hostile, "C-MOVE"))
    finally:
        hostile.hold.set()
        first.join(120)
    assert answers["ACC-A"][0] == 200  # the honest study still makes its disc


# -- finding 3 (the rest of the UIDs) and 11: every value checked where it arrives ------------


@pytest.mark.parametrize("level, attribute, value", [
    # UIDs, from the STUDY answers and from the IMAGE-level manifest
    ("STUDY", "StudyInstanceUID", b"1.2.3/../../x"),
    ("STUDY", "StudyInstanceUID", b"1.2..3"),
    ("STUDY", "StudyInstanceUID", b"1.2.3\n"),  # a regular expression's $ takes a trailing newline
    ("STUDY", "StudyInstanceUID", b"1." + b"2" * 64),
    ("STUDY", "StudyInstanceUID", b""),
    ("IMAGE", "SOPInstanceUID", b"1.2.3/../../x"),
    ("IMAGE", "SeriesInstanceUID", b"1.2.3\\4.5"),
    ("IMAGE", "AvailableTransferSyntaxUID", b"1.2.840.10008.1.2.1;rm"),
    # counts: "abc", "2\\3", "1.5" were a 500 with a traceback, for a lookup and a download alike
    ("STUDY", "NumberOfStudyRelatedInstances", b"abc"),
    ("STUDY", "NumberOfStudyRelatedInstances", b"2\\3"),
    ("STUDY", "NumberOfStudyRelatedInstances", b"1.5"),
    ("STUDY", "NumberOfStudyRelatedInstances", b"-1"),
    ("STUDY", "NumberOfStudyRelatedInstances", b"1e3"),
    ("STUDY", "NumberOfStudyRelatedInstances", b"3\n"),
    # the character set the answer's names are decoded with
    ("STUDY", "SpecificCharacterSet", b"ISO_IR 999"),
    ("STUDY", "SpecificCharacterSet", b"UTF-8"),
    ("STUDY", "SpecificCharacterSet", b"\\ISO 2022 IR 87\\ISO 2022 IR 999"),
])
def test_a_value_that_fails_its_check_is_a_502_naming_it(server, hostile, level, attribute, value):
    """A lookup and a download both: 502 bad_pacs_answer naming the attribute; for a STUDY-level value no
    C-MOVE asked for (the manifest's IMAGE-level C-FIND runs beside the C-MOVE, SPEC §3.9)."""
    hostile.alter(level, **{attribute: value})
    # The stored syntax is asked only where C-GET will propose it; refused before any C-GET is asked.
    _, base = server(**({"pacs": {"retrieve": "get"}} if attribute == "AvailableTransferSyntaxUID" else {}))
    for path in ("/api/studies?accession_numbers=ACC-A", "/api/iso/download?accession_number=ACC-A"):
        refused(*fetch(base + path), attribute)
    assert level == "IMAGE" or not asked(hostile, "C-MOVE")


def test_a_uid_with_a_leading_zero_component_is_taken():
    """PS3.5 forbids "04" as a component, but archives that wrote such UIDs exist: digits are no path."""
    assert pacs.checked_uid("1.2.840.04.5", "C-FIND", "StudyInstanceUID") == "1.2.840.04.5"
    assert pacs.checked_uid("0.0", "C-FIND", "StudyInstanceUID") == "0.0"


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_the_manifest_asks_the_stored_syntax_only_for_c_get(server, hostile, retrieve):
    """C-GET proposes the syntax each image is stored in; a C-MOVE's manifest is only checked against,
    and asking for the syntax made Orthanc's IMAGE-level C-FIND three times slower beside the C-MOVE."""
    _, base = server(pacs={"retrieve": retrieve})
    fetch(base + "/api/studies?accession_numbers=ACC-A")
    [(_, _, identifier)] = asked(hostile, "C-FIND", "IMAGE")
    assert ("AvailableTransferSyntaxUID" in identifier) == (retrieve == "get"), identifier


def test_an_absent_count_is_no_count(server, hostile):
    """An empty NumberOfStudyRelatedInstances is "not known": the manifest is what is checked."""
    hostile.alter("STUDY", NumberOfStudyRelatedInstances=b"")
    _, base = server()
    status, body = fetch(base + "/api/iso/download?accession_number=ACC-A")
    assert status == 200, body


# -- finding 9: thousands of studies for one accession -----------------------------------


def many_studies(hostile, count):
    """The PACS answers ACC-A with ``count`` studies (made-up UIDs; it holds no images of them)."""
    honest = hostile.answers

    def find(level, identifier):
        answers = honest(level, identifier)
        if level != "STUDY" or not answers:
            return answers
        return [dict(answers[0], StudyInstanceUID="1.2.826.0.1.3680043.9.7156.%d" % number)
                for number in range(1, count + 1)]

    hostile.find = find


def test_more_studies_than_the_limit_is_a_502_before_anything_else(server, hostile):
    """limits.max_studies_per_accession 3: three studies are looked up; four are refused naming the
    count and the key, without a single IMAGE-level C-FIND or C-MOVE: for a lookup, a download and a job."""
    _, base = server(limits={"max_studies_per_accession": 3})
    many_studies(hostile, 3)
    status, body = fetch(base + "/api/studies?accession_numbers=ACC-A")
    assert status == 200 and len(json.loads(body)["studies"]) == 3, body
    many_studies(hostile, 4)
    hostile.requests.clear()
    for path in ("/api/studies?accession_numbers=ACC-A", "/api/iso/download?accession_number=ACC-A"):
        answer = refused(*fetch(base + path), "limits.max_studies_per_accession", code="too_many_studies")
        assert "4 studies" in answer["error"]
    status, body = fetch(base + "/api/jobs", method="POST",
                         data=json.dumps({"accessions": ["ACC-A"], "action": "download"}).encode())
    assert status == 202, body
    job = json.loads(body)
    deadline = time.monotonic() + 60
    while job["state"] not in ("failed", "ready") and time.monotonic() < deadline:
        time.sleep(0.05)
        job = json.loads(fetch(base + "/api/jobs/" + job["id"])[1])
    assert job["state"] == "failed" and job["error"]["code"] == "too_many_studies", job
    assert job["error"]["status"] == 502 and "4 studies" in job["error"]["error"]
    assert not asked(hostile, "C-FIND", "IMAGE") and not asked(hostile, "C-MOVE")


def test_the_default_limit_is_twenty(server, hostile):
    """The issue's case: an accession answering 3,000 studies was minutes of IMAGE-level C-FINDs, unanswered."""
    _, base = server()
    many_studies(hostile, 3000)
    answer = refused(*fetch(base + "/api/studies?accession_numbers=ACC-A"), "limits.max_studies_per_accession",
                     code="too_many_studies")
    assert "3000 studies" in answer["error"] and "(20)" in answer["error"]
    assert not asked(hostile, "C-FIND", "IMAGE")
