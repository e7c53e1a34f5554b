"""OrthoDiffusion model: configuration, feature extraction, heads, EHR fusion (tiny configs on CPU)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from inference.labels import NUM_SEG_CLASSES, PLANES
from inference.model import (
    PRESETS,
    AttentionPool,
    DiffusionBackbone,
    EHRFusion,
    FeatureExtractor,
    FeaturePoint,
    ModelConfig,
    OrthoDiffusionClassifier,
    OrthoDiffusionSegmenter,
    PlaneEncoder,
    encode_ehr,
    model_config,
)

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def backbone() -> DiffusionBackbone:
    torch.manual_seed(0)
    return DiffusionBackbone(TINY).eval()


def _volume(batch: int = 2, seed: int = 0, cfg: ModelConfig = TINY) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 1, *cfg.input_shape), generator=gen) * 2 - 1


# --------------------------------------------------------------------------- configuration


def test_paper_preset_is_the_reference() -> None:
    cfg = model_config("paper")
    assert cfg.input_shape == (16, 256, 256)
    assert cfg.channels == (64, 64, 128, 128, 256)
    assert cfg.attention_levels == (False, False, False, False, True)
    assert cfg.num_res_blocks == 1 and cfg.num_train_timesteps == 1000 and cfg.schedule == "cosine"
    assert cfg.pool_heads == 16
    assert cfg.bottleneck_shape == (256, 1, 16, 16)
    assert all(p == FeaturePoint(100, "mid_2") for p in cfg.feature_points.values())
    assert set(cfg.feature_points) == set(PLANES)
    fusion = model_config("paper_fusion").feature_points
    assert fusion["sagittal"] == FeaturePoint(200, "mid_0") and fusion["axial"] == FeaturePoint(50, "mid_2")


def test_paper_depth_pattern_gives_a_1x16x16_bottleneck() -> None:
    """The paper's input size and downsampling pattern at width 8 (the full width runs in
    benchmarks/model_size.py): 1 x 16 x 256 x 256 -> C x 1 x 16 x 16."""
    cfg = dataclasses.replace(
        PRESETS["paper"], channels=(8, 8, 16, 16, 32), norm_num_groups=8, num_head_channels=8,
        seg_decoder_channels=(16, 16, 8, 8),
    )
    extractor = FeatureExtractor(DiffusionBackbone(cfg).eval(), FeaturePoint(100, "mid_2"))
    with torch.no_grad():
        out = extractor(torch.zeros(1, 1, 16, 256, 256))
    assert tuple(out.shape) == (1, 32, 1, 16, 16) == (1, *cfg.bottleneck_shape)


def test_config_round_trip_and_overrides() -> None:
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg = model_config({"preset": "tiny", "feature_points": {"sagittal": {"timestep": 50, "block": "up_1"}}})
    assert cfg.channels == TINY.channels and cfg.feature_points == {"sagittal": FeaturePoint(50, "up_1")}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"chanels": [8]}, "chanels"),
        ({"norm_num_groups": 3}, "norm_num_groups"),
        ({"attention_levels": [True]}, "attention_levels"),
        ({"input_shape": [12, 32, 32]}, "input_shape"),
        ({"seg_decoder_channels": [8]}, "seg_decoder_channels"),
        ({"schedule": "quadratic"}, "schedule"),
        ({"feature_points": {"sagittal": {"timestep": 1000, "block": "mid_2"}}}, "timestep"),
        ({"feature_points": {"sagittal": {"timestep": 10, "block": "up_9"}}}, "up_9"),
        ({"feature_points": {"oblique": {"timestep": 10, "block": "mid_2"}}}, "oblique"),
        ({"pool_heads": 3}, "pool_heads"),
        ({"pool_heads": True}, "pool_heads"),  # no silent conversions: a bool is no int ...
        ({"num_res_blocks": "1"}, "num_res_blocks"),  # ... nor a string
        ({"channels": "8"}, "channels"),
        ({"flash_attention": 1}, "flash_attention"),
        ({"feature_points": {"sagittal": {"timestep": 10, "block": "mid_2", "t": 1}}}, r"sagittal\.t: unknown key"),
    ],
)
def test_invalid_config_names_the_field(change: dict, needle: str) -> None:
    d = TINY.to_dict()
    d.update(change)
    with pytest.raises((ValueError, TypeError), match=needle):
        ModelConfig.from_dict(d)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="huge"):
        model_config("huge")


# --------------------------------------------------------------------------- feature extraction

BLOCKS = ["down_0", "down_2", "mid_0", "mid_1", "mid_2", "up_0", "up_1", "up_3"]


@pytest.mark.parametrize("block", BLOCKS)
def test_feature_shape_at_each_block(backbone: DiffusionBackbone, block: str) -> None:
    extractor = FeatureExtractor(backbone, FeaturePoint(10, block))
    with torch.no_grad():
        out = extractor(_volume())
    assert tuple(out.shape) == (2, extractor.out_channels, *TINY.block_shape(block))
    assert extractor.out_channels == TINY.block_channels(block)


def _count_calls(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, int], list]:
    calls = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(*_: object, name: str = name) -> None:
            calls[name] += 1

        handles.append(module.register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize(
    ("block", "ran"),
    [
        ("mid_2", {"mid": 1, "up_0": 0, "up_1": 0, "up_3": 0, "out": 0}),
        ("mid_0", {"mid": 0, "up_0": 0, "up_1": 0, "up_3": 0, "out": 0}),
        ("down_1", {"down_2": 0, "mid": 0, "up_0": 0, "out": 0}),
        ("up_1", {"mid": 1, "up_0": 1, "up_1": 1, "up_3": 0, "out": 0}),
    ],
)
def test_only_the_needed_layers_run(backbone: DiffusionBackbone, block: str, ran: dict[str, int]) -> None:
    unet = backbone.unet
    modules = {
        "mid": unet.middle_block.resnet_2,
        "down_2": unet.down_blocks[2],
        "up_0": unet.up_blocks[0],
        "up_1": unet.up_blocks[1],
        "up_3": unet.up_blocks[3],
        "out": unet.out,
    }
    calls, handles = _count_calls({k: modules[k] for k in ran})
    try:
        with torch.no_grad():
            FeatureExtractor(backbone, FeaturePoint(10, block))(_volume())
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ran


def test_partial_pass_mirrors_the_full_unet(backbone: DiffusionBackbone) -> None:
    """Running to the last decoder block and applying the output layer equals MONAI's forward."""
    x = _volume()
    t = torch.tensor([3, 700])
    with torch.no_grad():
        partial = backbone.unet.out(backbone.run_to(x, t, f"up_{TINY.num_levels - 1}"))
        full = backbone(x, t)
    torch.testing.assert_close(partial, full)


def test_q_sample_noise_level_matches_the_cosine_schedule(backbone: DiffusionBackbone) -> None:
    t, s = 100, 0.008
    abar = backbone.scheduler.alphas_cumprod[t].item()
    closed_form = (math.cos(((t + 1) / 1000 + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2
    assert abar == pytest.approx(closed_form, rel=1e-4)
    x = _volume()
    noise = torch.randn_like(x)
    seen: list[torch.Tensor] = []
    handle = backbone.unet.conv_in.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        with torch.no_grad():
            FeatureExtractor(backbone, FeaturePoint(t, "mid_2"))(x, noise=noise)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], math.sqrt(abar) * x + math.sqrt(1 - abar) * noise)


def test_evaluation_noise_is_fixed_and_independent_of_the_batch(backbone: DiffusionBackbone) -> None:
    extractor = FeatureExtractor(backbone, FeaturePoint(100, "mid_2"))
    x = _volume(batch=2)
    with torch.no_grad():
        together = extractor(x)
        alone = FeatureExtractor(backbone, FeaturePoint(100, "mid_2"))(x[1:])
    torch.testing.assert_close(together[1:], alone)
    backbone.train()
    try:
        with torch.no_grad():
            assert not torch.allclose(extractor(x), extractor(x))  # fresh noise while training
    finally:
        backbone.eval()


# --------------------------------------------------------------------------- pooling and heads


def test_attention_pool_gives_2c_and_ignores_token_order() -> None:
    torch.manual_seed(0)
    pool = AttentionPool(16, num_heads=4)
    x = torch.randn(3, 16, 1, 4, 4)
    out = pool(x)
    assert tuple(out.shape) == (3, 32) and pool.out_features == 32
    shuffled = x.flatten(2)[:, :, torch.randperm(16)].reshape_as(x)
    torch.testing.assert_close(pool(shuffled), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 16:], x.mean(dim=(2, 3, 4)))
    with pytest.raises(ValueError, match="num_heads"):
        AttentionPool(16, num_heads=3)


def test_plane_encoder_output(backbone: DiffusionBackbone) -> None:
    encoder = PlaneEncoder(backbone, FeaturePoint(100, "up_0"))
    with torch.no_grad():
        assert tuple(encoder(_volume()).shape) == (2, 2 * TINY.block_channels("up_0"))


@pytest.mark.parametrize("planes", [("sagittal",), ("sagittal", "coronal", "axial")])
def test_classifier_shapes(planes: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = OrthoDiffusionClassifier(TINY, planes, num_labels=8, use_ehr=False).eval()
    assert model.head.in_features == len(planes) * 2 * TINY.channels[-1]
    with torch.no_grad():
        logits = model({p: _volume(seed=i) for i, p in enumerate(planes)})
    assert tuple(logits.shape) == (2, 8)
    assert set(model.backbones) == set(planes)
    assert isinstance(model.backbones[planes[0]], DiffusionBackbone)
    with pytest.raises(ValueError, match="none of the model's planes"):
        model({})
    if len(planes) > 1:
        # in evaluation a missing plane is allowed (its standardised features are zero) ...
        with torch.no_grad():
            partial = model({planes[0]: _volume(seed=0)})
        assert tuple(partial.shape) == (2, 8) and not torch.allclose(partial, logits)
        # ... in training it is an error: the model must learn from every plane
        with pytest.raises(ValueError, match="training needs"):
            model.train()({planes[0]: _volume(seed=0)})


def test_pooled_features_are_standardised_before_the_head() -> None:
    """Per-plane BatchNorm: in training the features entering the head have zero mean and unit
    variance across the batch, whatever the tiny spread of the raw pooled features."""
    torch.manual_seed(0)
    model = OrthoDiffusionClassifier(TINY, ("sagittal",), num_labels=2).train()
    seen = {}
    model.head.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0].detach()))
    batch = torch.cat([_volume(seed=i) for i in range(4)])
    model({"sagittal": batch})
    x = seen["x"]
    raw = model.encoders["sagittal"](batch).detach()
    assert float(raw.std(0).median()) < 0.5  # the raw pooled features hardly vary across exams
    assert torch.allclose(x.mean(0), torch.zeros_like(x[0]), atol=1e-4)
    # unit variance, less BatchNorm's epsilon where the raw spread is tiny
    assert float(x.std(0, unbiased=False).median()) > 0.9


def test_pretrained_backbone_loads_per_plane() -> None:
    torch.manual_seed(0)
    pretrained = DiffusionBackbone(TINY)
    model = OrthoDiffusionClassifier(TINY, ("sagittal", "coronal"), num_labels=3)
    model.backbones["coronal"].load_state_dict(pretrained.state_dict())
    torch.testing.assert_close(model.encoders["coronal"].backbone.unet.conv_in.conv.weight,
                               pretrained.unet.conv_in.conv.weight)
    # one copy of each backbone in the state dict
    assert not any(k.startswith("backbones.") for k in model.state_dict())


def test_parameter_groups_split_backbone_and_head() -> None:
    model = OrthoDiffusionClassifier(TINY, ("sagittal",), num_labels=4, use_ehr=True)
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    assert backbone_ids and head_ids and not backbone_ids & head_ids
    unet = model.backbones["sagittal"].unet
    assert {id(p) for p in unet.middle_block.parameters()} <= backbone_ids
    assert not {id(p) for p in unet.up_blocks.parameters()} & backbone_ids  # decoder unused at mid_2
    assert {id(p) for p in model.ehr.parameters()} <= head_ids


# --------------------------------------------------------------------------- EHR


def test_encode_ehr_masks_missing_values() -> None:
    values, mask = encode_ehr(45, "F", None, float("nan"))
    assert values.dtype == mask.dtype == np.float32 and values.shape == mask.shape == (5,)
    assert mask.tolist() == [1, 0, 0, 1, 1]
    assert values.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    values, mask = encode_ehr("030Y", "O", 1.80, 90)
    assert mask.tolist() == [1, 1, 1, 1, 1] and values[3] == values[4] == 0.0
    assert values[0] == pytest.approx((30 - 45) / 18)
    assert encode_ehr(None, None, None, None)[1].sum() == 0
    with pytest.raises(ValueError, match="height"):
        encode_ehr(40, "M", 180, 80)  # centimetres, not metres
    with pytest.raises(ValueError, match="sex"):
        encode_ehr(40, "male", 1.8, 80)


def test_missing_ehr_value_changes_nothing_but_its_mask() -> None:
    torch.manual_seed(0)
    fusion = EHRFusion(num_labels=3, hidden=8)
    mri = torch.randn(2, 3)
    values, mask = (torch.from_numpy(a)[None].repeat(2, 1) for a in encode_ehr(50, "M", None, 80))
    garbage = values.clone()
    garbage[:, 1] = torch.tensor([123.0, float("nan")])
    out = fusion(mri, values, mask)
    torch.testing.assert_close(fusion(mri, garbage, mask), out)
    # with the mask bit on, the value is used
    known = mask.clone()
    known[:, 1] = 1.0
    assert not torch.allclose(fusion(mri, values, known), out)


def test_gradients_reach_the_gate_and_the_ehr_mlp() -> None:
    torch.manual_seed(0)
    model = OrthoDiffusionClassifier(TINY, ("axial",), num_labels=2, use_ehr=True)
    ehr, mask = (torch.from_numpy(a)[None].repeat(2, 1) for a in encode_ehr(60, "F", 1.6, 70))
    logits = model({"axial": _volume()}, ehr, mask)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).backward()
    assert model.ehr.gate.grad is not None and model.ehr.gate.grad.abs().sum() > 0
    assert model.ehr.mlp[0].weight.grad.abs().sum() > 0
    # no EHR at all means "every value missing", not an error
    with torch.no_grad():
        assert tuple(model({"axial": _volume()}).shape) == (2, 2)


# --------------------------------------------------------------------------- segmentation and training


def test_segmenter_output_matches_input_shape() -> None:
    torch.manual_seed(0)
    model = OrthoDiffusionSegmenter(TINY).eval()
    with torch.no_grad():
        logits = model(_volume())
    assert tuple(logits.shape) == (2, NUM_SEG_CLASSES, *TINY.input_shape)
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    assert not backbone_ids & {id(p) for p in model.head_parameters()}
    assert {id(p) for p in model.backbone.unet.middle_block.parameters()} <= backbone_ids


def test_a_few_steps_reduce_the_diffusion_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = DiffusionBackbone(TINY)
    x = _volume(batch=2, seed=3)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:  # the same t and noise every step: a fixed objective
        return model.training_loss(x, generator=torch.Generator().manual_seed(7))

    with torch.no_grad():
        first = loss().item()
    for _ in range(15):
        optimiser.zero_grad()
        value = loss()
        value.backward()
        optimiser.step()
    with torch.no_grad():
        last = loss().item()
    assert last < 0.8 * first


def test_wrong_input_shape_is_named() -> None:
    model = DiffusionBackbone(TINY)
    with pytest.raises(ValueError, match="spatial shape"):
        model.training_loss(torch.zeros(1, 1, 8, 16, 16))


def test_training_loss_is_the_epsilon_mse_of_sampled_inputs() -> None:
    torch.manual_seed(0)
    model = DiffusionBackbone(TINY)
    x = _volume(batch=3)
    noisy, timesteps, noise = model.sample_training_inputs(x, torch.Generator().manual_seed(5))
    assert timesteps.dtype == torch.long and ((0 <= timesteps) & (timesteps < 1000)).all()
    abar = model.scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noisy, abar.sqrt() * x + (1 - abar).sqrt() * noise)
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model(noisy, timesteps), noise)
        loss = model.training_loss(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, expected)
