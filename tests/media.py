"""Media for mkiso-verify's tests and bench: a disc tree made into an ISO and a ZIP.

SHA256.TXT is computed here with hashlib, as sha256sum would (one line per
other file, ``<hex>  <path>``, sorted, CRLF), and the ISO is made with
genisoimage's options exactly as the service makes it
(``tree.genisoimage_args``: Joliet and Rock Ridge), the ZIP with the
stdlib's zipfile (entries stored): what ``mkiso.disc.verify`` reads must be
what the service and the other tools write, not a copy of the reader's own
assumptions.
"""

import hashlib
import os
import shutil
import subprocess
import zipfile

from mkiso import demo, fastcopy
from mkiso.dicom import received
from mkiso.disc import dicomdir, tree

MANIFEST = "SHA256.TXT"
GENISOIMAGE = shutil.which("genisoimage") or "/usr/bin/genisoimage"


def files_of(root):
    """Every file under ``root``, as a path on the medium ('/' separators), sorted."""
    return sorted(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
                  for folder, _, names in os.walk(root) for name in names)


def write_manifest(root):
    """SHA256.TXT at the root of ``root``: every other file's SHA-256, as sha256sum writes it."""
    lines = []
    for path in files_of(root):
        if path == MANIFEST:
            continue
        digest = hashlib.sha256()
        with open(os.path.join(root, path), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        lines.append("%s  %s\r\n" % (digest.hexdigest(), path))
    with open(os.path.join(root, MANIFEST), "w", encoding="ascii", newline="") as handle:
        handle.writelines(lines)


def make_iso(root, iso_path, label="MKISO"):
    """The ISO of ``root``, built with the service's own genisoimage arguments."""
    args = tree.genisoimage_args(GENISOIMAGE, root, label)
    subprocess.run(args[:1] + ["-o", iso_path] + args[1:], check=True, capture_output=True)
    return iso_path


def make_zip(root, zip_path, compression=zipfile.ZIP_STORED):
    """The ZIP of ``root``: every file stored (zip.compress: stored) or DEFLATEd, the names as on the disc."""
    with zipfile.ZipFile(zip_path, "w", compression) as archive:
        for path in files_of(root):
            archive.write(os.path.join(root, path), path)
    return zip_path


def synthetic_disc(root, images, image_bytes, viewer_dir=None):
    """A PDI disc tree of ``images`` objects in one study (mkiso's own layout and DICOMDIR), with
    SHA256.TXT; fast enough for 10,000 images (``demo.write_large_study``)."""
    source = root + ".source"
    study = demo.SampleStudy("PAT-1", "DOE^JANE", "ACC1", series=(images,), image_bytes=image_bytes, noise=True)
    paths = demo.write_large_study(study, source)
    placed = tree.pdi_paths(received.read_all(paths))
    for folder in sorted({os.path.dirname(path) for _, path in placed}):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    fastcopy.place_files([(image.path, os.path.join(root, path)) for image, path in placed])
    for source_path, path in tree.viewer_paths(viewer_dir, tree.PDI_RESERVED):
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        shutil.copyfile(source_path, os.path.join(root, path))
    dicomdir.write(os.path.join(root, "DICOMDIR"), placed, "ACC1")
    with open(os.path.join(root, "README.TXT"), "w", encoding="ascii", newline="") as handle:
        handle.write("A synthetic disc.\r\n")
    shutil.rmtree(source)
    write_manifest(root)
    return study
