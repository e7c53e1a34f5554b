"""The checks of a received data set before it is stored: its SOP class, the identifying
attributes the receiver reads in its one header parse, pixel data cut short; and whether a
refused duplicate holds the same instance in another encoding."""
from __future__ import annotations

import logging
import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import sop_class

from inference.series import expected_pixel_bytes

log = logging.getLogger(__name__)


def sop_class_uid(name_or_uid: str) -> UID:
    """A SOP class given in node.yaml as a pynetdicom name (``MRImageStorage``) or a UID."""
    found = getattr(sop_class, name_or_uid, None)
    if isinstance(found, UID):
        return found
    uid = UID(name_or_uid)
    if not uid.is_valid:
        raise ValueError(f"{name_or_uid!r} is neither a pynetdicom SOP class name nor a valid UID")
    return uid


HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
]


def text_value(ds: Any, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or str(value) == "":
        return None
    return str(value)[:limit]


def int_value(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


PIXEL_TAGS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames", "PixelData"]


def pixel_data_problem(ds: Any, data: bytes) -> str | None:
    """Why the Pixel Data of an encoded data set is incomplete, or ``None`` when it is whole.

    ``ds`` is ``data`` read with at least the tags of :data:`PIXEL_TAGS` (the receiver reads
    them in its one header parse).

    pydicom reads an element cut short without complaint, so a file truncated inside its
    pixels would otherwise be acknowledged and stored.  Native pixel data must hold at least
    Rows x Columns x Samples x BitsAllocated/8 x Frames bytes; encapsulated (compressed) pixel
    data must end with its sequence delimiter.  A data set without Pixel Data is not judged here.
    """
    if "PixelData" not in ds:
        return None
    element = ds["PixelData"]
    if element.is_undefined_length:
        # the item and sequence delimiters of encapsulated data: FFFE,E0DD with a zero length
        delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        if delimiter not in data[-4096:]:
            return "the encapsulated Pixel Data ends without its sequence delimiter (the data set is cut short)"
        return None
    expected = expected_pixel_bytes(ds)
    if expected is None:
        return "the image size attributes (Rows, Columns, Bits Allocated, Samples per Pixel, Number of Frames) cannot be read"
    found = len(element.value or b"")
    if found < expected:
        return f"Pixel Data holds {found} bytes where the image size needs {expected} (the data set is cut short)"
    return None


def uid_value(ds: Any, keyword: str) -> object:
    """The element's value as a string only when it is encoded as UI: a UID sent with another
    VR (e.g. US, whose binary 1 would read as the valid-looking UID "1") stays a non-string and
    fails validation."""
    if keyword not in ds:
        return None
    element = ds.data_element(keyword)
    if element is None or element.value is None:
        return None
    return str(element.value) if element.VR == "UI" else element.value


#: what pydicom raises on a data set it cannot read (it is lenient: most damage still parses)
#: RecursionError: sequences nested a few hundred deep exhaust pydicom's recursive reader
PARSE_ERRORS = (
    InvalidDicomError, ValueError, EOFError, OSError, KeyError, NotImplementedError, RecursionError, struct.error,
    zlib.error,
)


#: elements whose values follow from the encoding, not from the instance: the pixel data, their
#: planar arrangement, the lossy-compression flags and trailing padding; the file meta group and
#: group lengths are left out separately
ENCODING_TAGS = frozenset({0x7FE00010, 0x00280006, 0x00282110, 0x00282112, 0x00282114, 0xFFFCFFFC})


def same_instance_content(stored: Path, data: bytes) -> bool:
    """True when ``data`` (a received file) holds the instance stored in ``stored`` in another
    encoding: every data element but those of :data:`ENCODING_TAGS` equal, and the decoded pixels
    equal (a lossless re-encoding).  Anything that cannot be read or decoded counts as different.

    Only the rare path of a refused duplicate pays for this (two full parses and pixel decodes).
    """
    import numpy as np

    def content(ds: Any) -> tuple[dict[int, Any], Any]:
        elements = {
            int(e.tag): e.value for e in ds
            if int(e.tag) not in ENCODING_TAGS and e.tag.group != 0x0002 and e.tag.element != 0x0000
        }
        return elements, np.asarray(ds.pixel_array) if "PixelData" in ds else None

    try:
        old_elements, old_pixels = content(dcmread(stored))
        new_elements, new_pixels = content(dcmread(BytesIO(data)))
        if old_elements != new_elements:
            return False
    except Exception as exc:  # noqa: BLE001 - pydicom and the pixel decoders raise many kinds on damaged data
        log.info("comparing a duplicate with %s: not comparable (%s: %s)", stored.name, type(exc).__name__, exc)
        return False
    if old_pixels is None or new_pixels is None:
        return old_pixels is None and new_pixels is None
    return old_pixels.shape == new_pixels.shape and bool(np.array_equal(old_pixels, new_pixels))
