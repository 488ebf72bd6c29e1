"""Jobs (SPEC §9): start, watch, fetch, cancel; the queue; event streams beside downloads."""

import glob
import json
import os
import shutil
import threading
import time
import urllib.request

import pytest

from mkiso import jobs
from mkiso.http import application
from mkiso.config import DCMTK_TOOLS
from conftest import job_leftovers
from discs import check_pdi, download, open_iso

JOB_KEYS = {"id", "action", "format", "accessions", "state", "progress", "error", "created", "updated", "expires",
            "links", "discs", "result", "omitted"}
PROGRESS_KEYS = {"phase", "images_expected", "images_received", "bytes_received", "disc_bytes"}


def slow_receiver_tools(root, seconds=1):
    """dcmtk as installed, but our receiver (the real storescp) sleeps ``seconds`` after every store.

    A C-MOVE of 20 images then takes 20 s: time to watch it, queue behind it or cancel it.
    """
    tools = root / "slow-dcmtk"
    tools.mkdir()
    for name in DCMTK_TOOLS:
        real = shutil.which(name)
        if name == "storescp":
            (tools / name).write_text('#!/bin/sh\nexec %s --sleep-after %d "$@"\n' % (real, seconds))
            (tools / name).chmod(0o755)
        else:
            (tools / name).symlink_to(real)
    return str(tools)


def slow_genisoimage(root, label, seconds=60):
    """genisoimage as installed, but for the disc labelled ``label`` it first waits ``seconds``.

    A job that stays running without holding the test PACS: dcmqrscp answers
    no C-FIND while one of its C-MOVEs runs, which would hide what is tested.
    """
    tool = root / "slow-genisoimage"
    tool.write_text('#!/bin/sh\ncase " $* " in *" -V %s "*) sleep %d;; esac\nexec %s "$@"\n'
                    % (label, seconds, shutil.which("genisoimage")))
    tool.chmod(0o755)
    return str(tool)


JSON = {"Content-Type": "application/json"}


def post_job(wsgi_call, app, accessions, action="download", headers=None):
    body = json.dumps({"accessions": accessions, "action": action}).encode()
    return wsgi_call(app, "/api/jobs", method="POST", body=body, headers=dict(JSON, **(headers or {})))


def wait_for(wsgi_call, app, job_id, states, timeout=60, headers=None):
    deadline = time.monotonic() + timeout
    while True:
        job = wsgi_call(app, "/api/jobs/" + job_id, headers=headers).json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def tools_running(name, study_uid):
    """Processes of ``name`` working on ``study_uid`` (from /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                args = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.endswith("/" + name) or arg == name for arg in args[:4]) and any(study_uid in a for a in args):
            found.append(int(pid))
    return found


@pytest.fixture
def app_of():
    return lambda service: application.Application(service.config, service)


def test_a_job_from_start_to_iso(make_service, wsgi_call, app_of, archive, tmp_path):
    service = make_service()
    app = app_of(service)
    response = post_job(wsgi_call, app, ["MR.180505.026", "ACC1002"])
    assert response.status == 202, response.body
    job = response.json()
    assert set(job) == JOB_KEYS and set(job["progress"]) == PROGRESS_KEYS
    assert response.header("Location") == "/api/jobs/" + job["id"] and len(job["id"]) == 32
    assert job["state"] in ("queued", "running") and job["action"] == "download" and job["format"] == "iso"
    job = wait_for(wsgi_call, app, job["id"], ("ready", "failed"))
    assert job["state"] == "ready", job
    wanted = archive.sop_uids("MR.180505.026", "ACC1002")
    assert job["progress"]["images_expected"] == job["progress"]["images_received"] == len(wanted)
    assert job["progress"]["disc_bytes"] > 0 and job["expires"] and job["error"] is None
    link = job["links"]["iso"]
    path, query = link.split("?", 1)
    iso = wsgi_call(app, path, query=query)
    assert iso.status == 200 and len(iso.body) == job["progress"]["disc_bytes"]
    assert iso.header("Content-Disposition").startswith('attachment; filename="MULLER_JURGEN.iso"')
    iso_path = tmp_path / "job.iso"
    iso_path.write_bytes(iso.body)
    check_pdi(open_iso(str(iso_path), str(tmp_path / "disc")), wanted)
    # fetched again, in part, or only its headers: the same disc, no second retrieval
    part = wsgi_call(app, path, query=query, headers={"Range": "bytes=100-199"})
    assert part.status == 206 and part.body == iso.body[100:200]
    head = wsgi_call(app, path, method="HEAD", query=query)
    assert head.status == 200 and head.header("Content-Length") == str(len(iso.body)) and head.body == b""
    with open(service.config.audit.path) as handle:
        lines = [json.loads(line) for line in handle]
    # the job's line at ready, then each fetch's begun and ended lines (the HEAD sends nothing)
    assert [(line["stage"], line["bytes"]) for line in lines] == [
        ("ended", len(iso.body)), ("begun", 0), ("ended", len(iso.body)), ("begun", 0), ("ended", 100)]


def test_a_failed_job_shows_the_error_and_has_no_disc(make_service, wsgi_call, app_of):
    service = make_service()
    app = app_of(service)
    job = wait_for(wsgi_call, app, post_job(wsgi_call, app, ["NOPE1", "NOPE2"]).json()["id"], ("failed",))
    assert job["state"] == "failed"
    assert job["error"]["code"] == "study_not_found" and job["error"]["status"] == 404
    assert "NOPE1, NOPE2" in job["error"]["error"]
    iso = wsgi_call(app, "/api/jobs/%s/iso" % job["id"])
    assert iso.status == 404 and iso.json()["code"] == "no_disc"


@pytest.mark.parametrize("body, code", [
    (b"not json", "bad_request"),
    (b"[1, 2]", "bad_request"),
    (json.dumps({"action": "download"}).encode(), "missing_parameter"),
    (json.dumps({"accessions": "ACC2001"}).encode(), "missing_parameter"),
    (json.dumps({"accessions": ["ACC*"]}).encode(), "bad_accession"),
    (json.dumps({"accessions": ["ACC2001,ACC1002"]}).encode(), "bad_accession"),
    (json.dumps({"accessions": []}).encode(), "missing_parameter"),
    (json.dumps({"accessions": ["ACC2001"], "action": "burn"}).encode(), "bad_request"),
])
def test_bad_job_requests_are_400_and_start_nothing(make_service, wsgi_call, app_of, silent_pacs, body, code):
    service = make_service()
    response = wsgi_call(app_of(service), "/api/jobs", method="POST", body=body, headers=JSON)
    assert response.status == 400 and response.json()["code"] == code, response.body
    assert service.jobs.recent() == []
    with pytest.raises(BlockingIOError):
        silent_pacs.accept()


def test_print_job_without_a_publisher_is_503(make_service, wsgi_call, app_of):
    response = post_job(wsgi_call, app_of(make_service()), ["ACC2001"], action="print")
    assert response.status == 503 and response.json()["code"] == "publisher_not_configured"


def test_unknown_job_is_404_and_ids_are_checked(make_service, wsgi_call, app_of):
    app = app_of(make_service())
    assert wsgi_call(app, "/api/jobs/" + "0" * 32).json()["code"] == "job_not_found"
    assert wsgi_call(app, "/api/jobs/../../etc").status == 404


def test_cancel_during_the_c_move_kills_the_tools_and_removes_the_files(make_service, wsgi_call, app_of, archive,
                                                                        tmp_path):
    service = make_service(tools={"dcmtk_dir": slow_receiver_tools(tmp_path)})
    app = app_of(service)
    study_uid = archive.by_accession("BIG01")[0].study_uid
    job = post_job(wsgi_call, app, ["BIG01"]).json()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = wsgi_call(app, "/api/jobs/" + job["id"]).json()
        if current["progress"]["images_received"] >= 2:
            break
        time.sleep(0.1)
    assert current["progress"]["phase"] == "retrieve", current
    # 20 once the manifest is in (SPEC §3.9: it runs beside the C-MOVE); dcmqrscp gives no count at STUDY
    # level and answers no C-FIND while its C-MOVE runs, so until then nothing is known.
    assert 2 <= current["progress"]["images_received"] < 20 and current["progress"]["images_expected"] in (0, 20)
    assert tools_running("movescu", study_uid), "the C-MOVE should be running"
    cancelled = wsgi_call(app, "/api/jobs/" + job["id"], method="DELETE")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["error"]["code"] == "cancelled"
    assert tools_running("movescu", study_uid) == []
    assert job_leftovers(service) == []
    deadline = time.monotonic() + 30  # the PACS may go on sending: the receiver sweeps what nobody expects
    while time.monotonic() < deadline and os.listdir(service.path("inbox")):
        time.sleep(0.2)
    assert os.listdir(service.path("inbox")) == []
    assert wsgi_call(app, "/api/jobs/%s/iso" % job["id"]).status == 404


def wrap_tool(tools, name, script):
    """dcmtk's ``name`` in the ``tools`` folder (``slow_receiver_tools``) replaced by a shell ``script``;
    ``%(real)s`` in it is the installed tool, ``%(dir)s`` the folder."""
    wrapper = os.path.join(tools, name)
    os.unlink(wrapper)
    with open(wrapper, "w") as handle:
        handle.write("#!/bin/sh\n" + script % {"real": shutil.which(name), "dir": tools})
    os.chmod(wrapper, 0o755)


def test_cancel_while_the_manifest_is_asked_beside_the_move_kills_its_findscu(make_service, wsgi_call, app_of,
                                                                             archive, tmp_path):
    """SPEC §3.9: the manifest's IMAGE-level C-FIND runs on its own association beside the C-MOVE, in a
    thread of its own.  Its findscu is the job's too: a cancel kills it with the movescu (here it hangs,
    as against a PACS that holds it until its C-MOVE ends), and nothing of the job is left.  Its timeout
    is longer than a cancel waits for the job to end (jobs.CANCEL_WAIT_S): only the kill ends it in time."""
    tools = slow_receiver_tools(tmp_path)
    wrap_tool(tools, "findscu", 'case " $* " in *QueryRetrieveLevel=IMAGE*) sleep 300;; esac\nexec %(real)s "$@"\n')
    app = app_of(make_service(tools={"dcmtk_dir": tools}, timeouts={"find_s": 2 * jobs.CANCEL_WAIT_S}))
    study_uid = archive.by_accession("BIG01")[0].study_uid
    job = post_job(wsgi_call, app, ["BIG01"]).json()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = wsgi_call(app, "/api/jobs/" + job["id"]).json()
        if current["progress"]["images_received"] >= 2 and tools_running("findscu", study_uid):
            break
        time.sleep(0.1)
    assert current["progress"]["phase"] == "retrieve", current
    assert tools_running("movescu", study_uid) and tools_running("findscu", study_uid), "both should be running"
    cancelled = wsgi_call(app, "/api/jobs/" + job["id"], method="DELETE")
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"
    assert tools_running("findscu", study_uid) == [] and tools_running("movescu", study_uid) == []
    assert job_leftovers(app.service) == []


def test_a_manifest_refused_beside_the_move_is_asked_again_after_it(make_service, wsgi_call, app_of, archive,
                                                                    tmp_path):
    """A PACS that serves one association at a time refuses the manifest's C-FIND while its C-MOVE runs
    (SPEC §3.9): the lookup is asked again once the transfer has ended, and the disc is made, checked
    against that manifest.  The first IMAGE-level findscu waits for the C-MOVE to begin and is turned away
    as such a PACS turns it away; the log says when each ran."""
    tools = slow_receiver_tools(tmp_path)
    wrap_tool(tools, "movescu", ': > %(dir)s/moving\n%(real)s "$@"\nstatus=$?\nrm -f %(dir)s/moving\nexit $status\n')
    wrap_tool(tools, "findscu", """case " $* " in *QueryRetrieveLevel=IMAGE*)
  if [ ! -e %(dir)s/refused ]; then
    : > %(dir)s/refused
    for i in $(seq 100); do [ -e %(dir)s/moving ] && break; sleep 0.1; done
    [ -e %(dir)s/moving ] && echo refused-during-the-move >> %(dir)s/lookups
    echo "E: Association Request Failed: 0006:0317 Peer aborted Association (or never connected)" >&2
    echo "E: Association Rejected: Result: Rejected Transient, Reason: Local Limit Exceeded" >&2
    exit 1
  fi
  [ -e %(dir)s/moving ] && echo asked-during-the-move >> %(dir)s/lookups || echo asked-after-the-move >> %(dir)s/lookups
esac
exec %(real)s "$@"
""")
    app = app_of(make_service(tools={"dcmtk_dir": tools}))
    _, disc, _ = download(wsgi_call, app, "/api/iso/download", tmp_path, "accession_number=ACC2001")
    with open(os.path.join(tools, "lookups")) as lookups:
        assert lookups.read().split() == ["refused-during-the-move", "asked-after-the-move"]
    check_pdi(disc, archive.sop_uids("ACC2001"))
    assert job_leftovers(app.service) == []


def test_the_queue_waits_for_a_slot_and_refuses_beyond_max_queued(make_service, wsgi_call, app_of, tmp_path):
    service = make_service(tools={"dcmtk_dir": slow_receiver_tools(tmp_path)}, limits={"max_jobs": 1},
                           jobs={"max_queued": 1})
    app = app_of(service)
    first = post_job(wsgi_call, app, ["BIG01"]).json()
    wait_for(wsgi_call, app, first["id"], ("running",))
    second = post_job(wsgi_call, app, ["ACC2001"])
    assert second.status == 202 and second.json()["state"] == "queued"
    third = post_job(wsgi_call, app, ["ACC3001"])
    assert third.status == 503 and third.json()["code"] == "busy" and third.header("Retry-After")
    time.sleep(0.5)
    assert wsgi_call(app, "/api/jobs/" + second.json()["id"]).json()["state"] == "queued"
    assert wsgi_call(app, "/api/jobs/" + second.json()["id"], method="DELETE").json()["state"] == "cancelled"
    assert wsgi_call(app, "/api/jobs/" + first["id"], method="DELETE").json()["state"] == "cancelled"
    listed = wsgi_call(app, "/api/jobs").json()["jobs"]
    assert [job["id"] for job in listed] == [second.json()["id"], first["id"]]  # newest first
    assert "BIG01" in json.dumps(listed) and "ROE" not in json.dumps(listed)  # no patient names


def test_finished_jobs_expire(make_service, wsgi_call, app_of):
    service = make_service(jobs={"keep_s": 1})
    app = app_of(service)
    job = wait_for(wsgi_call, app, post_job(wsgi_call, app, ["ACC2001"]).json()["id"], ("ready",))
    assert os.listdir(service.path("jobs"))
    time.sleep(1.1)
    assert wsgi_call(app, "/api/jobs/" + job["id"]).status == 404
    assert wsgi_call(app, "/api/jobs/%s/iso" % job["id"]).status == 404
    assert os.listdir(service.path("jobs")) == []


def test_the_download_token_opens_only_its_own_jobs_iso(make_service, wsgi_call, app_of):
    key = {"X-API-Key": "desk-key-0123456789"}
    service = make_service(auth={"enabled": True, "keys": {"desk": key["X-API-Key"]}})
    app = app_of(service)
    assert post_job(wsgi_call, app, ["ACC2001"]).status == 401
    first = wait_for(wsgi_call, app, post_job(wsgi_call, app, ["ACC2001"], headers=key).json()["id"], ("ready",),
                     headers=key)
    other = wait_for(wsgi_call, app, post_job(wsgi_call, app, ["ACC3001"], headers=key).json()["id"], ("ready",),
                     headers=key)
    path, query = first["links"]["iso"].split("?", 1)
    assert "key" not in query and key["X-API-Key"] not in first["links"]["iso"]
    assert wsgi_call(app, path, query=query).status == 200
    assert wsgi_call(app, path).status == 401
    assert wsgi_call(app, path, query="token=" + "x" * 43).status == 401
    assert wsgi_call(app, path, query=other["links"]["iso"].split("?", 1)[1]).status == 401
    assert wsgi_call(app, "/api/jobs/" + first["id"]).status == 401  # the token opens the ISO only
    assert wsgi_call(app, path, headers=key).status == 200


def test_a_synchronous_download_is_a_job_that_can_be_cancelled(make_service, wsgi_call, app_of, tmp_path):
    service = make_service(tools={"dcmtk_dir": slow_receiver_tools(tmp_path)})
    app = app_of(service)
    answers = []
    request = threading.Thread(target=lambda: answers.append(
        wsgi_call(app, "/mkiso.php", query="accession_number=BIG01")))
    request.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not service.jobs.recent():
        time.sleep(0.05)
    [job] = wsgi_call(app, "/api/jobs").json()["jobs"]
    assert job["state"] == "running" and job["accessions"] == ["BIG01"]
    wsgi_call(app, "/api/jobs/" + job["id"], method="DELETE")
    request.join(30)
    assert answers[0].status == 409 and answers[0].json()["code"] == "cancelled"
    assert job_leftovers(service) == []


# -- event streams ---------------------------------------------------------------


def read_events(url, limit=1000, timeout=60):
    """The data of each server-sent event, until the stream ends."""
    events = []
    with urllib.request.urlopen(url, timeout=timeout) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        for line in stream:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if len(events) >= limit:
                    break
    return events


def test_events_follow_the_job_to_ready(make_service, live_server, app_of, wsgi_call, tmp_path):
    service = make_service(tools={"dcmtk_dir": slow_receiver_tools(tmp_path)})
    base = live_server(app_of(service))
    job = post_job(wsgi_call, app_of(service), ["BIG01"]).json()
    events = read_events(base + "/api/jobs/%s/events" % job["id"])
    states = [event["state"] for event in events]
    assert states[-1] == "ready" and set(states) <= {"queued", "running", "ready"}
    received = [event["progress"]["images_received"] for event in events]
    assert received == sorted(received) and received[-1] == 20
    assert len(set(received)) >= 5, "the bar should move: %s" % received
    phases = [event["progress"]["phase"] for event in events]
    assert {"retrieve", "ready"} <= set(phases)


@pytest.mark.alone
def test_twenty_event_streams_do_not_starve_health_or_downloads(make_service, live_server, app_of, wsgi_call,
                                                                 tmp_path, archive):
    service = make_service(tools={"genisoimage": slow_genisoimage(tmp_path, "BIG01")}, limits={"max_jobs": 4})
    base = live_server(app_of(service))
    job = post_job(wsgi_call, app_of(service), ["BIG01"]).json()
    wait_for(wsgi_call, app_of(service), job["id"], ("failed",), timeout=5)  # into the slow genisoimage
    opened = []
    for clerk in range(20):  # twenty clerks, at twenty addresses (nginx says which): each may have 8
        stream = urllib.request.urlopen(urllib.request.Request(
            base + "/api/jobs/%s/events" % job["id"], headers={"X-Forwarded-For": "10.0.0.%d" % clerk}), timeout=60)
        assert stream.readline().startswith(b"data: ")
        opened.append(stream)
    try:
        with urllib.request.urlopen(base + "/api/health", timeout=10) as health:
            assert health.status == 200
        with urllib.request.urlopen(base + "/api/iso/download?accession_number=ACC2001", timeout=30) as iso:
            iso_path = tmp_path / "beside.iso"
            iso_path.write_bytes(iso.read())
        check_pdi(open_iso(str(iso_path), str(tmp_path / "beside")), archive.sop_uids("ACC2001"))
        assert wsgi_call(app_of(service), "/api/jobs/" + job["id"]).json()["state"] == "running"
    finally:
        for stream in opened:
            stream.close()
        wsgi_call(app_of(service), "/api/jobs/" + job["id"], method="DELETE")


# -- what the desk page shows ------------------------------------------------------


def test_studies_lists_what_the_pacs_holds(make_service, wsgi_call, app_of, archive):
    service = make_service()
    response = wsgi_call(app_of(service), "/api/studies", query="accession_numbers=ACC1002,MR.180505.026")
    assert response.status == 200, response.body
    assert [study["accession"] for study in response.json()["studies"]] == ["ACC1002", "MR.180505.026"]
    [smith] = wsgi_call(app_of(service), "/api/studies", query="accession_number=ACC3001").json()["studies"]
    assert (smith["patient_name"], smith["patient_id"], smith["date"]) == ("SMITH^JOHN", "PAT-3001", "20240115")
    assert (smith["series"], smith["images"]) == (2, 5)
    assert smith["description"] == "MR sample study"
    assert smith["study_uid"] == archive.by_accession("ACC3001")[0].study_uid
    assert wsgi_call(app_of(service), "/api/studies", query="accession_numbers=NOPE").status == 404
    assert wsgi_call(app_of(service), "/api/studies", query="accession_numbers=ACC2001,ACC3001").status == 409


def test_the_desk_page_is_one_self_contained_file(make_service, wsgi_call, app_of):
    page = wsgi_call(app_of(make_service()), "/")
    assert page.status == 200 and page.header("Content-Type") == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.header("Content-Security-Policy")
    text = page.body.decode()
    for external in ("http://", "https://", "src=\"/", "href=\"/"):
        assert external not in text, external


def test_a_print_job_ends_done_with_the_publishers_answer(make_service, wsgi_call, app_of, archive, tmp_path):
    from test_print import FakeRimage
    rimage = FakeRimage(str(tmp_path / "rimage"))
    try:
        service = make_service(publisher={"host": "127.0.0.1", "port": rimage.port})
        app = app_of(service)
        job = post_job(wsgi_call, app, ["ACC2001"], action="print")
        assert job.status == 202
        job = wait_for(wsgi_call, app, job.json()["id"], ("done", "failed"))
        assert rimage.received_sop_uids() == archive.sop_uids("ACC2001")
    finally:
        rimage.stop()
    assert job["state"] == "done" and job["action"] == "print", job
    assert job["result"] == {"status": "sent", "accessions": ["ACC2001"], "studies": 1,
                             "instances": len(archive.sop_uids("ACC2001")), "discs": 1, "media": "dvd"}
    assert "iso" not in job["links"]
    assert wsgi_call(app, "/api/jobs/%s/iso" % job["id"]).json()["code"] == "no_disc"


def test_a_ready_jobs_folder_keeps_only_its_disc(make_service, wsgi_call, app_of):
    """The staging tree (the last links to the images) goes in the background once the ISO is written."""
    service = make_service()
    app = app_of(service)
    job = wait_for(wsgi_call, app, post_job(wsgi_call, app, ["ACC2001"]).json()["id"], ("ready",))
    [folder] = os.listdir(service.path("jobs"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.listdir(service.path("jobs", folder)) != ["disc.iso"]:
        time.sleep(0.05)
    assert os.listdir(service.path("jobs", folder)) == ["disc.iso"], job


def test_with_named_keys_a_caller_sees_and_cancels_only_its_own_jobs(make_service, wsgi_call, app_of, tmp_path):
    keys = {"desk-1": "desk-one-0123456789", "desk-2": "desk-two-0123456789", "it": "it-admin-0123456789"}
    service = make_service(auth={"enabled": True, "keys": keys, "admin_keys": ["it"]},
                           tools={"genisoimage": slow_genisoimage(tmp_path, "ACC2001", seconds=30)})
    app = app_of(service)
    as_ = {name: {"X-API-Key": key} for name, key in keys.items()}
    mine = post_job(wsgi_call, app, ["ACC3001"], headers=as_["desk-1"]).json()
    mine = wait_for(wsgi_call, app, mine["id"], ("ready",), headers=as_["desk-1"])
    running = post_job(wsgi_call, app, ["ACC2001"], headers=as_["desk-1"]).json()
    token = mine["links"]["iso"].split("token=")[1]

    def listed(name):
        return wsgi_call(app, "/api/jobs", headers=as_[name]).json()["jobs"]

    assert {job["id"] for job in listed("desk-1")} == {mine["id"], running["id"]}
    assert token in json.dumps(listed("desk-1"))  # its own caller is shown the token
    assert listed("desk-2") == []
    for method in ("GET", "DELETE"):
        answer = wsgi_call(app, "/api/jobs/" + running["id"], method=method, headers=as_["desk-2"])
        assert answer.status == 404 and answer.json()["code"] == "job_not_found"
    assert wsgi_call(app, "/api/jobs/%s/events" % mine["id"], headers=as_["desk-2"]).status == 404
    assert wsgi_call(app, "/api/jobs/%s/iso" % mine["id"], headers=as_["desk-2"]).status == 401
    seen_by_it = listed("it")
    assert {job["id"] for job in seen_by_it} == {mine["id"], running["id"]}
    assert token not in json.dumps(seen_by_it)  # an admin sees every job, no one else's token
    assert "token" not in json.dumps(wsgi_call(app, "/api/jobs/" + mine["id"], headers=as_["it"]).json())
    cancelled = wsgi_call(app, "/api/jobs/" + running["id"], method="DELETE", headers=as_["it"])
    assert cancelled.status == 200 and cancelled.json()["state"] == "cancelled"


def test_without_named_keys_the_list_shows_no_token(make_service, wsgi_call, app_of):
    app = app_of(make_service())
    job = wait_for(wsgi_call, app, post_job(wsgi_call, app, ["ACC3001"]).json()["id"], ("ready",))
    assert "token=" in job["links"]["iso"]  # the job itself: its id is what opens it
    [listed] = wsgi_call(app, "/api/jobs").json()["jobs"]
    assert listed["id"] == job["id"] and "token" not in json.dumps(listed)


@pytest.mark.parametrize("fmt", ["iso", "zip"])
def test_a_disc_is_read_back_before_it_is_ready(make_service, wsgi_call, app_of, caplog, monkeypatch, fmt):
    """A byte of an image changed on the disk between staging and hand-over (a failing disk, a
    meddler): the read-back (SPEC §4.6) finds it, and the job fails instead of offering the disc."""
    service = make_service()
    app = app_of(service)
    read_back = service.steps.read_back

    def damaged_then_read_back(job):
        disc = job.discs[0]
        if disc.format == "iso":
            with open(disc.path, "r+b") as handle:  # inside the last image's header
                at = handle.read().rindex(b"DICM") + 100
                handle.seek(at)
                byte = handle.read(1)
                handle.seek(at)
                handle.write(bytes([byte[0] ^ 0xFF]))
        else:
            images = sorted(glob.glob(os.path.join(disc.tree, "DICOM", "*", "*", "*", "*")))
            with open(images[0], "r+b") as handle:  # a hard link of the received file: a copy, as a disk would
                data = bytearray(handle.read())
            os.unlink(images[0])
            data[-1] ^= 0xFF
            with open(images[0], "wb") as handle:
                handle.write(data)
        read_back(job)

    monkeypatch.setattr(service.steps, "read_back", damaged_then_read_back)
    body = json.dumps({"accessions": ["ACC2001"], "action": "download", "format": fmt}).encode()
    created = wsgi_call(app, "/api/jobs", method="POST", body=body, headers=JSON)
    job = wait_for(wsgi_call, app, created.json()["id"], ("ready", "failed"))
    assert job["state"] == "failed" and job["error"]["code"] == "disc_check_failed", job
    assert fmt not in job["links"] and "did not pass its read-back check (1 problem in" in job["error"]["error"]
    assert "read-back of disc 1: " in caplog.text


def test_a_sound_disc_passes_its_read_back(make_service, wsgi_call, app_of, caplog):
    service = make_service()
    app = app_of(service)
    job = wait_for(wsgi_call, app, post_job(wsgi_call, app, ["ACC2001"]).json()["id"], ("ready", "failed"))
    assert job["state"] == "ready", job
    assert "read-back" not in caplog.text
