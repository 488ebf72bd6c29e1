"""The disc: its tree (PDI or legacy), the DICOMDIR and its records, the web content, the media, the ISO.
It lays out what arrived (``dicom.received``); it never imports the rest of ``dicom``, ``http`` or the spine above."""
