"""The work dir after a crash: mkiso's own leftovers go, nothing else does."""

import os

from mkiso.service import INBOX, JOBS, RETRIEVALS


def test_crash_leftovers_are_removed_at_start(settings, make_service):
    work_dir = settings["paths"]["work_dir"]
    for folder in (INBOX, JOBS, RETRIEVALS):
        os.makedirs(os.path.join(work_dir, folder, "left-by-a-crash"))
        with open(os.path.join(work_dir, folder, "left-by-a-crash", "IMG"), "w") as handle:
            handle.write("patient data")
    with open(os.path.join(work_dir, "not-ours.txt"), "w") as handle:
        handle.write("an operator's note")
    service = make_service()
    for folder in (INBOX, JOBS, RETRIEVALS):
        assert os.listdir(service.path(folder)) == []
    assert os.path.exists(os.path.join(work_dir, "not-ours.txt"))
