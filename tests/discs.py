"""Reading a produced ISO back, as a person's viewer would."""

import os
import re
import subprocess

import pydicom

from mkiso.dicom.receiver import listening_sockets

FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")


class Disc:
    def __init__(self, root):
        self.root = root
        self.files = sorted(
            os.path.relpath(os.path.join(folder, name), root)
            for folder, _, names in os.walk(root) for name in names)

    def sop_uids(self, paths):
        return {str(pydicom.dcmread(os.path.join(self.root, path), stop_before_pixels=True).SOPInstanceUID)
                for path in paths}

    def dicomdir_references(self):
        dicomdir = pydicom.dcmread(os.path.join(self.root, "DICOMDIR"))
        references = []
        for record in dicomdir.DirectoryRecordSequence:
            file_id = record.get("ReferencedFileID")
            if file_id is not None:
                references.append([file_id] if isinstance(file_id, str) else list(file_id))
        return dicomdir, references


def open_iso(iso_path, dest):
    """Extract the ISO with osirrox (Rock Ridge names) into dest."""
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["osirrox", "-indev", iso_path, "-extract", "/", dest],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Disc(dest)


def joliet_listing(iso_path):
    """The Joliet names, as Windows sees the disc."""
    result = subprocess.run(["isoinfo", "-J", "-f", "-i", iso_path], check=True, capture_output=True, text=True)
    return sorted(line.strip() for line in result.stdout.splitlines() if line.strip())


def volume_id(iso_path):
    result = subprocess.run(["isoinfo", "-d", "-i", iso_path], check=True, capture_output=True, text=True)
    return re.search(r"^Volume id: (.*)$", result.stdout, re.M).group(1).strip()


def check_pdi(disc, expected_sop_uids):
    """The PDI checks: references both ways, file IDs, SOP UIDs, README at root."""
    dicomdir, references = disc.dicomdir_references()
    images = [path for path in disc.files if path.startswith("DICOM" + os.sep)]
    referenced = ["/".join(parts) for parts in references]
    assert sorted(referenced) == sorted(images), "DICOMDIR and disc disagree"
    assert len(set(referenced)) == len(referenced), "a file is referenced twice"
    for parts in references:
        assert len(parts) <= 8 and all(FILE_ID.match(part) for part in parts), parts
    assert disc.sop_uids(images) == set(expected_sop_uids)
    assert "README.TXT" in disc.files and "DICOMDIR" in disc.files
    return dicomdir


def download(wsgi_call, app, path, tmp_path, query, name="disc"):
    """GET an ISO in-process; returns (response, opened disc, iso path)."""
    response = wsgi_call(app, path, query=query)
    assert response.status == 200, response.body[:500]
    if app.config.pacs.retrieve == "get":  # SPEC §3.2: C-GET needs no open port
        assert app.service.receiver is None
        assert app.config.receiver.port not in listening_sockets(), "nothing may listen with C-GET"
    assert response.header("Content-Type") == "application/x-iso9660-image"
    assert int(response.header("Content-Length")) == len(response.body)
    iso_path = str(tmp_path / (name + ".iso"))
    with open(iso_path, "wb") as handle:
        handle.write(response.body)
    return response, open_iso(iso_path, str(tmp_path / name)), iso_path
