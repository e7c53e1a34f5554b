"""The models a node serves, one per joint, chosen per study by the joint its headers name.

``node.yaml`` names them (``model.checkpoints: {knee: ..., ankle: ..., shoulder: ...}``, or the
single ``model.checkpoint``).  :class:`ModelSet` holds the loaded bundles, checks that each
card's joint is the joint it is configured for, and answers ``for_joint``: the pipeline
(:func:`inference.pipeline.run_study`) detects the study's joint and takes that model; a joint
without one stays unsupported, with the reason.

Bundles fine-tuned from the same pretrained backbones with those backbones frozen (the
ankle and shoulder classifiers transferred from the knee, for example) hold identical
backbone weights.  Their cards say so (``ModelCard.backbones``, a sha256 per backbone), and
the set keeps one copy of each: the duplicates are replaced by the first bundle's module
after a tensor-by-tensor comparison, so memory grows with the distinct weights, not with the
number of joints.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from inference.labels import JOINTS

if TYPE_CHECKING:
    import torch

    from inference.checkpoint import ModelBundle, ModelCard

log = logging.getLogger(__name__)

__all__ = ["ModelSet", "ModelSetError", "check_cards"]


class ModelSetError(ValueError):
    """A configured model does not fit its place (wrong joint, unknown joint key); the message
    names the key and the file."""


def _check_joint(key: str, card: ModelCard, source: str) -> None:
    if key not in JOINTS:
        raise ModelSetError(f"model.checkpoints: unknown joint {key!r}; joints are {list(JOINTS)}")
    if card.joint != key:
        raise ModelSetError(
            f"model.checkpoints.{key}: {source} holds model {card.name!r} {card.version} for the {card.joint}, "
            f"not the {key}"
        )


def check_cards(paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, ModelCard]:
    """Read the card of each configured checkpoint (no networks built) and check its joint.

    Raises :class:`FileNotFoundError` naming the key for a missing file,
    :class:`inference.checkpoint.CheckpointError` for an unreadable one and
    :class:`ModelSetError` for a card of another joint.
    """
    from inference.checkpoint import read_card

    cards: dict[str, ModelCard] = {}
    for key, path in paths.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoints.{key}: {path} does not exist")
        cards[key] = read_card(path)
        _check_joint(key, cards[key], str(path))
    return cards


class ModelSet:
    """Loaded model bundles by joint.  ``ModelSet({"knee": bundle, ...})``, :meth:`single` or :meth:`load`."""

    def __init__(self, bundles: Mapping[str, ModelBundle], *, share: bool = True, release_memory: bool = True) -> None:
        if not bundles:
            raise ModelSetError("a model set needs at least one model")
        for key, bundle in bundles.items():
            _check_joint(key, bundle.card, f"model {bundle.card.name!r}")
        self._bundles = {joint: bundles[joint] for joint in JOINTS if joint in bundles}
        #: ``(joint, backbone name)`` of each module replaced by an identical one of another model
        self.shared: list[tuple[str, str, str, str]] = self._share_backbones() if share else []
        if release_memory:  # after loading; a full garbage collection costs about 0.2 s
            _release_freed_memory()

    @classmethod
    def single(cls, bundle: ModelBundle, *, release_memory: bool = True) -> ModelSet:
        """One model, for the joint its card names.  ``release_memory=False`` for a bundle that
        is already held (no heap trim, which costs a garbage collection)."""
        return cls({bundle.card.joint: bundle}, release_memory=release_memory)

    @classmethod
    def load(cls, paths: Mapping[str, str | os.PathLike[str]], map_location: str = "cpu") -> ModelSet:
        """Load each configured checkpoint once (cards checked first, so a wrong file fails fast)."""
        from inference.checkpoint import ModelBundle

        check_cards(paths)
        bundles = {}
        for key, path in paths.items():
            bundles[key] = ModelBundle.load(path, map_location=map_location)
            log.info("model for the %s: %s %s from %s", key, bundles[key].card.name, bundles[key].card.version, path)
        return cls(bundles)

    # -- lookup --------------------------------------------------------------------------

    @property
    def joints(self) -> list[str]:
        return list(self._bundles)

    def __len__(self) -> int:
        return len(self._bundles)

    def __iter__(self) -> Iterator[tuple[str, ModelBundle]]:
        return iter(self._bundles.items())

    def for_joint(self, joint: str) -> ModelBundle | None:
        return self._bundles.get(joint)

    def missing_reason(self, joint: str) -> str:
        """Why a study of ``joint`` gets no result (the pipeline's unsupported reason)."""
        if len(self._bundles) == 1:
            bundle = next(iter(self._bundles.values()))
            return (f"the study is of the {joint} but model {bundle.card.name!r} {bundle.card.version} is for the "
                    f"{bundle.card.joint}")
        have = ", ".join(f"{j} ({b.card.name!r} {b.card.version})" for j, b in self._bundles.items())
        return f"the study is of the {joint} and the node has no model for the {joint} (models: {have})"

    def to(self, device: str | torch.device) -> ModelSet:
        """Move every model (the shared backbones move once, with the first)."""
        import torch

        target = torch.device(device)
        for bundle in self._bundles.values():
            if bundle.device != target:
                bundle.to(target)
        return self

    # -- sharing -------------------------------------------------------------------------

    def _share_backbones(self) -> list[tuple[str, str, str, str]]:
        """Replace each backbone that equals one already kept by that one; see the module docstring."""
        import torch

        kept: dict[str, tuple[str, str, torch.nn.Module]] = {}  # fingerprint -> (joint, name, module)
        shared = []
        for joint, bundle in self._bundles.items():
            modules = bundle.backbone_modules()
            prints = dict(bundle.card.backbones)
            for name, module in modules.items():
                fingerprint = prints.get(name)
                if fingerprint is None:  # an older card: fingerprint the weights here
                    from inference.checkpoint import weights_fingerprint

                    fingerprint = weights_fingerprint(module)
                first = kept.get(fingerprint)
                if first is None:
                    kept[fingerprint] = (joint, name, module)
                    continue
                if first[2] is module:
                    continue
                if not _same_weights(first[2], module):
                    log.warning("model for the %s: backbone %s has the fingerprint of the %s's %s but other weights; "
                                "not shared", joint, name, first[0], first[1])
                    continue
                _replace_backbone(bundle, name, first[2])
                shared.append((joint, name, first[0], first[1]))
                log.info("model for the %s: backbone %s shares the weights of the %s's %s", joint, name, first[0],
                         first[1])
        return shared


def _release_freed_memory() -> None:
    """Hand the memory freed after loading back to the operating system.

    Loading leaves freed buffers (the state dicts read from disk, and the replaced duplicate
    backbones) in the C allocator's heap, where they stay as resident slack unless the heap is
    trimmed (glibc's ``malloc_trim``); without this the resident memory would not show the
    sharing.  A no-op where the C library has no ``malloc_trim``.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )


def _replace_backbone(bundle: ModelBundle, name: str, module: torch.nn.Module) -> None:
    if name == "segmenter":
        bundle.segmenter.extractor.backbone = module
    else:
        plane = name.removeprefix("classifier.")
        bundle.classifier.encoders[plane].extractor.backbone = module
