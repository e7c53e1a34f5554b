"""Site profiles: the scanner, its image quality and its header habits.

A model that is trained on one hospital's images and tested on another's meets a different
vendor, field strength, noise level, coil shading, contrast and wording of the headers.  Each
:class:`SiteProfile` bundles those differences so that a data set can be generated with sites
drawn at random, or with one site held out (``orthonode phantom --site NAME``).

The header habits are the ones series-selection rules stumble over in practice: the wording
of SeriesDescription, whether BodyPartExamined says "KNEE", "EXTREMITY" or nothing, which
laterality attribute is written, whether SpacingBetweenSlices is present, series numbering.
"""
from __future__ import annotations

from dataclasses import dataclass

#: sequence keys known to the contrast tables (see :mod:`training.phantoms.contrast`)
SEQUENCES: tuple[str, ...] = ("PD_FS", "T1", "T2_FS", "PD", "LOCALIZER")

_PLANE_ABBREV = {"sagittal": "SAG", "coronal": "COR", "axial": "AX"}

# Vendor wording of the sequence part of SeriesDescription.  Siemens sites in the field use
# either the short protocol names of the exam card ("PD_FS_SAG") or the sequence family
# ("PD TSE FS SAG"); GE writes the plane first ("Sag PD FSE FS"); Philips names the weighting
# and the fat suppression technique ("PDW_SPAIR_SAG").
_WORDING: dict[str, dict[str, str]] = {
    "siemens_short": {"PD_FS": "PD_FS", "T1": "T1", "T2_FS": "T2_FS", "PD": "PD", "LOCALIZER": "localizer"},
    "siemens_tse": {"PD_FS": "PD TSE FS", "T1": "T1 TSE", "T2_FS": "T2 TSE FS", "PD": "PD TSE", "LOCALIZER": "AAHead_Scout localizer"},
    "ge": {"PD_FS": "PD FSE FS", "T1": "T1 FSE", "T2_FS": "T2 FSE FS", "PD": "PD FSE", "LOCALIZER": "3-Plane Loc"},
    "philips": {"PD_FS": "PDW_SPAIR", "T1": "T1W_TSE", "T2_FS": "T2W_SPAIR", "PD": "PDW_TSE", "LOCALIZER": "Survey"},
}


@dataclass(frozen=True)
class SiteProfile:
    """One imaging site: scanner identity, image quality and DICOM header habits.

    ``snr`` is the signal-to-noise ratio of a tissue with relative signal 1.0 in a reference
    voxel of 0.6 x 0.6 x 3.5 mm; the acquisition scales it with the actual voxel volume.
    ``bias_strength`` is the peak relative deviation of the smooth receive-coil shading.
    ``fat_sat_residual`` is the fraction of fat signal left after fat suppression everywhere
    (poorer on 1.5 T); ``fat_sat_edge_failure`` the extra fraction left at the edges of the
    field of view, where the main field is less homogeneous (worse at 3 T).  ``contrast_gamma`` bends
    the tissue contrast slightly (vendor reconstruction and filtering differ).
    ``intensity_scale`` is the stored value of a tissue with relative signal 1.0.
    """

    name: str
    manufacturer: str
    model_name: str
    field_strength_t: float
    institution: str
    station_name: str
    software_versions: str
    device_serial: str
    snr: float
    bias_strength: float
    fat_sat_residual: float
    fat_sat_edge_failure: float
    contrast_gamma: float
    intensity_scale: float
    wording: str  # key of _WORDING
    body_part_style: str  # "joint" (KNEE/ANKLE/SHOULDER), "extremity" or "empty"
    laterality_tags: str  # "series": Laterality (0020,0060); "image": ImageLaterality (0020,0062)
    writes_spacing_between_slices: bool
    series_number_step: int  # 1 for consecutive numbering, 100 for Philips-style 101, 201, ...
    slice_thickness_mm: tuple[float, float]  # range drawn per series
    receive_coil: dict[str, str]  # joint -> ReceiveCoilName

    def __post_init__(self) -> None:
        if self.wording not in _WORDING:
            raise ValueError(f"SiteProfile {self.name!r}: wording must be one of {sorted(_WORDING)}, got {self.wording!r}")
        if self.body_part_style not in ("joint", "extremity", "empty"):
            raise ValueError(f"SiteProfile {self.name!r}: body_part_style {self.body_part_style!r} is not joint/extremity/empty")
        # Laterality is Type 2C in General Series: it may not be present together with Image
        # Laterality, so a site writes one or the other
        if self.laterality_tags not in ("series", "image"):
            raise ValueError(f"SiteProfile {self.name!r}: laterality_tags {self.laterality_tags!r} is not series/image")
        if self.field_strength_t not in (1.5, 3.0):
            raise ValueError(f"SiteProfile {self.name!r}: field_strength_t must be 1.5 or 3.0, got {self.field_strength_t}")
        if not 0.0 <= self.fat_sat_edge_failure < 1.0:
            raise ValueError(f"SiteProfile {self.name!r}: fat_sat_edge_failure must be in [0, 1), got {self.fat_sat_edge_failure}")
        if not 0.0 <= self.fat_sat_residual < 1.0:
            raise ValueError(f"SiteProfile {self.name!r}: fat_sat_residual must be in [0, 1), got {self.fat_sat_residual}")

    def series_description(self, sequence: str, plane: str, oblique: bool = False) -> str:
        """SeriesDescription as this site's technologists would word it."""
        try:
            seq = _WORDING[self.wording][sequence]
        except KeyError:
            raise ValueError(f"unknown sequence {sequence!r}; expected one of {SEQUENCES}") from None
        if sequence == "LOCALIZER":
            return seq
        abbrev = _PLANE_ABBREV[plane]
        if self.wording == "siemens_short":
            return f"{seq}_{abbrev}" + ("_OBL" if oblique else "")
        if self.wording == "siemens_tse":
            return f"{seq} {abbrev}" + (" obl" if oblique else "")
        if self.wording == "ge":
            plane_word = {"sagittal": "Sag", "coronal": "Cor", "axial": "Ax"}[plane]
            return f"{'Obl ' if oblique else ''}{plane_word} {seq}"
        return f"{seq}_{abbrev}" + ("_OBL" if oblique else "")  # philips

    def body_part(self, joint: str) -> str | None:
        """BodyPartExamined value, or None when this site leaves it out."""
        if self.body_part_style == "joint":
            return joint.upper()
        if self.body_part_style == "extremity":
            return "EXTREMITY"
        return None


SITES: dict[str, SiteProfile] = {
    profile.name: profile
    for profile in (
        SiteProfile(
            name="siemens_3t_a",
            manufacturer="SIEMENS",
            model_name="MAGNETOM Skyra",
            field_strength_t=3.0,
            institution="Phantom University Hospital A",
            station_name="MRC40112",
            software_versions="syngo MR E11",
            device_serial="40112",
            snr=38.0,
            bias_strength=0.22,
            fat_sat_residual=0.06,
            fat_sat_edge_failure=0.25,
            contrast_gamma=1.0,
            intensity_scale=1400.0,
            wording="siemens_short",
            body_part_style="joint",
            laterality_tags="series",
            writes_spacing_between_slices=True,
            series_number_step=1,
            slice_thickness_mm=(3.0, 3.5),
            receive_coil={"knee": "Tx/Rx Knee 15", "ankle": "Foot/Ankle 16", "shoulder": "Shoulder 16"},
        ),
        SiteProfile(
            name="ge_1p5t_b",
            manufacturer="GE MEDICAL SYSTEMS",
            model_name="SIGNA Artist",
            field_strength_t=1.5,
            institution="Phantom Regional Clinic B",
            station_name="GEMR15B",
            software_versions="29\\LX\\MR Software release:MR29.1",
            device_serial="0000081533MR1",
            snr=22.0,
            bias_strength=0.30,
            fat_sat_residual=0.10,
            fat_sat_edge_failure=0.15,
            contrast_gamma=0.92,
            intensity_scale=2600.0,
            wording="ge",
            body_part_style="extremity",
            laterality_tags="series",
            writes_spacing_between_slices=True,
            series_number_step=1,
            slice_thickness_mm=(3.5, 4.0),
            receive_coil={"knee": "16ch Knee", "ankle": "16ch Foot Ankle", "shoulder": "16ch Shoulder"},
        ),
        SiteProfile(
            name="philips_3t_c",
            manufacturer="Philips",
            model_name="Ingenia",
            field_strength_t=3.0,
            institution="Phantom Orthopaedic Centre C",
            station_name="PHILIPS-C3T",
            software_versions="5.7.1\\5.7.1.2",
            device_serial="44187",
            snr=34.0,
            bias_strength=0.18,
            fat_sat_residual=0.05,
            fat_sat_edge_failure=0.12,
            contrast_gamma=1.08,
            intensity_scale=1800.0,
            wording="philips",
            body_part_style="joint",
            laterality_tags="image",
            writes_spacing_between_slices=False,
            series_number_step=100,
            slice_thickness_mm=(3.0, 3.5),
            receive_coil={"knee": "dS Knee 16ch", "ankle": "dS FootAnkle 8ch", "shoulder": "dS Shoulder 8ch"},
        ),
        SiteProfile(
            name="siemens_1p5t_d",
            manufacturer="SIEMENS",
            model_name="MAGNETOM Aera",
            field_strength_t=1.5,
            institution="Phantom Community Hospital D",
            station_name="AWP45321",
            software_versions="syngo MR E11",
            device_serial="45321",
            snr=20.0,
            bias_strength=0.35,
            fat_sat_residual=0.09,
            fat_sat_edge_failure=0.15,
            contrast_gamma=0.95,
            intensity_scale=1100.0,
            wording="siemens_tse",
            body_part_style="empty",
            laterality_tags="series",
            writes_spacing_between_slices=False,
            series_number_step=1,
            slice_thickness_mm=(3.5, 4.0),
            receive_coil={"knee": "Knee 18", "ankle": "Foot/Ankle 16", "shoulder": "Shoulder 16"},
        ),
        SiteProfile(
            name="ge_3t_e",
            manufacturer="GE MEDICAL SYSTEMS",
            model_name="DISCOVERY MR750w",
            field_strength_t=3.0,
            institution="Phantom Sports Medicine Institute E",
            station_name="GEMR30E",
            software_versions="27\\LX\\MR Software release:DV26.0_R03",
            device_serial="0000262444MR3",
            snr=36.0,
            bias_strength=0.25,
            fat_sat_residual=0.08,
            fat_sat_edge_failure=0.30,
            contrast_gamma=1.03,
            intensity_scale=3000.0,
            wording="ge",
            body_part_style="joint",
            laterality_tags="image",
            writes_spacing_between_slices=True,
            series_number_step=1,
            slice_thickness_mm=(3.0, 3.5),
            receive_coil={"knee": "TR Knee PA", "ankle": "Foot Ankle", "shoulder": "Shoulder PA"},
        ),
    )
}


def site_names() -> tuple[str, ...]:
    """Names of all site profiles, in a stable order."""
    return tuple(SITES)


def get_site(name: str) -> SiteProfile:
    """The profile called ``name``; the error lists the known sites."""
    try:
        return SITES[name]
    except KeyError:
        raise ValueError(f"unknown site {name!r}; known sites: {', '.join(SITES)}") from None
