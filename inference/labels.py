"""The one table of labels, structures and planes, shared by phantoms, training and inference.

Everything that needs a label order (CSV columns, model heads, SR content, SEG segment
numbers, NIfTI label maps) reads it from here, so the order can never drift between the
generator, the trainer and the node.
"""
from __future__ import annotations

from dataclasses import dataclass

PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")

JOINTS: tuple[str, ...] = ("knee", "ankle", "shoulder")


@dataclass(frozen=True)
class Label:
    """One diagnostic label: its CSV/model key and the words a radiologist reads."""

    key: str
    name: str


JOINT_LABELS: dict[str, tuple[Label, ...]] = {
    "knee": (
        Label("acl", "Anterior cruciate ligament tear"),
        Label("pcl", "Posterior cruciate ligament tear"),
        Label("mm", "Medial meniscus tear"),
        Label("lm", "Lateral meniscus tear"),
        Label("mcl", "Medial collateral ligament injury"),
        Label("lcl", "Lateral collateral ligament injury"),
        Label("pd", "Patellar dislocation"),
        Label("effusion", "Joint effusion"),
    ),
    "ankle": (
        Label("atfl", "Anterior talofibular ligament injury"),
        Label("cfl", "Calcaneofibular ligament injury"),
        Label("atr", "Achilles tendon rupture"),
        Label("olt", "Osteochondral lesion of the talus"),
    ),
    "shoulder": (
        Label("ssp", "Supraspinatus tendon tear"),
        Label("isp", "Infraspinatus tendon tear"),
        Label("ssc", "Subscapularis tendon tear"),
        Label("lhbt", "Long head of biceps tendon injury"),
        Label("ac", "Acromioclavicular joint lesion"),
        Label("ghj", "Glenohumeral joint lesion or effusion"),
        Label("lhbt_effusion", "Long head of biceps tendon sheath effusion"),
        Label("sasd", "Subacromial-subdeltoid bursitis"),
    ),
}


def label_keys(joint: str) -> tuple[str, ...]:
    """Label keys of ``joint`` in model/CSV order."""
    try:
        return tuple(label.key for label in JOINT_LABELS[joint])
    except KeyError:
        raise ValueError(f"joint must be one of {JOINTS}, got {joint!r}") from None


@dataclass(frozen=True)
class Structure:
    """One segmented knee structure; ``index`` is its value in label maps and its SEG segment number."""

    index: int
    key: str
    name: str


KNEE_STRUCTURES: tuple[Structure, ...] = (
    Structure(1, "femur", "Femur"),
    Structure(2, "tibia", "Tibia"),
    Structure(3, "fibula", "Fibula"),
    Structure(4, "patella", "Patella"),
    Structure(5, "femoral_cartilage", "Femoral cartilage"),
    Structure(6, "tibial_cartilage", "Tibial cartilage"),
    Structure(7, "patellar_cartilage", "Patellar cartilage"),
    Structure(8, "medial_meniscus", "Medial meniscus"),
    Structure(9, "lateral_meniscus", "Lateral meniscus"),
    Structure(10, "acl", "Anterior cruciate ligament"),
    Structure(11, "pcl", "Posterior cruciate ligament"),
)

STRUCTURE_INDEX: dict[str, int] = {s.key: s.index for s in KNEE_STRUCTURES}

#: number of segmentation classes including background (0)
NUM_SEG_CLASSES = len(KNEE_STRUCTURES) + 1
