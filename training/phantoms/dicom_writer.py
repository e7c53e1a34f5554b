"""Write acquired phantom series as MR Image Storage instances, one file per slice.

The headers are filled the way a clinical scanner fills them (Patient, General Study,
Patient Study, General Series, Frame of Reference, General Equipment, General Acquisition,
General Image, Image Plane, Image Pixel, MR Image, VOI LUT and SOP Common modules), with the
site's habits for the attributes that vary in practice.  UIDs are derived from a seed string,
so a rerun of the generator gives byte-identical files.

Pixels are unsigned 16-bit MONOCHROME2 with 12 bits stored.  The transfer syntax is Explicit
VR Little Endian or one of three lossless compressions (JPEG 2000, JPEG-LS, RLE); lossless
compression keeps the SOP Instance UID, since the pixel values do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    UID,
    generate_uid,
)

from training.phantoms.acquisition import AcquiredSeries, SliceStack
from training.phantoms.anatomy import CaseSpec
from training.phantoms.sites import SiteProfile

#: ``--transfer-syntax`` choice -> transfer syntax UID
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}

#: implementation identity written in the file meta information
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["orthonode", "phantom", "implementation"])
IMPLEMENTATION_VERSION_NAME = "ORTHONODE_PH01"

_GYROMAGNETIC_MHZ_PER_T = 42.577478


def make_uid(*parts: object) -> UID:
    """A deterministic UID from ``parts`` (under the pydicom root; SHA-512 of the parts)."""
    return generate_uid(entropy_srcs=[str(part) for part in parts])


@dataclass(frozen=True)
class StudyContext:
    """What all series of one study share: patient, study, frame of reference, site."""

    spec: CaseSpec
    site: SiteProfile
    uid_root: str  # seed string every UID of the study is derived from
    study_uid: UID
    frame_of_reference_uid: UID
    study_datetime: datetime
    accession_number: str

    @classmethod
    def create(cls, spec: CaseSpec, site: SiteProfile, uid_root: str, rng: np.random.Generator) -> "StudyContext":
        start = datetime(2019, 1, 1, 7, 0, 0) + timedelta(
            days=int(rng.integers(0, 6 * 365)), minutes=int(rng.integers(0, 12 * 60)), seconds=int(rng.integers(0, 60))
        )
        return cls(
            spec=spec,
            site=site,
            uid_root=uid_root,
            study_uid=make_uid(uid_root, "study"),
            frame_of_reference_uid=make_uid(uid_root, "frame-of-reference"),
            study_datetime=start,
            accession_number=f"PH{int(rng.integers(10**7, 10**8))}",
        )

    def series_uid(self, series_number: int) -> UID:
        return make_uid(self.uid_root, "series", series_number)

    def instance_uid(self, series_number: int, instance_number: int) -> UID:
        return make_uid(self.uid_root, "instance", series_number, instance_number)


def _study_description(site: SiteProfile, joint: str, laterality: str) -> str:
    side = {"L": "LEFT", "R": "RIGHT"}[laterality]
    if site.wording == "ge":
        return f"MR {joint.upper()} {side[:1]}T WO CONTRAST"
    if site.wording == "philips":
        return f"MRI {joint} {side.lower()}"
    return f"MRI {joint.upper()} {side}"


def _image_type(site: SiteProfile, localizer: bool) -> list[str]:
    if localizer:
        return ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    # value 3 "OTHER" is the MR Image module's defined term for a plain magnitude image;
    # Siemens adds its normalisation flag as value 4
    if site.manufacturer.upper().startswith("SIEMENS"):
        return ["ORIGINAL", "PRIMARY", "OTHER", "ND"]
    return ["ORIGINAL", "PRIMARY", "OTHER"]


def _ds(value: float, decimals: int = 6) -> str:
    """A Decimal String value that fits 16 characters."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    while len(text) > 16:
        decimals -= 1
        text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return text


def _dt(moment: datetime) -> tuple[str, str]:
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")[:13]


def _base_dataset(series: AcquiredSeries, study: StudyContext) -> Dataset:
    """Everything that is the same for all instances of the series."""
    spec, site, plan = study.spec, study.site, series.plan
    params = plan.parameters
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = _image_type(site, plan.plane == "localizer")
    ds.SOPClassUID = MRImageStorage
    study_date, study_time = _dt(study.study_datetime)
    acq_moment = study.study_datetime + timedelta(seconds=plan.start_offset_s)
    acq_date, acq_time = _dt(acq_moment)
    ds.InstanceCreationDate, ds.InstanceCreationTime = acq_date, acq_time
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.SeriesDate, ds.SeriesTime = acq_date, acq_time
    ds.AcquisitionDate, ds.AcquisitionTime = acq_date, acq_time
    ds.ContentDate, ds.ContentTime = acq_date, acq_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = site.manufacturer
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = site.station_name
    ds.StudyDescription = _study_description(site, spec.joint, spec.laterality)
    ds.SeriesDescription = plan.description
    ds.ManufacturerModelName = site.model_name
    # patient
    ds.PatientName = f"PHANTOM^{spec.case_id.upper()}"
    ds.PatientID = spec.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = spec.sex if spec.sex is not None else ""
    if spec.age is not None:
        if not 0 <= spec.age <= 999:
            raise ValueError(f"case {spec.case_id}: age {spec.age} cannot be written as PatientAge (nnnY)")
        ds.PatientAge = f"{int(spec.age):03d}Y"
    if spec.height_m is not None:
        ds.PatientSize = _ds(spec.height_m, 2)
    if spec.weight_kg is not None:
        ds.PatientWeight = _ds(spec.weight_kg, 1)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "Synthetic phantom, no patient data"
    body_part = site.body_part(spec.joint)
    if body_part is not None:
        ds.BodyPartExamined = body_part
    # MR acquisition
    ds.ScanningSequence = params.scanning_sequence
    ds.SequenceVariant = list(params.sequence_variant) if len(params.sequence_variant) > 1 else params.sequence_variant[0]
    if len(params.scan_options) > 1:
        ds.ScanOptions = list(params.scan_options)
    else:
        ds.ScanOptions = params.scan_options[0] if params.scan_options else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = params.sequence_name
    ds.AngioFlag = "N"
    stack0 = plan.stacks[0]
    ds.SliceThickness = _ds(stack0.thickness, 3)
    ds.RepetitionTime = _ds(params.repetition_time_ms, 2)
    ds.EchoTime = _ds(params.echo_time_ms, 3)
    ds.NumberOfAverages = _ds(params.number_of_averages, 1)
    ds.ImagingFrequency = _ds(_GYROMAGNETIC_MHZ_PER_T * site.field_strength_t, 6)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(site.field_strength_t, 1)
    if site.writes_spacing_between_slices and plan.plane != "localizer":
        ds.SpacingBetweenSlices = _ds(stack0.slice_spacing, 3)
    ds.EchoTrainLength = params.echo_train_length
    # square field of view; the phase direction is sampled with fewer lines and zero-filled
    ds.PercentSampling = _ds(params.percent_sampling, 1)
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = _ds(params.pixel_bandwidth_hz, 1)
    ds.DeviceSerialNumber = site.device_serial
    ds.SoftwareVersions = site.software_versions.split("\\") if "\\" in site.software_versions else site.software_versions
    ds.ProtocolName = plan.description
    ds.ReceiveCoilName = site.receive_coil[spec.joint]
    ds.TransmitCoilName = site.receive_coil[spec.joint] if spec.joint == "knee" else "Body"
    # AcquisitionMatrix is (frequency rows, frequency columns, phase rows, phase columns)
    phase_direction = plan.phase_direction
    frequency = stack0.cols if phase_direction == "ROW" else stack0.rows
    phase = int(round(frequency * params.percent_sampling / 100.0))
    ds.AcquisitionMatrix = [frequency, 0, 0, phase] if phase_direction == "ROW" else [0, frequency, phase, 0]
    ds.InPlanePhaseEncodingDirection = phase_direction
    ds.FlipAngle = _ds(params.flip_angle_deg, 1)
    ds.VariableFlipAngleFlag = "N"
    ds.PatientPosition = "HFS" if spec.joint == "shoulder" else "FFS"
    # study / series identity
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid(plan.series_number)
    ds.StudyID = study.accession_number[-6:]
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    if site.laterality_tags == "series":
        ds.Laterality = spec.laterality
    else:
        ds.ImageLaterality = spec.laterality
    # pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    center, width = series.window
    ds.WindowCenter = _ds(center, 1)
    ds.WindowWidth = _ds(width, 1)
    ds.WindowCenterWidthExplanation = "Phantom auto window"
    return ds


def _slice_attributes(ds: Dataset, stack: SliceStack, k: int) -> None:
    position = stack.slice_origin(k)
    ds.ImagePositionPatient = [_ds(float(v), 4) for v in position]
    ds.ImageOrientationPatient = [_ds(float(v), 6) for v in (*stack.row_dir, *stack.col_dir)]
    ds.SliceLocation = _ds(float(np.dot(stack.slice_center(k), stack.normal)), 4)
    ds.Rows = stack.rows
    ds.Columns = stack.cols
    ds.PixelSpacing = [_ds(stack.pixel_spacing[0], 6), _ds(stack.pixel_spacing[1], 6)]
    ds.SliceThickness = _ds(stack.thickness, 3)


def write_series(series: AcquiredSeries, study: StudyContext, out_dir: Path, transfer_syntax: str = "explicit") -> list[Path]:
    """Write every image of ``series`` into ``out_dir`` as ``IMG0001.dcm``, ``IMG0002.dcm``, ...

    Returns the written paths in instance order.
    """
    try:
        syntax = TRANSFER_SYNTAXES[transfer_syntax]
    except KeyError:
        raise ValueError(f"transfer_syntax must be one of {sorted(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = series.plan
    base = _base_dataset(series, study)
    paths: list[Path] = []
    instance = 0
    seconds_per_image = 1.5
    for stack, pixels in zip(plan.stacks, series.pixels, strict=True):
        if pixels.dtype != np.uint16 or pixels.shape != (stack.n_slices, stack.rows, stack.cols):
            raise ValueError(
                f"series {plan.series_number}: pixels must be uint16 {(stack.n_slices, stack.rows, stack.cols)}, "
                f"got {pixels.dtype} {pixels.shape}"
            )
        for k in range(stack.n_slices):
            instance += 1
            ds = Dataset()
            ds.update(base)
            ds.SOPInstanceUID = study.instance_uid(plan.series_number, instance)
            ds.InstanceNumber = instance
            content = study.study_datetime + timedelta(seconds=plan.start_offset_s + instance * seconds_per_image)
            ds.ContentDate, ds.ContentTime = _dt(content)
            _slice_attributes(ds, stack, k)
            ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
            ds["PixelData"].VR = "OW"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
            ds.file_meta = meta
            if syntax != ExplicitVRLittleEndian:
                ds.compress(syntax, np.ascontiguousarray(pixels[k]), generate_instance_uid=False)
            path = out_dir / f"IMG{instance:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
