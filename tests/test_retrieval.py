"""What a retrieval accepts: the C-MOVE's own report and every file's header."""

import os

import pytest

from mkiso import demo, errors, process
from mkiso.dicom import pacs
from mkiso.dicom.retrieval import Listed, verify

FINAL_SUCCESS = """\
I: Received Move Response 1 (Pending)
D: Completed Suboperations       : 1
D: DIMSE Status                  : 0xff00: Pending: Sub-operations are continuing
I: Received Final Move Response
D: ===================== INCOMING DIMSE MESSAGE ====================
D: Remaining Suboperations       : none
D: Completed Suboperations       : 3
D: Failed Suboperations          : 0
D: Warning Suboperations         : 0
D: DIMSE Status                  : 0x0000: Success: Sub-operations complete - No failures or warnings
"""

FINAL_REFUSED = """\
W: Move response with error status (Refused: MoveDestinationUnknown)
I: Received Final Move Response
D: Remaining Suboperations       : none
D: Completed Suboperations       : 0
D: Failed Suboperations          : 0
D: Warning Suboperations         : 0
D: DIMSE Status                  : 0xa801: Refused: Move Destination unknown
"""


def test_parse_final_move_response():
    move = pacs.parse_move_output(FINAL_SUCCESS)
    assert (move.status, move.completed, move.failed, move.warning) == (0, 3, 0, 0)
    assert move.succeeded and move.delivered == 3


def test_parse_refused_move():
    move = pacs.parse_move_output(FINAL_REFUSED)
    assert move.status == 0xA801 and not move.succeeded
    assert "Move Destination unknown" in move.status_text


def test_no_final_response_is_none():
    assert pacs.parse_move_output("E: Association Request Failed: connection refused") is None


def test_failure_reasons():
    assert process.failure_reason("F: Association Rejected:\nF: Result: Rejected Permanent\n"
                               "F: Reason: Called AE Title Not Recognized\n") == \
        "association rejected: Called AE Title Not Recognized"
    assert "DUL network read timeout" in process.failure_reason(
        "I: Requesting Association\nF: Association Request Failed:\nF: 0006:031a DUL network read timeout\n")
    peer = pacs.Peer("PACS", "ABPACS", "127.0.0.1", 11112)
    with pytest.raises(errors.UpstreamTimeout):
        pacs.raise_for_failure("F: Association Request Failed:\nF: 0006:031a DUL network read timeout\n",
                               peer, "C-FIND")
    with pytest.raises(errors.UpstreamFailed):
        pacs.raise_for_failure("E: Association Request Failed: Connection refused\n", peer, "C-FIND")


# findscu -v against Orthanc, which does not know the calling AE title: the query's dump comes first.
ABORTED_FIND = "I: Association Accepted (Max Send PDV: 16372)\nI: Sending Find Request (MsgID 1)\n" \
    "E: Find Failed, query keys:\nE: \nE: # Dicom-File-Format\nE: \nE: # Dicom-Meta-Information-Header\n" \
    "E: # Used TransferSyntax: Little Endian Explicit\nE: \nE: # Dicom-Data-Set\n" \
    "E: # Used TransferSyntax: Little Endian Explicit\n" + "".join(
        "E: (0010,%04x) PN (no value available)                     #   0, 0 PatientName\n" % n for n in range(20)) + \
    "E: \nE: 0006:0317 Peer aborted Association (or never connected)\nI: Peer Aborted Association\n"


def test_the_cause_after_a_dumped_query_is_kept():
    """Before, the dump filled the reason's 300 characters and the cause was cut off."""
    assert process.failure_reason(ABORTED_FIND) == \
        "Find Failed, query keys: 0006:0317 Peer aborted Association (or never connected)"
    assert pacs.refused_caller(ABORTED_FIND)
    assert not pacs.refused_caller(ABORTED_FIND.replace("I: Sending", "I: Received Find Response 1 (Pending)\nI: "))


@pytest.fixture
def received(tmp_path):
    sample = demo.SampleStudy("PAT-9", "TEST^ONE", "ACC9", series=(3,))
    paths = demo.write_study(sample, str(tmp_path / "in"))
    study = pacs.Study("ACC9", sample.study_uid, "PAT-9", "TEST^ONE")
    return sample, study, paths


def intruder(study, tmp_path, patient_id, name="OTHER^ONE"):
    """One more image with the study's UID (and this patient), as anyone could send to the receiver."""
    extra = demo.SampleStudy(patient_id, name, "ACC9", series=(1,))
    extra.study_uid = study.study_uid
    return demo.write_study(extra, str(tmp_path / ("intruder-" + patient_id)))


def move(completed, failed=0, status=0):
    return pacs.MoveResult(status, "Success" if status == 0 else "Failed", completed, failed, 0)


def test_complete_study_passes(received):
    sample, study, paths = received
    files = verify(study, move(3), paths, None)
    assert {f.sop_uid for f in files} == set(sample.sop_uids)
    assert all(f.series_number == 1 for f in files)


@pytest.mark.parametrize("result, message", [
    (move(2, failed=1, status=0xB000), "did not deliver"),
    (move(0, status=0xA801), "did not deliver"),
    (move(4), "reported 4 images sent"),
])
def test_bad_move_reports_are_502(received, result, message):
    _, study, paths = received
    with pytest.raises(errors.UpstreamFailed, match=message) as caught:
        verify(study, result, paths, None)
    assert caught.value.status == 502


def test_fewer_files_than_the_pacs_lists(received):
    _, study, paths = received
    study.instances = 5
    with pytest.raises(errors.UpstreamFailed, match="lists 5 images"):
        verify(study, move(3), paths, None)


def test_no_files_at_all(received):
    _, study, _ = received
    with pytest.raises(errors.UpstreamFailed, match="sent no images"):
        verify(study, move(None), [], None)


def test_file_of_another_patient_stops_the_disc(received, tmp_path):
    _, study, paths = received
    paths = paths + intruder(study, tmp_path, "PAT-OTHER")
    with pytest.raises(errors.UpstreamFailed, match="its PatientID") as caught:
        verify(study, move(4), paths, None)
    assert caught.value.code == "patient_mismatch"


def test_file_of_another_study_stops_the_disc(received, tmp_path):
    _, study, paths = received
    other = demo.SampleStudy("PAT-9", "TEST^ONE", "ACC9", series=(1,))
    paths = paths + demo.write_study(other, str(tmp_path / "other"))
    with pytest.raises(errors.UpstreamFailed, match="another study"):
        verify(study, move(4), paths, None)


def test_unreadable_file_stops_the_disc(received, tmp_path):
    _, study, paths = received
    broken = str(tmp_path / "broken")
    with open(broken, "wb") as handle:
        handle.write(b"not dicom at all")
    with pytest.raises(errors.UpstreamFailed, match="could not be read as DICOM"):
        verify(study, move(4), paths + [broken], None)
    assert os.path.exists(broken)


# -- the manifest (SPEC §3.6) ------------------------------------------------

def test_manifest_equal_to_what_arrived_passes(received):
    sample, study, paths = received
    files = verify(study, move(3), paths, list(sample.sop_uids))
    assert sorted(f.sop_uid for f in files) == sorted(sample.sop_uids)


def test_manifest_missing_image_is_incomplete_with_the_number(received):
    sample, study, paths = received
    manifest = list(sample.sop_uids) + ["1.2.3.4.5.6.7"]
    with pytest.raises(errors.UpstreamFailed, match="1 of the 4 images the PACS lists") as caught:
        verify(study, move(3), paths, manifest)
    assert caught.value.code == "incomplete_study"


def test_a_manifest_made_as_the_answers_are_read_counts_a_uid_answered_twice_once(received):
    """A C-MOVE's manifest is made straight from findscu's answers (``Listed``, never a dict of them): a
    PACS answering an image twice lists it once, as before, and the study is complete; one image more
    listed is still one missing."""
    sample, study, paths = received
    uids = list(sample.sop_uids)
    files = verify(study, move(3), paths, Listed(iter(uids + uids[:1])))
    assert sorted(f.sop_uid for f in files) == sorted(uids)
    with pytest.raises(errors.UpstreamFailed, match="1 of the 4 images the PACS lists") as caught:
        verify(study, move(3), paths, Listed(iter(uids + uids[:1] + ["1.2.3.4.5.6.7"])))
    assert caught.value.code == "incomplete_study"


def test_image_not_in_the_manifest_is_unexpected(received, tmp_path):
    sample, study, paths = received
    paths = paths + intruder(study, tmp_path, "PAT-9", "TEST^ONE")
    with pytest.raises(errors.UpstreamFailed, match="1 images arrived .* that the PACS does not list") as caught:
        verify(study, move(4), paths, list(sample.sop_uids))
    assert caught.value.code == "unexpected_image"


def test_an_image_twice_is_unexpected_even_without_a_manifest(received, tmp_path):
    _, study, paths = received
    twin = str(tmp_path / "twin")
    with open(paths[0], "rb") as source, open(twin, "wb") as target:
        target.write(source.read())
    for manifest in (None, [f.sop_uid for f in verify(study, move(3), paths, None)]):
        with pytest.raises(errors.UpstreamFailed, match="1 images of .* arrived more than once") as caught:
            verify(study, move(3), paths + [twin], manifest)
        assert caught.value.code == "unexpected_image"


GET_SUCCESS = """\
I: Received C-GET Response (Pending)
I: Received C-STORE Request (MsgID 2)
I: Sending C-STORE Response (Success)
I: Received C-GET Response (Success)
I: Final status report from last C-GET message:
I:   Number of Remaining Suboperations : 0
I:   Number of Completed Suboperations : 2
I:   Number of Failed Suboperations    : 0
I:   Number of Warning Suboperations   : 0
"""


def test_parse_get_output():
    got = pacs.parse_get_output(GET_SUCCESS)
    assert (got.status, got.completed, got.failed, got.warning) == (0, 2, 0, 0) and got.succeeded
    failed = pacs.parse_get_output(GET_SUCCESS.replace("Response (Success)", "Response (Failed: UnableToProcess)")
                                   .replace("Failed Suboperations    : 0", "Failed Suboperations    : 1"))
    assert not failed.succeeded and failed.failed == 1 and "UnableToProcess" in failed.status_text
    assert pacs.parse_get_output("F: Association Request Failed: connection refused") is None
