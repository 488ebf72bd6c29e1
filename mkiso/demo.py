"""A demo PACS: synthetic studies served by a real dcmqrscp.

The tests and ``python -m mkiso.demo`` share this: studies are generated
with pydicom (made-up patients, fresh UIDs, Explicit VR Little Endian) and
indexed into a dcmqrscp storage area that knows our receiver's AE title.
No real patient data is involved anywhere.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3
LOW_NIBBLE = bytes(value & 0x0F for value in range(256))


class SampleStudy:
    """A made-up study: who, which accession, how many series and images."""

    def __init__(self, patient_id, patient_name, accession, series=(3,), modality="MR",
                 study_id="1", series_numbers=True, image_bytes=128, noise=False, study_date="20240115"):
        self.patient_id = patient_id
        self.patient_name = patient_name
        self.accession = accession
        self.series = tuple(series)
        self.modality = modality
        self.study_id = study_id
        self.series_numbers = series_numbers
        self.image_bytes = image_bytes
        self.noise = noise  # pixels that compress about 2:1, as real images do, instead of zeros
        self.study_date = study_date
        self.study_uid = generate_uid()
        self.sop_uids = []

    @property
    def image_count(self):
        return sum(self.series)


def sample_studies():
    """The demo's and tests' archive: three patients, one of them non-ASCII."""
    return [
        SampleStudy("PAT-1001", "Müller^Jürgen", "MR.180505.026", series=(3, 2)),
        SampleStudy("PAT-1001", "Müller^Jürgen", "ACC1002", series=(2,), modality="CT"),
        SampleStudy("PAT-2001", "DOE^JANE", "ACC2001", series=(4,)),
        SampleStudy("PAT-2001", "DOE^JANE", "DUP01", series=(2,)),
        SampleStudy("PAT-2001", "DOE^JANE", "DUP01", series=(1, 1)),
        SampleStudy("PAT-3001", "SMITH^JOHN", "ACC3001", series=(2, 3), study_id=None, series_numbers=False),
    ]


def write_study(study, folder):
    """Write the study's images as Part 10 files; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    sop_class = CT_IMAGE_STORAGE if study.modality == "CT" else MR_IMAGE_STORAGE
    paths = []
    for series_index, count in enumerate(study.series, start=1):
        series_uid = generate_uid()
        for number in range(1, count + 1):
            sop_uid = generate_uid()
            ds = _image(study, sop_class, sop_uid, series_uid, series_index, number)
            path = os.path.join(folder, "%s.dcm" % sop_uid)
            _save(ds, path)
            study.sop_uids.append(sop_uid)
            paths.append(path)
    return paths


def _image(study, sop_class, sop_uid, series_uid, series_number, number):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = study.accession
    ds.StudyDescription = "%s sample study" % study.modality
    ds.Modality = study.modality
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    if study.study_id is not None:
        ds.StudyID = study.study_id
    ds.SeriesNumber = series_number if study.series_numbers else None
    ds.InstanceNumber = number
    side = max(1, int((study.image_bytes // 2) ** 0.5))
    ds.Rows = side
    ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(side * side * 2).translate(LOW_NIBBLE) if study.noise else bytes(side * side * 2)
    return ds


def _save(ds, path):
    if PYDICOM_3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.save_as(path, write_like_original=False)


def free_port():
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, timeout=10.0, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Dcmqrscp:
    """A real dcmqrscp PACS on loopback, with its config written here."""

    def __init__(self, root, port, destinations, ae_title="ABPACS", dcmtk_dir="/usr/bin", options=()):
        """``options`` go to dcmqrscp, e.g. ("-xs",) to send JPEG Lossless images as they are stored."""
        self.root = root
        self.options = list(options)
        self.port = port
        self.destinations = dict(destinations)  # AE title -> port on 127.0.0.1
        self.ae_title = ae_title
        self.dcmtk_dir = dcmtk_dir
        self.storage = os.path.join(root, "storage")
        self.config_file = os.path.join(root, "dcmqrscp.cfg")
        self.log_file = os.path.join(root, "dcmqrscp.log")
        self.proc = None
        os.makedirs(self.storage, exist_ok=True)

    def add_studies(self, studies):
        """Generate the studies into the storage area and index them."""
        paths = []
        for study in studies:
            paths += write_study(study, os.path.join(self.storage, study.study_uid))
        subprocess.run([os.path.join(self.dcmtk_dir, "dcmqridx"), self.storage] + paths,
                       check=True, stdout=subprocess.DEVNULL)
        return paths

    def write_config(self):
        hosts = "\n".join(
            "dest%d = (%s, 127.0.0.1, %d)" % (i, ae, port) for i, (ae, port) in enumerate(self.destinations.items()))
        with open(self.config_file, "w", encoding="ascii") as handle:
            handle.write(
                "NetworkTCPPort = %d\nMaxPDUSize = 65536\nMaxAssociations = 32\n"
                "HostTable BEGIN\n%s\nHostTable END\n"
                "VendorTable BEGIN\nVendorTable END\n"
                "AETable BEGIN\n%s %s RW (1000, 4096mb) ANY\nAETable END\n"
                % (self.port, hosts, self.ae_title, self.storage)
            )

    def start(self):
        self.write_config()
        env = dict(os.environ, TCP_NODELAY="1")
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(self.dcmtk_dir, "dcmqrscp"), "-c", self.config_file] + self.options + [str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        if not wait_for_port(self.port):
            self.stop()
            raise RuntimeError("dcmqrscp did not start; see %s" % self.log_file)

    def stop(self):
        stop_group(self.proc)
        self.proc = None


class DemoPublisher:
    """A stand-in for the Rimage publisher: a storescp (AE title RIMAGE) that "burns" into a folder.

    So that print works in the demo as it will at go-live: every image the
    service relays lands in ``folder`` as a Part 10 file.
    """

    ae_title = "RIMAGE"

    def __init__(self, folder, port, dcmtk_dir="/usr/bin"):
        self.folder = folder
        self.port = port
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(os.path.dirname(folder), "publisher.log"), "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(dcmtk_dir, "storescp"), "-aet", self.ae_title, "-od", folder, str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, TCP_NODELAY="1"), start_new_session=True)
        if not wait_for_port(port):
            self.stop()
            raise RuntimeError("the demo publisher (storescp) did not start on port %d" % port)

    def stop(self):
        stop_group(self.proc)


def stop_group(proc):
    """Kill a helper started in a session of its own, with whatever it started, and reap it."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


DEMO_CONFIG = """\
# Written by python -m mkiso.demo: mkiso against the local demo PACS and demo publisher.
server: {{host: 127.0.0.1, port: {http_port}}}
pacs: {{ae_title: ABPACS, host: 127.0.0.1, port: {pacs_port}}}
receiver: {{ae_title: CDRECORD, port: {receiver_port}}}
publisher: {{ae_title: RIMAGE, host: 127.0.0.1, port: {publisher_port}}}
iso: {{viewer_dir: {viewer_dir}}}
paths: {{work_dir: {work_dir}}}
limits: {{min_free_bytes: 100000000}}
audit: {{path: {audit_path}}}
metrics: {{enabled: true}}
"""


def main(argv=None):
    """Generate sample studies, start the demo PACS and publisher, and run mkiso against them."""
    parser = argparse.ArgumentParser(prog="python -m mkiso.demo")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "mkiso-demo"))
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--pacs-port", type=int, default=11112)
    parser.add_argument("--receiver-port", type=int, default=10104)
    parser.add_argument("--publisher-port", type=int, default=10105)
    args = parser.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(os.path.join(args.dir, "viewer"))
    os.makedirs(os.path.join(args.dir, "work"))
    with open(os.path.join(args.dir, "viewer", "VIEWER.TXT"), "w") as handle:
        handle.write("A DICOM viewer would be here (iso.viewer_dir).\n")
    pacs = Dcmqrscp(os.path.join(args.dir, "pacs"), args.pacs_port, {"CDRECORD": args.receiver_port})
    studies = sample_studies()
    pacs.add_studies(studies)
    pacs.start()
    try:
        burned = os.path.join(args.dir, "publisher", "burned")
        publisher = DemoPublisher(burned, args.publisher_port)
    except BaseException:
        pacs.stop()
        raise
    config_file = os.path.join(args.dir, "config.yaml")
    with open(config_file, "w", encoding="utf-8") as handle:
        handle.write(DEMO_CONFIG.format(
            http_port=args.http_port, pacs_port=args.pacs_port, receiver_port=args.receiver_port,
            publisher_port=args.publisher_port, viewer_dir=os.path.join(args.dir, "viewer"),
            work_dir=os.path.join(args.dir, "work"), audit_path=os.path.join(args.dir, "audit.log")))
    base = "http://127.0.0.1:%d" % args.http_port
    print("Demo PACS (dcmqrscp ABPACS) on 127.0.0.1:%d with accessions: %s" % (
        args.pacs_port, ", ".join(sorted({s.accession for s in studies}))))
    print("Demo publisher (storescp RIMAGE) on 127.0.0.1:%d" % args.publisher_port)
    print("Try:")
    print("  curl -s %s/api/health" % base)
    print("  curl -OJ '%s/api/iso/download?accession_number=ACC2001'" % base)
    print("  curl -OJ '%s/api/iso/download-multiple?accession_numbers=MR.180505.026,ACC1002'" % base)
    print("  curl -s '%s/send_rimage_multiple.php?accession_number=ACC2001'   # print" % base)
    print("The desk page: %s/" % base)
    print("Metrics (Prometheus): %s/metrics" % base)
    print("Printed images are \"burned\" into %s" % burned)
    print("Ctrl-C stops the service, the demo PACS and the demo publisher.", flush=True)
    from .server import main as server_main
    try:
        return server_main(["--config", config_file])
    finally:
        publisher.stop()
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())
