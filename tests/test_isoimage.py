"""A streamed download's ISO laid out over its staged tree, never written (SPEC §8.1, ``isoimage``).

It is allowed only where it is genisoimage's own ISO of the same tree: here
every disc kind (one study, several studies, a split set, web content and
viewer) is laid out and held against genisoimage's file, byte for byte
but for the time each was made (the volume descriptors' dates), and by
isoinfo's listings (-d, -l, -J, -R).  The downloads go through a real
server with the real PACS and are opened and checked as a viewer would.
"""

import io
import os
import subprocess
import time

import pytest

from mkiso import disk, process, steps
from mkiso.disc import isoimage, tree, ziparchive
from mkiso.http import application
from discs import check_pdi, open_iso
from conftest import wait_until_clean
from test_iso_answers import get
from test_media import SMALL_CD, fetch_discs, media_pacs, split_job  # noqa: F401 (fixtures)
from test_download import viewer  # noqa: F401 (fixture)

SECTOR = 2048


def without_dates(data):
    """The image with each volume descriptor's four dates (when it was made; ECMA-119 8.4.26-29)
    zeroed: two runs of genisoimage on one tree differ only there."""
    data = bytearray(data)
    sector = 16
    while data[sector * SECTOR + 1:sector * SECTOR + 6] == b"CD001" and data[sector * SECTOR] != 255:
        data[sector * SECTOR + 813:sector * SECTOR + 881] = bytes(68)
        sector += 1
    return bytes(data)


def listings(iso_path):
    """isoinfo's -d (its date lines aside), -l, -J -l and -R -l of the image."""
    found = []
    for options in (["-d"], ["-l"], ["-J", "-l"], ["-R", "-l"]):
        out = subprocess.run(["isoinfo", "-i", iso_path] + options, check=True, capture_output=True, text=True)
        found.append([line for line in out.stdout.splitlines() if "Date" not in line])
    return found


def same_image(laid_out, written):
    """The laid-out image's bytes (a file) are genisoimage's (a file), as the module promises."""
    assert os.path.getsize(laid_out) == os.path.getsize(written)
    with open(laid_out, "rb") as mine, open(written, "rb") as theirs:
        assert without_dates(mine.read()) == without_dates(theirs.read()), "the bytes differ"
    assert listings(laid_out) == listings(written)


def written_out(image, staging, target):
    """The laid-out image written to a file, as nginx would be given it."""
    ziparchive.write(image, staging, str(target))
    return str(target)


def read_once(staging):
    """Let the tree's times settle before two images of it are made: the received names of its files
    removed (``disk.remove_soon``; that changes each inode's change time, which Rock Ridge records), and
    a byte of each file read, as genisoimage reads them all (the access time, also recorded, moves at a
    file's first read only: relatime)."""
    disk._remover.submit(lambda: None).result()
    for folder, _, names in os.walk(staging):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                handle.read(1)


@pytest.fixture
def beside_genisoimage(monkeypatch, tmp_path):
    """Every ``isoimage.lay_out`` also has genisoimage write the ISO of the same tree first (kept under
    tmp_path): [(the laid-out Image, its tree's genisoimage ISO)]."""
    real, made = isoimage.lay_out, []

    def lay_out(genisoimage, staging, label, head, timeout, number=1, of=1):
        read_once(staging)
        written = str(tmp_path / ("genisoimage-%d.iso" % len(made)))
        tree.make_iso(genisoimage, staging, label, written, timeout, number, of)
        image = real(genisoimage, staging, label, head, timeout, number, of)
        made.append((image, written))
        return image

    monkeypatch.setattr(isoimage, "lay_out", lay_out)
    return made


@pytest.mark.parametrize("path, query, accessions", [
    ("/api/iso/download", "accession_number=ACC2001", ["ACC2001"]),
    ("/api/iso/download-multiple", "accession_numbers=MR.180505.026,ACC1002", ["MR.180505.026", "ACC1002"]),
])
def test_a_streamed_download_is_genisoimages_iso_of_its_tree(make_service, live_server, archive, viewer,  # noqa: F811
                                                             tmp_path, beside_genisoimage, monkeypatch, path, query,
                                                             accessions):
    """One study and two, each with its web content and a viewer; with the disc cache off, no byte of
    the ISO is written anywhere."""
    service = make_service(iso={"viewer_dir": viewer}, cache={"max_bytes": 0})

    def no_copy(*args):
        raise AssertionError("the ISO was written for a cache that keeps nothing")

    monkeypatch.setattr(steps.ziparchive, "write", no_copy)
    base = live_server(application.Application(service.config, service))
    status, headers, body = get(base + path + "?" + query)
    assert status == 200 and len(body) == int(headers["Content-Length"])
    [(image, written)] = beside_genisoimage
    assert image.size == len(body)
    got = tmp_path / "got.iso"
    got.write_bytes(body)
    same_image(str(got), written)
    disc = open_iso(str(got), str(tmp_path / "disc"))
    check_pdi(disc, set().union(*(archive.sop_uids(accession) for accession in accessions)))
    assert "INDEX.HTM" in disc.files and any(name.startswith("IHE_PDI/") for name in disc.files)
    assert wait_until_clean(service) == []
    [job] = service.jobs.recent()
    assert job.state.value == "done" and job.export.verified is True


def test_every_disc_of_a_split_set_lays_out_as_genisoimage_writes_it(make_service, settings, wsgi_call,
                                                                      media_pacs, monkeypatch, tmp_path):  # noqa: F811
    """A split set's discs (jobs write them) laid out from the same trees: the same bytes, the volume
    set's size and each disc's number included."""
    settings["pacs"]["port"] = media_pacs.pacs.port
    service = make_service(iso=SMALL_CD)
    real, compared = tree.make_iso, []

    def make_iso(genisoimage, staging, label, iso_path, timeout, number=1, of=1, on_tick=None):
        read_once(staging)
        real(genisoimage, staging, label, iso_path, timeout, number, of, on_tick)
        head = tmp_path / ("head-%d" % number)
        image = isoimage.lay_out(genisoimage, staging, label, str(head), timeout, number, of)
        same_image(written_out(image, staging, tmp_path / ("laid-%d.iso" % number)), iso_path)
        compared.append((number, of))

    monkeypatch.setattr(tree, "make_iso", make_iso)
    app = application.Application(service.config, service)
    job = split_job(wsgi_call, app, ["OLD01", "NEW01", "MID01"])
    assert len(job["discs"]) >= 2
    assert sorted(compared) == [(number, len(job["discs"])) for number in range(1, len(job["discs"]) + 1)]
    assert len(fetch_discs(wsgi_call, app, job, tmp_path / "fetched")) == len(job["discs"])


def stand_in(tmp_path, body):
    """A genisoimage that runs ``body`` (Python) where it would lay out, the real one for -print-size."""
    tool = tmp_path / "genisoimage"
    tool.write_text("#!/usr/bin/python3\nimport os, sys, time\nif '-print-size' in sys.argv:\n"
                    "    os.execv('/usr/bin/genisoimage', ['genisoimage'] + sys.argv[1:])\n" + body)
    tool.chmod(0o755)
    return str(tool)


@pytest.fixture
def small_tree(tmp_path):
    """A tree as deep and as long-named as a viewer's can be: relocated directories and all."""
    root = tmp_path / "tree"
    deep = root.joinpath("VIEWER", *("LEVEL%d" % level for level in range(10)))
    deep.mkdir(parents=True)
    (deep / "a file whose name is longer than sixty-four characters, which Joliet cuts short.dll").write_bytes(
        os.urandom(70000))
    (root / "EMPTY").write_bytes(b"")
    for number in range(40):
        (root / ("IMG%05d" % number)).write_bytes(os.urandom(3000 + 977 * number))
    return str(root)


def test_a_deep_and_long_named_tree_is_laid_out_as_genisoimage_writes_it(small_tree, tmp_path):
    """Directories below depth 8 (Rock Ridge relocates them), names Joliet cuts, an empty file."""
    read_once(small_tree)
    written = str(tmp_path / "written.iso")
    for _ in range(5):  # rr_moved, where Rock Ridge relocates them, is dated when genisoimage runs:
        started = int(time.time())  # both images made within one second (CI's load once split them)
        tree.make_iso("genisoimage", small_tree, "DEEP", written, 60)
        image = isoimage.lay_out("genisoimage", small_tree, "DEEP", str(tmp_path / "head"), 60)
        if int(time.time()) == started:
            break
    else:
        pytest.fail("genisoimage never ran twice within one second")
    assert len(image) == 41  # every file with bytes
    same_image(written_out(image, small_tree, tmp_path / "laid.iso"), written)


def test_the_size_laid_out_is_the_one_genisoimage_announces(small_tree, tmp_path):
    """The size comes from the image's primary volume descriptor: -print-size's, without its own run."""
    image = isoimage.lay_out("genisoimage", small_tree, "DEEP", str(tmp_path / "head"), 60)
    assert image.size == tree.iso_size("genisoimage", small_tree, "DEEP", 60)


def test_an_image_without_its_primary_descriptor_first_is_not_laid_out(small_tree, tmp_path):
    tool = stand_in(tmp_path, "sys.stdout.buffer.write(bytes(%d))\n" % (20 * SECTOR))
    with pytest.raises(isoimage.NotLaidOut, match="not the primary one"):
        isoimage.lay_out(tool, small_tree, "DEEP", str(tmp_path / "head"), 60)


def test_a_file_changed_while_genisoimage_ran_is_not_laid_out(small_tree, tmp_path):
    """A staged file whose size is not the one in the image's directory: never sent as if it were."""
    real = tree.read_iso

    def read_iso(genisoimage, staging, label, read, timeout, number=1, of=1):
        def changed_then_read(stream):
            first = stream.read(SECTOR * 17)  # genisoimage has read the tree: its directory is made
            with open(os.path.join(staging, "IMG00003"), "ab") as grown:
                grown.write(b"more")
            return read(io.BufferedReader(Replayed(first, stream)))
        return real(genisoimage, staging, label, changed_then_read, timeout, number, of)

    tree.read_iso = read_iso
    try:
        with pytest.raises(isoimage.NotLaidOut, match="IMG00003 is not a file of the staged tree with its size"):
            isoimage.lay_out("genisoimage", small_tree, "DEEP", str(tmp_path / "head"), 60)
    finally:
        tree.read_iso = real


class Replayed(io.RawIOBase):
    """``first`` (bytes already taken from ``stream``), then the rest of ``stream``."""

    def __init__(self, first, stream):
        self._first, self._stream = first, stream

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._first:
            count = min(len(buffer), len(self._first))
            buffer[:count], self._first = self._first[:count], self._first[count:]
            return count
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def test_a_genisoimage_that_fails_is_named_with_its_words(small_tree, tmp_path):
    tool = stand_in(tmp_path, "sys.exit('genisoimage: Unable to open the tree: the test says no')\n")
    with pytest.raises(Exception) as caught:
        isoimage.lay_out(tool, small_tree, "DEEP", str(tmp_path / "head"), 60)
    assert getattr(caught.value, "code", None) == "iso_failed"
    assert "the test says no" in str(caught.value)


def test_a_genisoimage_that_hangs_is_stopped_and_leaves_no_process(small_tree, tmp_path):
    tool = stand_in(tmp_path, "sys.stdout.buffer.write(bytes(40000)); sys.stdout.flush(); time.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        isoimage.lay_out(tool, small_tree, "DEEP", str(tmp_path / "head"), 1)
    assert getattr(caught.value, "code", None) == "tool_timeout"
    assert time.monotonic() - started < 30
    assert not [proc for proc in process._live if proc.poll() is None]
    assert subprocess.run(["pgrep", "-f", tool], capture_output=True).returncode == 1, "a genisoimage lives on"


def test_genisoimage_is_stopped_once_the_head_is_read(small_tree, tmp_path):
    """It would go on reading every file for bytes nobody wants: it is gone when lay_out returns."""
    size = tree.iso_size("genisoimage", small_tree, "DEEP", 60)
    image = isoimage.lay_out("genisoimage", small_tree, "DEEP", str(tmp_path / "head"), 60)
    assert os.path.getsize(tmp_path / "head") == image.head_end < size
    assert not [proc for proc in process._live if proc.poll() is None]
