"""Structure, shapes, gradients and numerics of the DPE networks (tiny config unless stated)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpe.config import ModelConfig
from dpe.discriminator import Discriminator
from dpe.layers import ConvLayer, ToFlow, make_kernel, upsample2d
from dpe.model import DPEGenerator, MotionNetwork

TINY = ModelConfig.tiny()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DPEGenerator(TINY)


def _images(batch: int, size: int = TINY.size, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------ sizes
def test_official_parameter_counts():
    cfg = ModelConfig()
    gen, disc = DPEGenerator(cfg), Discriminator(cfg)
    assert sum(p.numel() for p in gen.parameters()) == 69_101_798
    assert sum(p.numel() for p in disc.parameters()) == 24_001_089
    # sizes quoted in the design notes
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(gen.encoder) / 1e6, 1) == 21.6
    assert round(count(gen.expression_generator) / 1e6, 1) == round(count(gen.pose_generator) / 1e6, 1) == 22.4
    assert round(count(gen.expression_head) / 1e6, 2) == round(count(gen.pose_head) / 1e6, 2) == 0.79


def test_unused_official_tensors_are_frozen(tiny):
    frozen = {n for n, p in tiny.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in tiny.named_parameters() if ".to_rgb1." in n or n.endswith(".noise.weight")}
    assert frozen == expected and frozen
    n_scales = len(TINY.feature_resolutions)
    assert len([n for n in frozen if n.endswith("noise.weight")]) == 2 * (1 + 2 * n_scales)


def test_config_round_trip_and_validation():
    cfg = ModelConfig.tiny()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # json turns int keys into strings
    as_json = {**cfg.to_dict(), "channels": {str(k): v for k, v in cfg.channels.items()}}
    assert ModelConfig.from_dict(as_json) == cfg
    assert ModelConfig().channels[256] == 64 and ModelConfig(channel_multiplier=2).channels[256] == 128
    with pytest.raises(ValueError, match="power of two"):
        ModelConfig(size=48)
    with pytest.raises(ValueError, match="channels"):
        ModelConfig(size=64, channels={4: 8, 8: 8, 16: 8, 32: 8})
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"size": 32, "bogus": 1})


# ------------------------------------------------------------------------------ shapes / motion
def test_shapes_tiny(tiny):
    x = _images(3)
    with torch.no_grad():
        code = tiny.encode(x)
        assert code.latent.shape == (3, TINY.style_dim)
        assert [tuple(f.shape) for f in code.features] == [
            (3, TINY.channels[r], r, r) for r in TINY.feature_resolutions]
        alpha = tiny.motion_coefficients(code.latent)
        d = tiny.motion_vector(code.latent)
        assert alpha.shape == (3, TINY.motion_dim) and d.shape == (3, TINY.style_dim)
        assert tiny.expression_offset(d).shape == tiny.pose_offset(d).shape == (3, TINY.style_dim)
        for render in (tiny.render_expression, tiny.render_pose):
            assert render(code.latent, code.features).shape == (3, 3, TINY.size, TINY.size)
    with pytest.raises(ValueError, match="expected images"):
        tiny.encode(_images(1, size=64))


@pytest.mark.parametrize("cfg", [TINY, ModelConfig()], ids=["tiny", "official"])
def test_directions_orthonormal(cfg):
    torch.manual_seed(0)
    motion = MotionNetwork(cfg)
    q = motion.basis()
    assert q.shape == (cfg.style_dim, cfg.motion_dim)
    torch.testing.assert_close(q.t() @ q, torch.eye(cfg.motion_dim), atol=1e-5, rtol=0)
    alpha = torch.randn(4, cfg.motion_dim)
    d = motion.combine(alpha)
    torch.testing.assert_close(d, alpha @ q.t())
    # d lies in the span of Q and its coordinates are alpha
    torch.testing.assert_close(d @ q, alpha, atol=1e-5, rtol=1e-5)


def test_discriminator_shapes_and_odd_batches():
    disc = Discriminator(TINY)
    for batch in (1, 2, 3, 4, 6, 8):
        assert disc(_images(batch)).shape == (batch, 1)


def test_minibatch_stddev_groups_like_official():
    """Samples b and b + batch/group share the statistic: permuting within a group-column keeps outputs."""
    torch.manual_seed(0)
    disc = Discriminator(TINY)
    x = _images(4)
    out = disc(x)
    swapped = disc(x[[2, 1, 0, 3]])  # group of 4 -> one statistic over all four
    torch.testing.assert_close(swapped[[2, 1, 0, 3]], out)


# ------------------------------------------------------------------------------ gradients
def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    gen = DPEGenerator(TINY)
    a, b = _images(2, seed=2), _images(2, seed=3)
    code_a, code_b = gen.encode(a), gen.encode(b)
    d_b = gen.motion_vector(code_b.latent)
    # one cycle of the training objective: pose branch, re-encode, expression branch
    mid = gen.render_pose(code_a.latent + gen.pose_offset(d_b), code_a.features)
    code_mid = gen.encode(mid)
    out = gen.render_expression(code_mid.latent + gen.expression_offset(d_b), code_mid.features)
    loss = (out - b).abs().mean() + (mid - a).pow(2).mean()
    loss.backward()
    missing = [n for n, p in gen.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing}"
    frozen = [n for n, p in gen.named_parameters() if not p.requires_grad]
    assert all(gen.get_parameter(n).grad is None for n in frozen)


# ------------------------------------------------------------------------------ numerics of the pieces
def _upfirdn_up2(x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Plain zero-insertion upsampling + padding + FIR (the definition of upfirdn2d)."""
    b, c, h, w = x.shape
    up = torch.zeros(b, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    up = F.pad(up, [pad[0], pad[1], pad[0], pad[1]])
    k = torch.flip(kernel, [0, 1])[None, None].repeat(c, 1, 1, 1)
    return F.conv2d(up, k, groups=c)


def test_upsample_matches_upfirdn_definition():
    x = torch.randn(2, 5, 7, 7)
    k = make_kernel([1, 3, 3, 1]) * 4
    torch.testing.assert_close(upsample2d(x, k, (2, 1)), _upfirdn_up2(x, k, (2, 1)))
    asym = torch.rand(4, 4)  # a non-symmetric kernel checks the flip convention too
    torch.testing.assert_close(upsample2d(x, asym, (2, 1)), _upfirdn_up2(x, asym, (2, 1)))


@pytest.mark.parametrize("activate", [False, True])
def test_strided_blur_skip_equals_blur_then_strided_conv(activate):
    torch.manual_seed(0)
    layer = ConvLayer(8, 16, 1, downsample=True, activate=activate, bias=activate)
    x = torch.randn(2, 8, 16, 16)
    expected = torch.nn.Sequential.forward(layer, x)  # the official order of operations
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_modulated_conv_equals_grouped_per_sample_weights():
    """Non-fused form == official per-sample modulated/demodulated weights with grouped conv."""
    torch.manual_seed(0)
    gen = DPEGenerator(TINY)
    for layer in (gen.expression_generator.convs[0].conv, gen.expression_generator.convs[1].conv,
                  gen.pose_generator.to_flows[0].conv):
        x = torch.randn(3, layer.in_channel, 8, 8)
        style = torch.randn(3, TINY.style_dim)
        s = layer.modulation(style).view(3, 1, -1, 1, 1)
        w = layer.scale * layer.weight * s
        if layer.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum([2, 3, 4]) + 1e-8).view(3, -1, 1, 1, 1)
        k = layer.kernel_size
        if layer.upsample:
            wt = w.transpose(1, 2).reshape(3 * layer.in_channel, layer.out_channel, k, k)
            ref = F.conv_transpose2d(x.reshape(1, -1, 8, 8), wt, stride=2, groups=3).view(3, layer.out_channel, 17, 17)
            ref = layer.blur(ref)
        else:
            ref = F.conv2d(x.reshape(1, -1, 8, 8), w.reshape(-1, layer.in_channel, k, k), padding=k // 2, groups=3)
            ref = ref.view(3, layer.out_channel, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(layer(x, style), ref.detach(), atol=1e-5, rtol=1e-4)


def test_identity_flow_samples_the_official_grid():
    """With zero flow and an open mask the warp reads the feature on linspace(-1, 1) coordinates."""
    flow = ToFlow(4, 8, 8)
    with torch.no_grad():
        flow.conv.weight.zero_()
        flow.bias.copy_(torch.tensor([0.0, 0.0, 50.0]).view(1, 3, 1, 1))  # tanh(0)=0, sigmoid(50)=1
    feat = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        warped, blended, raw = flow(torch.zeros(1, 4, 8, 8), torch.zeros(1, 8), feat)
    expected = F.grid_sample(feat, flow.grid, align_corners=False)
    torch.testing.assert_close(warped, expected)
    torch.testing.assert_close(blended, expected)
    assert raw.shape == (1, 3, 8, 8)


def test_bf16_autocast_runs_and_stays_close(tiny):
    x = _images(2)
    with torch.no_grad():
        code = tiny.encode(x)
        z = code.latent + tiny.expression_offset(tiny.motion_vector(code.latent))
        ref = tiny.render_expression(z, code.features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            code16 = tiny.encode(x)
            d16 = tiny.motion_vector(code16.latent)
            assert d16.dtype == torch.float32  # motion network stays float32
            out = tiny.render_expression(code16.latent + tiny.expression_offset(d16), code16.features)
            logits = Discriminator(TINY)(x)
    assert torch.isfinite(out).all() and torch.isfinite(logits).all()
    # Random weights give rough features, so bf16 flow errors of ~1% move samples visibly; the
    # bound only catches gross breakage (a dtype bug gives errors of order 1).
    assert (out.float() - ref).abs().mean() / ref.abs().mean() < 0.2


def test_a_fresh_generator_passes_the_encoder_features_through():
    """Fresh to-flow heads warp by (nearly) nothing with their masks open (README, training recipe):
    random heads sent samples across the image and training closed the masks (blurred faces)."""
    torch.manual_seed(0)
    gen = DPEGenerator(TINY)
    raws = []
    hooks = [head.register_forward_hook(lambda module, inputs, output: raws.append(output[2]))
             for head in gen.expression_generator.to_flows]
    with torch.no_grad():
        code = gen.encode(_images(2))
        gen.render_expression(code.latent, code.features)
    for hook in hooks:
        hook.remove()
    assert len(raws) == len(TINY.feature_resolutions)
    for raw in raws:
        assert torch.tanh(raw[:, :2]).abs().max() < 0.05  # grid units: the image spans [-1, 1]
        assert torch.sigmoid(raw[:, 2]).min() > 0.9
