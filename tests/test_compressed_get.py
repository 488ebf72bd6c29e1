"""C-GET of compressed studies (SPEC §3.2) from a dcmqrscp that cannot convert.

dcmqrscp has no codecs: it sends a file only in the transfer syntax it is
stored in.  Started with ``+xs`` (``+xt``) it accepts JPEG Lossless (JPEG-LS)
storage contexts on a C-GET association when they are proposed, and with
``-xs`` (``-xt``) it proposes them on a C-MOVE's.  getscu proposes only
uncompressed contexts unless told; these tests hold that every image arrives
as stored, and that the disc is the one C-MOVE makes.
"""

import os
import subprocess

import pydicom
import pytest

from mkiso import config as configuration, demo, process
from mkiso.dicom import pacs, retrieval
from mkiso.http import application
from conftest import DCMTK_DIR, write_config
from discs import check_pdi, download

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_LOSSLESS_14 = "1.2.840.10008.1.2.4.57"  # no getscu option proposes it


class CompressedPacs:
    """A dcmqrscp holding studies whose series are compressed as asked: {accession: [tool args per series]}."""

    def __init__(self, root, receiver_port, options, studies):
        self.pacs = demo.Dcmqrscp(root, demo.free_port(), {"CDRECORD": receiver_port}, dcmtk_dir=DCMTK_DIR,
                                  options=options)
        self.port = self.pacs.port
        self.stored = {}  # SOP Instance UID -> transfer syntax as stored
        self.samples = {}
        paths = []
        for sample, per_series in studies:
            written = demo.write_study(sample, os.path.join(self.pacs.storage, sample.study_uid))
            start = 0
            for count, tool in zip(sample.series, per_series, strict=True):
                for path in written[start:start + count]:
                    if tool:
                        subprocess.run([os.path.join(DCMTK_DIR, tool[0])] + list(tool[1:]) + [path, path + ".c"],
                                       check=True)
                        os.replace(path + ".c", path)
                start += count
            for path in written:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                self.stored[str(header.SOPInstanceUID)] = str(header.file_meta.TransferSyntaxUID)
            self.samples[sample.accession] = sample
            paths += written
        subprocess.run([os.path.join(DCMTK_DIR, "dcmqridx"), self.pacs.storage] + paths, check=True,
                       stdout=subprocess.DEVNULL)
        self.pacs.start()


def sample(accession, series):
    return demo.SampleStudy("PAT-" + accession, "PRESS^PETRA", accession, series=series, image_bytes=8192,
                            noise=True)


JPEG = ("dcmcjpeg", "+e1")  # JPEG Lossless SV1
JLS = ("dcmcjpls",)


@pytest.fixture(scope="module")
def jpeg_pacs(tmp_path_factory, receiver_port):
    archive = CompressedPacs(str(tmp_path_factory.mktemp("get-jpeg")), receiver_port, ("-xs", "+xs"), [
        (sample("GJPG01", (2, 3)), (JPEG, JPEG)),
        (sample("GMIX01", (2, 2)), (JPEG, None)),  # one series JPEG, one uncompressed
        (sample("GJ57", (2,)), (("dcmcjpeg", "+el"),)),  # JPEG Lossless, process 14
    ])
    yield archive
    archive.pacs.stop()


@pytest.fixture(scope="module")
def jls_pacs(tmp_path_factory, receiver_port):
    archive = CompressedPacs(str(tmp_path_factory.mktemp("get-jls")), receiver_port, ("-xt", "+xt"), [
        (sample("GJLS01", (3,)), (JLS,)),
    ])
    yield archive
    archive.pacs.stop()


def disc_contents(disc):
    """{disc path: (SOP Instance UID, transfer syntax, pixel data)} of every DICOM file on the disc."""
    contents = {}
    for path in disc.files:
        if path.startswith("DICOM" + os.sep):
            image = pydicom.dcmread(os.path.join(disc.root, path))
            contents[path] = (str(image.SOPInstanceUID), str(image.file_meta.TransferSyntaxUID), image.PixelData)
    return contents


def make_disc(make_service, settings, wsgi_call, archive, accession, retrieve, tmp_path):
    settings["pacs"]["port"] = archive.port
    (tmp_path / retrieve / "work").mkdir(parents=True)  # a work dir each: two services run side by side
    service = make_service(pacs={"retrieve": retrieve}, paths={"work_dir": str(tmp_path / retrieve / "work")})
    _, disc, _ = download(wsgi_call, application.Application(service.config, service), "/api/iso/download",
                          tmp_path / retrieve, "accession_number=" + accession, name=retrieve)
    return disc


@pytest.mark.parametrize("holder, accession, syntaxes", [
    ("jpeg_pacs", "GJPG01", {JPEG_LOSSLESS_SV1}),
    ("jls_pacs", "GJLS01", {JPEG_LS}),
])
def test_c_get_of_a_compressed_study_is_the_disc_c_move_makes(request, make_service, settings, wsgi_call, tmp_path,
                                                             holder, accession, syntaxes):
    archive = request.getfixturevalue(holder)
    discs = {retrieve: as_stored(make_disc(make_service, settings, wsgi_call, archive, accession, retrieve, tmp_path),
                                 archive, accession, syntaxes) for retrieve in ("get", "move")}
    assert disc_contents(discs["get"]) == disc_contents(discs["move"])
    assert records(discs["get"]) == records(discs["move"])


def test_c_get_of_a_study_in_two_syntaxes(make_service, settings, wsgi_call, tmp_path, jpeg_pacs):
    """JPEG and uncompressed series in one study: C-GET gets both as stored.

    (dcmqrscp -xs cannot C-MOVE this study: it proposes one context per SOP
    class, JPEG first, and then cannot send the uncompressed images in it.)
    """
    disc = make_disc(make_service, settings, wsgi_call, jpeg_pacs, "GMIX01", "get", tmp_path)
    as_stored(disc, jpeg_pacs, "GMIX01", {JPEG_LOSSLESS_SV1, EXPLICIT_LE})


def test_c_get_reads_its_manifest_back_only_for_a_retry(make_service, settings, wsgi_call, tmp_path, jpeg_pacs,
                                                        archive, monkeypatch):
    """While a study arrives by C-GET the job holds its manifest as digests, the rest in a file
    (``retrieval.Spilled``, SPEC §8 flat memory); the whole list is read back only where a C-GET failed
    some images and they are fetched again (GMIX01's JPEG series), and then it is the manifest as listed."""
    loaded = []
    real_load = retrieval.Spilled.load

    def load(self):
        manifest = real_load(self)
        loaded.append((len(manifest), dict(manifest), manifest.syntaxes))
        return manifest

    monkeypatch.setattr(retrieval.Spilled, "load", load)
    plain = make_disc(make_service, settings, wsgi_call, archive.pacs, "ACC2001", "get", tmp_path / "plain")
    check_pdi(plain, archive.sop_uids("ACC2001"))
    assert loaded == []  # every image came with the first C-GET
    study_uid = jpeg_pacs.samples["GMIX01"].study_uid
    mixed = make_disc(make_service, settings, wsgi_call, jpeg_pacs, "GMIX01", "get", tmp_path / "mixed")
    check_pdi(mixed, jpeg_pacs.samples["GMIX01"].sop_uids)
    listed = pacs.Pacs(configuration.load(write_config(tmp_path / "config.yaml", dict(
        settings, pacs=dict(settings["pacs"], port=jpeg_pacs.port))))).list_instances(study_uid, str(tmp_path))
    assert loaded == [(4, dict(listed), listed.syntaxes)]


def test_a_spilled_manifest_reads_back_as_it_was(tmp_path):
    manifest = pacs.Manifest({"1.2.3.1": "1.2.3.10", "1.2.3.2": "1.2.3.10", "1.2.3.3": ""},
                             {"1.2.3.1": JPEG_LS, "1.2.3.2": JPEG_LS})
    spilled = retrieval.Spilled(manifest, str(tmp_path / "manifest.txt"))
    again = spilled.load()
    assert (dict(again), again.syntaxes) == (dict(manifest), manifest.syntaxes)
    assert len(spilled) == 3 and "1.2.3.2" in spilled and "1.2.3.4" not in spilled
    assert spilled.stored_syntax is manifest.stored_syntax is None  # one instance says nothing
    del manifest["1.2.3.3"]
    assert retrieval.Spilled(manifest, str(tmp_path / "two.txt")).stored_syntax == JPEG_LS


def as_stored(disc, archive, accession, syntaxes):
    """The disc holds exactly the study's images, each in the transfer syntax the PACS stores it in."""
    expected = set(archive.samples[accession].sop_uids)
    check_pdi(disc, expected)
    contents = disc_contents(disc)
    assert {uid: syntax for uid, syntax, _ in contents.values()} == {
        uid: archive.stored[uid] for uid in expected}, "an image did not arrive as stored"
    assert {syntax for _, syntax, _ in contents.values()} == syntaxes
    return disc


def records(disc):
    """The DICOMDIR's records without their offsets (the meta header's own UID shifts them)."""
    dicomdir = pydicom.dcmread(os.path.join(disc.root, "DICOMDIR"))
    return [[(element.tag, element.value) for element in record if not element.keyword.startswith("Offset")]
            for record in dicomdir.DirectoryRecordSequence]


def test_what_no_proposal_can_fetch_is_an_incomplete_study(make_service, settings, wsgi_call, jpeg_pacs):
    settings["pacs"]["port"] = jpeg_pacs.port
    service = make_service(pacs={"retrieve": "get"})
    response = wsgi_call(application.Application(service.config, service), "/api/iso/download",
                         query="accession_number=GJ57")
    assert set(jpeg_pacs.stored[uid] for uid in jpeg_pacs.samples["GJ57"].sop_uids) == {JPEG_LOSSLESS_14}
    assert response.status == 502 and response.json()["code"] == "incomplete_study", response.body
    assert "2 images did not arrive" in response.json()["error"]


def getscu_runs(monkeypatch):
    """The option lists of every getscu run from here on."""
    runs = []
    run_step = process.run_step

    def counting(args, *rest, **options):
        if os.path.basename(args[0]) == "getscu":
            runs.append([arg for arg in args if arg.startswith("+x")])
        return run_step(args, *rest, **options)

    monkeypatch.setattr(process, "run_step", counting)
    return runs


@pytest.fixture
def jpeg_pacs_client(settings, jpeg_pacs, tmp_path):
    settings["pacs"].update(port=jpeg_pacs.port, retrieve="get")
    return pacs.Pacs(configuration.load(write_config(tmp_path / "config.yaml", settings)))


def test_syntaxes_the_pacs_names_are_proposed_at_once(jpeg_pacs_client, jpeg_pacs, monkeypatch, tmp_path):
    """Where the manifest carries AvailableTransferSyntaxUID, one C-GET proposing it fetches the study."""
    study_uid = jpeg_pacs.samples["GJPG01"].study_uid
    manifest = jpeg_pacs_client.list_instances(study_uid, str(tmp_path))
    assert manifest.syntaxes == {}  # dcmqrscp leaves AvailableTransferSyntaxUID out of its answers
    told = pacs.Manifest(manifest, {uid: jpeg_pacs.stored[uid] for uid in manifest})
    runs = getscu_runs(monkeypatch)
    (tmp_path / "received").mkdir()
    result = jpeg_pacs_client.get_study(study_uid, str(tmp_path / "received"), told)
    assert runs == [["+xs"]] and result.succeeded and result.completed == 5
    assert len(os.listdir(tmp_path / "received")) == 5


def test_without_syntaxes_what_failed_is_fetched_again_by_series(jpeg_pacs_client, jpeg_pacs, monkeypatch,
                                                                 tmp_path):
    study_uid = jpeg_pacs.samples["GMIX01"].study_uid
    manifest = jpeg_pacs_client.list_instances(study_uid, str(tmp_path))
    runs = getscu_runs(monkeypatch)
    (tmp_path / "received").mkdir()
    result = jpeg_pacs_client.get_study(study_uid, str(tmp_path / "received"), manifest)
    assert runs == [[], ["+xs"]]  # the study, then the JPEG series' two images
    assert result.succeeded and (result.completed, result.failed) == (4, 0)


def test_a_pacs_that_refuses_the_syntax_key_is_asked_without_it(jpeg_pacs_client, jpeg_pacs, monkeypatch, tmp_path):
    asked = []
    find = jpeg_pacs_client._find_instances

    def strict(study_uid, scratch_dir, what, asks_syntaxes, make=None):
        asked.append(asks_syntaxes)
        if asks_syntaxes:
            return None, "Failed: UnableToProcess"
        return find(study_uid, scratch_dir, what, asks_syntaxes, make)

    monkeypatch.setattr(jpeg_pacs_client, "_find_instances", strict)
    for accession in ("GJPG01", "GMIX01"):
        manifest = jpeg_pacs_client.list_instances(jpeg_pacs.samples[accession].study_uid, str(tmp_path))
        assert set(manifest) == set(jpeg_pacs.samples[accession].sop_uids)
    assert asked == [True, False, False]  # once refused, never asked again


def test_a_query_file_is_what_getscu_reads(tmp_path):
    path = str(tmp_path / "query")
    pacs.write_query(path, [("0020,000D", "1.2.3"), ("0008,0052", "IMAGE"), ("0008,0018", "1.2.4\\1.2.55")])
    query = pydicom.dcmread(path, force=True)
    assert (query.QueryRetrieveLevel, query.StudyInstanceUID) == ("IMAGE", "1.2.3")
    assert list(query.SOPInstanceUID) == ["1.2.4", "1.2.55"]
