"""The disc's web content (SPEC §4.4): INDEX.HTM and IHE_PDI/ that any browser opens from the disc.

Discs are made by a real mkiso against real dcmqrscp PACS, read back from
the ISO, and the pages checked as XML, link by link against the ISO 9660,
Joliet and Rock Ridge names, preview by preview; test_web_content_browser.py
opens them in headless chromium.
"""

import logging
import os
import posixpath
import shutil
import struct
import subprocess
import tempfile
import types
import xml.etree.ElementTree as ElementTree

import pydicom
import pytest

from mkiso import demo
from mkiso.disc import webcontent
from mkiso.http import application
from mkiso.dicom.received import ReceivedFile
from conftest import DCMTK_DIR
from discs import check_pdi, download
from test_compressed_get import jls_pacs, jpeg_pacs  # noqa: F401 (fixtures)
from test_download import viewer  # noqa: F401 (fixture)
from test_media import CD, SMALL_CD, fetch_discs, media_pacs, split_job  # noqa: F401 (fixtures)

XHTML = "{http://www.w3.org/1999/xhtml}"
PRIVACY = "This disc holds personal health information."


def iso_names(iso_path):
    """The file paths on the ISO as each of its three name spaces gives them: ISO 9660, Joliet, Rock Ridge."""
    names = {}
    for space, options in (("iso9660", []), ("joliet", ["-J"]), ("rock ridge", ["-R"])):
        listing = subprocess.run(["isoinfo", "-f", "-i", iso_path] + options, check=True, capture_output=True,
                                 text=True).stdout
        # ISO 9660 names end in a version (;1), and a name without extension in a dot
        names[space] = {line.strip().split(";")[0].rstrip(".") for line in listing.splitlines() if line.strip()}
    return names


def pages_of(disc):
    return [path for path in disc.files if path == "INDEX.HTM" or path.startswith("IHE_PDI" + os.sep)
            and path.endswith(".HTM")]


def check_web_content(disc, iso_path):
    """Every page XHTML without script, every link relative, upper case and on the ISO; every preview a JPEG
    of the size its page states.  Returns {page: parsed tree}."""
    names = iso_names(iso_path)
    trees = {}
    for page in pages_of(disc):
        tree = ElementTree.parse(os.path.join(disc.root, page))  # XHTML: well-formed XML
        trees[page] = tree
        assert tree.getroot().tag == XHTML + "html"
        for element in tree.iter():
            assert element.tag.startswith(XHTML), element.tag
            assert element.tag != XHTML + "script"
            assert not [name for name in element.attrib if name.lower().startswith("on")], element.attrib
            for attribute in ("href", "src"):
                link = element.get(attribute)
                if link is None:
                    continue
                assert ":" not in link and not link.startswith("/") and link == link.upper(), link
                target = posixpath.normpath(posixpath.join(posixpath.dirname(page), link))
                for space, listed in names.items():
                    assert "/" + target in listed, "%s links to %s, not on the disc's %s names" % (page, link, space)
                if element.tag == XHTML + "img":
                    assert jpeg_size(os.path.join(disc.root, target)) == (
                        int(element.get("width")), int(element.get("height")))
    with open(os.path.join(disc.root, "DICOMDIR"), "rb") as handle:
        dicomdir = handle.read()
    assert b"IHE_PDI" not in dicomdir and b"INDEX" not in dicomdir  # nothing of it is referenced
    return trees


def jpeg_size(path):
    """(width, height) of a JPEG as dcmtk's img2dcm reads it (and refuses anything else)."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "preview.dcm")
        subprocess.run([os.path.join(DCMTK_DIR, "img2dcm"), "-i", "JPEG", path, out], check=True,
                       capture_output=True)
        converted = pydicom.dcmread(out)
        return converted.Columns, converted.Rows


def text_of(tree):
    """The body's text, a space between elements."""
    return " ".join(" ".join(text.split()) for text in tree.find(XHTML + "body").itertext() if text.strip())


def previews(trees):
    """(page, src, width, height) of every preview on the pages."""
    return [(page, img.get("src"), int(img.get("width")), int(img.get("height")))
            for page, tree in trees.items() for img in tree.iter(XHTML + "img")]


def get_disc(wsgi_call, service, tmp_path, query, path="/api/iso/download", name="disc"):
    app = application.Application(service.config, service)
    _, disc, iso_path = download(wsgi_call, app, path, tmp_path, query, name)
    return disc, iso_path


def test_the_pages_name_the_patient_and_every_study_and_every_link_is_on_the_disc(
        make_service, wsgi_call, archive, viewer, tmp_path):  # noqa: F811
    service = make_service(iso={"viewer_dir": viewer, "institution": "Klinik Süd & Partner",
                                "contact": "Radiologie, Tel. 0123 456"})
    disc, iso_path = get_disc(wsgi_call, service, tmp_path, "accession_numbers=MR.180505.026,ACC1002",
                              "/api/iso/download-multiple")
    check_pdi(disc, archive.sop_uids("MR.180505.026", "ACC1002"))  # the DICOMDIR: DICOM/ and nothing else
    trees = check_web_content(disc, iso_path)
    assert sorted(trees) == ["IHE_PDI/STU00001.HTM", "IHE_PDI/STU00002.HTM", "INDEX.HTM"]
    index = text_of(trees["INDEX.HTM"])
    for words in ("Klinik Süd & Partner", "Radiologie, Tel. 0123 456", "Patient: Müller, Jürgen",
                  "2024-01-15 MR sample study MR.180505.026 MR 2", "2024-01-15 CT sample study ACC1002 CT 1",
                  PRIVACY, "The DICOM viewer: VIEWER/VIEWER.EXE"):
        assert words in index, words
    hrefs = [a.get("href") for a in trees["INDEX.HTM"].iter(XHTML + "a")]
    assert sorted(hrefs[:2]) == ["IHE_PDI/STU00001.HTM", "IHE_PDI/STU00002.HTM"]
    assert hrefs[2:] == ["README.TXT", "VIEWER/VIEWER.EXE"]
    [mr] = [text_of(tree) for page, tree in trees.items() if page != "INDEX.HTM" and "MR.180505.026" in text_of(tree)]
    assert "Patient: Müller, Jürgen" in mr and "MR sample study" in mr and PRIVACY in mr
    assert "1 MR 3 images" in mr and "2 MR 2 images" in mr and "ACC1002" not in mr
    # one preview per series, of the images' own size (8 x 8: smaller than the preview width)
    shown = previews(trees)
    assert len(shown) == 3 and {(width, height) for _, _, width, height in shown} == {(8, 8)}
    per_page = {page: len([src for shown_on, src, _, _ in shown if shown_on == page]) for page in trees}
    assert sorted(per_page.values()) == [0, 1, 2]  # INDEX.HTM none, CT one series, MR two


def test_a_large_image_gives_a_preview_of_the_preview_width(make_service, wsgi_call, tmp_path):
    disc, iso_path = get_disc(wsgi_call, make_service(), tmp_path, "accession_number=BIG01")
    trees = check_web_content(disc, iso_path)
    assert [(width, height) for _, _, width, height in previews(trees)] == [(webcontent.PREVIEW_WIDTH,) * 2]
    assert "ROE" not in open(os.path.join(disc.root, "README.TXT")).read()
    assert "Patient: ROE, RICHARD" in text_of(trees["INDEX.HTM"])
    assert "There is no DICOM viewer on this disc." in text_of(trees["INDEX.HTM"])


def test_a_jpeg_study_gets_previews(make_service, settings, wsgi_call, jpeg_pacs, tmp_path):  # noqa: F811
    settings["pacs"]["port"] = jpeg_pacs.port
    disc, iso_path = get_disc(wsgi_call, make_service(pacs={"retrieve": "get"}), tmp_path,
                              "accession_number=GJPG01")
    assert {pydicom.dcmread(os.path.join(disc.root, path)).file_meta.TransferSyntaxUID
            for path in disc.files if path.startswith("DICOM" + os.sep)} == {"1.2.840.10008.1.2.4.70"}
    trees = check_web_content(disc, iso_path)
    assert [(src, width, height) for _, src, width, height in previews(trees)] == [
        ("STU00001/SER00001.JPG", 64, 64), ("STU00001/SER00002.JPG", 64, 64)]


def test_a_series_that_cannot_be_rendered_gets_a_sentence(make_service, settings, wsgi_call,
                                                          jls_pacs, tmp_path):  # noqa: F811
    """dcmj2pnm cannot decode JPEG-LS: the disc is made, the series says why it has no preview."""
    settings["pacs"]["port"] = jls_pacs.port
    disc, iso_path = get_disc(wsgi_call, make_service(pacs={"retrieve": "get"}), tmp_path,
                              "accession_number=GJLS01")
    trees = check_web_content(disc, iso_path)
    assert previews(trees) == []
    assert "No preview could be made of this series; a DICOM viewer shows it." in text_of(
        trees["IHE_PDI/STU00001.HTM"])


def test_web_content_false_leaves_it_out(make_service, wsgi_call, archive, tmp_path):
    disc, _ = get_disc(wsgi_call, make_service(iso={"web_content": False}), tmp_path, "accession_number=ACC2001")
    check_pdi(disc, archive.sop_uids("ACC2001"))
    assert not [path for path in disc.files if "INDEX" in path or "IHE_PDI" in path]


def test_each_split_disc_has_its_own_index_of_its_part(make_service, settings, wsgi_call,
                                                       media_pacs, tmp_path):  # noqa: F811
    settings["pacs"]["port"] = media_pacs.pacs.port
    service = make_service(iso=SMALL_CD)
    app = application.Application(service.config, service)
    discs = fetch_discs(wsgi_call, app, split_job(wsgi_call, app, ["OLD01", "NEW01", "MID01"]), tmp_path)
    accessions = ["NEW01", "MID01", "OLD01"]  # newest first
    for number, (disc, iso_path) in enumerate(discs, start=1):
        assert os.path.getsize(iso_path) <= CD
        index = text_of(check_web_content(disc, iso_path)["INDEX.HTM"])
        assert "This is disc %d of 3" % number in index
        assert [accession for accession in accessions if accession in index] == [accessions[number - 1]]


def test_objects_are_told_by_kind():
    def objects(*classes):
        return [(ReceivedFile("", "P", "S", "R", 1, 1, "I%d" % n, sop_class_uid=uid), "") for n, uid in
                enumerate(classes)]

    ct, dose, pdf, kos = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.67",
                          "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.88.59")
    assert webcontent.count_kinds(objects(ct, ct, ct)) == "3 images"
    assert webcontent.count_kinds(objects(dose)) == "1 dose report"
    assert webcontent.count_kinds(objects(pdf, pdf)) == "2 reports (PDF)"
    assert webcontent.count_kinds(objects(kos, ct)) == "1 key image selection, 1 image"
    assert webcontent.person("Müller^Jürgen") == "Müller, Jürgen" and webcontent.person("") == "(no name)"


def test_a_disc_cached_with_web_content_is_not_served_without(make_service, wsgi_call, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    service = make_service(cache={"max_bytes": 10 ** 9, "ttl_s": 3600})
    with_pages, _ = get_disc(wsgi_call, service, tmp_path, "accession_number=ACC2001", name="with")
    service.config.iso.web_content = False  # as after a restart with the key changed
    without, _ = get_disc(wsgi_call, service, tmp_path, "accession_number=ACC2001", name="without")
    assert "INDEX.HTM" in with_pages.files and "INDEX.HTM" not in without.files
    assert [record.getMessage() for record in caplog.records].count("study retrieved") == 2


def staged_series(staging, halves, window=None):
    """A series of 16 x 16 MR images staged as on a disc, each image's left and right half from given values."""
    images = []
    for number, (left, right) in enumerate(halves, start=1):
        sample = demo.SampleStudy("PAT-W", "WIN^DOW", "WIN01", series=(1,), image_bytes=512)
        path = os.path.join(staging, "DICOM/PAT00001/STU00001/SER00001/IMG%05d" % number)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        [written] = demo.write_study(sample, os.path.dirname(path) + "/tmp")
        image = pydicom.dcmread(written)
        # each half a ramp of 8 values, as real pixels vary (a window from the pixels ignores the extremes)
        image.PixelData = struct.pack("<16H", *[left + i for i in range(8)] + [right + i for i in range(8)]) * 16
        if window:
            image.WindowCenter, image.WindowWidth = window
        image.save_as(path)
        shutil.rmtree(os.path.dirname(path) + "/tmp")
        images.append((ReceivedFile(path, "PAT-W", "S", "R", 1, number, "I%d" % number,
                                    sop_class_uid=demo.MR_IMAGE_STORAGE, patient_name="WIN^DOW", modality="MR"),
                       "DICOM/PAT00001/STU00001/SER00001/IMG%05d" % number))
    return images


def preview_halves(staging, images, tmp_path):
    """The preview's mean grey value on its left and right half (decoded by dcmtk)."""
    iso = types.SimpleNamespace(institution="", contact="", viewer_dir="")
    webcontent.write(staging, images, iso, os.path.join(DCMTK_DIR, "dcmj2pnm"), 30)
    preview = os.path.join(staging, "IHE_PDI/STU00001/SER00001.JPG")
    subprocess.run([os.path.join(DCMTK_DIR, "img2dcm"), "-i", "JPEG", preview, str(tmp_path / "p.dcm")], check=True)
    subprocess.run([os.path.join(DCMTK_DIR, "dcmdjpeg"), str(tmp_path / "p.dcm"), str(tmp_path / "raw.dcm")],
                   check=True)
    raw = pydicom.dcmread(str(tmp_path / "raw.dcm"))
    pixels = raw.PixelData
    left = [pixels[row * 16 + column] for row in range(16) for column in range(2, 6)]
    right = [pixels[row * 16 + column] for row in range(16) for column in range(10, 14)]
    return sum(left) / len(left), sum(right) / len(right)


def test_the_preview_is_the_middle_image(tmp_path):
    staging = str(tmp_path / "staging")
    images = staged_series(staging, [(0, 1000), (1000, 0), (0, 1000)])  # only the middle one is bright left
    left, right = preview_halves(staging, images, tmp_path)
    assert left > 200 and right < 50


def test_the_preview_uses_the_window_in_the_file(tmp_path):
    """Pixels of 60 beside 1000: dark from the pixel values alone, white in the file's window (40 to 60)."""
    staging = str(tmp_path / "staging")
    left, right = preview_halves(staging, staged_series(staging, [(60, 1000)], window=(50, 20)), tmp_path)
    assert left > 200 and right > 200
    plain = str(tmp_path / "plain")
    os.makedirs(tmp_path / "again")
    left, right = preview_halves(plain, staged_series(plain, [(60, 1000)]), tmp_path / "again")
    assert left < 50 and right > 200


def test_a_multi_frame_image_gives_its_middle_frame(tmp_path):
    staging = str(tmp_path / "staging")
    [(received, path)] = staged_series(staging, [(0, 1000)])
    image = pydicom.dcmread(received.path)
    frames = [struct.pack("<16H", *[left + i for i in range(8)] + [right + i for i in range(8)]) * 16
              for left, right in ((0, 1000), (1000, 0), (0, 1000))]
    image.NumberOfFrames, image.PixelData = 3, b"".join(frames)
    image.save_as(received.path)
    left, right = preview_halves(staging, [(received, path)], tmp_path)
    assert left > 200 and right < 50


@pytest.fixture(scope="module")
def kinds_pacs(tmp_path_factory, receiver_port):
    """A CT study with a dose report and a PDF report besides its images, in a dcmqrscp of its own."""
    pacs = demo.Dcmqrscp(str(tmp_path_factory.mktemp("kinds-pacs")), demo.free_port(), {"CDRECORD": receiver_port},
                         dcmtk_dir=DCMTK_DIR)
    study = demo.SampleStudy("PAT-K", "KIND^KATE", "KIND01", series=(2,), modality="CT")
    folder = os.path.join(pacs.storage, study.study_uid)
    paths = demo.write_study(study, folder)
    for number, (sop_class, modality) in enumerate((("1.2.840.10008.5.1.4.1.1.88.67", "SR"),
                                                    ("1.2.840.10008.5.1.4.1.1.104.1", "DOC")), start=2):
        document = pydicom.dcmread(paths[0])
        for keyword in ("PixelData", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
            delattr(document, keyword)
        document.SOPClassUID = document.file_meta.MediaStorageSOPClassUID = sop_class
        document.SOPInstanceUID = document.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        document.SeriesInstanceUID = pydicom.uid.generate_uid()
        document.SeriesNumber, document.Modality = number, modality
        document.ContentDate, document.ContentTime = document.StudyDate, "101500"
        if modality == "SR":  # what its SR DOCUMENT record needs (type 1 in PS3.3 F.5)
            document.CompletionFlag, document.VerificationFlag = "COMPLETE", "UNVERIFIED"
            concept = pydicom.Dataset()
            concept.CodeValue, concept.CodingSchemeDesignator = "113701", "DCM"
            concept.CodeMeaning = "X-Ray Radiation Dose Report"
            document.ConceptNameCodeSequence = [concept]
        if modality == "DOC":
            document.MIMETypeOfEncapsulatedDocument = "application/pdf"
            document.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
        paths.append(os.path.join(folder, document.SOPInstanceUID + ".dcm"))
        document.save_as(paths[-1])
        study.sop_uids.append(document.SOPInstanceUID)
    subprocess.run([os.path.join(DCMTK_DIR, "dcmqridx"), pacs.storage] + paths, check=True, stdout=subprocess.DEVNULL)
    pacs.start()
    pacs.study = study
    yield pacs
    pacs.stop()


def test_objects_that_are_not_images_are_listed_by_kind(make_service, settings, wsgi_call, kinds_pacs, tmp_path):
    settings["pacs"]["port"] = kinds_pacs.port
    disc, iso_path = get_disc(wsgi_call, make_service(), tmp_path, "accession_number=KIND01")
    check_pdi(disc, kinds_pacs.study.sop_uids)
    trees = check_web_content(disc, iso_path)
    page = text_of(trees["IHE_PDI/STU00001.HTM"])
    for row in ("1 CT 2 images", "2 SR 1 dose report", "3 DOC 1 report (PDF)"):
        assert row in page, row
    assert [src for _, src, _, _ in previews(trees)] == ["STU00001/SER00001.JPG"]  # the images' series only
    assert "Modalities: CT, SR, DOC" in page
