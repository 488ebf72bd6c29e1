"""mkiso: accession numbers in, a patient's DICOM CD/DVD out."""

__version__ = "0.3.5"
