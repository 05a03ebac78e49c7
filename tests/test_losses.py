"""VGG19 loading, perceptual/L1/GAN/R1 losses and the pose/expression probes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpe.losses import (
    MIN_VGG_INPUT,
    DisentanglementProbes,
    PerceptualLoss,
    cross_covariance_leakage,
    discriminator_gan_loss,
    gaussian_downsample,
    generator_gan_loss,
    l1_distance,
    r1_penalty,
)
from dpe.vgg import VGG19Features, VGGWeightsNotFoundError, default_vgg19_weights_path, load_vgg19

# torchvision's vgg19().state_dict() keys up to conv5_1 (features.28).
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)


def _save_random_vgg(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = VGG19Features().state_dict()
    state["classifier.0.weight"] = torch.zeros(2, 2)  # extra keys of the full network are ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def vgg(tmp_path_factory) -> VGG19Features:
    path = tmp_path_factory.mktemp("vgg") / "random_vgg19.pth"
    _save_random_vgg(path)
    return load_vgg19(path)


def _images(seed: int, size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vgg_uses_torchvision_key_names() -> None:
    expected = {f"features.{i}.{p}" for i in TORCHVISION_CONV_INDICES for p in ("weight", "bias")}
    assert set(VGG19Features().state_dict()) == expected


def test_weights_load_from_an_explicit_file(tmp_path: Path) -> None:
    saved = _save_random_vgg(tmp_path / "w.pth", seed=3)
    model = load_vgg19(tmp_path / "w.pth")
    torch.testing.assert_close(model.features[28].weight, saved["features.28.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training, "the feature extractor must stay in eval mode"


def test_weights_load_from_the_torch_hub_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_vgg19_weights_path() == tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    saved = _save_random_vgg(default_vgg19_weights_path(), seed=4)
    torch.testing.assert_close(load_vgg19().features[0].weight, saved["features.0.weight"])


def test_missing_weights_say_where_to_put_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(VGGWeightsNotFoundError) as error:
        load_vgg19()
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in message
    assert "vgg_weights=" in message and "perceptual=False" in message
    with pytest.raises(VGGWeightsNotFoundError, match="nowhere.pth"):
        load_vgg19(tmp_path / "nowhere.pth")


def test_a_foreign_state_dict_is_rejected(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG19"):
        load_vgg19(tmp_path / "other.pth")


def test_perceptual_loss_is_zero_for_identical_and_positive_otherwise(vgg) -> None:
    loss = PerceptualLoss(vgg)
    a, b = _images(0), _images(1)
    assert torch.all(loss(a, a) == 0)
    distances = loss(a, b)
    assert distances.shape == (2,) and torch.all(distances > 0)
    # It grows with the size of the difference.
    assert torch.all(loss(a, a + 0.3 * (b - a)) < distances)


def test_perceptual_loss_uses_all_pyramid_levels_that_fit(vgg) -> None:
    a, b = _images(0, size=128, batch=1), _images(1, size=128, batch=1)
    full = PerceptualLoss(vgg)(a, b)
    levels = [PerceptualLoss(vgg, scales=(s,))(a, b) for s in (1.0, 0.5, 0.25, 0.125)]
    torch.testing.assert_close(full, sum(levels))
    # At 32 px only scales 1 and 1/2 leave VGG anything to see at relu5_1.
    small_a, small_b = _images(2, size=32), _images(3, size=32)
    torch.testing.assert_close(
        PerceptualLoss(vgg)(small_a, small_b), PerceptualLoss(vgg, scales=(1.0, 0.5))(small_a, small_b)
    )


def test_perceptual_gradient_reaches_both_generated_images(vgg) -> None:
    a = _images(0).requires_grad_(True)
    b = _images(1).requires_grad_(True)
    PerceptualLoss(vgg)(a, b).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_perceptual_target_detached_on_request(vgg) -> None:
    """Official mode: the second image is a fixed target, only the first one is pulled."""
    a = _images(0).requires_grad_(True)
    b = _images(1).requires_grad_(True)
    loss = PerceptualLoss(vgg, detach_target=True)(a, b)
    torch.testing.assert_close(loss, PerceptualLoss(vgg)(a, b))  # same value, one-sided gradient
    loss.sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad is None


@pytest.mark.parametrize("pyramid", ["area", "gaussian"])
def test_each_pyramid_image_is_clamped_after_downsampling_as_officially(vgg, pyramid: str) -> None:
    target = _images(1)
    output = _images(0) * 3  # about a third of the pixels lie outside [-1, 1]
    loss = PerceptualLoss(vgg, pyramid=pyramid)
    expected = torch.zeros(len(output))
    for scale in loss.scales:
        if round(output.shape[-1] * scale) < MIN_VGG_INPUT:
            continue
        images = loss._downsample(torch.cat([output, target]), scale).clamp(-1, 1)
        expected = expected + sum(loss.layer_weight * (o - t).abs().mean(dim=(1, 2, 3))
                                  for o, t in (f.split(len(output)) for f in vgg(images)))
    torch.testing.assert_close(loss(output, target), expected)
    # clamping before the pyramid (our former order) scores another image: the order matters here
    assert not torch.isclose(loss(output, target), loss(output.clamp(-1, 1), target), rtol=1e-3).all()


# The official (FOMM) anti-aliasing kernels, written out: (scale, kernel size, sigma).
OFFICIAL_GAUSSIANS = ((0.5, 5, 0.5), (0.25, 13, 1.5), (0.125, 29, 3.5))


def _explicit_gaussian_level(images: torch.Tensor, size: int, sigma: float, step: int) -> torch.Tensor:
    """Float64 depthwise Gaussian with zero padding of size // 2 on each side, then a strided pick."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(profile, profile)
    kernel = (kernel / kernel.sum()).expand(3, 1, size, size)
    padded = F.pad(images.double(), [size // 2] * 4, mode="constant", value=0.0)
    return F.conv2d(padded, kernel, groups=3)[:, :, ::step, ::step].float()


@pytest.mark.parametrize(("scale", "size", "sigma"), OFFICIAL_GAUSSIANS)
def test_gaussian_pyramid_is_the_official_one(vgg, scale: float, size: int, sigma: float) -> None:
    step = round(1 / scale)
    a, b = _images(0, size=128, batch=1), _images(1, size=128, batch=1)
    level = gaussian_downsample(a, scale)
    torch.testing.assert_close(level, _explicit_gaussian_level(a, size, sigma, step), rtol=0, atol=1e-6)
    assert level.shape[-1] == 128 // step
    # Zero padding: a constant image fades at the corner by the kernel mass that falls outside.
    ones = gaussian_downsample(torch.ones(1, 3, 128, 128), scale)
    profile = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    inside = float(profile[size // 2 :].sum() / profile.sum()) ** 2
    assert ones[0, 0, 0, 0].item() == pytest.approx(inside, rel=1e-5)
    assert ones[0, 0, 8, 8].item() == pytest.approx(1.0, rel=1e-5)

    # The perceptual loss at that scale is VGG on exactly these levels.
    explicit = sum(
        10.0 * (fa - fb).abs().mean()
        for fa, fb in zip(vgg(_explicit_gaussian_level(a, size, sigma, step)),
                          vgg(_explicit_gaussian_level(b, size, sigma, step)))
    )
    gaussian = PerceptualLoss(vgg, scales=(scale,), pyramid="gaussian")(a, b)
    torch.testing.assert_close(gaussian, explicit.reshape(1), rtol=1e-4, atol=0)
    area = PerceptualLoss(vgg, scales=(scale,))(a, b)
    assert not torch.isclose(area, gaussian, rtol=1e-3).any()


def test_perceptual_modes_are_checked(vgg) -> None:
    with pytest.raises(ValueError, match="pyramid"):
        PerceptualLoss(vgg, pyramid="bilinear")
    with pytest.raises(ValueError, match="1/n"):
        PerceptualLoss(vgg, scales=(1.0, 0.3), pyramid="gaussian")


def test_l1_distance_per_sample() -> None:
    a = _images(0)
    assert torch.all(l1_distance(a, a) == 0)
    torch.testing.assert_close(l1_distance(a, a + 0.25), torch.full((2,), 0.25))


def test_gan_losses_reward_the_right_side() -> None:
    zero = torch.zeros(4, 1)
    assert math.isclose(generator_gan_loss(zero).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(discriminator_gan_loss(zero, zero).item(), 2 * math.log(2), rel_tol=1e-6)
    assert generator_gan_loss(zero + 3) < generator_gan_loss(zero) < generator_gan_loss(zero - 3)
    assert discriminator_gan_loss(zero + 3, zero - 3) < discriminator_gan_loss(zero - 3, zero + 3)


def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight_norm() -> None:
    weight = torch.randn(3, 8, 8)
    images = torch.randn(5, 3, 8, 8, requires_grad=True)
    logits = (images * weight).flatten(1).sum(dim=1, keepdim=True)
    torch.testing.assert_close(r1_penalty(logits, images), weight.pow(2).sum())


# --- pose/expression probes --------------------------------------------------------------


def _annotations(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pose = torch.randn(batch, 6, generator=g) * torch.tensor([0.3, 0.2, 0.1, 20.0, 20.0, 10.0]) + 100
    expression = torch.randn(batch, 68, 2, generator=g) * 0.05
    return pose, expression


def test_probe_targets_are_standardised_with_running_statistics() -> None:
    probes = DisentanglementProbes(latent_dim=8)
    for seed in range(30):
        probes.observe(*_annotations(16, seed))
    pose_z, expression_z = probes.standardise(*_annotations(512, 99))
    assert pose_z.shape == (512, 6) and expression_z.shape == (512, 136)
    torch.testing.assert_close(pose_z.mean(0), torch.zeros(6), atol=0.2, rtol=0)
    torch.testing.assert_close(pose_z.std(0), torch.ones(6), atol=0.2, rtol=0)
    with pytest.raises(ValueError, match="split_pose_expression"):
        probes.standardise(torch.zeros(2, 5), torch.zeros(2, 68, 2))


def test_readout_trains_probes_and_offsets_leakage_only_offsets() -> None:
    probes = DisentanglementProbes(latent_dim=8)
    pose, expression = _annotations(4, 0)
    probes.observe(pose, expression)
    for term, probes_learn in (("readout", True), ("leakage", False)):
        probes.zero_grad()
        pose_offset = torch.randn(4, 8, requires_grad=True)
        expression_offset = torch.randn(4, 8, requires_grad=True)
        getattr(probes(pose_offset, expression_offset, pose, expression), term).backward()
        assert pose_offset.grad.abs().sum() > 0 and expression_offset.grad.abs().sum() > 0
        assert all((p.grad is not None) == probes_learn for p in probes.parameters())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), zoom=st.floats(1e-3, 1e3))
def test_leakage_is_bounded_scale_invariant_and_small_without_a_link(seed: int, zoom: float) -> None:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(512, 6, generator=g)
    copies = targets @ torch.randn(6, 16, generator=g)  # offset that carries the targets
    unrelated = torch.randn(512, 16, generator=g)
    linked = cross_covariance_leakage(copies, targets)
    assert 0.1 < linked <= 1.0
    torch.testing.assert_close(cross_covariance_leakage(zoom * copies, targets), linked, rtol=1e-3, atol=0)
    assert cross_covariance_leakage(unrelated, targets) < 0.02  # noise floor ~ 1 / batch
    assert cross_covariance_leakage(copies[:1], targets[:1]) == 0


def test_probe_terms_separate_pose_from_expression() -> None:
    """Offsets that mix both factors learn to carry each one in its own branch only."""
    torch.manual_seed(0)
    latent, n, batch = 16, 256, 16
    pose_factors, expression_factors = torch.randn(n, 6), torch.randn(n, 4)
    pose = pose_factors * 10 + 50
    expression = (expression_factors @ torch.randn(4, 136) * 0.03).view(n, 68, 2)
    mixed_input = torch.cat([pose_factors, expression_factors], dim=1) @ torch.randn(10, 10)

    pose_branch, expression_branch = torch.nn.Linear(10, latent), torch.nn.Linear(10, latent)
    probes = DisentanglementProbes(latent_dim=latent)
    probes.observe(pose, expression)
    optimiser = torch.optim.Adam(
        [*pose_branch.parameters(), *expression_branch.parameters(), *probes.parameters()], lr=0.01
    )

    def explained_share(offset: torch.Tensor, factors: torch.Tensor) -> float:
        """Fraction of the offset's variance a least-squares fit on ``factors`` explains."""
        design = torch.cat([factors, torch.ones(n, 1)], dim=1)
        residual = offset - design @ torch.linalg.lstsq(design, offset).solution
        return float(1 - residual.var(0).sum() / offset.var(0).sum())

    with torch.no_grad():
        assert explained_share(expression_branch(mixed_input), pose_factors) > 0.3
    for _ in range(400):  # small batches, as on one GPU
        rows = torch.randint(0, n, (batch,))
        terms = probes(pose_branch(mixed_input[rows]), expression_branch(mixed_input[rows]), pose[rows], expression[rows])
        optimiser.zero_grad()
        (terms.readout + terms.leakage).backward()
        optimiser.step()
    with torch.no_grad():
        assert probes(pose_branch(mixed_input), expression_branch(mixed_input), pose, expression).readout < 0.5
        assert explained_share(expression_branch(mixed_input), pose_factors) < 0.1
        assert explained_share(pose_branch(mixed_input), expression_factors) < 0.1
