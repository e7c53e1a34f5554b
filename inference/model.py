"""The OrthoDiffusion model: per-plane 3D diffusion UNets used as feature extractors.

Why one module of about 1,100 lines: the backbone, the feature path, the heads and the MONAI
baselines are built from one :class:`ModelConfig` and saved in one checkpoint format; kept
together, one file says how a configuration becomes a network.

Three objects, kept apart as in MONAI (network, noise schedule, procedure):

* :class:`DiffusionBackbone` holds one plane's ``DiffusionModelUNet`` (3D, epsilon prediction)
  and its ``DDPMScheduler`` (cosine, T = 1000).  Pre-training minimises the L2 error of the
  predicted noise at a uniformly drawn timestep (:meth:`DiffusionBackbone.training_loss`).
* :class:`FeatureExtractor` noises a volume with the forward process at a fixed timestep
  (``q_sample``) and runs *only* the UNet layers needed to reach a named block (``mid_2`` by
  default); the decoder runs only when a decoder block (``up_<i>``) is configured.
* Heads: :class:`AttentionPool` + linear head per plane or on the concatenation of planes
  (:class:`OrthoDiffusionClassifier`, with optional EHR late fusion in :class:`EHRFusion`), and
  a transposed-convolution decoder from the bottleneck (:class:`OrthoDiffusionSegmenter`).
* Supervised baselines, for the label-efficiency benchmark and for anyone who wants to compare:
  ``ModelConfig.classifier_backbone = "monai_resnet18"`` swaps each plane's diffusion encoder
  for MONAI's 3D ResNet-18 (:class:`ResNetPlaneEncoder`) under the *same* fusion (per-plane
  standardisation, concatenation, EHR late fusion); ``ModelConfig.segmenter_backbone =
  "monai_unet" | "monai_segresnet"`` makes the segmenter MONAI's 3D ``UNet`` or ``SegResNet``
  (:class:`MonaiSegmenter`).  They have no pretraining; every weight trains at the full rate.

Reference hyper-parameters (``PRESETS["paper"]``) follow docs/method.md: input
1 x 16 x 256 x 256, widths 64 x (1, 1, 2, 2, 4), one residual block per level, attention at
the lowest level and in the middle block, isotropic 2x2x2 downsampling, so a 1 x 16 x 256 x 256
input gives a 256 x 1 x 16 x 16 bottleneck.  ``num_head_channels = 64`` gives the UNet's
attention 4 heads of 64 channels at width 256, which is what a guided-diffusion UNet uses at
that width (4 heads by default, or 64 channels per head); the pooling attention uses 16 heads.

Block names, for a UNet with ``L = len(channels)`` levels:

* ``down_<i>`` (0 <= i < L): the hidden state leaving encoder level ``i`` (after its stride-2
  convolution when the level has one, i.e. for i < L - 1);
* ``mid_0`` after the middle block's first residual block, ``mid_1`` after its attention,
  ``mid_2`` after its second residual block (the bottleneck);
* ``up_<i>`` (0 <= i < L): the hidden state leaving decoder level ``i`` (counted from the
  bottleneck; after its upsampling when it has one).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import field, fields
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import Tensor, nn

from inference.labels import NUM_SEG_CLASSES, PLANES
from inference.validated import plain_errors, sequence

__all__ = [
    "EHR_FEATURES",
    "EHR_STANDARDISATION",
    "PRESETS",
    "AttentionPool",
    "DiffusionBackbone",
    "EHRFusion",
    "FeatureExtractor",
    "CLASSIFIER_BACKBONES",
    "FeaturePoint",
    "ModelConfig",
    "MonaiSegmenter",
    "OrthoDiffusionClassifier",
    "OrthoDiffusionSegmenter",
    "PlaneEncoder",
    "ResNetPlaneEncoder",
    "SEGMENTER_BACKBONES",
    "encode_ehr",
    "ehr_from_dicom",
    "make_plane_encoder",
    "make_segmenter",
    "model_config",
]

#: segmentation heads (:class:`OrthoDiffusionSegmenter`): the reference's transposed-convolution
#: decoder from the bottleneck, or the diffusion UNet's own decoder with its skip connections
SEG_HEADS: tuple[str, ...] = ("bottleneck", "unet")

#: per-plane feature extractors of :class:`OrthoDiffusionClassifier`: the diffusion UNet (the
#: method), or MONAI's 3D ResNet-18 (a supervised baseline, :class:`ResNetPlaneEncoder`).
#: MONAI's DenseNet121 is not offered: it halves the depth five times, so a 16-slice input
#: (every preset's) is pooled to nothing before its last dense block.
CLASSIFIER_BACKBONES: tuple[str, ...] = ("diffusion_unet", "monai_resnet18")

#: segmentation networks: the diffusion UNet with a ``seg_head`` (the method), or MONAI's 3D
#: ``UNet`` / ``SegResNet`` trained from scratch (supervised baselines, :class:`MonaiSegmenter`)
SEGMENTER_BACKBONES: tuple[str, ...] = ("diffusion_unet", "monai_unet", "monai_segresnet")

_BLOCK_RE = re.compile(r"^(mid)_([012])$|^(down|up)_(\d+)$")


# --------------------------------------------------------------------------- configuration


#: what ``FeaturePoint.block`` may be (whether its level exists is checked against a ModelConfig)
_BLOCK_FORMS = "'mid_0', 'mid_1', 'mid_2', 'down_<i>' or 'up_<i>'"

#: unknown keys are errors; the scalar fields below are ``Strict`` (no "8", 8.0 or True for an
#: int), and a tuple may be given as a list (what a checkpoint's card stores) or a tuple
_CONFIG = ConfigDict(extra="forbid")

_PositiveInt = Annotated[int, Strict(), Field(gt=0)]
_NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
_Sizes = Annotated[tuple[_PositiveInt, ...], BeforeValidator(sequence), Field(min_length=1)]


def _check_block(block: str) -> str:
    if not _BLOCK_RE.match(block):
        raise ValueError(f"must be {_BLOCK_FORMS}, got {block!r}")
    return block


@plain_errors
@pydantic_dataclass(frozen=True, config=_CONFIG)
class FeaturePoint:
    """Where the features of one plane are taken: forward-process noise level and UNet block."""

    timestep: _NonNegativeInt = 100
    block: Annotated[str, Strict(), AfterValidator(_check_block)] = "mid_2"

    def to_dict(self) -> dict[str, Any]:
        return {"timestep": self.timestep, "block": self.block}


def _default_points() -> dict[str, FeaturePoint]:
    return {plane: FeaturePoint() for plane in PLANES}


@plain_errors
@pydantic_dataclass(frozen=True, config=_CONFIG)
class ModelConfig:
    """Every number needed to rebuild an OrthoDiffusion model; stored in each checkpoint's card.

    ``seg_decoder_channels`` are the output widths of the segmentation decoder's transposed
    convolutions, one per encoder downsampling (``len(channels) - 1`` of them); the default
    mirrors the encoder widths (128, 128, 64, 64) because the reference gives no widths.
    ``seg_head`` is ``"bottleneck"`` (the reference's decoder) or ``"unet"`` (the diffusion
    UNet's own decoder with skip connections; see :class:`OrthoDiffusionSegmenter`).
    ``seg_timestep`` is the forward-process noise level of the segmenter's input (0: nearly
    clean; the bottleneck features of a diffusion UNet are trained on noised inputs only).
    ``feature_noise_seed`` seeds the fixed noise used for q_sample in evaluation mode, so
    that the same study always gives the same result, whatever batch it is part of.

    ``classifier_backbone`` (:data:`CLASSIFIER_BACKBONES`) and ``segmenter_backbone``
    (:data:`SEGMENTER_BACKBONES`) choose the networks; anything but ``"diffusion_unet"`` is a
    supervised baseline without pretraining.  The baselines' widths follow ``channels``:
    ResNet-18's four stages are ``channels[0]`` x (1, 2, 4, 8) (MONAI's ``widen_factor =
    channels[0] / 64``, so the ``paper`` preset gets the standard ResNet-18), the MONAI
    ``UNet`` has the diffusion UNet's ``channels`` with one stride-2 step per level after the
    first and two residual units per level, and ``SegResNet`` starts at ``channels[0]``
    filters with GroupNorm of ``norm_num_groups`` groups.

    A pydantic dataclass (frozen; lists are accepted for the tuples): each field's type and
    range is checked by pydantic, the rules that tie fields together by :meth:`_check_geometry`;
    an invalid configuration raises ``ValueError`` naming the field.
    """

    input_shape: Annotated[tuple[_PositiveInt, ...], BeforeValidator(sequence), Field(min_length=3, max_length=3)] = (
        16, 256, 256,
    )
    channels: _Sizes = (64, 64, 128, 128, 256)
    attention_levels: Annotated[tuple[Annotated[bool, Strict()], ...], BeforeValidator(sequence)] = (
        False, False, False, False, True,
    )
    num_res_blocks: _PositiveInt = 1
    num_head_channels: _PositiveInt = 64
    norm_num_groups: _PositiveInt = 32
    num_train_timesteps: _PositiveInt = 1000
    schedule: Annotated[str, Strict()] = "cosine"
    pool_heads: _PositiveInt = 16
    feature_points: Annotated[dict[Literal[PLANES], FeaturePoint], Field(min_length=1)] = field(
        default_factory=_default_points, hash=False
    )
    ehr_hidden: _PositiveInt = 64
    seg_decoder_channels: _Sizes = (128, 128, 64, 64)
    seg_timestep: _NonNegativeInt = 0
    seg_head: Literal[SEG_HEADS] = "bottleneck"
    feature_noise_seed: _NonNegativeInt = 0
    flash_attention: Annotated[bool, Strict()] = True
    classifier_backbone: Literal[CLASSIFIER_BACKBONES] = "diffusion_unet"
    segmenter_backbone: Literal[SEGMENTER_BACKBONES] = "diffusion_unet"

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelConfig:
        """The rules between fields: widths, heads and groups that divide, shapes that halve."""
        if self.segmenter_backbone == "monai_segresnet":
            for axis, size in zip("DHW", self.input_shape):
                if size % 8:  # SegResNet's three stride-2 stages
                    raise ValueError(
                        f"ModelConfig.segmenter_backbone='monai_segresnet' needs every input size divisible by 8; "
                        f"input_shape {self.input_shape} has {axis}={size}"
                    )
        levels = len(self.channels)
        if len(self.attention_levels) != levels:
            raise ValueError(
                f"ModelConfig.attention_levels has {len(self.attention_levels)} entries; channels has {levels}"
            )
        for width in self.channels + self.seg_decoder_channels:
            if width % self.norm_num_groups:
                raise ValueError(
                    f"ModelConfig.norm_num_groups={self.norm_num_groups} must divide every width in channels "
                    f"and seg_decoder_channels (got {width})"
                )
        for width, attn in zip(self.channels, self.attention_levels):
            if attn and width % self.num_head_channels:
                raise ValueError(
                    f"ModelConfig.num_head_channels={self.num_head_channels} must divide the width {width} of "
                    "every attention level"
                )
        if self.channels[-1] % self.num_head_channels:
            raise ValueError(
                f"ModelConfig.num_head_channels={self.num_head_channels} must divide the middle-block width "
                f"{self.channels[-1]}"
            )
        factor = 2 ** (levels - 1)
        for axis, size in zip("DHW", self.input_shape):
            if size % factor:
                raise ValueError(
                    f"ModelConfig.input_shape {self.input_shape}: {axis}={size} is not divisible by "
                    f"2**{levels - 1}={factor} (one 2x2x2 downsampling per level after the first)"
                )
        if len(self.seg_decoder_channels) != levels - 1:
            raise ValueError(
                f"ModelConfig.seg_decoder_channels needs {levels - 1} widths (one per downsampling), "
                f"got {len(self.seg_decoder_channels)}"
            )
        if self.schedule not in _known_schedules():
            raise ValueError(f"ModelConfig.schedule must be one of {sorted(_known_schedules())}, got {self.schedule!r}")
        if self.seg_timestep >= self.num_train_timesteps:
            raise ValueError(
                f"ModelConfig.seg_timestep={self.seg_timestep} must be < num_train_timesteps={self.num_train_timesteps}"
            )
        # The pooling attention runs on whatever block a plane is configured to use.
        for plane, point in self.feature_points.items():
            if point.timestep >= self.num_train_timesteps:
                raise ValueError(
                    f"ModelConfig.feature_points[{plane!r}].timestep={point.timestep} must be < "
                    f"num_train_timesteps={self.num_train_timesteps}"
                )
            try:
                width = self.block_channels(point.block)
            except ValueError as err:
                raise ValueError(f"ModelConfig.feature_points[{plane!r}]: {err}") from None
            if width % self.pool_heads:
                raise ValueError(
                    f"ModelConfig.pool_heads={self.pool_heads} must divide the width {width} of block "
                    f"{point.block!r} used by feature_points[{plane!r}]"
                )
        return self

    # -- geometry ------------------------------------------------------------------------

    @property
    def num_levels(self) -> int:
        return len(self.channels)

    def block_channels(self, block: str) -> int:
        """Number of channels of the activation at ``block``."""
        kind, index = parse_block(block, self.num_levels)
        if kind == "mid":
            return self.channels[-1]
        if kind == "down":
            return self.channels[index]
        return self.channels[::-1][index]

    def block_shape(self, block: str) -> tuple[int, int, int]:
        """Spatial size (d, h, w) of the activation at ``block`` for an ``input_shape`` volume."""
        kind, index = parse_block(block, self.num_levels)
        last = self.num_levels - 1
        if kind == "mid":
            downs = last
        elif kind == "down":
            downs = min(index + 1, last)
        else:
            downs = max(last - index - 1, 0)
        return tuple(s // 2**downs for s in self.input_shape)  # type: ignore[return-value]

    @property
    def bottleneck_shape(self) -> tuple[int, int, int, int]:
        """(C, d, h, w) of the middle block's output."""
        return (self.channels[-1], *self.block_shape("mid_2"))

    def point(self, plane: str) -> FeaturePoint:
        try:
            return self.feature_points[plane]
        except KeyError:
            raise ValueError(
                f"ModelConfig.feature_points has no entry for plane {plane!r} (has {sorted(self.feature_points)})"
            ) from None

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists, ints, strs, bools), so it loads with ``weights_only=True``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "feature_points":
                value = {plane: point.to_dict() for plane, point in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build and validate a config; missing keys take the defaults, unknown keys are errors."""
        if not isinstance(d, Mapping):
            raise TypeError(f"model configuration must be a mapping, got {type(d).__name__}")
        return cls(**d)


def _known_schedules() -> set[str]:
    from monai.networks.schedulers.scheduler import NoiseSchedules

    return set(NoiseSchedules.names) if hasattr(NoiseSchedules, "names") else set(NoiseSchedules.keys())


def parse_block(block: str, num_levels: int) -> tuple[str, int]:
    """``"mid_2"`` -> ("mid", 2); ``"up_1"`` -> ("up", 1); errors name the block and the range."""
    match = _BLOCK_RE.match(block) if isinstance(block, str) else None
    if not match:
        raise ValueError(f"block must be 'mid_0', 'mid_1', 'mid_2', 'down_<i>' or 'up_<i>', got {block!r}")
    if match.group(1):
        return "mid", int(match.group(2))
    kind, index = match.group(3), int(match.group(4))
    if index >= num_levels:
        raise ValueError(f"block {block!r}: the UNet has {num_levels} levels, so i must be < {num_levels}")
    return kind, index


PRESETS: dict[str, ModelConfig] = {
    # The reference sizes (method.md); features at t = 100, mid_2 for every plane.
    "paper": ModelConfig(),
    # The reference's best fusion run: per-plane (t, block).
    "paper_fusion": ModelConfig(
        feature_points={
            "sagittal": FeaturePoint(200, "mid_0"),
            "coronal": FeaturePoint(150, "mid_0"),
            "axial": FeaturePoint(50, "mid_2"),
        }
    ),
    # The paper's depth pattern at a size a CPU trains in minutes: 16 x 64 x 64 -> 64 x 1 x 4 x 4.
    "small": ModelConfig(
        input_shape=(16, 64, 64),
        channels=(16, 16, 32, 32, 64),
        num_head_channels=32,
        norm_num_groups=8,
        pool_heads=8,
        ehr_hidden=32,
        seg_decoder_channels=(32, 32, 16, 16),
        # measured on phantoms (48 training cases, 400 steps from scratch, 12 unseen cases of the
        # held-out site): mean Dice 0.46 with the UNet decoder head against 0.33 with the bottleneck head
        seg_head="unet",
    ),
    # For tests: 8 x 32 x 32, three downsamplings -> 16 x 1 x 4 x 4; a forward takes milliseconds.
    "tiny": ModelConfig(
        input_shape=(8, 32, 32),
        channels=(8, 8, 16, 16),
        attention_levels=(False, False, False, True),
        num_head_channels=8,
        norm_num_groups=4,
        pool_heads=4,
        ehr_hidden=16,
        seg_decoder_channels=(16, 8, 8),
    ),
}


def model_config(name_or_dict: str | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A preset by name, a config dict (optionally ``{"preset": name, **overrides}``), or a config."""
    if isinstance(name_or_dict, ModelConfig):
        return name_or_dict
    if isinstance(name_or_dict, str):
        try:
            return PRESETS[name_or_dict]
        except KeyError:
            raise ValueError(f"unknown model preset {name_or_dict!r}; presets are {sorted(PRESETS)}") from None
    if isinstance(name_or_dict, Mapping):
        d = dict(name_or_dict)
        preset = d.pop("preset", None)
        if preset is None:
            return ModelConfig.from_dict(d)
        base = model_config(str(preset)).to_dict()
        base.update(d)
        return ModelConfig.from_dict(base)
    raise TypeError(f"model configuration must be a preset name or a mapping, got {type(name_or_dict).__name__}")


# --------------------------------------------------------------------------- backbone


class DiffusionBackbone(nn.Module):
    """One plane's 3D diffusion UNet (epsilon prediction) with its cosine DDPM noise schedule."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            num_res_blocks=cfg.num_res_blocks,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=cfg.num_head_channels,
            resblock_updown=False,
            use_flash_attention=cfg.flash_attention,
        )
        # The scheduler holds no parameters: it is a plain attribute, not a submodule.
        self.scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule, prediction_type="epsilon"
        )

    # -- diffusion ---------------------------------------------------------------------

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """Predicted noise for noisy volumes ``x`` (B, 1, D, H, W) at ``timesteps`` (B,)."""
        return self.unet(x, timesteps)

    def q_sample(self, x: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        """Forward process: sqrt(abar_t) x + sqrt(1 - abar_t) noise, from the scheduler's table."""
        return self.scheduler.add_noise(original_samples=x, noise=noise, timesteps=timesteps)

    def sample_training_inputs(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(noisy, timesteps, noise)`` for one pre-training step: t uniform in [0, T), noise N(0, I).

        Separate from :meth:`training_loss` so that a DistributedDataParallel wrapper can call
        the module's ``forward(noisy, timesteps)`` itself (DDP synchronises gradients only
        through ``forward``) and compare the prediction with ``noise``.
        """
        _check_volume(x, self.cfg, "x")
        gen_device = generator.device if generator is not None else x.device
        timesteps = torch.randint(
            0, self.cfg.num_train_timesteps, (x.shape[0],), generator=generator, device=gen_device
        ).to(x.device)
        noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        return self.q_sample(x, timesteps, noise), timesteps, noise

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pre-training objective: mean squared error of the predicted noise at uniform t."""
        noisy, timesteps, noise = self.sample_training_inputs(x, generator)
        return F.mse_loss(self.unet(noisy, timesteps).float(), noise.float())

    # -- partial forward passes --------------------------------------------------------

    def run_to(self, x: Tensor, timesteps: Tensor, block: str) -> Tensor:
        """Run the UNet on (already noised) ``x`` only as far as ``block`` and return its activation.

        Mirrors ``DiffusionModelUNet.forward`` step by step; the decoder and output layers run
        only for an ``up_<i>`` block, and then only up to decoder level ``i``.
        """
        kind, index = parse_block(block, self.cfg.num_levels)
        unet = self.unet
        emb = unet.time_embed(_timestep_embedding(timesteps, self.cfg.channels[0]).to(dtype=x.dtype))
        h = unet.conv_in(x)
        skips: list[Tensor] = [h]
        for level, down in enumerate(unet.down_blocks):
            h, res = down(hidden_states=h, temb=emb)
            skips.extend(res)
            if kind == "down" and level == index:
                return h
        mid = unet.middle_block
        h = mid.resnet_1(h, emb)
        if kind == "mid" and index == 0:
            return h
        h = mid.attention(h).contiguous()
        if kind == "mid" and index == 1:
            return h
        h = mid.resnet_2(h, emb)
        if kind == "mid":
            return h
        for level, up in enumerate(unet.up_blocks):
            n = len(up.resnets)
            res, skips = skips[-n:], skips[:-n]
            h = up(hidden_states=h, res_hidden_states_list=res, temb=emb)
            if level == index:
                return h
        raise AssertionError(f"unreachable: block {block!r}")  # parse_block bounds the index

    def modules_for(self, block: str) -> list[nn.Module]:
        """The UNet sub-modules that :meth:`run_to` uses to reach ``block`` (for fine-tuning)."""
        kind, index = parse_block(block, self.cfg.num_levels)
        unet = self.unet
        used: list[nn.Module] = [unet.time_embed, unet.conv_in]
        if kind == "down":
            return used + list(unet.down_blocks[: index + 1])
        used += list(unet.down_blocks) + [unet.middle_block]
        if kind == "up":
            used += list(unet.up_blocks[: index + 1])
        return used

    def parameters_for(self, block: str) -> Iterator[nn.Parameter]:
        for module in self.modules_for(block):
            yield from module.parameters()


def _timestep_embedding(timesteps: Tensor, dim: int) -> Tensor:
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    return get_timestep_embedding(timesteps, dim)


def _check_volume(x: Tensor, cfg: ModelConfig, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 5 or x.shape[1] != 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, 1, D, H, W) tensor, got {shape}")
    if tuple(x.shape[2:]) != cfg.input_shape:
        raise ValueError(f"{name} has spatial shape {tuple(x.shape[2:])}; the model expects {cfg.input_shape}")


# --------------------------------------------------------------------------- features


class FeatureExtractor(nn.Module):
    """q_sample at a fixed timestep, then the UNet up to one block.

    In training mode (of the backbone) fresh noise is drawn per sample.  In evaluation mode,
    unless ``noise`` is given, one fixed noise volume drawn from ``cfg.feature_noise_seed`` is
    used for every sample: a study's features do not depend on the run, the device's random
    state or the other studies in its batch.
    """

    def __init__(self, backbone: DiffusionBackbone, point: FeaturePoint) -> None:
        super().__init__()
        if point.timestep >= backbone.cfg.num_train_timesteps:
            raise ValueError(
                f"FeaturePoint.timestep={point.timestep} must be < num_train_timesteps="
                f"{backbone.cfg.num_train_timesteps}"
            )
        self.backbone = backbone
        self.point = point
        self.out_channels = backbone.cfg.block_channels(point.block)
        self._fixed_noise: dict[tuple[Any, ...], Tensor] = {}

    def fixed_noise(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The evaluation-mode noise for one sample of ``shape`` (C, D, H, W), cached per device."""
        key = (tuple(shape), str(device), dtype)
        if key not in self._fixed_noise:
            gen = torch.Generator().manual_seed(self.backbone.cfg.feature_noise_seed)
            self._fixed_noise[key] = torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)
        return self._fixed_noise[key]

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        _check_volume(x, self.backbone.cfg, "x")
        if noise is None:
            if self.backbone.training:
                noise = torch.randn_like(x)
            else:
                noise = self.fixed_noise(x.shape[1:], x.device, x.dtype).expand_as(x)
        elif noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; x has {tuple(x.shape)}")
        timesteps = torch.full((x.shape[0],), self.point.timestep, dtype=torch.long, device=x.device)
        return self.backbone.run_to(self.backbone.q_sample(x, timesteps, noise), timesteps, self.point.block)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Only the parameters this extractor runs through (encoder + middle, decoder if used)."""
        return self.backbone.parameters_for(self.point.block)


class AttentionPool(nn.Module):
    """Self-attention pooling: multi-head QKV attention over the d*h*w tokens, mean over tokens,
    output projection; concatenated with the global average -> (B, 2C)."""

    def __init__(self, channels: int, num_heads: int = 16) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionPool: num_heads={num_heads} must divide channels={channels}")
        self.channels = channels
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.out_features = 2 * channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(f"AttentionPool expects (B, {self.channels}, d, h, w), got {tuple(x.shape)}")
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        heads = self.num_heads
        q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        attended = attended.transpose(1, 2).reshape(b, -1, c)
        pooled = self.proj(attended.mean(dim=1))
        return torch.cat([pooled, tokens.mean(dim=1)], dim=1)


class PlaneEncoder(nn.Module):
    """One plane: features at its FeaturePoint, pooled to a (B, 2C) vector."""

    def __init__(self, backbone: DiffusionBackbone, point: FeaturePoint, pool_heads: int | None = None) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, point)
        self.pool = AttentionPool(self.extractor.out_channels, pool_heads or backbone.cfg.pool_heads)
        self.out_features = self.pool.out_features

    @property
    def backbone(self) -> DiffusionBackbone:
        return self.extractor.backbone

    def forward(self, x: Tensor, noise: Tensor | None = None, *, precomputed: bool = False) -> Tensor:
        """Pooled features of volumes ``x``; with ``precomputed``, ``x`` already holds the
        extractor's feature maps (a frozen backbone's, computed once per exam)."""
        return self.pool(x if precomputed else self.extractor(x, noise))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The diffusion UNet's layers on the feature path (fine-tuned at the backbone's rate)."""
        return list(self.extractor.backbone_parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """The attention pool."""
        return list(self.pool.parameters())


class _MonaiBaseline(nn.Module):
    """A supervised baseline around one MONAI network ``self.net``: checked volumes in, the
    network's output out; no pretrained backbone, so every weight is a head parameter."""

    cfg: ModelConfig
    net: nn.Module

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """The network's output for volumes (B, 1, D, H, W); ``noise`` is not used."""
        _check_volume(x, self.cfg, "x")
        return self.net(x)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return []

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())


class ResNetPlaneEncoder(_MonaiBaseline):
    """One plane of the supervised baseline: MONAI's 3D ResNet-18, global-average-pooled to a vector.

    ``monai.networks.nets.resnet18(spatial_dims=3, n_input_channels=1)`` without its final
    linear layer, widths ``channels[0]`` x (1, 2, 4, 8) (``widen_factor = channels[0] / 64``),
    so it gives ``8 * channels[0]`` features per plane.  Random initialisation, no pretraining:
    all its weights count as head parameters, trained at the head's (full) learning rate.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from monai.networks.nets import resnet18

        self.cfg = cfg
        self.net = resnet18(
            spatial_dims=3, n_input_channels=1, widen_factor=cfg.channels[0] / 64, feed_forward=False,
            conv1_t_stride=1, shortcut_type="B",
        )
        self.out_features = 8 * cfg.channels[0]



def make_plane_encoder(cfg: ModelConfig, plane: str) -> nn.Module:
    """The per-plane feature extractor that ``cfg.classifier_backbone`` names."""
    if cfg.classifier_backbone == "monai_resnet18":
        return ResNetPlaneEncoder(cfg)
    return PlaneEncoder(DiffusionBackbone(cfg), cfg.point(plane))


# --------------------------------------------------------------------------- EHR

#: order of the EHR vector built by :func:`encode_ehr`
EHR_FEATURES: tuple[str, ...] = ("age", "height", "weight", "sex_male", "sex_female")

#: (mean, standard deviation) used to standardise each continuous value: broad adult
#: orthopaedic-outpatient figures (age in years, height in metres, weight in kilograms).
EHR_STANDARDISATION: dict[str, tuple[float, float]] = {
    "age": (45.0, 18.0),
    "height": (1.70, 0.10),
    "weight": (75.0, 15.0),
}

_EHR_RANGES = {"age": (0.0, 130.0), "height": (0.3, 2.6), "weight": (1.0, 400.0)}


def encode_ehr(
    age: float | str | None,
    sex: str | None,
    height_m: float | None,
    weight_kg: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The EHR input of :class:`EHRFusion`: ``(values, mask)``, both float32 of shape (5,).

    Order: :data:`EHR_FEATURES`.  ``mask`` is 1 where the value is known and 0 where it is
    missing (``None``, NaN, empty); a missing value is stored as 0 and never imputed.  Sex
    is one-hot (M, F); DICOM's ``"O"`` (other) is known but sets neither bit.  ``age`` may
    be a DICOM Age String (``"045Y"``, ``"006M"``, ``"010W"``, ``"020D"``).  A value outside a
    plausible range (e.g. a height in centimetres) raises ``ValueError`` naming the field.
    """
    values = np.zeros(len(EHR_FEATURES), dtype=np.float32)
    mask = np.zeros(len(EHR_FEATURES), dtype=np.float32)
    for i, (name, raw) in enumerate((("age", age), ("height", height_m), ("weight", weight_kg))):
        value = _parse_age(raw) if name == "age" else _parse_number(name, raw)
        if value is None:
            continue
        low, high = _EHR_RANGES[name]
        if not low <= value <= high:
            raise ValueError(f"EHR {name}={raw!r} is outside the plausible range [{low}, {high}]")
        mean, sd = EHR_STANDARDISATION[name]
        values[i] = (value - mean) / sd
        mask[i] = 1.0
    if sex is not None and not (isinstance(sex, float) and math.isnan(sex)):
        if not isinstance(sex, str):
            raise ValueError(f"EHR sex must be 'M', 'F', 'O' or None, got {sex!r}")
        code = sex.strip().upper()
        if code:
            if code not in ("M", "F", "O"):
                raise ValueError(f"EHR sex must be 'M', 'F', 'O' or None, got {sex!r}")
            values[3] = 1.0 if code == "M" else 0.0
            values[4] = 1.0 if code == "F" else 0.0
            mask[3:5] = 1.0
    return values, mask


def _parse_number(name: str, raw: Any) -> float | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, bool):
        raise ValueError(f"EHR {name} must be a number, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"EHR {name} must be a number, got {raw!r}") from None
    return None if math.isnan(value) else value


def _parse_age(raw: Any) -> float | None:
    if isinstance(raw, str):
        text = raw.strip().upper()
        match = re.fullmatch(r"(\d{1,3})([DWMY])", text)
        if match:
            divisor = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]
            return int(match.group(1)) / divisor
    return _parse_number("age", raw)


#: the DICOM attribute each EHR value is read from (PS3.3 Patient Study Module)
EHR_DICOM_KEYWORDS: dict[str, str] = {
    "age": "PatientAge",
    "sex": "PatientSex",
    "height_m": "PatientSize",
    "weight_kg": "PatientWeight",
}


def ehr_from_dicom(ds: Any) -> tuple[dict[str, Any], list[str]]:
    """The EHR values ``{age, sex, height_m, weight_kg}`` of a DICOM header, and notes on masked ones.

    The one reader of patient values from DICOM, used by the node, ``orthonode predict`` and the
    trainer's DICOM reader alike.  PatientAge is an Age String (``045Y``) and becomes years,
    PatientSize is in metres, PatientWeight in kilograms, PatientSex is ``M``, ``F`` or ``O``.
    An absent, empty or implausible value (a height written in centimetres, an age that is not
    an Age String) becomes ``None`` (masked as missing by the model) and a note says why;
    nothing is converted behind the reader's back.
    """
    values: dict[str, Any] = {}
    notes: list[str] = []
    for key, keyword in EHR_DICOM_KEYWORDS.items():
        try:
            raw = ds.get(keyword, None)
        except (ValueError, TypeError) as err:  # pydicom converts a DS/IS value on access
            values[key] = None
            notes.append(f"EHR: {keyword} cannot be read ({err}); masked as missing")
            continue
        if raw is None or str(raw).strip() == "":
            values[key] = None
            notes.append(f"EHR: {keyword} is absent; masked as missing")
            continue
        try:
            if key == "sex":
                value: Any = str(raw).strip().upper()
                encode_ehr(None, value, None, None)
            elif key == "age":
                value = _parse_age(str(raw).strip())
                encode_ehr(value, None, None, None)
            else:
                value = _parse_number(key, raw)
                encode_ehr(None, None, value if key == "height_m" else None, value if key == "weight_kg" else None)
        except (ValueError, TypeError) as err:
            values[key] = None
            notes.append(f"EHR: {keyword}={str(raw)!r} not used ({err}); masked as missing")
            continue
        values[key] = value
    return values, notes


class EHRFusion(nn.Module):
    """EHR logits from an MLP on the masked EHR vector, and the per-label late-fusion gate.

    ``p_k = sigmoid(a_k) * mri_k + (1 - sigmoid(a_k)) * ehr_k``.  The MLP sees
    ``[values * mask, mask]``, so a missing value contributes exactly what a zero with its
    mask bit off does, whatever the caller stored there.  ``a_k`` starts at 0 (equal weight).
    """

    def __init__(self, num_labels: int, hidden: int = 64, num_features: int = len(EHR_FEATURES)) -> None:
        super().__init__()
        self.num_features = num_features
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_labels)
        )
        self.gate = nn.Parameter(torch.zeros(num_labels))

    def ehr_logits(self, ehr: Tensor, ehr_mask: Tensor) -> Tensor:
        if ehr.shape != ehr_mask.shape or ehr.ndim != 2 or ehr.shape[1] != self.num_features:
            raise ValueError(
                f"ehr and ehr_mask must both be (B, {self.num_features}), got {tuple(ehr.shape)} and "
                f"{tuple(ehr_mask.shape)}"
            )
        mask = ehr_mask.to(dtype=ehr.dtype)
        values = torch.where(mask > 0, ehr, torch.zeros_like(ehr))  # also clears NaN in missing slots
        return self.mlp(torch.cat([values, mask], dim=1))

    def forward(self, mri_logits: Tensor, ehr: Tensor, ehr_mask: Tensor) -> Tensor:
        weight = torch.sigmoid(self.gate)
        return weight * mri_logits + (1.0 - weight) * self.ehr_logits(ehr, ehr_mask)


# --------------------------------------------------------------------------- heads


class OrthoDiffusionClassifier(nn.Module):
    """Multi-label classifier on one plane or on the concatenation of several planes.

    ``encoders[plane]`` holds that plane's feature extractor, chosen by
    ``cfg.classifier_backbone``: the diffusion backbone, its feature point and attention pool
    (:class:`PlaneEncoder`, the method), or MONAI's 3D ResNet-18 (:class:`ResNetPlaneEncoder`,
    the supervised baseline).  Both feed the same fusion: per-plane standardisation,
    concatenation, linear head, optional EHR late fusion with missing-value masking.
    ``backbones`` exposes the diffusion backbones alone (plane -> DiffusionBackbone) so
    pre-trained weights load per plane, without storing them twice in the state dict; a
    baseline has none.
    """

    def __init__(self, cfg: ModelConfig, planes: Sequence[str], num_labels: int, use_ehr: bool = False) -> None:
        super().__init__()
        planes = tuple(planes)
        if not planes:
            raise ValueError("OrthoDiffusionClassifier: planes must name at least one plane")
        if len(set(planes)) != len(planes):
            raise ValueError(f"OrthoDiffusionClassifier: planes {planes} repeat a plane")
        for plane in planes:
            if plane not in PLANES:
                raise ValueError(f"OrthoDiffusionClassifier: unknown plane {plane!r}; planes are {PLANES}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"OrthoDiffusionClassifier: num_labels must be a positive int, got {num_labels!r}")
        self.cfg = cfg
        self.planes = planes
        self.num_labels = num_labels
        self.use_ehr = bool(use_ehr)
        self.encoders = nn.ModuleDict({plane: make_plane_encoder(cfg, plane) for plane in planes})
        # The pooled diffusion features vary across exams by ~1 % of their magnitude; a linear
        # head on them barely moves between exams.  Each plane's features are standardised
        # across exams (running statistics at inference) before the concatenation.
        self.norms = nn.ModuleDict(
            {plane: nn.BatchNorm1d(enc.out_features) for plane, enc in self.encoders.items()}
        )
        in_features = sum(enc.out_features for enc in self.encoders.values())
        self.head = nn.Linear(in_features, num_labels)
        self.ehr = EHRFusion(num_labels, cfg.ehr_hidden) if self.use_ehr else None

    @property
    def backbones(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {plane: enc.backbone for plane, enc in self.encoders.items() if isinstance(enc, PlaneEncoder)}
        )

    def forward(
        self,
        volumes: Mapping[str, Tensor],
        ehr: Tensor | None = None,
        ehr_mask: Tensor | None = None,
        *,
        precomputed: bool = False,
    ) -> Tensor:
        """Logits (B, num_labels).  ``volumes[plane]`` is (B, 1, D, H, W), or with
        ``precomputed`` the plane's backbone feature maps (:meth:`backbone_features`).

        A plane absent from ``volumes`` (only in evaluation mode, where the node serves a study
        that lacks a series) contributes its standardised features' expected value, zero: the
        fused head then decides from the planes present.  Training needs every plane.
        With EHR fusion, ``ehr`` (B, 5) comes from :func:`encode_ehr`; ``ehr_mask`` defaults to
        "known where finite", and no ``ehr`` at all means every value is missing.
        """
        present = [p for p in self.planes if p in volumes]
        if not present:
            raise ValueError(f"volumes holds none of the model's planes {list(self.planes)}")
        if len(present) < len(self.planes) and self.training:
            missing = [p for p in self.planes if p not in volumes]
            raise ValueError(f"volumes lacks plane(s) {missing}; training needs {list(self.planes)}")
        if precomputed and not all(isinstance(self.encoders[p], PlaneEncoder) for p in present):
            raise ValueError("precomputed features need diffusion backbones (not a supervised baseline)")
        batch = volumes[present[0]].shape[0]
        feats = []
        for plane in self.planes:
            if plane in volumes:
                encoder = self.encoders[plane]
                pooled = encoder(volumes[plane], precomputed=True) if precomputed else encoder(volumes[plane])
                feats.append(self.norms[plane](pooled.float()))
            else:
                ref = volumes[present[0]]
                feats.append(ref.new_zeros((batch, self.encoders[plane].out_features), dtype=torch.float32))
        logits = self.head(torch.cat(feats, dim=1))
        if self.ehr is None:
            if ehr is not None:
                raise ValueError("ehr was given but this classifier was built with use_ehr=False")
            return logits
        if ehr is None:
            ehr = logits.new_zeros((logits.shape[0], self.ehr.num_features))
            ehr_mask = torch.zeros_like(ehr)
        elif ehr_mask is None:
            ehr_mask = torch.isfinite(ehr).to(ehr.dtype)
        return self.ehr(logits, ehr.to(logits.dtype), ehr_mask.to(logits.device))

    @torch.no_grad()
    def backbone_features(self, volumes: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each plane's backbone feature maps as evaluation computes them (fixed noise): what
        ``forward(..., precomputed=True)`` takes in place of the volumes when the backbones are
        frozen."""
        out = {}
        for plane, x in volumes.items():
            encoder = self.encoders[plane]
            if not isinstance(encoder, PlaneEncoder):
                raise ValueError(f"plane {plane}: a supervised baseline has no backbone features")
            was_training = encoder.extractor.backbone.training
            encoder.extractor.backbone.eval()
            try:
                out[plane] = encoder.extractor(x)
            finally:
                encoder.extractor.backbone.train(was_training)
        return out

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Backbone layers on the feature path (encoder + middle; decoder levels if configured);
        none for the supervised baseline."""
        return _unique(p for enc in self.encoders.values() for p in enc.backbone_parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Attention pools (the baseline: its whole CNNs), the normalisation, the linear head and
        the EHR branch."""
        params = [p for enc in self.encoders.values() for p in enc.head_parameters()]
        params += list(self.norms.parameters())
        params += list(self.head.parameters())
        if self.ehr is not None:
            params += list(self.ehr.parameters())
        return _unique(params)


class _ResBlock3d(nn.Module):
    """GroupNorm-SiLU-Conv x 2 with an identity skip: the decoder's residual 3D block."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class OrthoDiffusionSegmenter(nn.Module):
    """The segmentation head on a plane's diffusion UNet, in one of two forms (``cfg.seg_head``):

    * ``"bottleneck"`` (the reference): encoder + middle block, then one stride-2
      ConvTranspose3d and one residual block per encoder downsampling back to the input size,
      then a 1x1x1 convolution to the classes.  Every spatial detail has to come back out of
      the 1/16-resolution bottleneck.
    * ``"unet"``: the diffusion UNet's own decoder, with its skip connections from every
      encoder level, initialised from the pretrained (EMA) weights, then a residual block and
      a 1x1x1 convolution at full resolution, as in label-efficient segmentation with
      diffusion models.  The decoder is trained at the head's learning rate, the encoder and
      middle block at the backbone's.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int = NUM_SEG_CLASSES) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"OrthoDiffusionSegmenter: num_classes must be an int >= 2, got {num_classes!r}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.head_kind = cfg.seg_head
        stages: list[nn.Module] = []
        if cfg.seg_head == "unet":
            block = f"up_{cfg.num_levels - 1}"
            width = cfg.block_channels(block)
            stages = [_ResBlock3d(width, cfg.norm_num_groups), nn.GroupNorm(cfg.norm_num_groups, width), nn.SiLU()]
        else:
            block = "mid_2"
            width = cfg.channels[-1]
            for out in cfg.seg_decoder_channels:
                stages += [nn.ConvTranspose3d(width, out, kernel_size=2, stride=2), _ResBlock3d(out, cfg.norm_num_groups)]
                width = out
        self.extractor = FeatureExtractor(DiffusionBackbone(cfg), FeaturePoint(cfg.seg_timestep, block))
        self.decoder = nn.Sequential(*stages)
        self.classify = nn.Conv3d(width, num_classes, kernel_size=1)

    @property
    def backbone(self) -> DiffusionBackbone:
        return self.extractor.backbone

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """Logits (B, num_classes, D, H, W) for volumes (B, 1, D, H, W)."""
        return self.classify(self.decoder(self.extractor(x, noise)))

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The encoder and middle block (the UNet's decoder, for the ``unet`` head, is head)."""
        return _unique(self.backbone.parameters_for("mid_2"))

    def head_parameters(self) -> list[nn.Parameter]:
        params = list(self.decoder.parameters()) + list(self.classify.parameters())
        if self.head_kind == "unet":
            params = list(self.backbone.unet.up_blocks.parameters()) + params
        return _unique(params)


class MonaiSegmenter(_MonaiBaseline):
    """A supervised baseline segmenter: MONAI's 3D ``UNet`` or ``SegResNet`` (``cfg.segmenter_backbone``).

    Same inputs and outputs as :class:`OrthoDiffusionSegmenter`: volumes (B, 1, D, H, W) in,
    logits (B, num_classes, D, H, W) out, so the node, the evaluation and the fine-tuner's loss
    treat both alike.  Random initialisation, no pretraining: every weight is a head
    parameter, trained at the segmenter's full learning rate.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int = NUM_SEG_CLASSES) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"MonaiSegmenter: num_classes must be an int >= 2, got {num_classes!r}")
        if cfg.segmenter_backbone not in ("monai_unet", "monai_segresnet"):
            raise ValueError(f"MonaiSegmenter: cfg.segmenter_backbone is {cfg.segmenter_backbone!r}, not a MONAI network")
        from monai.networks.nets import SegResNet, UNet

        self.cfg = cfg
        self.num_classes = num_classes
        self.head_kind = cfg.segmenter_backbone
        if cfg.segmenter_backbone == "monai_unet":
            self.net: nn.Module = UNet(
                spatial_dims=3, in_channels=1, out_channels=num_classes, channels=cfg.channels,
                strides=(2,) * (cfg.num_levels - 1), num_res_units=2,
            )
        else:
            self.net = SegResNet(
                spatial_dims=3, in_channels=1, out_channels=num_classes, init_filters=cfg.channels[0],
                norm=("GROUP", {"num_groups": cfg.norm_num_groups}),
            )



def make_segmenter(cfg: ModelConfig, num_classes: int = NUM_SEG_CLASSES) -> nn.Module:
    """The segmentation network that ``cfg.segmenter_backbone`` names (what a checkpoint rebuilds)."""
    if cfg.segmenter_backbone == "diffusion_unet":
        return OrthoDiffusionSegmenter(cfg, num_classes)
    return MonaiSegmenter(cfg, num_classes)


def _unique(params: Iterator[nn.Parameter] | list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
