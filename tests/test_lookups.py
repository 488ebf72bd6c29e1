"""GET /api/studies (SPEC §9): it shows patient names, so each lookup is audited (action ``query``), and
at most limits.max_jobs run at once, so that a crowd of lookups cannot starve health and downloads."""

import json
import random
import threading
import time
import urllib.error
import urllib.request

import pytest

from mkiso.http import application

ACCESSIONS = ("MR.180505.026", "ACC1002", "ACC2001", "DUP01", "ACC3001")  # 3 patients, 6 studies
LOOKUPS = 40


def fetch(url, timeout=120):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def timed(url):
    started = time.monotonic()
    status, _, body = fetch(url)
    return status, time.monotonic() - started, body


@pytest.mark.alone
def test_forty_lookups_at_once_leave_health_and_downloads_fast(make_service, live_server, archive):
    service = make_service(limits={"max_jobs": 4, "allow_multi_patient": True})
    base = live_server(application.Application(service.config, service))
    lookup = base + "/api/studies?accession_numbers=" + ",".join(ACCESSIONS)
    assert fetch(base + "/api/health")[0] == 200  # its tool checks and C-ECHOs are shared for 5 s
    alone = timed(base + "/api/iso/download?accession_number=ACC2001")  # this machine's pace, now
    answers, refused = [], []

    def clerk():
        while True:  # as a clerk would: try again when told busy, after the Retry-After given
            status, headers, body = fetch(lookup)
            if status != 503:
                answers.append((status, json.loads(body)))
                return
            assert json.loads(body)["code"] == "busy"
            refused.append(status)
            time.sleep(float(headers["Retry-After"]) * random.uniform(0.5, 1.5))

    clerks = [threading.Thread(target=clerk) for _ in range(LOOKUPS)]
    for thread in clerks:
        thread.start()
    time.sleep(0.5)  # the crowd is at it
    health = timed(base + "/api/health")
    download = timed(base + "/api/iso/download?accession_number=ACC2001")
    still_busy = len(answers) < LOOKUPS
    for thread in clerks:
        thread.join(300)
    assert health[0] == 200 and download[0] == 200, (health, download[:2])
    assert still_busy, "the lookups were over before health and the download were timed"
    # Under 1 s, as on an idle gateway (0.25 s alone, 0.6 s beside the lookups); on a test machine
    # loaded by other work (two cores), within four times the same download alone (seen: 3x at a
    # load of 5). Without the limit health took 15 s and the download as long.
    assert health[1] < 1.0 and download[1] < max(1.0, 4 * alone[1]), (
        "health %.2f s, download %.2f s (alone %.2f s)" % (health[1], download[1], alone[1]))
    assert len(answers) == LOOKUPS and refused, "at most limits.max_jobs lookups run at once; the others are 503"
    assert all(status == 200 and len(body["studies"]) == 6 for status, body in answers)
    with open(service.config.audit.path, encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    queries = [line for line in lines if line["action"] == "query"]
    assert len(queries) == LOOKUPS  # one per lookup that ran; a refused one showed nothing
    for line in queries:
        assert line["status"] == 200 and line["accessions"] == list(ACCESSIONS)
        assert line["patient_ids"] == ["PAT-1001", "PAT-2001", "PAT-3001"] and len(line["study_uids"]) == 6
    # each download's begun line (its outcome is written when its answer has closed)
    assert [line["action"] for line in lines if line["stage"] == "begun"] == ["download", "download"]


def test_a_lookup_that_finds_nothing_is_audited_too(make_service, wsgi_call):
    service = make_service()
    app = application.Application(service.config, service)
    assert wsgi_call(app, "/api/studies", query="accession_numbers=NOPE1").status == 404
    assert wsgi_call(app, "/api/studies", query="accession_numbers=ACC*").status == 400  # nothing asked, no line
    with open(service.config.audit.path, encoding="utf-8") as handle:
        [line] = [json.loads(line) for line in handle]
    assert line["action"] == "query" and line["status"] == 404 and line["code"] == "study_not_found"


def test_modalities_come_from_the_series_when_the_pacs_gives_none(make_service, wsgi_call):
    """dcmqrscp leaves ModalitiesInStudy empty; the clerk still sees MR and CT."""
    service = make_service()
    answer = wsgi_call(application.Application(service.config, service), "/api/studies",
                       query="accession_numbers=MR.180505.026,ACC1002").json()
    assert {study["accession"]: study["modalities"] for study in answer["studies"]} == {
        "MR.180505.026": ["MR"], "ACC1002": ["CT"]}
