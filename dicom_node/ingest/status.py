"""The C-STORE statuses the node answers with."""
from __future__ import annotations

import enum


class StoreStatus(enum.IntEnum):
    """The C-STORE statuses the node answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

    SUCCESS = 0x0000
    #: general failure "Duplicate SOP Instance": same UID, different bytes, reject_if_different;
    #: or the UID is already stored in another study/series
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: general failure: a SOP class outside the configured lists (normally refused at negotiation)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: out of resources: storing would go below ``storage.min_free_mb``
    OUT_OF_SPACE = 0xA700
    #: out of resources: the file could not be written (I/O error, permissions)
    STORAGE_WRITE_FAILED = 0xA701
    #: out of resources: the database is unavailable; nothing was kept, the sender may retry
    DATABASE_UNAVAILABLE = 0xA702
    #: the data set's SOP Class UID is not the presentation context's
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: cannot understand: a Study/Series/SOP Instance UID missing or not a valid UID
    INVALID_UIDS = 0xC210
    #: cannot understand: the data set could not be parsed
    UNPARSABLE_DATASET = 0xC211
    #: cannot understand: the data set's SOP Instance UID differs from the command's
    SOP_INSTANCE_UID_MISMATCH = 0xC212
    #: cannot understand: the series is recorded under another study
    SERIES_IN_OTHER_STUDY = 0xC213
    #: general failure "Processing failure": an unexpected error in the node (logged with its
    #: traceback); nothing of the instance was kept.  Never the answer to any known input
    PROCESSING_FAILURE = 0x0110
