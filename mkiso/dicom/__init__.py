"""DICOM networking: the PACS (C-ECHO, C-FIND, C-MOVE, C-GET), our receiver, verified retrievals, the publisher.
It uses dcmtk's tools and the spine's base (errors, process, disk, logs, fastcopy); never ``disc``, ``http``, above."""
