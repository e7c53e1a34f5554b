"""Build small synthetic DICOM MR series for tests: classic, Enhanced MR multi-frame, compressed.

Geometry is explicit (orientation, origin, pixel spacing, slice spacing) so tests can check
sorting, spacing and affine against values they chose, including oblique and flipped
planes.  Pixel values are a deterministic pattern that differs per slice, so a wrong slice
order or a transposed axis shows up as a value mismatch.

Other test modules may reuse it: ``write_classic_series`` for a folder of MR Image Storage
files, ``write_enhanced_series`` for one Enhanced MR Image Storage file, ``write_junk`` for
files a scanner must skip.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DSfloat
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

#: the compressed transfer syntaxes the factory writes (JPEG baseline needs uint8 volumes)
COMPRESSED_SYNTAXES: dict[str, UID] = {
    "rle": RLELossless,
    "jpegls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg": JPEGBaseline8Bit,
}

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

#: orientation (row cosines, column cosines) of the three cardinal planes as scanners write them
CARDINAL_ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
}


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about patient axis ``x``, ``y`` or ``z``."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"axis must be 'x', 'y' or 'z', got {axis!r}")


def orientation(
    plane: str, tilt_deg: float = 0.0, tilt_axis: str = "z", flip: bool = False
) -> tuple[float, ...]:
    """Direction cosines of ``plane`` rotated by ``tilt_deg`` about ``tilt_axis``.

    ``flip`` swaps the row direction, which reverses the slice normal: same plane, slices
    stacked the other way.
    """
    base = np.asarray(CARDINAL_ORIENTATIONS[plane], dtype=np.float64)
    r = rotation(tilt_axis, tilt_deg)
    row, col = r @ base[:3], r @ base[3:]
    if flip:
        row = -row
    return tuple(float(v) for v in np.concatenate([row, col]))


@dataclass
class Geometry:
    """Where the slices of a synthetic series lie."""

    orientation: tuple[float, ...] = CARDINAL_ORIENTATIONS["sagittal"]
    origin: tuple[float, float, float] = (-30.0, -40.0, 50.0)
    pixel_spacing: tuple[float, float] = (0.8, 0.7)  # (row spacing, column spacing)
    slice_spacing: float = 3.5
    slice_thickness: float = 3.0

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, dtype=np.float64)
        n = np.cross(o[:3], o[3:])
        return n / np.linalg.norm(n)

    def position(self, k: int) -> tuple[float, float, float]:
        p = np.asarray(self.origin, dtype=np.float64) + k * self.slice_spacing * self.normal
        return tuple(float(v) for v in p)


def pattern_volume(slices: int, rows: int, cols: int, seed: int = 0, high: int = 3000) -> np.ndarray:
    """uint16 (slices, rows, cols) with a value that encodes the slice and a smooth texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    volume = np.empty((slices, rows, cols), dtype=np.uint16)
    for k in range(slices):
        texture = 200 * np.sin(xx / 3.0 + k) + 150 * np.cos(yy / 4.0 - k) + rng.integers(0, 50, (rows, cols))
        volume[k] = np.clip(500 + 60 * k + texture + 3 * xx + yy, 0, high).astype(np.uint16)
    return volume


@dataclass
class SeriesHeader:
    """Identity and descriptive tags shared by the files of a synthetic series."""

    series_description: str = "PD FS SAG"
    protocol_name: str = ""
    series_number: int = 3
    body_part: str = "KNEE"
    study_description: str = "MRI KNEE"
    laterality: str = "R"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "NONE")
    manufacturer: str = "SIEMENS"
    modality: str = "MR"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    patient_id: str = "PHANTOM001"
    accession: str = "ACC001"
    rescale: tuple[float, float] | None = None  # (slope, intercept)


def _ds(values: Sequence[float]) -> list[DSfloat]:
    """Decimal strings within the 16 characters DICOM allows (full float repr is longer)."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def _file_meta(sop_class: str, sop_instance: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1311.1")
    return meta


def _common(ds: Dataset, header: SeriesHeader, sop_class: str, sop_instance: str) -> None:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.AccessionNumber = header.accession
    ds.Modality = header.modality
    ds.Manufacturer = header.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.study_description
    ds.SeriesDescription = header.series_description
    if header.protocol_name:
        ds.ProtocolName = header.protocol_name
    ds.PatientName = "Phantom^Knee"
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    if header.body_part:
        ds.BodyPartExamined = header.body_part
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = header.series_number
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "FFS"  # extremity MR: feet first supine
    ds.Laterality = header.laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0


def _set_pixels(ds: Dataset, frames: np.ndarray, syntax: str) -> None:
    """Store ``frames`` (F, R, C) uint16 in ``ds`` with transfer syntax ``syntax``."""
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    if syntax == JPEGBaseline8Bit:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = encapsulate([_jpeg_baseline(frame) for frame in frames])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "2.0"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        return
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    data = frames.astype(np.uint16)
    ds.PixelData = (data[0] if data.shape[0] == 1 else data).tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax != ExplicitVRLittleEndian:
        arr = data[0] if data.shape[0] == 1 else data
        ds.compress(UID(syntax), arr, generate_instance_uid=False)


def _jpeg_baseline(frame: np.ndarray) -> bytes:
    """8-bit JPEG baseline bytes of one frame, encoded by SimpleITK's JPEG writer."""
    import SimpleITK as sitk

    if frame.dtype != np.uint8:
        raise ValueError(f"JPEG baseline frames must be uint8, got {frame.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.jpg"
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(path))
        writer.SetImageIO("JPEGImageIO")
        writer.SetUseCompression(True)
        writer.SetCompressionLevel(95)
        writer.Execute(sitk.GetImageFromArray(frame))
        return path.read_bytes()


def write_classic_series(
    folder: Path,
    volume: np.ndarray,
    geometry: Geometry,
    header: SeriesHeader | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle_seed: int | None = None,
    positions: Sequence[Sequence[float]] | None = None,
    orientations: Sequence[Sequence[float]] | None = None,
) -> list[Path]:
    """Write ``volume`` (slices, rows, cols) as MR Image Storage files, one per slice.

    File names and InstanceNumbers are shuffled when ``shuffle_seed`` is given, so readers
    must sort by position.  ``positions``/``orientations`` override the per-slice geometry
    (for broken or multi-plane series).  Returns the paths in slice order.
    """
    header = header or SeriesHeader()
    folder.mkdir(parents=True, exist_ok=True)
    n = volume.shape[0]
    names = list(range(n))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(names)
    paths = []
    for k in range(n):
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop, transfer_syntax)
        _common(ds, header, MR_IMAGE_STORAGE, sop)
        ds.ImageType = list(header.image_type)
        ds.InstanceNumber = names[k] + 1
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTrainLength = 8
        ds.RepetitionTime = 3000.0
        ds.EchoTime = 30.0
        ds.ImagePositionPatient = _ds(positions[k] if positions is not None else geometry.position(k))
        ds.ImageOrientationPatient = _ds(
            orientations[k] if orientations is not None else geometry.orientation
        )
        ds.PixelSpacing = _ds(geometry.pixel_spacing)
        ds.SliceThickness = geometry.slice_thickness
        ds.SpacingBetweenSlices = geometry.slice_spacing
        if header.rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = header.rescale
            ds.RescaleType = "US"
        _set_pixels(ds, volume[k : k + 1], transfer_syntax)
        path = folder / f"IMG{names[k] + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def group(**values: object) -> DicomSequence:
    """A functional-group sequence with one item holding ``values``."""
    return DicomSequence([_item(**values)])


def _dimension(organization_uid: str, pointer: int, label: str) -> Dataset:
    return _item(
        DimensionOrganizationUID=organization_uid,
        DimensionIndexPointer=pointer,
        FunctionalGroupPointer=0x00209111,  # Frame Content Sequence
        DimensionDescriptionLabel=label,
    )


def write_enhanced_series(
    path: Path,
    volume: np.ndarray,
    geometry: Geometry,
    header: SeriesHeader | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    frame_order: Sequence[int] | None = None,
    per_frame_rescale: bool = False,
) -> Path:
    """Write ``volume`` as one Enhanced MR Image Storage file with per-frame functional groups.

    ``frame_order`` stores slice ``frame_order[i]`` as frame ``i + 1`` (readers must sort by
    position, not by frame number).  With ``per_frame_rescale`` the Pixel Value
    Transformation sits in each frame's group instead of the shared group.
    """
    header = header or SeriesHeader()
    path.parent.mkdir(parents=True, exist_ok=True)
    n = volume.shape[0]
    order = list(frame_order) if frame_order is not None else list(range(n))
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, sop, transfer_syntax)
    _common(ds, header, ENHANCED_MR_IMAGE_STORAGE, sop)
    # value 3 of an Enhanced MR image type is the image flavour; frames carry the laterality
    ds.ImageType = list(header.image_type[:2]) + ["VOLUME", "NONE"]
    del ds.Laterality
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    ds.ContentQualification = "RESEARCH"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.AcquisitionDateTime = "20260101120000"
    ds.AcquisitionDuration = 60.0
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Enhanced General Equipment, Enhanced MR Image and MR Pulse Sequence modules
    ds.ManufacturerModelName = "Phantom"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "PROTON_DENSITY"
    ds.MagneticFieldStrength = 3.0
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PulseSequenceName = "PD_TSE_FS"
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "YES"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    ds.EchoPlanarPulseSequence = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.TimeOfFlightContrast = "NO"
    # frames are organised as (stack, position in stack)
    dimension_uid = generate_uid()
    ds.DimensionOrganizationSequence = group(DimensionOrganizationUID=dimension_uid)
    ds.DimensionIndexSequence = DicomSequence(
        [
            _dimension(dimension_uid, 0x00209056, "Stack ID"),
            _dimension(dimension_uid, 0x00209057, "In-Stack Position Number"),
        ]
    )

    shared = Dataset()
    anatomy = Dataset()
    anatomy.CodeValue, anatomy.CodingSchemeDesignator, anatomy.CodeMeaning = "72696002", "SCT", "Knee"
    shared.FrameAnatomySequence = group(AnatomicRegionSequence=DicomSequence([anatomy]), FrameLaterality="R")
    shared.MRImageFrameTypeSequence = group(
        FrameType=list(ds.ImageType),
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
        ComplexImageComponent="MAGNITUDE",
        AcquisitionContrast="PROTON_DENSITY",
    )
    shared.MRTimingAndRelatedParametersSequence = group(
        RepetitionTime=3000.0,
        FlipAngle=90.0,
        EchoTrainLength=8,
        RFEchoTrainLength=8,
        GradientEchoTrainLength=0,
        GradientOutputType="DB_DT",
        GradientOutput=10.0,
        OperatingModeSequence=DicomSequence(
            [_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]
        ),
        SpecificAbsorptionRateSequence=DicomSequence(
            [_item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.5)]
        ),
    )
    shared.MREchoSequence = group(EffectiveEchoTime=30.0)
    shared.MRModifierSequence = group(
        InversionRecovery="NO",
        FlowCompensation="NONE",
        T2Preparation="NO",
        SpectrallySelectedExcitation="NONE",
        SpatialPresaturation="NONE",
        PartialFourier="NO",
        ParallelAcquisition="NO",
    )
    shared.MRImagingModifierSequence = group(
        MagnetizationTransfer="NONE",
        BloodSignalNulling="NO",
        Tagging="NONE",
        TransmitterFrequency=123.2,
        PixelBandwidth=200.0,
    )
    shared.MRReceiveCoilSequence = group(
        ReceiveCoilName="Knee 18",
        ReceiveCoilManufacturerName="Phantom",
        ReceiveCoilType="VOLUME",
        QuadratureReceiveCoil="NO",
    )
    shared.MRTransmitCoilSequence = group(
        TransmitCoilName="Body", TransmitCoilManufacturerName="Phantom", TransmitCoilType="BODY"
    )
    shared.MRFOVGeometrySequence = group(
        InPlanePhaseEncodingDirection="ROW",
        MRAcquisitionFrequencyEncodingSteps=int(volume.shape[2]),
        MRAcquisitionPhaseEncodingStepsInPlane=int(volume.shape[1]),
        PercentSampling=100.0,
        PercentPhaseFieldOfView=100.0,
    )
    shared.MRAveragesSequence = group(NumberOfAverages=1.0)
    shared.PlaneOrientationSequence = group(ImageOrientationPatient=_ds(geometry.orientation))
    shared.PixelMeasuresSequence = group(
        PixelSpacing=_ds(geometry.pixel_spacing),
        SliceThickness=geometry.slice_thickness,
        SpacingBetweenSlices=geometry.slice_spacing,
    )
    rescale = header.rescale or (1.0, 0.0)
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = group(
            RescaleSlope=rescale[0],
            RescaleIntercept=rescale[1],
            RescaleType="US",
        )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for i, k in enumerate(order):
        item = Dataset()
        item.PlanePositionSequence = group(ImagePositionPatient=_ds(geometry.position(k)))
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        content.FrameAcquisitionDateTime = "20260101120000"
        content.FrameReferenceDateTime = "20260101120000"
        content.FrameAcquisitionDuration = 60.0
        item.FrameContentSequence = DicomSequence([content])
        if per_frame_rescale:
            item.PixelValueTransformationSequence = group(
                RescaleSlope=rescale[0],
                RescaleIntercept=rescale[1],
                RescaleType="US",
            )
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _set_pixels(ds, volume[order], transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_junk(folder: Path) -> dict[str, Path]:
    """Files a folder scan must skip: text, a DICOMDIR, an empty file, a truncated image."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "README.txt"
    text.write_text("exported by a PACS\n")
    empty = folder / "empty.dcm"
    empty.write_bytes(b"")

    dicomdir = folder / "DICOMDIR"
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta("1.2.840.10008.1.3.10", sop, ExplicitVRLittleEndian)
    ds.FileSetID = "PHANTOM"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = DicomSequence([])
    ds.save_as(dicomdir, enforce_file_format=True)

    source = write_classic_series(
        folder / "_tmp_truncated", pattern_volume(1, 16, 16), Geometry(), SeriesHeader(series_number=99)
    )[0]
    truncated = folder / "truncated.dcm"
    data = source.read_bytes()
    truncated.write_bytes(data[: len(data) - 200])
    source.unlink()
    source.parent.rmdir()
    return {"text": text, "empty": empty, "dicomdir": dicomdir, "truncated": truncated}
