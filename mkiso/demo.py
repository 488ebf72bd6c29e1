"""A demo PACS: synthetic studies served by a real dcmqrscp.

The tests and ``python -m mkiso.demo`` share this: studies are generated
with pydicom (made-up patients, fresh UIDs, Explicit VR Little Endian) and
indexed into a dcmqrscp storage area that knows our receiver's AE title.
No real patient data is involved anywhere.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

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
    if isinstance(study, EveryKindStudy):
        return study.write(folder)
    sop_class = CT_IMAGE_STORAGE if study.modality == "CT" else MR_IMAGE_STORAGE
    paths = []
    for series_index, count in enumerate(study.series, start=1):
        series_uid = generate_uid()
        for number in range(1, count + 1):
            ds = _image(study, sop_class, series_uid, series_index, number)
            path = os.path.join(folder, "%s.dcm" % ds.SOPInstanceUID)
            _save(ds, path)
            study.sop_uids.append(ds.SOPInstanceUID)
            paths.append(path)
    return paths


def _new_object(study, sop_class, charset):
    """A Part 10 dataset of ``sop_class`` with the study's patient and study attributes."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = study.accession
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study.study_uid
    return ds


def _image(study, sop_class, series_uid, series_number, number):
    ds = _new_object(study, sop_class, "ISO_IR 192")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDescription = "%s sample study" % study.modality
    ds.Modality = study.modality
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


# -- a study with every kind of object ------------------------------------------------

SOP = {
    "ct": CT_IMAGE_STORAGE,
    "multiframe": "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image
    "dose": "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "report": "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "key_images": "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "presentation": "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "pdf": "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
}
PRIVATE_CLASS = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image: a vendor's own class
CT_PERFORMED_PROTOCOL = "1.2.840.10008.5.1.4.1.1.200.2"  # stored with the study by recent CT scanners
RECORD_OF = {"ct": "IMAGE", "multiframe": "IMAGE", "dose": "SR DOCUMENT", "report": "SR DOCUMENT",
             "key_images": "KEY OBJECT DOC", "presentation": "PRESENTATION", "pdf": "ENCAP DOC",
             "extra": "PRIVATE"}
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
       b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def _code(value, scheme, meaning):
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _content(relationship, value_type, concept, **values):
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(*concept)]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


class EveryKindStudy(SampleStudy):
    """A CT study as scanners and archives send them: every kind of object a disc must file right.

    Three CT images, a multi-frame image (JPEG Lossless, made by dcmtk's
    dcmcjpeg), an X-Ray Radiation Dose SR, a Comprehensive SR (a
    verified report, Latin-1 names in it), a Key Object Selection, a
    Grayscale Softcopy Presentation State and an Encapsulated PDF, each with
    the modules its IOD requires, all in ISO 8859-1 (ISO_IR 100): one
    patient's name is the same bytes in every file, as dcentvfy checks.
    ``extra_class`` adds an object of that class (a vendor's private one, a
    CT Performed Procedure Protocol, or one mkiso does not know).  ``kinds``
    maps each SOP Instance UID to its kind.
    """

    def __init__(self, patient_id, patient_name, accession, extra_class=None, dcmtk_dir="/usr/bin",
                 image_bytes=8192):
        super().__init__(patient_id, patient_name, accession, series=(), modality="CT", image_bytes=image_bytes)
        self.classes = dict(SOP, extra=extra_class)
        self.dcmtk_dir = dcmtk_dir
        self.kinds = {}
        self.frame_of_reference = generate_uid()

    @property
    def image_count(self):
        return 9 + (1 if self.classes["extra"] else 0)

    def write(self, folder):
        ct_series, ct = generate_uid(), []
        for number in range(1, 4):
            ct.append(self._ct(ct_series, number))
        objects = ct + [self._multiframe(), self._dose(ct_series, ct), self._report(), self._key_images(ct_series, ct),
                        self._presentation(ct_series, ct), self._pdf()]
        if self.classes["extra"]:
            objects.append(self._extra())
        paths = []
        for kind, ds in objects:
            path = os.path.join(folder, "%s.dcm" % ds.SOPInstanceUID)
            _save(ds, path)
            self.kinds[ds.SOPInstanceUID] = kind
            self.sop_uids.append(ds.SOPInstanceUID)
            paths.append(path)
        jpeg = paths[3]  # the multi-frame image, as JPEG Lossless (SV1)
        subprocess.run([os.path.join(self.dcmtk_dir, "dcmcjpeg"), "+e1", jpeg, jpeg + ".jpg"], check=True)
        os.replace(jpeg + ".jpg", jpeg)
        return paths

    # The modules every object shares: Patient, General Study, its series, General Equipment, SOP Common.
    def _object(self, kind, series_uid, series_number, modality, number):
        ds = _new_object(self, self.classes[kind], "ISO_IR 100")
        ds.InstanceCreationDate = self.study_date
        ds.InstanceCreationTime = "103000"
        ds.Modality = modality
        ds.Manufacturer = "mkiso demo"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT every kind of object"
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = self.study_id
        ds.SeriesNumber = series_number
        ds.InstanceNumber = number
        ds.ContentDate = self.study_date
        ds.ContentTime = "102000"
        return kind, ds

    def _pixels(self, ds, frames=1):
        ds.BodyPartExamined = "CHEST"  # unpaired: no Laterality (General Series, type 2C)
        side = max(8, int((self.image_bytes // 2) ** 0.5))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = side
        ds.Columns = side
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = bytes((value * 7) & 0x0F for value in range(side * side * 2 * frames))

    def _ct(self, series_uid, number):
        kind, ds = self._object("ct", series_uid, 1, "CT", number)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = self.frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.SliceThickness = 5
        ds.ImagePositionPatient = [0, 0, 5 * number]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        self._pixels(ds)
        return kind, ds

    def _multiframe(self):
        kind, ds = self._object("multiframe", generate_uid(), 2, "OT", 1)
        ds.ConversionType = "WSD"
        ds.BurnedInAnnotation = "NO"
        ds.NumberOfFrames = 4
        ds.FrameIncrementPointer = 0x00182002  # FrameLabelVector
        ds.FrameLabelVector = ["1", "2", "3", "4"]
        ds.PatientOrientation = ""
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        self._pixels(ds, frames=4)
        return kind, ds

    def _document(self, kind, series_number, modality):
        kind, ds = self._object(kind, generate_uid(), series_number, modality, 1)
        ds.ReferencedPerformedProcedureStepSequence = []
        ds.PerformedProcedureCodeSequence = []
        ds.ValueType = "CONTAINER"
        ds.ContinuityOfContent = "SEPARATE"
        return kind, ds

    def _evidence(self, series_uid, images):
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = [_reference(ds) for _, ds in images]
        study = Dataset()
        study.StudyInstanceUID = self.study_uid
        study.ReferencedSeriesSequence = [series]
        return [study]

    def _dose(self, series_uid, images):
        kind, ds = self._document("dose", 3, "SR")
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        ds.ManufacturerModelName = "Demo CT"
        ds.DeviceSerialNumber = "0001"
        ds.SoftwareVersions = "1"
        ds.ConceptNameCodeSequence = [_code("113701", "DCM", "X-Ray Radiation Dose Report")]
        template = Dataset()
        template.MappingResource = "DCMR"
        template.TemplateIdentifier = "10011"
        ds.ContentTemplateSequence = [template]
        ds.CurrentRequestedProcedureEvidenceSequence = self._evidence(series_uid, images)
        ds.ContentSequence = [
            _content("HAS CONCEPT MOD", "CODE", ("121058", "DCM", "Procedure reported"),
                     ConceptCodeSequence=[_code("77477000", "SCT", "Computed Tomography X-Ray")]),
            _content("HAS OBS CONTEXT", "CODE", ("121005", "DCM", "Observer Type"),
                     ConceptCodeSequence=[_code("121007", "DCM", "Device")]),
        ]
        return kind, ds

    def _report(self):
        kind, ds = self._document("report", 4, "SR")
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "VERIFIED"
        observer = Dataset()
        observer.VerifyingObserverName = "Größe^Renée"
        observer.VerifyingObserverIdentificationCodeSequence = []
        observer.VerifyingOrganization = "Hôpital démo"
        observer.VerificationDateTime = self.study_date + "120000"
        ds.VerifyingObserverSequence = [observer]
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
        ds.ContentSequence = [_content("CONTAINS", "TEXT", ("121071", "DCM", "Finding"),
                                       TextValue="Befund: unauffällig; keine Läsion.")]
        return kind, ds

    def _key_images(self, series_uid, images):
        kind, ds = self._document("key_images", 5, "KO")
        del ds.PerformedProcedureCodeSequence  # not in the Key Object Document module
        ds.ConceptNameCodeSequence = [_code("113000", "DCM", "Of Interest")]
        template = Dataset()
        template.MappingResource = "DCMR"
        template.TemplateIdentifier = "2010"
        ds.ContentTemplateSequence = [template]
        ds.CurrentRequestedProcedureEvidenceSequence = self._evidence(series_uid, images[:2])
        ds.ContentSequence = [_content("CONTAINS", "IMAGE", ("113000", "DCM", "Of Interest"),
                                       ReferencedSOPSequence=[_reference(image)]) for _, image in images[:2]]
        for item in ds.ContentSequence:
            del item.ConceptNameCodeSequence  # an IMAGE item of TID 2010 has no concept name
        return kind, ds

    def _presentation(self, series_uid, images):
        kind, ds = self._object("presentation", generate_uid(), 6, "PR", 1)
        del ds.ContentDate, ds.ContentTime
        ds.ContentLabel = "WINDOW"
        ds.ContentDescription = "Soft tissue window"
        ds.ContentCreatorName = "DOE^JOHN"
        ds.PresentationCreationDate = self.study_date
        ds.PresentationCreationTime = "104500"
        ds.BodyPartExamined = "CHEST"
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedImageSequence = [_reference(image) for _, image in images]
        ds.ReferencedSeriesSequence = [series]
        area = Dataset()
        area.DisplayedAreaTopLeftHandCorner = [1, 1]
        area.DisplayedAreaBottomRightHandCorner = [images[0][1].Columns, images[0][1].Rows]
        area.PresentationSizeMode = "SCALE TO FIT"
        area.PresentationPixelSpacing = [0.5, 0.5]
        ds.DisplayedAreaSelectionSequence = [area]
        voi = Dataset()
        voi.WindowCenter = 40
        voi.WindowWidth = 400
        ds.SoftcopyVOILUTSequence = [voi]
        ds.PresentationLUTShape = "IDENTITY"
        return kind, ds

    def _pdf(self):
        kind, ds = self._object("pdf", generate_uid(), 7, "DOC", 1)
        ds.ConversionType = "WSD"
        ds.AcquisitionDateTime = self.study_date + "101500"
        ds.BurnedInAnnotation = "YES"
        ds.DocumentTitle = "Radiology report"
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocument = PDF + (b"\n" if len(PDF) % 2 else b"")
        ds.EncapsulatedDocumentLength = len(PDF)
        return kind, ds

    def _extra(self):
        if self.classes["extra"] == CT_PERFORMED_PROTOCOL:  # how the scanner scanned: a series of its own
            kind, ds = self._object("extra", generate_uid(), 99, "CT", 1)
            ds.SeriesDescription = "Performed protocol"
            ds.ProtocolName = "Head routine"
            return kind, ds
        kind, ds = self._object("extra", generate_uid(), 99, "OT", 1)
        ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
        ds.add_new(0x00291008, "CS", "RAWDATA")
        return kind, ds


def _reference(ds):
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


TEMPLATE_NUMBER = 10000000  # 8 digits: room for any InstanceNumber of a large study


def write_large_study(study, folder):
    """Write a study of tens of thousands of images fast; returns their paths.

    ``write_study`` encodes every image with pydicom (tens of milliseconds
    each); here one image per series is, and every other image is a copy of
    its bytes with its own SOP Instance UID (all of one length: 2.25 and 39
    digits) and InstanceNumber (8 characters) written over them.  Pixel data
    as ``study.image_bytes`` and ``study.noise`` say, the same in a series.
    """
    os.makedirs(folder, exist_ok=True)
    sop_class = CT_IMAGE_STORAGE if study.modality == "CT" else MR_IMAGE_STORAGE
    paths = []
    for series_index, count in enumerate(study.series, start=1):
        template_uid = _fixed_uid()
        ds = _image(study, sop_class, generate_uid(), series_index, TEMPLATE_NUMBER)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = template_uid
        template = os.path.join(folder, "template.dcm")
        _save(ds, template)
        with open(template, "rb") as handle:
            data = handle.read()
        os.unlink(template)
        uid_bytes, number_bytes = template_uid.encode("ascii"), b"%d" % TEMPLATE_NUMBER
        uid_at = [at for at in range(len(data)) if data.startswith(uid_bytes, at)]
        number_at = data.index(b"\x20\x00\x13\x00IS\x08\x00" + number_bytes) + 8
        if len(uid_at) != 2:  # the meta header's and the data set's
            raise RuntimeError("the template image holds its SOP Instance UID %d times" % len(uid_at))
        image = bytearray(data)
        for number in range(1, count + 1):
            sop_uid = _fixed_uid()
            for at in uid_at:
                image[at:at + len(uid_bytes)] = sop_uid.encode("ascii")
            image[number_at:number_at + 8] = b"%-8d" % number  # IS: padded with trailing spaces
            path = os.path.join(folder, "%s.dcm" % sop_uid)
            with open(path, "wb") as handle:
                handle.write(image)
            study.sop_uids.append(sop_uid)
            paths.append(path)
    return paths


def _fixed_uid():
    """A fresh UID of always the same length (43 characters): 2.25. and a 38-digit number without a leading 0."""
    return "2.25.%d" % random.randint(10 ** 37, 10 ** 38 - 1)


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


class Orthanc:
    """Debian's Orthanc as a plain loopback process, loaded over C-STORE.

    The PACS for studies larger than dcmqrscp's index holds (about 9,000
    images): the memory test and the benchmark.
    """

    ae_title = "ORTHANC"

    def __init__(self, root, destinations, settings=None):
        """``destinations``: AE title -> port on 127.0.0.1, for C-MOVE; ``settings``: Orthanc's
        configuration options over the ones below (the tests of a PACS set up as a hospital's is)."""
        self.root = root
        self.port = free_port()
        self.http = "http://127.0.0.1:%d" % free_port()
        self.destinations = dict(destinations)
        self.settings = dict(settings or {})
        self.proc = None

    def start(self):
        os.makedirs(self.root, exist_ok=True)
        config = {
            "Name": "mkiso-test", "StorageDirectory": self.root + "/db", "IndexDirectory": self.root + "/db",
            "HttpPort": int(self.http.rsplit(":", 1)[1]), "DicomPort": self.port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "StorageCompression": False, "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomModalities": {ae.lower(): [ae, "127.0.0.1", port] for ae, port in self.destinations.items()},
            "Plugins": [], "HttpTimeout": 3600, "LimitFindInstances": 0, "LimitFindResults": 0,
        }
        config.update(self.settings)
        path = os.path.join(self.root, "orthanc.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        with open(os.path.join(self.root, "orthanc.log"), "ab") as log:
            # TCP_NODELAY: Orthanc's DICOM side is dcmtk, which waits out Nagle on each C-STORE response without it.
            self.proc = subprocess.Popen(["Orthanc", path], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=dict(os.environ, TCP_NODELAY="1"),
                                         start_new_session=True)
        if not wait_for_port(self.port, timeout=60):
            self.stop()
            raise RuntimeError("Orthanc did not start; see %s/orthanc.log" % self.root)

    def load(self, folder, count):
        """Send every file below ``folder`` with storescu; Orthanc must then hold ``count`` images."""
        subprocess.run(["storescu", "-aec", self.ae_title, "+sd", "+r", "127.0.0.1", str(self.port), folder],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, TCP_NODELAY="1"))
        with urllib.request.urlopen(self.http + "/statistics", timeout=60) as answer:
            held = json.load(answer)["CountInstances"]
        if held != count:
            raise RuntimeError("Orthanc holds %d of %d images" % (held, count))

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


def _openssl(*args):
    subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Pki:
    """Certificates for DICOM over TLS, made with openssl as the README tells an admin to: a CA, the
    PACS's and mkiso's certificates it issued (mkiso's for 400 days, another of its key for 10), a
    syslog server's (for 127.0.0.1), another CA with a PACS certificate of its own, and an expired
    certificate of mkiso's.  For the tests and the TLS benchmark."""

    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.ca = self.authority("ca", "mkiso test CA")
        self.other_ca = self.authority("other-ca", "another CA")
        self.pacs = self.issue("pacs", "PACS", self.ca)
        self.mkiso = self.issue("mkiso", "mkiso", self.ca, days=400)
        self.soon = self.issue("soon", "mkiso", self.ca, days=10, key=self.mkiso[1])  # renew it!
        self.syslog = self.issue("syslog", "127.0.0.1", self.ca, alt="IP:127.0.0.1")
        self.stranger = self.issue("stranger", "PACS", self.other_ca)  # a PACS whose CA we do not trust
        self.expired = self.issue("expired", "mkiso", self.ca, days=-1, key=self.mkiso[1])

    def path(self, name):
        return os.path.join(self.folder, name)

    def authority(self, name, subject):
        """(certificate, key) of a self-signed CA."""
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.path(name + ".key"),
                 "-out", self.path(name + ".crt"), "-days", "3650", "-subj", "/CN=" + subject)
        return self.path(name + ".crt"), self.path(name + ".key")

    def issue(self, name, subject, authority, days=30, key=None, alt=None):
        """(certificate, key) issued by ``authority`` for ``days`` (negative: expired already)."""
        key = key or self.path(name + ".key")
        if not os.path.exists(key):
            _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key)
        _openssl("req", "-new", "-key", key, "-out", self.path(name + ".csr"), "-subj", "/CN=" + subject)
        extensions = []
        if alt:
            with open(self.path(name + ".ext"), "w", encoding="ascii") as handle:
                handle.write("subjectAltName = %s\n" % alt)
            extensions = ["-extfile", self.path(name + ".ext")]
        _openssl("x509", "-req", "-in", self.path(name + ".csr"), "-CA", authority[0], "-CAkey", authority[1],
                 "-CAcreateserial", "-out", self.path(name + ".crt"), "-days", str(days), *extensions)
        return self.path(name + ".crt"), key

    def setting(self, pair=None, ca=None, **more):
        """A tls: mapping for the config with ``pair`` (default mkiso's) and ``ca`` (default our CA)."""
        certificate, key = pair or self.mkiso
        return dict({"enabled": True, "certificate": certificate, "private_key": key,
                     "ca_file": ca or self.ca[0]}, **more)


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
        handle.write("A placeholder, not a viewer: a real DICOM viewer's files would be here (iso.viewer_dir).\n")
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
    print("  curl -sS --fail-with-body %s/api/health" % base)
    print("  curl --fail -OJ '%s/api/iso/download?accession_number=ACC2001'" % base)
    print("  curl --fail -OJ '%s/api/iso/download-multiple?accession_numbers=MR.180505.026,ACC1002'" % base)
    print("  curl -sS --fail-with-body '%s/send_rimage_multiple.php?accession_number=ACC2001'   # print" % base)
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
