"""Which directory record each object gets on a disc (PS3.3 F.4, F.5), and what the record holds.

A study is not only images: a CT study carries a dose report (an SR), key
images, presentation states, a PDF report.  A viewer trusts the record type
(an SR filed as an IMAGE is opened as an image), so every instance gets the
record its SOP class calls for.  The table follows dcmtk's ``dcddirif.cc``
(the tests' oracle, ``dcmmkdir``), which follows PS3.3 F.4: IMAGE for every
image storage class, multi-frame and segmentation included; SR DOCUMENT for
every SR class; and so on.

Storage classes that the current PS3.3 F.5 files under no patient's study
are in ``NO_RECORD`` with their names (PS3.6): the protocol objects recent CT
and XA scanners store with a study (CT/XA Defined and Performed Procedure
Protocol, Protocol Approval), the DICOS reports, the retired stand-alone
overlays, curves, LUTs, stored prints and trial SRs (whose record types
PS3.3 retired), and the objects of no patient whose records sit at the
root of a DICOMDIR (hanging protocols, colour palettes, implant templates,
inventories).  An object of such a class is left off the disc and said so
(SPEC §4.1), whatever ``iso.private_objects`` says: refusing a whole study
for a scanner's protocol would leave the patient without a disc, and
filing it under a record it does not fit would mislead a viewer.  (dcmtk's
dcddirif.cc files a Performed Procedure Protocol as an IMAGE: its default
branch, not the standard.)

A UID under the standard's root (1.2.840.10008.) that neither table has is
an error naming it (500 ``unknown_sop_class``), never a guessed record: a
class of a later edition of the standard wants a decision.  Any other root
is a vendor's private class (``PRIVATE``).

``KEYS`` lists, per record type, the keys PS3.3 F.5 asks for and dcmmkdir
copies from the file: type 1 must have a value (only InstanceNumber is
invented, as for images), type 2 is present even when empty, type 3 and 1C
are copied where the file has them.
"""

import collections

from .. import errors

STANDARD_ROOT = "1.2.840.10008."
IMAGE = "IMAGE"
PRIVATE = "PRIVATE"

# Storage SOP classes by record type (PS3.4 B.5, PS3.3 F.4); the names as in PS3.6.
RECORD_TYPES_BY_KIND = {
    "IMAGE": (
        "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image Storage SOP Class
        "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image Storage SOP Class
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3",  # Digital Intra-Oral X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage
        "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
        "1.2.840.10008.5.1.4.1.1.6.3",  # Photoacoustic Image Storage
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
        "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image Storage
        "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image Storage
        "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image Storage
        "1.2.840.10008.5.1.4.1.1.13.1.4",  # Breast Projection X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.13.1.5",  # Breast Projection X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.14.1",  # Intravascular Optical Coherence Tomography Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.14.2",  # Intravascular Optical Coherence Tomography Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.8",  # Height Map Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial
        "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.2",  # VL Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.3",  # VL Slide-Coordinates Microscopic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.5",  # Wide Field Ophthalmic Photography Stereographic Projection Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.6",  # Wide Field Ophthalmic Photography 3D Coordinates Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.7",  # Ophthalmic Optical Coherence Tomography En Face Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic Optical Coherence Tomography B-scan Volume Analysis Storage
        "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.7",  # Dermoscopic Photography Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.8",  # Confocal Microscopy Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.9",  # Confocal Microscopy Tiled Pyramidal Image Storage
        "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image Storage - Trial
        "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map Storage
        "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map Storage
        "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
        "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image Storage
        "1.2.840.10008.5.1.4.1.1.481.23",  # Enhanced RT Image Storage
        "1.2.840.10008.5.1.4.1.1.481.24",  # Enhanced Continuous RT Image Storage
        "1.2.840.10008.5.1.4.1.1.501.1",  # DICOS CT Image Storage
        "1.2.840.10008.5.1.4.1.1.501.2.1",  # DICOS Digital X-Ray Image Storage - For Presentation
        "1.2.840.10008.5.1.4.1.1.501.2.2",  # DICOS Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.601.1",  # Eddy Current Image Storage
        "1.2.840.10008.5.1.4.1.1.601.2",  # Eddy Current Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.601.3",  # DICONDE_Thermography Image Storage
        "1.2.840.10008.5.1.4.1.1.601.4",  # DICONDE_Thermography Multi Frame Image Storage
    ),
    "SR DOCUMENT": (
        "1.2.840.10008.5.1.4.1.1.78.6",  # Spectacle Prescription Report Storage
        "1.2.840.10008.5.1.4.1.1.79.1",  # Macular Grid Thickness and Volume Report Storage
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR Storage
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR Storage
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR Storage
        "1.2.840.10008.5.1.4.1.1.88.35",  # Extensible SR Storage
        "1.2.840.10008.5.1.4.1.1.88.40",  # Procedure Log Storage
        "1.2.840.10008.5.1.4.1.1.88.50",  # Mammography CAD SR Storage
        "1.2.840.10008.5.1.4.1.1.88.65",  # Chest CAD SR Storage
        "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.69",  # Colon CAD SR Storage
        "1.2.840.10008.5.1.4.1.1.88.70",  # Implantation Plan SR Storage
        "1.2.840.10008.5.1.4.1.1.88.71",  # Acquisition Context SR Storage
        "1.2.840.10008.5.1.4.1.1.88.72",  # Simplified Adult Echo SR Storage
        "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.74",  # Planned Imaging Agent Administration SR Storage
        "1.2.840.10008.5.1.4.1.1.88.75",  # Performed Imaging Agent Administration SR Storage
        "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR Storage
        "1.2.840.10008.5.1.4.1.1.88.77",  # Waveform Annotation SR Storage
    ),
    "PRESENTATION": (
        "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.2",  # Color Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.3",  # Pseudo-Color Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.4",  # Blending Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.5",  # XA/XRF Grayscale Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.6",  # Grayscale Planar MPR Volumetric Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.7",  # Compositing Planar MPR Volumetric Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.8",  # Advanced Blending Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.9",  # Volume Rendering Volumetric Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.10",  # Segmented Volume Rendering Volumetric Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.11",  # Multiple Volume Rendering Volumetric Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.11.12",  # Variable Modality LUT Softcopy Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.131",  # Basic Structured Display Storage
    ),
    "WAVEFORM": (
        "1.2.840.10008.5.1.4.1.1.9.1",  # Waveform Storage - Trial
        "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.4",  # General 32-bit ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.2.1",  # Hemodynamic Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.3.1",  # Cardiac Electrophysiology Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.4.1",  # Basic Voice Audio Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.4.2",  # General Audio Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.5.1",  # Arterial Pulse Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.6.1",  # Respiratory Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.6.2",  # Multi-channel Respiratory Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.1",  # Routine Scalp Electroencephalogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.2",  # Electromyogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.3",  # Electrooculogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.7.4",  # Sleep Electroencephalogram Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.8.1",  # Body Position Waveform Storage
    ),
    "RT DOSE": (
        "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
    ),
    "RT STRUCTURE SET": (
        "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set Storage
    ),
    "RT PLAN": (
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan Storage
        "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan Storage
    ),
    "RT TREAT RECORD": (
        "1.2.840.10008.5.1.4.1.1.481.4",  # RT Beams Treatment Record Storage
        "1.2.840.10008.5.1.4.1.1.481.6",  # RT Brachy Treatment Record Storage
        "1.2.840.10008.5.1.4.1.1.481.7",  # RT Treatment Summary Record Storage
        "1.2.840.10008.5.1.4.1.1.481.9",  # RT Ion Beams Treatment Record Storage
    ),
    "KEY OBJECT DOC": (
        "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document Storage
    ),
    "REGISTRATION": (
        "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration Storage
        "1.2.840.10008.5.1.4.1.1.66.3",  # Deformable Spatial Registration Storage
    ),
    "FIDUCIAL": (
        "1.2.840.10008.5.1.4.1.1.66.2",  # Spatial Fiducials Storage
    ),
    "RAW DATA": (
        "1.2.840.10008.5.1.4.1.1.66",  # Raw Data Storage
    ),
    "SPECTROSCOPY": (
        "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy Storage
    ),
    "ENCAP DOC": (
        "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF Storage
        "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA Storage
        "1.2.840.10008.5.1.4.1.1.104.3",  # Encapsulated STL Storage
        "1.2.840.10008.5.1.4.1.1.104.4",  # Encapsulated OBJ Storage
        "1.2.840.10008.5.1.4.1.1.104.5",  # Encapsulated MTL Storage
    ),
    "VALUE MAP": (
        "1.2.840.10008.5.1.4.1.1.67",  # Real World Value Mapping Storage
    ),
    "STEREOMETRIC": (
        "1.2.840.10008.5.1.4.1.1.77.1.5.3",  # Stereometric Relationship Storage
    ),
    "SURFACE": (
        "1.2.840.10008.5.1.4.1.1.66.5",  # Surface Segmentation Storage
    ),
    "MEASUREMENT": (
        "1.2.840.10008.5.1.4.1.1.78.1",  # Lensometry Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.2",  # Autorefraction Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.3",  # Keratometry Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.4",  # Subjective Refraction Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.5",  # Visual Acuity Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.7",  # Ophthalmic Axial Measurements Storage
        "1.2.840.10008.5.1.4.1.1.78.8",  # Intraocular Lens Calculations Storage
        "1.2.840.10008.5.1.4.1.1.80.1",  # Ophthalmic Visual Field Static Perimetry Measurements Storage
    ),
    "PLAN": (
        "1.2.840.10008.5.1.4.1.1.481.25",  # RT Patient Position Acquisition Instruction Storage
        "1.2.840.10008.5.1.4.34.1",  # RT Beams Delivery Instruction Storage - Trial
        "1.2.840.10008.5.1.4.34.7",  # RT Beams Delivery Instruction Storage
        "1.2.840.10008.5.1.4.34.10",  # RT Brachy Application Setup Delivery Instruction Storage
    ),
    "SURFACE SCAN": (
        "1.2.840.10008.5.1.4.1.1.68.1",  # Surface Scan Mesh Storage
        "1.2.840.10008.5.1.4.1.1.68.2",  # Surface Scan Point Cloud Storage
    ),
    "TRACT": (
        "1.2.840.10008.5.1.4.1.1.66.6",  # Tractography Results Storage
    ),
    "ASSESSMENT": (
        "1.2.840.10008.5.1.4.1.1.90.1",  # Content Assessment Results Storage
    ),
    "RADIOTHERAPY": (
        "1.2.840.10008.5.1.4.1.1.481.10",  # RT Physician Intent Storage
        "1.2.840.10008.5.1.4.1.1.481.11",  # RT Segment Annotation Storage
        "1.2.840.10008.5.1.4.1.1.481.12",  # RT Radiation Set Storage
        "1.2.840.10008.5.1.4.1.1.481.13",  # C-Arm Photon-Electron Radiation Storage
        "1.2.840.10008.5.1.4.1.1.481.14",  # Tomotherapeutic Radiation Storage
        "1.2.840.10008.5.1.4.1.1.481.15",  # Robotic-Arm Radiation Storage
        "1.2.840.10008.5.1.4.1.1.481.16",  # RT Radiation Record Set Storage
        "1.2.840.10008.5.1.4.1.1.481.17",  # RT Radiation Salvage Record Storage
        "1.2.840.10008.5.1.4.1.1.481.18",  # Tomotherapeutic Radiation Record Storage
        "1.2.840.10008.5.1.4.1.1.481.19",  # C-Arm Photon-Electron Radiation Record Storage
        "1.2.840.10008.5.1.4.1.1.481.20",  # Robotic Radiation Record Storage
        "1.2.840.10008.5.1.4.1.1.481.21",  # RT Radiation Set Delivery Instruction Storage
        "1.2.840.10008.5.1.4.1.1.481.22",  # RT Treatment Preparation Storage
    ),
    "ANNOTATION": (
        "1.2.840.10008.5.1.4.1.1.91.1",  # Microscopy Bulk Simple Annotations Storage
    ),
    "WF PRESENTATION": (
        "1.2.840.10008.5.1.4.1.1.9.100.1",  # Waveform Presentation State Storage
        "1.2.840.10008.5.1.4.1.1.9.100.2",  # Waveform Acquisition Presentation State Storage
    ),
}

RECORD_TYPES = {uid: kind for kind, uids in RECORD_TYPES_BY_KIND.items() for uid in uids}

# Storage SOP classes (PS3.4 B.5) with no record under a patient's study in the current PS3.3 F.5, named
# as in PS3.6: left off every disc, and said so.  dcmtk's dcuid.cc marks most of them UID_PROP_NO_DIR_RECORD
# or UID_PROP_NON_PATIENT.
NO_RECORD = {
    # No directory record type at all.
    "1.2.840.10008.5.1.4.1.1.200.1": "CT Defined Procedure Protocol",
    "1.2.840.10008.5.1.4.1.1.200.2": "CT Performed Procedure Protocol",
    "1.2.840.10008.5.1.4.1.1.200.3": "Protocol Approval",
    "1.2.840.10008.5.1.4.1.1.200.7": "XA Defined Procedure Protocol",
    "1.2.840.10008.5.1.4.1.1.200.8": "XA Performed Procedure Protocol",
    "1.2.840.10008.5.1.4.1.1.501.3": "DICOS Threat Detection Report",
    "1.2.840.10008.5.1.4.1.1.501.4": "DICOS 2D AIT",
    "1.2.840.10008.5.1.4.1.1.501.5": "DICOS 3D AIT",
    "1.2.840.10008.5.1.4.1.1.501.6": "DICOS Quadrupole Resonance (QR)",
    "1.2.840.10008.5.1.4.1.1.601.5": "DICONDE Ultrasound Waveform",
    # Retired classes whose record types (OVERLAY, CURVE, MODALITY LUT, VOI LUT, STORED PRINT) PS3.3 retired,
    # and the trial SRs, which SR DOCUMENT never covered.
    "1.2.840.10008.5.1.4.1.1.8": "Standalone Overlay (retired)",
    "1.2.840.10008.5.1.4.1.1.9": "Standalone Curve (retired)",
    "1.2.840.10008.5.1.4.1.1.10": "Standalone Modality LUT (retired)",
    "1.2.840.10008.5.1.4.1.1.11": "Standalone VOI LUT (retired)",
    "1.2.840.10008.5.1.4.1.1.129": "Standalone PET Curve (retired)",
    "1.2.840.10008.5.1.1.27": "Stored Print (retired)",
    "1.2.840.10008.5.1.4.1.1.88.1": "Text SR - Trial (retired)",
    "1.2.840.10008.5.1.4.1.1.88.2": "Audio SR - Trial (retired)",
    "1.2.840.10008.5.1.4.1.1.88.3": "Detail SR - Trial (retired)",
    "1.2.840.10008.5.1.4.1.1.88.4": "Comprehensive SR - Trial (retired)",
    # Objects of no patient: their records (HANGING PROTOCOL, PALETTE, IMPLANT..., INVENTORY) sit at the root.
    "1.2.840.10008.5.1.4.38.1": "Hanging Protocol",
    "1.2.840.10008.5.1.4.39.1": "Color Palette",
    "1.2.840.10008.5.1.4.43.1": "Generic Implant Template",
    "1.2.840.10008.5.1.4.44.1": "Implant Assembly Template",
    "1.2.840.10008.5.1.4.45.1": "Implant Template Group",
    "1.2.840.10008.5.1.4.1.1.201.1": "Inventory",
}

# Keys of each record type beyond the referenced file's (PS3.3 F.5): (keyword, type), type 1, 2 or 3
# (3 also stands for 1C where the condition is "present in the file").  Records of type IMAGE are
# made by mkiso.dicomdir's fast path; the SR's VerificationDateTime, its HAS CONCEPT MOD items and
# a blending presentation state's BlendingSequence are added by mkiso.dicomdir.object_record.
CONTENT_KEYS = (("ContentDate", 1), ("ContentTime", 1), ("InstanceNumber", 1), ("ContentLabel", 1),
                ("ContentDescription", 2), ("ContentCreatorName", 2))
KEYS = {
    "SR DOCUMENT": (("InstanceNumber", 1), ("CompletionFlag", 1), ("VerificationFlag", 1), ("ContentDate", 1),
                    ("ContentTime", 1), ("ConceptNameCodeSequence", 1)),
    "KEY OBJECT DOC": (("InstanceNumber", 1), ("ContentDate", 1), ("ContentTime", 1),
                       ("ConceptNameCodeSequence", 1)),
    "PRESENTATION": (("InstanceNumber", 1), ("ContentLabel", 1), ("ContentDescription", 2),
                     ("PresentationCreationDate", 1), ("PresentationCreationTime", 1), ("ContentCreatorName", 2),
                     ("ReferencedSeriesSequence", 3)),
    "WF PRESENTATION": (("InstanceNumber", 1), ("ContentLabel", 1), ("ContentDescription", 2),
                        ("PresentationCreationDate", 1), ("PresentationCreationTime", 1),
                        ("ContentCreatorName", 3), ("ReferencedSeriesSequence", 3)),
    "WAVEFORM": (("InstanceNumber", 1), ("ContentDate", 1), ("ContentTime", 1)),
    "RT DOSE": (("InstanceNumber", 1), ("DoseSummationType", 1), ("DoseComment", 3), ("IconImageSequence", 3)),
    "RT STRUCTURE SET": (("InstanceNumber", 1), ("StructureSetLabel", 1), ("StructureSetDate", 2),
                         ("StructureSetTime", 2)),
    "RT PLAN": (("InstanceNumber", 1), ("RTPlanLabel", 1), ("RTPlanDate", 2), ("RTPlanTime", 2)),
    "RT TREAT RECORD": (("InstanceNumber", 1), ("TreatmentDate", 2), ("TreatmentTime", 2)),
    "REGISTRATION": CONTENT_KEYS,
    "FIDUCIAL": CONTENT_KEYS,
    "VALUE MAP": CONTENT_KEYS,
    "SURFACE": CONTENT_KEYS,
    "MEASUREMENT": CONTENT_KEYS,
    "TRACT": CONTENT_KEYS,
    "ANNOTATION": CONTENT_KEYS,
    "RAW DATA": (("ContentDate", 1), ("ContentTime", 1), ("InstanceNumber", 2)),
    "SPECTROSCOPY": (("ImageType", 1), ("ContentDate", 1), ("ContentTime", 1), ("InstanceNumber", 1),
                     ("ReferencedImageEvidenceSequence", 3), ("NumberOfFrames", 1), ("Rows", 1), ("Columns", 1),
                     ("DataPointRows", 1), ("DataPointColumns", 1)),
    "ENCAP DOC": (("ContentDate", 2), ("ContentTime", 2), ("InstanceNumber", 1), ("DocumentTitle", 2),
                  ("HL7InstanceIdentifier", 3), ("ConceptNameCodeSequence", 2),
                  ("MIMETypeOfEncapsulatedDocument", 1)),
    "STEREOMETRIC": (),
    "PLAN": (),
    "SURFACE SCAN": (("ContentDate", 1), ("ContentTime", 1)),
    "ASSESSMENT": (("InstanceNumber", 1), ("InstanceCreationDate", 1), ("InstanceCreationTime", 2)),
    "RADIOTHERAPY": (("InstanceNumber", 1), ("UserContentLabel", 3), ("UserContentLongLabel", 3),
                     ("ContentDescription", 2), ("ContentCreatorName", 2)),
    PRIVATE: (),
}


def is_standard(sop_class_uid):
    """A UID under the standard's root: the standard defines it, whether mkiso knows it or not."""
    return sop_class_uid.startswith(STANDARD_ROOT)


def is_private(sop_class_uid):
    """A vendor's own class: not in the table and not under the standard's root."""
    return sop_class_uid not in RECORD_TYPES and not is_standard(sop_class_uid)


def record_type(sop_class_uid):
    """The directory record type for objects of ``sop_class_uid``: 'IMAGE', 'SR DOCUMENT', ... or 'PRIVATE';
    None for a class of ``NO_RECORD``, whose objects are left off before anything is filed.

    A standard class that neither table has raises (500 ``unknown_sop_class``):
    a wrong record type would mislead every viewer that reads the disc.
    """
    kind = RECORD_TYPES.get(sop_class_uid)
    if kind is not None or sop_class_uid in NO_RECORD:
        return kind
    if is_standard(sop_class_uid):
        raise errors.MkisoError(
            "The study holds an object of SOP class %s, which mkiso cannot file in a DICOMDIR; "
            "the disc was not made." % sop_class_uid, code="unknown_sop_class")
    return PRIVATE


def sort_out(files, private_objects):
    """(the received files that go on a disc, the SOP class of each one left off), SPEC §4.1.

    Every object's record type is known before anything is staged (an
    unknown standard class raises).  Off go the classes of ``NO_RECORD``,
    always, and a vendor's private classes with ``private_objects`` "omit";
    a study of nothing else makes no empty disc (500).
    """
    kept, left_off = [], []
    for received in files:
        kind = record_type(received.sop_class_uid)
        if kind is None or (kind == PRIVATE and private_objects == "omit"):
            left_off.append(received.sop_class_uid)
        else:
            kept.append(received)
    if files and not kept:
        private = [uid for uid in left_off if uid not in NO_RECORD]
        raise errors.MkisoError(
            "No object of these studies can go on a disc, so none was made. %s%s" % (
                " ".join(told(left_off, "Left off")),
                " With iso.private_objects: keep the private ones would go on it." if private else ""),
            code="only_private_objects" if len(private) == len(left_off) else "nothing_to_file")
    return kept, left_off


def told(sop_classes, lead="Left off this disc"):
    """What README.TXT (and an error) say of the objects left off (their SOP classes, one entry each): a
    sentence for those of a class with no record, one for the private ones; the classes by name where known."""
    sentences = []
    unfiled = [uid for uid in sop_classes if uid in NO_RECORD]
    if unfiled:
        classes = sorted(set(unfiled))
        named = ", ".join("%s (%s)" % (NO_RECORD[uid], uid) for uid in classes)
        one = len(classes) == 1
        sentences.append("%s: %s of %s, which %s no place in a DICOMDIR (PS3.3 gives %s no directory record "
                         "under a patient's study)." % (lead, _objects(len(unfiled)), named,
                                                       "has" if one else "have", "it" if one else "them"))
    private = [uid for uid in sop_classes if uid not in NO_RECORD]
    if private:
        classes = sorted(set(private))
        sentences.append("%s: %s of private SOP class%s %s (a manufacturer's own format, which no general-purpose "
                         "viewer reads)." % (lead, _objects(len(private)), "" if len(classes) == 1 else "es",
                                             ", ".join(classes)))
    return sentences


def left_off_report(sop_classes):
    """The job's JSON of the objects left off (their SOP classes, one entry each): how many, which classes,
    and per class its name (PS3.6, None for a private one), its count and why (``no_directory_record`` or
    ``private``)."""
    counts = collections.Counter(sop_classes)
    return {"objects": len(sop_classes), "sop_classes": sorted(counts),
            "classes": [{"sop_class_uid": uid, "name": NO_RECORD.get(uid), "objects": counts[uid],
                         "reason": "no_directory_record" if uid in NO_RECORD else "private"}
                        for uid in sorted(counts)]}


def _objects(count):
    return "%d object%s" % (count, "" if count == 1 else "s")
