"""Tissue-to-signal tables and pulse-sequence parameters for the simulated protocols.

The tables give the relative signal (0..1, fluid on a T2 fat-sat image = 1) of every
:class:`~training.phantoms.anatomy.Tissue` in each clinical contrast, following what a
musculoskeletal radiologist reads from them:

* fat is bright on T1 and PD, dark on fat-suppressed images (residual signal set by the site);
* fluid, marrow edema, soft-tissue edema and tears are bright on PD/T2 fat-sat, dark on T1;
* cortex, ligaments, tendons and menisci are dark in every sequence;
* hyaline cartilage is intermediate, brighter than muscle on PD fat-sat;
* fatty marrow follows fat (bright T1, suppressed on fat-sat).

The numbers are not relaxometry: they are calibrated reading impressions, so that a model
trained on the phantoms has to learn the same cues it would use on real images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.phantoms.anatomy import N_TISSUES, Tissue
from training.phantoms.sites import SiteProfile

#: relative signal per tissue and sequence (before site tweaks)
_BASE: dict[str, dict[Tissue, float]] = {
    "T1": {
        Tissue.AIR: 0.0, Tissue.FAT: 0.95, Tissue.MUSCLE: 0.34, Tissue.SKIN: 0.50, Tissue.CORTEX: 0.02,
        Tissue.MARROW: 0.86, Tissue.CARTILAGE: 0.40, Tissue.FIBROCARTILAGE: 0.05, Tissue.LIGAMENT: 0.06,
        Tissue.FLUID: 0.18, Tissue.MARROW_EDEMA: 0.30, Tissue.SOFT_TISSUE_EDEMA: 0.28, Tissue.TEAR: 0.24,
        Tissue.VESSEL: 0.12,
    },
    "PD_FS": {
        Tissue.AIR: 0.0, Tissue.FAT: 0.0, Tissue.MUSCLE: 0.30, Tissue.SKIN: 0.34, Tissue.CORTEX: 0.02,
        Tissue.MARROW: 0.04, Tissue.CARTILAGE: 0.55, Tissue.FIBROCARTILAGE: 0.06, Tissue.LIGAMENT: 0.07,
        Tissue.FLUID: 0.92, Tissue.MARROW_EDEMA: 0.68, Tissue.SOFT_TISSUE_EDEMA: 0.62, Tissue.TEAR: 0.80,
        Tissue.VESSEL: 0.28,
    },
    "T2_FS": {
        Tissue.AIR: 0.0, Tissue.FAT: 0.0, Tissue.MUSCLE: 0.20, Tissue.SKIN: 0.25, Tissue.CORTEX: 0.02,
        Tissue.MARROW: 0.03, Tissue.CARTILAGE: 0.35, Tissue.FIBROCARTILAGE: 0.04, Tissue.LIGAMENT: 0.04,
        Tissue.FLUID: 1.00, Tissue.MARROW_EDEMA: 0.74, Tissue.SOFT_TISSUE_EDEMA: 0.66, Tissue.TEAR: 0.90,
        Tissue.VESSEL: 0.32,
    },
    "PD": {
        Tissue.AIR: 0.0, Tissue.FAT: 0.90, Tissue.MUSCLE: 0.40, Tissue.SKIN: 0.55, Tissue.CORTEX: 0.02,
        Tissue.MARROW: 0.80, Tissue.CARTILAGE: 0.55, Tissue.FIBROCARTILAGE: 0.06, Tissue.LIGAMENT: 0.07,
        Tissue.FLUID: 0.75, Tissue.MARROW_EDEMA: 0.55, Tissue.SOFT_TISSUE_EDEMA: 0.58, Tissue.TEAR: 0.66,
        Tissue.VESSEL: 0.20,
    },
    # gradient-echo scout: little contrast, fat and fluid both moderately bright
    "LOCALIZER": {
        Tissue.AIR: 0.0, Tissue.FAT: 0.80, Tissue.MUSCLE: 0.45, Tissue.SKIN: 0.55, Tissue.CORTEX: 0.03,
        Tissue.MARROW: 0.70, Tissue.CARTILAGE: 0.55, Tissue.FIBROCARTILAGE: 0.10, Tissue.LIGAMENT: 0.10,
        Tissue.FLUID: 0.60, Tissue.MARROW_EDEMA: 0.62, Tissue.SOFT_TISSUE_EDEMA: 0.55, Tissue.TEAR: 0.55,
        Tissue.VESSEL: 0.75,
    },
}

FAT_SUPPRESSED: frozenset[str] = frozenset({"PD_FS", "T2_FS"})

#: tissues whose signal comes from fat protons, and so rise with imperfect fat suppression
_FATTY = (Tissue.FAT, Tissue.MARROW)


def sequences() -> tuple[str, ...]:
    """All sequence keys that have a contrast table."""
    return tuple(_BASE)


def signal_table(sequence: str, site: SiteProfile, rng: np.random.Generator | None = None) -> np.ndarray:
    """(N_TISSUES,) float32 relative signal per tissue value for ``sequence`` at ``site``.

    The site's residual fat signal is added on fat-suppressed sequences, its contrast gamma
    applied, and, when ``rng`` is given, each tissue jittered by a few percent so that no two
    cases share exactly the same grey levels (patients differ, so do coil loads).
    """
    try:
        base = _BASE[sequence]
    except KeyError:
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {tuple(_BASE)}") from None
    table = np.zeros(N_TISSUES, dtype=np.float64)
    for tissue, value in base.items():
        table[int(tissue)] = value
    if sequence in FAT_SUPPRESSED:
        fat_on_t1 = _BASE["PD"]
        for tissue in _FATTY:
            table[int(tissue)] += site.fat_sat_residual * fat_on_t1[tissue]
    table = np.power(table, site.contrast_gamma)
    if rng is not None:
        table *= rng.uniform(0.94, 1.06, size=N_TISSUES)
    table[int(Tissue.AIR)] = 0.0
    return np.clip(table, 0.0, 1.2).astype(np.float32)


def fat_signal_table() -> np.ndarray:
    """(N_TISSUES,) float32 signal of the fat protons of each tissue without suppression.

    What a fat-suppressed sequence lets through where the suppression fails (scaled by the
    site's failure strength): subcutaneous fat and fatty marrow at their PD brightness.
    """
    table = np.zeros(N_TISSUES, dtype=np.float32)
    for tissue in _FATTY:
        table[int(tissue)] = _BASE["PD"][tissue]
    return table


@dataclass(frozen=True)
class SequenceParameters:
    """The MR acquisition attributes (MR Image module) of one series."""

    scanning_sequence: str  # (0018,0020) SE / GR / IR ...
    sequence_variant: tuple[str, ...]  # (0018,0021)
    scan_options: tuple[str, ...]  # (0018,0022); empty = none
    sequence_name: str  # (0018,0024), vendor style
    repetition_time_ms: float
    echo_time_ms: float
    echo_train_length: int
    flip_angle_deg: float
    number_of_averages: float
    pixel_bandwidth_hz: float
    percent_sampling: float  # phase-encoding lines as a percentage of the frequency matrix


def sequence_parameters(sequence: str, site: SiteProfile, rng: np.random.Generator) -> SequenceParameters:
    """Draw plausible timing for ``sequence`` on ``site``'s scanner.

    Turbo/fast spin echo for the diagnostic contrasts (TR/TE in the clinical ranges at the
    site's field strength), a spoiled gradient echo for the localizer.
    """
    high_field = site.field_strength_t >= 3.0
    vendor = site.manufacturer.upper()
    fs_option: tuple[str, ...] = ("FS",) if sequence in FAT_SUPPRESSED else ()
    if sequence == "LOCALIZER":
        name = "*fl2d1" if "SIEMENS" in vendor else ("3PL" if "GE" in vendor else "FFE")
        return SequenceParameters(
            scanning_sequence="GR", sequence_variant=("SP",), scan_options=(), sequence_name=name,
            repetition_time_ms=float(round(rng.uniform(7.0, 9.0), 2)), echo_time_ms=float(round(rng.uniform(3.0, 4.6), 2)),
            echo_train_length=1, flip_angle_deg=20.0, number_of_averages=1.0,
            pixel_bandwidth_hz=float(round(rng.uniform(250, 320))), percent_sampling=100.0,
        )
    if sequence == "T1":
        tr, te, etl = rng.uniform(450, 750), rng.uniform(9, 16), int(rng.integers(2, 5))
    elif sequence == "PD_FS" or sequence == "PD":
        tr, te, etl = rng.uniform(2600, 4200), rng.uniform(28, 45), int(rng.integers(7, 13))
    elif sequence == "T2_FS":
        tr, te, etl = rng.uniform(3000, 5200), rng.uniform(55, 85), int(rng.integers(10, 17))
    else:
        raise ValueError(f"unknown sequence {sequence!r}; expected one of {tuple(_BASE)}")
    if high_field and sequence != "T1":
        te *= 0.92  # shorter T2 at 3 T: vendors shorten TE slightly
    if "SIEMENS" in vendor:
        name = f"*tse2d1_{etl}"
    elif "GE" in vendor:
        name = "fse-xl" if sequence != "T1" else "fse"
    else:
        name = "TSE"
    return SequenceParameters(
        scanning_sequence="SE", sequence_variant=("SK", "OSP"), scan_options=fs_option, sequence_name=name,
        repetition_time_ms=float(round(tr, 1)), echo_time_ms=float(round(te, 2)), echo_train_length=etl,
        flip_angle_deg=float(rng.choice([90.0, 150.0, 160.0])), number_of_averages=float(rng.choice([1.0, 2.0])),
        pixel_bandwidth_hz=float(round(rng.uniform(180, 300))), percent_sampling=float(rng.choice([70.0, 75.0, 80.0, 100.0])),
    )
