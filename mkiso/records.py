"""Directory record types per SOP class (SPEC §4.1): a stub with the classes the web content tells apart.

The full table (every storage SOP class of PS3.4) is written for issue 19
at the same time; this stub gives the same answers for the classes below
and IMAGE for the rest.
"""

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
PRESENTATION_PREFIX = "1.2.840.10008.5.1.4.1.1.11."
ENCAPSULATED_PREFIX = "1.2.840.10008.5.1.4.1.1.104."


def record_type(sop_class_uid):
    """The DICOMDIR record type of an instance of ``sop_class_uid``."""
    if sop_class_uid == KEY_OBJECT_SELECTION:
        return "KEY OBJECT DOC"
    if sop_class_uid.startswith(SR_PREFIX):
        return "SR DOCUMENT"
    if sop_class_uid.startswith(PRESENTATION_PREFIX):
        return "PRESENTATION"
    if sop_class_uid.startswith(ENCAPSULATED_PREFIX):
        return "ENCAP DOC"
    return "IMAGE"
