"""Hostile and odd DICOM input for the node, built in code (nothing binary is committed).

Every case is a short list of files, each the complete bytes a sender would put on the wire
(128-byte preamble, ``DICM``, file meta group, encoded data set), plus what the node must answer
for each and what must or must not be stored afterwards.  Data sets pydicom would not encode
(wrong VRs, lengths that run past the end, unterminated sequences, garbage after the meta
group) are assembled from raw elements with :func:`element`.

:func:`send_files` is the sender: pynetdicom with ``STORE_SEND_CHUNKED_DATASET``, so a file's
data set goes out byte for byte as built here, never decoded and re-encoded by the sender.

The statuses are those of :class:`dicom_node.ingest.StoreStatus`; ``None`` stands for "refused
at association negotiation" (no accepted presentation context, so nothing is sent at all).
"""
from __future__ import annotations

import contextlib
import random
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, sop_class
from pynetdicom import _config as pynetdicom_config

from dicom_node.ingest import StoreStatus

MR = str(sop_class.MRImageStorage)
ENHANCED_MR = str(sop_class.EnhancedMRImageStorage)
CT = str(sop_class.CTImageStorage)
SEG = str(sop_class.SegmentationStorage)
SR = str(sop_class.Comprehensive3DSRStorage)
DICOMDIR = str(sop_class.MediaStorageDirectoryStorage)
GSPS = str(sop_class.GrayscaleSoftcopyPresentationStateStorage)

#: every status the node may answer a C-STORE with; 0xC211 is also what pynetdicom answers
#: when a handler raises, so it is listed once
VALID_STATUSES: frozenset[int] = frozenset(int(s) for s in StoreStatus)

OK = frozenset({StoreStatus.SUCCESS})

#: cases the node does not handle as documented yet, with the reason; the tests mark them as
#: expected failures (strict, so a fix shows up as an unexpected pass)
KNOWN_GAPS: dict[str, str] = {}
NEGOTIATION_REFUSED = None


# --------------------------------------------------------------------------- encoding


def element(tag: int, vr: str, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit VR little endian element, written by hand so any VR, value or declared
    ``length`` (e.g. longer than the value, or 0xFFFFFFFF) can be produced."""
    group, elem = tag >> 16, tag & 0xFFFF
    declared = len(value) if length is None else length
    head = struct.pack("<HH", group, elem) + vr.encode("ascii")
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UR", "UT", "UN", "SV", "UV"):
        return head + b"\0\0" + struct.pack("<I", declared) + value
    return head + struct.pack("<H", declared) + value


def text(value: str) -> bytes:
    """A text value padded to even length with a space (UIDs pad with NUL)."""
    raw = value.encode("latin-1")
    return raw + b" " if len(raw) % 2 else raw


def uid_bytes(value: str) -> bytes:
    raw = value.encode("latin-1", errors="replace")
    return raw + b"\0" if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1311.2")
    meta.ImplementationVersionName = "ORTHO_HOSTILE"
    return meta


def file_bytes(meta: FileMetaDataset, body: bytes) -> bytes:
    """Preamble, ``DICM``, the file meta group and ``body`` exactly as given."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    with _lenient_writing():
        write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + body


@contextlib.contextmanager
def _lenient_writing() -> Iterator[None]:
    """pydicom writes invalid values (that is the point) without warnings or errors."""
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = previous


def encode(ds: Dataset) -> bytes:
    """The complete file of ``ds`` (which carries its ``file_meta``), invalid values kept."""
    out = BytesIO()
    with _lenient_writing():
        dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def body_of(data: bytes) -> bytes:
    """The encoded data set of a complete file: what follows the file meta group."""
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM file: no DICM prefix at byte 128")
    group_length = struct.unpack("<I", data[140:144])[0]  # (0002,0000) UL, explicit VR LE
    return data[144 + group_length :]


# --------------------------------------------------------------------------- data sets


def mr_dataset(
    *,
    rows: int = 16,
    cols: int = 16,
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    sop_class_uid: str = MR,
    syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    orientation: Sequence[float] = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    **values: object,
) -> Dataset:
    """A small, valid MR Image Storage data set (16x16 uint16); ``values`` override or, when
    ``None``, delete attributes."""
    sop = sop or generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(sop_class_uid, sop, syntax)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.Modality = "MR"
    ds.StudyDescription = "MRI KNEE"
    ds.SeriesDescription = "PD FS SAG"
    ds.BodyPartExamined = "KNEE"
    ds.PatientName = "Hostile^Case"
    ds.PatientID = "HOSTILE01"
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    ds.ImagePositionPatient = ["-30", "-40", "50"]
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.SliceThickness = "3"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.random.default_rng(seed).integers(0, 4000, (rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    for key, value in values.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def raw_identity(sop: str, sop_class_uid: str = MR) -> bytes:
    """(0008,0016) SOP Class UID and (0008,0018) SOP Instance UID, raw; the study and series
    UIDs come later in tag order (:func:`raw_study_series`)."""
    return element(0x00080016, "UI", uid_bytes(sop_class_uid)) + element(0x00080018, "UI", uid_bytes(sop))


def raw_study_series(study: str, series: str) -> bytes:
    return element(0x0020000D, "UI", uid_bytes(study)) + element(0x0020000E, "UI", uid_bytes(series))


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Item:
    """One file of a case and the statuses the node may answer it with."""

    data: bytes
    #: allowed statuses; ``None``: refused at negotiation (no accepted presentation context)
    expect: frozenset[int] | None

    @property
    def meta(self) -> FileMetaDataset:
        """The file meta group (read from the bytes up to the end of the group only)."""
        from pydicom import dcmread

        end = len(self.data) - len(body_of(self.data))
        return dcmread(BytesIO(self.data[:end])).file_meta


@dataclass(frozen=True)
class HostileCase:
    """A named hostile input: the files, in order, and what must hold afterwards."""

    name: str
    what: str
    items: tuple[Item, ...]
    #: (study, series, sop) that must be on disk and in the database, the data set byte-identical
    #: to the first file of the case accepted for that SOP Instance UID
    stored: tuple[tuple[str, str, str], ...] = ()
    #: SOP Instance UIDs that must be neither on disk nor in the database
    absent: tuple[str, ...] = ()
    #: text the node's log must contain (the reason), or "" when nothing specific is logged
    log: str = ""


def _ids(ds: Dataset) -> tuple[str, str, str]:
    return (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def _one(name: str, what: str, ds: Dataset, expect: frozenset[int] | None, log: str = "", stored: bool | None = None) -> HostileCase:
    """A one-file case from a data set; stored if and only if success is the only answer.

    The file meta is ``ds.file_meta`` as given (pydicom's writer would make it agree with the
    data set, which the mismatch cases must avoid)."""
    data = file_bytes(ds.file_meta, body_of(encode(ds)))
    keep = expect == OK if stored is None else stored
    return HostileCase(
        name,
        what,
        (Item(data, expect),),
        stored=(_ids(ds),) if keep else (),
        absent=() if keep else (str(ds.file_meta.MediaStorageSOPInstanceUID),),
        log=log,
    )


def _raw(name: str, what: str, meta: FileMetaDataset, body: bytes, expect: frozenset[int] | None, log: str) -> HostileCase:
    return HostileCase(
        name, what, (Item(file_bytes(meta, body), expect),), absent=(str(meta.MediaStorageSOPInstanceUID),), log=log
    )


def _replace_body(ds: Dataset, transform: Callable[[bytes], bytes]) -> bytes:
    data = encode(ds)
    body = body_of(data)
    return data[: len(data) - len(body)] + transform(body)


def build_cases() -> list[HostileCase]:
    """The whole corpus (fresh UIDs on every call); pydicom's warnings about the invalid values
    it is asked to write are expected and silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build_cases()


def _build_cases() -> list[HostileCase]:
    cases: list[HostileCase] = []
    add = cases.append
    refused_uid = "is not a valid DICOM UID"
    unparsable = "cannot be parsed"

    # -- controls and odd but valid images ------------------------------------------------
    add(_one("valid_mr", "a plain valid MR image (control)", mr_dataset(), OK, "created"))
    add(_one("implicit_vr", "implicit VR little endian", mr_dataset(syntax=ImplicitVRLittleEndian), OK))
    add(_one("explicit_big_endian", "retired explicit VR big endian", mr_dataset(syntax=ExplicitVRBigEndian), OK))
    add(_one("oblique", "orientation tilted 25 degrees", mr_dataset(orientation=(0.0, 0.906, -0.423, 0.0, -0.423, -0.906)), OK))
    add(_one("flipped", "row direction reversed (slices stacked the other way)", mr_dataset(orientation=(0.0, -1.0, 0.0, 0.0, 0.0, -1.0)), OK))
    add(_one("localizer", "ImageType LOCALIZER", mr_dataset(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), OK))
    add(_one("non_mr_modality_in_mr_class", "MR Image Storage whose Modality says CT (the pipeline decides)", mr_dataset(Modality="CT"), OK))
    rgb = mr_dataset(SamplesPerPixel=3, PhotometricInterpretation="RGB", BitsAllocated=8, BitsStored=8, HighBit=7, PlanarConfiguration=0)
    rgb.PixelData = np.zeros((16, 16, 3), dtype=np.uint8).tobytes()
    rgb["PixelData"].VR = "OB"
    add(_one("rgb", "an RGB MR image (stored as received; the pipeline refuses colour)", rgb, OK))
    add(_one("no_pixel_data", "no Pixel Data element (stored as received, never decoded)", mr_dataset(PixelData=None), OK))
    short = mr_dataset()
    short.PixelData = b"\0\1" * 10
    cut_short = frozenset({StoreStatus.UNPARSABLE_DATASET})
    add(_one("short_pixel_data", "Pixel Data far shorter than Rows x Columns (refused: cut short)", short, cut_short,
             log="cut short"))
    huge = mr_dataset(Rows=65535, Columns=65535, NumberOfFrames="99999")
    add(_one("huge_declared_dimensions", "65535 x 65535 x 99999 declared, 512 bytes sent (refused, never allocated)",
             huge, cut_short, log="cut short"))
    broken_j2k = mr_dataset(syntax=JPEG2000Lossless)
    broken_j2k.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    broken_j2k["PixelData"].VR = "OB"
    add(_one("corrupt_jpeg2000", "JPEG 2000 transfer syntax, garbage codestream (stored, never decoded)", broken_j2k, OK))
    add(_one("non_ascii_patient", "UTF-8 patient name (ISO_IR 192)", mr_dataset(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen=山田^太郎"), OK))
    add(_one("very_long_patient", "patient name and ID of 10,000 characters", mr_dataset(PatientName="A" * 10000, PatientID="9" * 10000), OK))
    bad_charset = mr_dataset(SpecificCharacterSet="ISO_IR 192")
    bad_charset.PatientName = "x"
    data = encode(bad_charset).replace(text("x"), b"\xff\xfe", 1)
    add(HostileCase("invalid_utf8_name", "bytes that are not UTF-8 under ISO_IR 192", (Item(data, OK),), stored=(_ids(bad_charset),)))
    add(_one("unknown_charset", "SpecificCharacterSet nobody knows", mr_dataset(SpecificCharacterSet="ISO_IR 9999"), OK))
    add(_one("long_descriptions", "descriptions far over their VR length", mr_dataset(StudyDescription="D" * 5000, AccessionNumber="A" * 500, SeriesNumber="12345678901234"), OK))

    enhanced = Dataset()
    enhanced.update(mr_dataset(sop_class_uid=ENHANCED_MR, NumberOfFrames="2"))
    enhanced.file_meta = file_meta(ENHANCED_MR, enhanced.SOPInstanceUID)
    enhanced.PixelData = np.zeros((2, 16, 16), dtype=np.uint16).tobytes()
    enhanced.SharedFunctionalGroupsSequence = DicomSequence([Dataset()])
    enhanced.PerFrameFunctionalGroupsSequence = DicomSequence([Dataset(), Dataset()])
    add(_one("enhanced_multiframe", "Enhanced MR multi-frame", enhanced, OK))

    # -- SOP classes that must not be stored ----------------------------------------------
    ct = mr_dataset(sop_class_uid=CT, Modality="CT")
    add(_one("ct_image", "CT Image Storage", ct, NEGOTIATION_REFUSED))
    seg = mr_dataset(sop_class_uid=SEG, Modality="SEG")
    add(_one("seg_sent_back", "a DICOM SEG sent back to the node (must not loop)", seg, NEGOTIATION_REFUSED))
    sr = mr_dataset(sop_class_uid=SR, Modality="SR", PixelData=None)
    add(_one("sr_sent_back", "a TID 1500 SR sent back to the node (must not loop)", sr, NEGOTIATION_REFUSED))
    dicomdir = Dataset()
    dicomdir.file_meta = file_meta(DICOMDIR, generate_uid())
    dicomdir.FileSetID = "HOSTILE"
    dicomdir.DirectoryRecordSequence = DicomSequence([])
    data = encode(dicomdir)
    add(HostileCase("dicomdir", "a DICOMDIR sent as an instance", (Item(data, None),), absent=(str(dicomdir.file_meta.MediaStorageSOPInstanceUID),)))
    gsps = mr_dataset(sop_class_uid=GSPS, Modality="PR", PixelData=None)
    add(_one("presentation_state", "an ignored class: acknowledged and dropped", gsps, OK, "listener.ignore_sop_classes", stored=False))
    seg_in_mr = mr_dataset(sop_class_uid=SEG, Modality="SEG")
    seg_in_mr.file_meta.MediaStorageSOPClassUID = UID(MR)
    add(_one("seg_on_mr_context", "a SEG data set on an MR presentation context",
             seg_in_mr, frozenset({StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS}), "differs from the presentation context"))

    # -- identifiers ----------------------------------------------------------------------
    hostile_uids = {
        "uid_dotdot_study": {"StudyInstanceUID": "../../../etc"},
        "uid_absolute_series": {"SeriesInstanceUID": "/etc/passwd"},
        "uid_backslash_sop": {"SOPInstanceUID": "1.2.3\\..\\4"},
        "uid_nul_inside": {"SeriesInstanceUID": "1.2\x00/3"},
        "uid_too_long": {"StudyInstanceUID": "1.2." + "3" * 70},
        "uid_empty_component": {"SeriesInstanceUID": "1..2"},
        "uid_trailing_dot": {"StudyInstanceUID": "1.2.3."},
        "uid_missing_study": {"StudyInstanceUID": None},
        "uid_missing_sop": {"SOPInstanceUID": None},
        "uid_spaces": {"SeriesInstanceUID": "1.2 .3"},
    }
    for name, values in hostile_uids.items():
        ds = mr_dataset(**values)
        add(_one(name, f"hostile identifier: {values!r}", ds, frozenset({StoreStatus.INVALID_UIDS}), refused_uid))
    # full-width digits: pydicom will not encode them in a UI element, so they are patched in
    placeholder = "12345678901"
    ds = mr_dataset(StudyInstanceUID=placeholder)
    wide = "\uff11.\uff12.\uff13".encode("utf-8")
    data = encode(ds).replace(uid_bytes(placeholder), wide + b"\0", 1)
    add(HostileCase("uid_unicode_digits", "Study Instance UID in full-width Unicode digits",
                    (Item(data, frozenset({StoreStatus.INVALID_UIDS})),), absent=(str(ds.SOPInstanceUID),), log=refused_uid))
    ds = mr_dataset()
    ds.file_meta.MediaStorageSOPInstanceUID = UID(generate_uid())
    add(_one("sop_uid_mismatch", "command SOP Instance UID differs from the data set's", ds,
             frozenset({StoreStatus.SOP_INSTANCE_UID_MISMATCH}), "Affected SOP Instance UID"))
    wrong_class = mr_dataset(sop_class_uid=ENHANCED_MR)
    wrong_class.file_meta.MediaStorageSOPClassUID = UID(MR)
    add(_one("sop_class_mismatch", "data set SOP class differs from the context", wrong_class,
             frozenset({StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS}), "differs from the presentation context"))

    # -- several instances ----------------------------------------------------------------
    study = generate_uid()
    a = mr_dataset(study=study, PatientID="PATIENT_A", PatientName="A^A")
    b = mr_dataset(study=study, series=str(a.SeriesInstanceUID), PatientID="PATIENT_B", PatientName="B^B")
    add(HostileCase("mixed_patients", "two patients in one study (stored; the node keys on the study UID)",
                    (Item(encode(a), OK), Item(encode(b), OK)), stored=(_ids(a), _ids(b))))
    first = mr_dataset(seed=1)
    second = mr_dataset(seed=2, study=str(first.StudyInstanceUID), series=str(first.SeriesInstanceUID), sop=str(first.SOPInstanceUID))
    add(HostileCase("duplicate_different_content", "same SOP Instance UID, other pixels (reject_if_different)",
                    (Item(encode(first), OK), Item(encode(second), frozenset({StoreStatus.DUPLICATE_SOP_INSTANCE}))),
                    stored=(_ids(first),), log="different content"))
    kept = mr_dataset(seed=3)
    # the same instance again with Acquisition Matrix (US) in 3 bytes, no whole number of values,
    # placed in tag order before Study Instance UID: outside what the receiver reads, so only the
    # duplicate comparison meets it
    acquisition_matrix = struct.pack("<HH", 0x0018, 0x1310) + b"US" + struct.pack("<H", 3) + b"\x01\x02\x03"
    damaged = _replace_body(kept, lambda body: body.replace(b"\x20\x00\x0d\x00UI", acquisition_matrix + b"\x20\x00\x0d\x00UI", 1))
    add(HostileCase("duplicate_unreadable_element", "same SOP Instance UID again, with a value that cannot be read",
                    (Item(encode(kept), OK), Item(damaged, frozenset({StoreStatus.DUPLICATE_SOP_INSTANCE}))),
                    stored=(_ids(kept),), log="not comparable"))
    same = mr_dataset()
    add(HostileCase("duplicate_identical", "the same file twice", (Item(encode(same), OK), Item(encode(same), OK)), stored=(_ids(same),)))
    moved = mr_dataset()
    elsewhere = mr_dataset(sop=str(moved.SOPInstanceUID))
    add(HostileCase("duplicate_in_other_series", "same SOP Instance UID in another study and series",
                    (Item(encode(moved), OK), Item(encode(elsewhere), frozenset({StoreStatus.DUPLICATE_SOP_INSTANCE}))),
                    stored=(_ids(moved),), log="it is stored under study"))
    home = mr_dataset()
    stray = mr_dataset(series=str(home.SeriesInstanceUID))
    add(HostileCase("series_in_two_studies", "a series UID reused under another study",
                    (Item(encode(home), OK), Item(encode(stray), frozenset({StoreStatus.SERIES_IN_OTHER_STUDY}))),
                    stored=(_ids(home),), absent=(str(stray.SOPInstanceUID),), log="series"))

    # -- damaged encodings (raw bytes) ----------------------------------------------------
    def truncated(fraction: float) -> Callable[[bytes], bytes]:
        return lambda body: body[: int(len(body) * fraction)]

    # cut inside Pixel Data: the identifying header is intact but the last element's declared
    # length is not met
    for name, fraction in (("truncated_in_pixel_data", 0.9), ("truncated_in_header", 0.05)):
        ds = mr_dataset()
        data = _replace_body(ds, truncated(fraction))
        expect = frozenset({StoreStatus.UNPARSABLE_DATASET, StoreStatus.INVALID_UIDS})
        add(HostileCase(name, f"data set cut at {fraction:.0%}", (Item(data, expect),), absent=(str(ds.SOPInstanceUID),)))
    sop = generate_uid()
    meta = file_meta(MR, sop)
    add(_raw("empty_dataset", "file meta and nothing else", meta, b"", frozenset({StoreStatus.UNPARSABLE_DATASET}),
             "holds no data element that could be read"))
    rng = np.random.default_rng(7)
    add(_raw("garbage_body", "4 KiB of random bytes after the meta group", file_meta(MR, generate_uid()),
             rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
             frozenset({StoreStatus.UNPARSABLE_DATASET, StoreStatus.INVALID_UIDS}), "refused SOP instance"))
    add(_raw("garbage_deflate", "deflated transfer syntax, bytes that are not deflate",
             file_meta(MR, generate_uid(), DeflatedExplicitVRLittleEndian), b"\x78\x9c" + b"\xff" * 300,
             frozenset({StoreStatus.UNPARSABLE_DATASET}), unparsable))
    sop = generate_uid()
    body = raw_identity(sop) + element(0x00100010, "PN", b"LONG", length=0xFFF0) + raw_study_series(generate_uid(), generate_uid())
    add(_raw("length_past_end", "an element whose length runs past the end of the data set", file_meta(MR, sop), body,
             frozenset({StoreStatus.UNPARSABLE_DATASET, StoreStatus.INVALID_UIDS}), "refused SOP instance"))
    sop = generate_uid()
    body = raw_identity(sop) + element(0x0020000D, "US", b"\x01\x00") + element(0x0020000E, "UI", uid_bytes(generate_uid()))
    add(_raw("wrong_vr_uid", "Study Instance UID encoded as US (binary)", file_meta(MR, sop), body,
             frozenset({StoreStatus.INVALID_UIDS, StoreStatus.UNPARSABLE_DATASET}), "refused SOP instance"))
    sop = generate_uid()
    body = raw_identity(sop) + raw_study_series(generate_uid(), generate_uid()) + element(0x00280010, "LO", text("sixteen"))
    add(HostileCase("wrong_vr_rows", "Rows encoded as LO text (stored as received)", (Item(file_bytes(file_meta(MR, sop), body), OK),),
                    log="created"))
    sop = generate_uid()
    # (0010,0020) Patient ID with the VR bytes 4C 0F: pydicom reads past it and fails only when
    # the value is converted, after the identifying UIDs were read and the file written
    unknown_vr = struct.pack("<HH", 0x0010, 0x0020) + b"\x4c\x0f" + struct.pack("<H", 8) + b"PAT12345"
    body = raw_identity(sop) + unknown_vr + raw_study_series(generate_uid(), generate_uid())
    add(_raw("unknown_vr_patient_id", "Patient ID with VR bytes that name no VR", file_meta(MR, sop), body,
             frozenset({StoreStatus.UNPARSABLE_DATASET}), unparsable))
    sop = generate_uid()
    body = raw_identity(sop) + element(0x00081140, "SQ", b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x00" * 40, length=0xFFFFFFFF)
    add(_raw("unterminated_sequence", "an undefined-length sequence that never ends", file_meta(MR, sop), body,
             frozenset({StoreStatus.UNPARSABLE_DATASET, StoreStatus.INVALID_UIDS}), "refused SOP instance"))
    sop = generate_uid()
    depth = 400
    inner = b""
    for _ in range(depth):
        inner = (element(0x00081140, "SQ", b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
                         + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", length=0xFFFFFFFF))
    body = raw_identity(sop) + inner + raw_study_series(generate_uid(), generate_uid())
    add(HostileCase("deeply_nested_sequences", f"sequences nested {depth} deep (exhausts a recursive reader)",
                    (Item(file_bytes(file_meta(MR, sop), body), frozenset({StoreStatus.UNPARSABLE_DATASET})),),
                    absent=(sop,), log=unparsable))
    sop = generate_uid()
    body = raw_identity(sop) + element(0x00091010, "UN", b"\x00" * 8, length=0xFFFFFFFF)
    add(_raw("undefined_length_un", "a private UN element of undefined length with no delimiter", file_meta(MR, sop), body,
             frozenset({StoreStatus.UNPARSABLE_DATASET, StoreStatus.INVALID_UIDS}), "refused SOP instance"))
    return cases


# --------------------------------------------------------------------------- sender


@contextlib.contextmanager
def _send_raw() -> Iterator[None]:
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


@dataclass
class SendResult:
    """What a sender saw: one entry per file, the status or ``None`` (no accepted context)."""

    statuses: list[int | None] = field(default_factory=list)
    #: the association was aborted or timed out before every file went
    aborted: bool = False


def send_files(
    port: int,
    files: Sequence[Path],
    *,
    calling: str = "TESTSCU",
    called: str = "ORTHONODE",
    host: str = "127.0.0.1",
    timeout: float = 20.0,
) -> SendResult:
    """C-STORE ``files`` on one association, each data set sent byte for byte as in the file."""
    from pydicom.filereader import read_file_meta_info

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = set()
    for path in files:
        meta = read_file_meta_info(path)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for abstract, syntax in sorted(contexts):
        ae.add_requested_context(abstract, syntax)
    # Verification too, so the association stands when every storage context is refused and
    # the refusal shows per file, as a PACS sending a mixed study sees it
    ae.add_requested_context(sop_class.Verification)
    result = SendResult()
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        raise ConnectionError(f"association to {called}@{host}:{port} as {calling} not established")
    try:
        with _send_raw():
            for path in files:
                if not assoc.is_established:
                    result.aborted = True
                    break
                try:
                    response = assoc.send_c_store(path)
                except ValueError as exc:
                    if "presentation context" not in str(exc):
                        raise
                    result.statuses.append(None)
                    continue
                status = response.get("Status") if response is not None else None
                if status is None:
                    result.aborted = True
                    break
                result.statuses.append(int(status))
    finally:
        if assoc.is_established:
            assoc.release()
    return result


def echo(port: int, *, calling: str = "TESTSCU", called: str = "ORTHONODE", host: str = "127.0.0.1") -> bool:
    """A C-ECHO on a new association; True when it succeeds."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(sop_class.Verification)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return status is not None and int(status.Status) == 0
    finally:
        assoc.release()


# --------------------------------------------------------------------------- random mutations (fuzzing)

_JUNK_VALUES: list[Any] = ["", "\\".join(["1"] * 40), "x" * 300, "../..", "\x00\x01\x02", "1.2.3", -1, 2**31, "é" * 9]


def _delete_tags(ds: Dataset, rng: random.Random) -> None:
    keywords = [e.keyword for e in ds if e.keyword and e.keyword != "PixelData"]
    for keyword in rng.sample(keywords, k=rng.randint(1, 4)):
        delattr(ds, keyword)


def _corrupt_value(ds: Dataset, rng: random.Random) -> None:
    element = rng.choice([e for e in ds if e.keyword != "PixelData"])
    if rng.random() < 0.5:
        element.VR = rng.choice(["US", "UL", "FD", "OB", "SQ", "AT", "DA", "UN"])
    value = rng.choice(_JUNK_VALUES)
    try:
        element.value = value
    except (TypeError, ValueError, OverflowError, AttributeError):
        # the VR cannot hold it (e.g. AT): the element becomes raw junk bytes instead
        element.VR = "UN"
        element.value = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 7, 64])))


def _mutate_dataset(ds: Dataset, rng: random.Random) -> bytes:
    for _ in range(rng.randint(1, 3)):
        (_delete_tags if rng.random() < 0.4 else _corrupt_value)(ds, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return body_of(encode(ds))
        except (TypeError, ValueError, OverflowError, OSError, struct.error, AttributeError):
            return b""  # pydicom cannot encode this mutation; the caller sends the original


def _flip_bytes(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 12)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _cut_or_extend(body: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return body[: rng.randrange(len(body))]
    return body + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def mutated_body(ds: Dataset, original: bytes, rng: random.Random) -> bytes:
    """The encoded data set ``original`` (of ``ds``, which may be changed) damaged one of three
    ways: attributes deleted or given junk values, bytes flipped, cut short or extended."""
    kind = rng.random()
    if kind < 0.4:
        return _mutate_dataset(ds, rng) or original
    if kind < 0.8:
        return _flip_bytes(original, rng)
    return _cut_or_extend(original, rng)
