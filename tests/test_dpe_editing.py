"""Editing API: strength, absolute/relative motion, precomputed codes, broadcasting, autocast."""

from __future__ import annotations

import pytest
import torch

from dpe.config import ModelConfig
from dpe.editing import (
    FrameCode,
    encode_driving,
    encode_source,
    expression_transfer,
    pose_transfer,
    target_motion,
    transfer_both,
)
from dpe.model import DPEGenerator

TINY = ModelConfig.tiny()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DPEGenerator(TINY).eval()


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, TINY.size, TINY.size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def frames():
    return {"source": _images(3, 1), "driving": _images(3, 2), "reference": _images(3, 3)}


TRANSFERS = {"expression": expression_transfer, "pose": pose_transfer}


def _official(model, source, driving, branch):
    """The official exp / pose stage."""
    with torch.no_grad():
        s, d = model.encode(source), model.encode(driving)
        motion = model.motion_vector(d.latent)
        if branch == "expression":
            return model.render_expression(s.latent + model.expression_offset(motion), s.features)
        return model.render_pose(s.latent + model.pose_offset(motion), s.features)


@pytest.mark.parametrize("branch", TRANSFERS)
def test_strength_one_absolute_is_the_official_stage(model, frames, branch):
    out = TRANSFERS[branch](model, frames["source"], frames["driving"])
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, _official(model, frames["source"], frames["driving"], branch), rtol=0, atol=0)


def test_transfer_both_is_the_official_both_stage(model, frames):
    with torch.no_grad():
        middle = _official(model, frames["source"], frames["driving"], "expression")
        x = model.encode(middle)
        d = model.motion_vector(model.encode(frames["driving"]).latent)
        expected = model.render_pose(x.latent + model.pose_offset(d), x.features)
    torch.testing.assert_close(transfer_both(model, frames["source"], frames["driving"]), expected, rtol=0, atol=0)


@pytest.mark.parametrize("branch", TRANSFERS)
def test_strength_zero_is_the_self_reconstruction(model, frames, branch):
    with torch.no_grad():
        code = model.encode(frames["source"])
        recon = model.reconstruct_expression(code) if branch == "expression" else model.reconstruct_pose(code)
    for mode, ref in (("absolute", None), ("relative", frames["reference"])):
        out = TRANSFERS[branch](model, frames["source"], frames["driving"], strength=0.0, mode=mode,
                                driving_reference=ref)
        torch.testing.assert_close(out, recon, rtol=0, atol=0)


def test_transfer_both_strength_zero_is_the_two_pass_reconstruction(model, frames):
    with torch.no_grad():
        first = model.reconstruct_expression(model.encode(frames["source"]))
        expected = model.reconstruct_pose(model.encode(first))
    torch.testing.assert_close(transfer_both(model, frames["source"], frames["driving"], strength=0.0), expected)


@pytest.mark.parametrize("branch", TRANSFERS)
def test_relative_with_driver_equal_to_reference_keeps_source_motion(model, frames, branch):
    src, drv = encode_source(model, frames["source"]), encode_driving(model, frames["driving"])
    d = target_motion(src.motion, drv.motion, strength=0.7, mode="relative", reference_motion=drv.motion)
    assert torch.equal(d, src.motion)
    out = TRANSFERS[branch](model, src, drv, strength=0.7, mode="relative", driving_reference=drv)
    recon = TRANSFERS[branch](model, src, drv, strength=0.0)
    torch.testing.assert_close(out, recon, rtol=0, atol=0)


def test_relative_motion_formula(model, frames):
    s, d, r = (encode_driving(model, frames[k]).motion for k in ("source", "driving", "reference"))
    torch.testing.assert_close(target_motion(s, d, 0.5, "relative", r), s + 0.5 * (d - r))
    torch.testing.assert_close(target_motion(s, d, 0.25, "absolute"), s + 0.25 * (d - s))
    assert torch.equal(target_motion(s, d, 1.0), d)
    # per-sample strengths
    strength = torch.tensor([0.0, 0.5, 1.0])
    got = target_motion(s, d, strength)
    assert torch.equal(got[0], s[0]) and torch.equal(got[2], d[2])


def test_strength_interpolates_offsets_because_heads_are_affine(model, frames):
    src, drv = encode_source(model, frames["source"]), encode_driving(model, frames["driving"])
    with torch.no_grad():
        half = model.expression_offset(target_motion(src.motion, drv.motion, 0.5))
        a, b = model.expression_offset(src.motion), model.expression_offset(drv.motion)
    torch.testing.assert_close(half, 0.5 * (a + b), atol=1e-5, rtol=1e-5)


def test_precomputed_codes_give_the_same_images(model, frames):
    src, drv = encode_source(model, frames["source"]), encode_driving(model, frames["driving"])
    assert isinstance(src, FrameCode) and drv.features is None
    for fn in (expression_transfer, pose_transfer, transfer_both):
        torch.testing.assert_close(fn(model, src, drv), fn(model, frames["source"], frames["driving"]),
                                   rtol=0, atol=0)


class _CountingEncoder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, img):
        self.images += img.shape[0]
        return self.inner(img)


def test_fixed_source_is_encoded_once_and_broadcast(model, frames):
    counter = _CountingEncoder(model.encoder)
    model.encoder = counter
    try:
        still = frames["source"][:1]
        cache = encode_source(model, still)
        ref_code = encode_driving(model, frames["reference"][:1])
        assert counter.images == 2
        video = [frames["driving"], frames["reference"]]  # two chunks of 3 driving frames
        outs = [expression_transfer(model, cache, chunk, mode="relative", driving_reference=ref_code)
                for chunk in video]
        assert counter.images == 2 + 6  # only the driving frames were encoded
        # a batch-1 source broadcast against 3 drivers == the source repeated 3 times
        repeated = expression_transfer(model, still.expand(3, -1, -1, -1), video[0], mode="relative",
                                       driving_reference=frames["reference"][:1])
        # (batch-1 vs batch-3 convolutions round differently: float32 noise only)
        torch.testing.assert_close(outs[0], repeated, atol=1e-4, rtol=1e-3)
        # a fixed driver likewise: one driving code against a batch of sources
        drv = encode_driving(model, frames["driving"][:1])
        before = counter.images
        out = pose_transfer(model, frames["source"], drv)
        assert counter.images == before + 3 and out.shape == (3, 3, TINY.size, TINY.size)
    finally:
        model.encoder = counter.inner


def test_argument_errors(model, frames):
    s, d = frames["source"], frames["driving"]
    with pytest.raises(ValueError, match="driving_reference"):
        expression_transfer(model, s, d, mode="relative")
    with pytest.raises(ValueError, match="only used with mode='relative'"):
        expression_transfer(model, s, d, driving_reference=d)
    with pytest.raises(ValueError, match="mode must be"):
        pose_transfer(model, s, d, mode="sideways")
    with pytest.raises(ValueError, match="broadcast"):
        expression_transfer(model, s[:2], d)
    with pytest.raises(ValueError, match="no features"):
        expression_transfer(model, encode_driving(model, s), d)
    with pytest.raises(ValueError, match="strength"):
        expression_transfer(model, s, d, strength=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("fn", [expression_transfer, pose_transfer, transfer_both])
def test_bf16_autocast(model, frames, fn):
    ref = fn(model, frames["source"], frames["driving"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped = fn(model, frames["source"], frames["driving"])
    argument = fn(model, frames["source"], frames["driving"], amp_dtype=torch.bfloat16)
    for out in (wrapped, argument):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out - ref).abs().mean() / ref.abs().mean() < 0.25
    torch.testing.assert_close(wrapped, argument)


def test_frame_code_is_plain_data(model, frames):
    code = encode_source(model, frames["source"])
    assert isinstance(code, FrameCode) and code.batch == 3
    assert code.motion.dtype == torch.float32 and len(code.features) == len(TINY.feature_resolutions)
    assert code.encoded().expand(3).latent is code.latent
