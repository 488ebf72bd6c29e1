"""The disc's web content (SPEC §4.4, the IHE PDI Web Content option).

Patients open their disc on a Mac, a phone or a PC that will not run the
viewer; a disc of DICOM files alone then shows nothing readable.  So the
disc carries INDEX.HTM at its root and pages in IHE_PDI/ that any browser
opens from the disc: the institution, the patient's name as in the files,
each study (date, description, accession number, modalities) with its
series (description, modality, what it holds), one JPEG preview per image
series, links to README.TXT and to the viewer, and the privacy sentence.

The pages are plain XHTML: no script, no reference outside the disc, every
link relative and in the upper case the file has on the disc, so that the
ISO 9660, Joliet and Rock Ridge names all lead to it.  Nothing here is
referenced by the DICOMDIR; the DICOM files stay under DICOM/.

Previews come from the series' middle image, windowed as the file says (its
first VOI window, else from its pixel values), at most PREVIEW_WIDTH pixels
wide, made by dcmtk's ``dcmj2pnm +oj`` (JPEG-compressed images too).  A
series it cannot render (JPEG 2000, JPEG-LS, ...) gets a sentence instead,
never a failed disc; at most MAX_PREVIEWS per disc keep the cost at a
fraction of a second whatever the study.
"""

import array
import collections
import dataclasses
import datetime
import logging
import os
import re
from xml.sax.saxutils import escape, quoteattr

import pydicom

from .. import __version__, process
from . import records, tree
from ..dicom.received import integer

log = logging.getLogger(__name__)

INDEX = "INDEX.HTM"
FOLDER = "IHE_PDI"
README = "README.TXT"
PREVIEW_WIDTH = 256
MAX_PREVIEWS = 12
PREVIEW_QUALITY = "85"
# What the web content takes on a disc, for the split plan: estimates, rounded up (genisoimage
# then sizes each real disc, and a plan that was too hopeful is made again tighter).
# A folder takes a sector in the ISO 9660 tree and one in the Joliet tree.
DISC_BYTES = 4 * tree.SECTOR  # INDEX.HTM and the folder IHE_PDI/
STUDY_BYTES = 4 * tree.SECTOR  # a study's page and its folder of previews
SERIES_BYTES = 8 * tree.SECTOR  # a preview of at most PREVIEW_WIDTH pixels (JPEG) and its row

PRIVACY = ("This disc holds personal health information. Keep it safe, and give it only to the patient "
           "or to those who care for them.")

# What an object is, in a patient's words: (one, several), by record type and for a few classes.
KINDS = {
    "IMAGE": ("image", "images"),
    "SR DOCUMENT": ("structured report", "structured reports"),
    "KEY OBJECT DOC": ("key image selection", "key image selections"),
    "PRESENTATION": ("presentation state", "presentation states"),
    "ENCAP DOC": ("document", "documents"),
}
DOSE_REPORT = ("dose report", "dose reports")
CLASS_KINDS = {
    "1.2.840.10008.5.1.4.1.1.88.67": DOSE_REPORT,  # X-Ray Radiation Dose SR (CT too)
    "1.2.840.10008.5.1.4.1.1.88.68": DOSE_REPORT,  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.73": DOSE_REPORT,  # Patient Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.76": DOSE_REPORT,  # Enhanced X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.104.1": ("report (PDF)", "reports (PDF)"),  # Encapsulated PDF
}
OTHER = ("other object", "other objects")

PREVIEW_TAGS = ["SeriesDescription", "Rows", "Columns", "NumberOfFrames", "WindowCenter"]

STYLE = ("body{font-family:sans-serif;margin:1em;max-width:60em}table{border-collapse:collapse}"
         "th,td{border:1px solid #999;padding:.3em .5em;text-align:left;vertical-align:top}"
         ".privacy{font-weight:bold}")
PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE html>
<html xmlns="http://www.w3.org/1999/xhtml" lang="en" xml:lang="en">
<head>
<meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
<meta name="viewport" content="width=device-width, initial-scale=1" />
<title>{title}</title>
<style type="text/css">{style}</style>
</head>
<body>
{body}
</body>
</html>
"""


@dataclasses.dataclass
class Series:
    """A series as its row shows it."""

    number: str
    description: str
    modality: str
    objects: str  # "3 images", "1 dose report"
    preview: str = ""  # its JPEG's path on the disc, if it has one
    width: int = 0
    height: int = 0
    note: str = ""  # why it has no preview


@dataclasses.dataclass
class Study:
    """A study as the pages show it: ``page`` is its page's path on the disc."""

    page: str
    patient: str
    date: str
    description: str
    accession: str
    modalities: list
    series: list


def kind(sop_class_uid):
    """What an object of ``sop_class_uid`` is, in words: (one, several)."""
    return CLASS_KINDS.get(sop_class_uid) or KINDS.get(records.record_type(sop_class_uid), OTHER)


def count_kinds(objects):
    """ "3 images, 1 dose report" for the objects of a series."""
    return told(collections.Counter(kind(received.sop_class_uid) for received, _ in objects))


def told(counts):
    """ "3 images, 1 dose report" from a Counter of ``kind`` values, in the order first seen."""
    return ", ".join("%d %s" % (count, words[count != 1]) for words, count in counts.items())


def person(name):
    """A DICOM person name as people write it: "Müller, Jürgen" for Müller^Jürgen."""
    parts = [part.strip() for part in name.split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(part for part in [given] + parts[2:3] if part)
    return "%s, %s" % (family, rest) if family and rest else family or rest or "(no name)"


def day(value):
    """A DICOM date as 2024-01-15 (anything else as it is)."""
    if len(value) == 8 and value.isdigit():
        return "%s-%s-%s" % (value[:4], value[4:6], value[6:])
    return value


def write(staging, images, iso, dcmj2pnm, timeout, number=1, of=1):
    """Write INDEX.HTM and IHE_PDI/ into ``staging`` for the ``images`` ((file, disc path), indexed) of this disc."""
    os.makedirs(os.path.join(staging, FOLDER))
    studies = collect(staging, images, dcmj2pnm, timeout)
    for study in studies:
        with open(os.path.join(staging, study.page), "w", encoding="utf-8") as handle:
            handle.write(study_page(study, iso))
    viewer = viewer_entry(iso.viewer_dir) if iso.viewer_dir else None
    with open(os.path.join(staging, INDEX), "w", encoding="utf-8") as handle:
        handle.write(index_page(studies, iso, viewer, number, of))


class Members:
    """A series' objects as positions in the disc's ``images``, and what they are.

    4 bytes an object, where a list of the (file, disc path) pairs would
    cost about 150: 50,000 images keep memory flat (SPEC §8).
    """

    def __init__(self):
        self.objects = array.array("I")
        self.pictures = array.array("I")  # those whose record is IMAGE: the preview is one of them
        self.kinds = collections.Counter()

    def add(self, at, received):
        self.objects.append(at)
        if records.record_type(received.sop_class_uid) == "IMAGE":
            self.pictures.append(at)
        self.kinds[kind(received.sop_class_uid)] += 1


def collect(staging, images, dcmj2pnm, timeout):
    """The disc's studies and series, in disc order, with the previews made into IHE_PDI/."""
    grouped, modalities = {}, {}
    for at, (received, path) in enumerate(images):
        _, patient, study, series, _ = path.split("/")
        series_of_study = grouped.setdefault((patient, study), {})
        members = series_of_study.get(series)
        if members is None:
            members = series_of_study[series] = Members()
        members.add(at, received)
        if received.modality:
            modalities.setdefault((patient, study), {})[received.modality] = None
    studies, previews = [], 0
    for number, (key, series_of_study) in enumerate(grouped.items(), start=1):
        first = images[next(iter(series_of_study.values())).objects[0]][0]
        page = "%s/STU%05d.HTM" % (FOLDER, number)
        rows = []
        for series_number, members in enumerate(series_of_study.values(), start=1):
            row, made = describe_series(staging, images, members,
                                        "%s/STU%05d/SER%05d.JPG" % (FOLDER, number, series_number),
                                        dcmj2pnm, timeout, previews < MAX_PREVIEWS)
            previews += made
            rows.append(row)
        studies.append(Study(page, person(first.patient_name), day(first.study_date), first.study_description,
                             first.accession, list(modalities.get(key, ())), rows))
    return studies


def describe_series(staging, images, members, preview, dcmj2pnm, timeout, may_preview):
    """A series' row (``members`` of ``images``), and whether a preview was made for it (into ``preview``)."""
    chosen = members.pictures or members.objects
    received, path = images[chosen[len(chosen) // 2]]
    header = pydicom.dcmread(os.path.join(staging, path), stop_before_pixels=True, specific_tags=PREVIEW_TAGS)
    row = Series(str(received.series_number) if received.series_number is not None else "",
                 str(header.get("SeriesDescription", "") or ""), received.modality, told(members.kinds))
    if not members.pictures:
        return row, False
    if not may_preview:
        row.note = "No preview on this disc (only the first %d series have one)." % MAX_PREVIEWS
        return row, False
    target = os.path.join(staging, preview)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    size = make_preview(dcmj2pnm, os.path.join(staging, path), target, header, timeout)
    if size is None:
        row.note = "No preview could be made of this series; a DICOM viewer shows it."
        return row, False
    row.preview, (row.width, row.height) = preview, size
    return row, True


def make_preview(dcmj2pnm, source, target, header, timeout):
    """The JPEG preview of ``source`` at ``target`` by dcmj2pnm: its (width, height), or None if it failed."""
    args = [dcmj2pnm, "+oj", "+Jq", PREVIEW_QUALITY]
    args += ["+Wi", "1"] if header.get("WindowCenter") not in (None, "") else ["+Wn"]
    frames = integer(header.get("NumberOfFrames")) or 1
    if frames > 1:
        args += ["+F", str((frames + 1) // 2)]
    if (integer(header.get("Columns")) or 0) > PREVIEW_WIDTH:
        args += ["+Sxv", str(PREVIEW_WIDTH)]
    try:
        result = process.run(args + [source, target], timeout)
    except (process.ToolTimeout, process.ToolMissing) as exc:
        log.warning("no preview: %s", exc)
        return None
    size = jpeg_size(target) if result.returncode == 0 and os.path.exists(target) else None
    if size is None:
        log.info("no preview: dcmj2pnm could not render a series: %s", process.failure_reason(result.output))
        if os.path.exists(target):
            os.unlink(target)
    return size


def jpeg_size(path):
    """(width, height) from a JPEG's frame header, or None when the file is not a JPEG."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[at + 7:at + 9], "big"), int.from_bytes(data[at + 5:at + 7], "big")
        at += 2 + length
    return None


def viewer_entry(viewer_dir):
    """The viewer's program on the disc, as AUTORUN.INF's open= names it; None if it names none there."""
    program = tree.autorun_program(viewer_dir)
    if program is None:
        return None
    paths = {path.replace(os.sep, "/").upper(): path.replace(os.sep, "/")
             for _, path in tree.viewer_paths(viewer_dir, tree.PDI_RESERVED)}
    return paths.get(program.replace("\\", "/").lstrip("./").upper())


# -- the pages -------------------------------------------------------------------


CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _text(value):
    """``value`` as XHTML text: escaped, without the control characters XML does not allow."""
    return escape(CONTROL.sub("", value))


def _page(title, body):
    return PAGE.format(title=_text(title), style=STYLE, body=body)


def _link(href, text):
    return "<a href=%s>%s</a>" % (quoteattr(href), _text(text))


def _heading(iso):
    lines = ["<h1>%s</h1>" % _text(iso.institution or "Medical images")]
    if iso.contact:
        lines.append("<p>%s</p>" % _text(iso.contact))
    return lines


def _footer():
    return ['<p class="privacy">%s</p>' % _text(PRIVACY),
            "<p>Made by mkiso %s on %s.</p>" % (_text(__version__), datetime.date.today().isoformat())]


def index_page(studies, iso, viewer, number, of):
    """INDEX.HTM: who, which studies (each linking to its page), what else is on the disc."""
    body = _heading(iso)
    if of > 1:
        body.append("<p>This is disc %d of %d; it shows the studies on this disc, and each disc can be read "
                    "on its own.</p>" % (number, of))
    by_patient = {}
    for study in studies:
        by_patient.setdefault(study.patient, []).append(study)
    for patient, held in by_patient.items():
        body.append("<h2>Patient: %s</h2>" % _text(patient))
        body.append("<table>\n<tr><th>Date</th><th>Study</th><th>Accession number</th><th>Modalities</th>"
                    "<th>Series</th></tr>")
        for study in held:
            body.append("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%d</td></tr>" % (
                _text(study.date), _link(study.page, study.description or "Study"), _text(study.accession),
                _text(", ".join(study.modalities)), len(study.series)))
        body.append("</table>")
    body.append("<h2>On this disc</h2>\n<ul>")
    body.append("<li>%s: what the disc holds and how it was made.</li>" % _link(README, README))
    if viewer:
        body.append("<li>The DICOM viewer: %s (a Windows program; it may start by itself when the disc is "
                    "inserted).</li>" % _link(viewer, viewer))
    elif iso.viewer_dir:
        body.append("<li>The hospital's viewer folder is on this disc; README.TXT says whether it holds a "
                    "viewer program and how to start it.</li>")
    else:
        body.append("<li>There is no DICOM viewer on this disc.</li>")
    body.append("<li>The images for a DICOM viewer: DICOMDIR and the folder DICOM (any DICOM viewer "
                "opens them).</li>\n</ul>")
    body += _footer()
    return _page(iso.institution or "Medical images", "\n".join(body))


def study_page(study, iso):
    """A study's page in IHE_PDI/: its series with what they hold and their previews."""
    body = _heading(iso)
    body.append("<p>%s | %s</p>" % (_link("../" + INDEX, "Back to the disc's contents"), _link("../" + README,
                                                                                                  README)))
    body.append("<h2>%s</h2>" % _text(study.description or "Study"))
    body.append("<p>Patient: %s<br />Date: %s<br />Accession number: %s<br />Modalities: %s</p>" % (
        _text(study.patient), _text(study.date), _text(study.accession), _text(", ".join(study.modalities))))
    body.append("<table>\n<tr><th>Series</th><th>Description</th><th>Modality</th><th>Objects</th>"
                "<th>Preview</th></tr>")
    folder = FOLDER + "/"
    for series in study.series:
        if series.preview:
            shown = '<img src=%s width="%d" height="%d" alt=%s />' % (
                quoteattr(series.preview[len(folder):]), series.width, series.height,
                quoteattr("Preview of series %s" % series.number))
        else:
            shown = _text(series.note)
        body.append("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>" % (
            _text(series.number), _text(series.description), _text(series.modality), _text(series.objects),
            shown))
    body.append("</table>")
    body += _footer()
    return _page("%s, %s" % (study.description or "Study", study.date), "\n".join(body))
