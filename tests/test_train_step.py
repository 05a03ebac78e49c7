"""The DPE training step on the tiny model with real frames from the sample clip."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpe.checkpoint import load_checkpoint, save_checkpoint
from dpe.config import ModelConfig
from dpe.discriminator import Discriminator
from dpe.landmarks import split_pose_expression
from dpe.train_step import PAIR_WEIGHTS, TrainConfig, generator_objective, make_train_state, train_step
from dpe.vgg import VGG19Features, VGGWeightsNotFoundError
from train_support import random_batch

TINY = ModelConfig.tiny()


@pytest.fixture(scope="module")
def random_vgg_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vgg") / "random_vgg19.pth"
    torch.manual_seed(0)
    torch.save(VGG19Features().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def real_pair(carphone_frames) -> dict[str, torch.Tensor]:
    """Frames 0 and 60 of the sample clip: face-centred crop, area-resized to the tiny size, with landmarks."""
    cv2 = pytest.importorskip("cv2")
    dlib = pytest.importorskip("dlib")
    models = pytest.importorskip("face_recognition_models")
    frames = carphone_frames[[0, 60]]

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(models.pose_predictor_model_location())
    box = detector(np.ascontiguousarray(frames[0]), 1)[0]
    side = round(1.8 * box.width())  # the same crop for both frames, as for a track
    left = round((box.left() + box.right()) / 2 - side / 2)
    top = round((box.top() + box.bottom()) / 2 - side / 2)
    assert left >= 0 and top >= 0 and left + side <= 176 and top + side <= 144

    images, landmarks = [], []
    for frame in frames:
        frame = np.ascontiguousarray(frame)
        shape = predictor(frame, detector(frame, 1)[0])
        points = np.array([[shape.part(i).x - left, shape.part(i).y - top] for i in range(68)], dtype=np.float64)
        landmarks.append(points * TINY.size / side)
        crop = cv2.resize(frame[top : top + side, left : left + side], (TINY.size, TINY.size), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1.0)
    pose, expression = split_pose_expression(np.stack(landmarks))
    return {
        "frame_a": images[0][None],
        "frame_b": images[1][None],
        "pose_a": torch.tensor(pose[:1]),
        "pose_b": torch.tensor(pose[1:]),
        "expression_a": torch.tensor(expression[:1]),
        "expression_b": torch.tensor(expression[1:]),
    }


def _both_ways(pair: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of two samples: (A, B) and (B, A)."""
    def other_side(key: str) -> str:
        stem, side = key.rsplit("_", 1)
        return f"{stem}_{'b' if side == 'a' else 'a'}"

    return {key: torch.cat([pair[key], pair[other_side(key)]]) for key in pair}


def _floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in logs.items()}


def _reconstruction_l1(logs: dict[str, float]) -> float:
    return sum(2.0 * logs[f"l1_{name}"] if name.startswith("cycle") else logs[f"l1_{name}"]
               for name in PAIR_WEIGHTS if name != "middle")


def test_one_step_reaches_every_trainable_parameter(real_pair, random_vgg_file) -> None:
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(vgg_weights=random_vgg_file, r1_weight=10.0, r1_every=1))
    before = {name: p.detach().clone() for name, p in state.generator.named_parameters()}
    logs = train_step(state, _both_ways(real_pair))

    expected = {f"{kind}_{name}" for kind in ("l1", "vgg") for name in PAIR_WEIGHTS}
    expected |= {"g_gan", "readout", "leakage", "g_total", "d_gan", "r1", "g_grad_norm", "d_grad_norm", "skipped"}
    assert set(logs) == expected
    assert all(math.isfinite(value) for value in logs.values()), logs
    assert logs["vgg_self_pose"] > 0 and logs["r1"] > 0 and logs["g_grad_norm"] > 0 and logs["d_grad_norm"] > 0
    assert logs["skipped"] == 0
    assert state.step == 1
    for owner, module in state.modules().items():
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {owner}.{name}"
    changed = [name for name, p in state.generator.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == sum(p.requires_grad for p in state.generator.parameters())


def test_tiny_model_overfits_one_real_pair(real_pair) -> None:
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False))
    history = [_reconstruction_l1(train_step(state, real_pair)) for _ in range(25)]
    assert min(history[-5:]) < 0.8 * history[0], history


def test_gradient_accumulation_matches_the_full_batch(real_pair) -> None:
    # Per-sample discriminator statistics (stddev group 1) and no batch-covariance term:
    # then chunking must not change the gradient. Zero learning rates keep the gradients readable.
    config = ModelConfig.tiny()
    config.stddev_group = 1
    batch = {key: torch.cat([value, value.flip(0)]) for key, value in _both_ways(real_pair).items()}
    grads, logs = [], []
    for micro_batches in (1, 2):
        torch.manual_seed(0)
        train = TrainConfig(perceptual=False, leakage_weight=0.0, g_lr=0.0, d_lr=0.0, probe_lr=0.0,
                            micro_batches=micro_batches)
        state = make_train_state(config, train)
        logs.append(_floats(train_step(state, batch)))
        grads.append({f"{owner}.{name}": p.grad.clone() for owner, module in state.modules().items()
                      for name, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # float32 sums in another order (and grid_sample sample points that cross a pixel boundary) differ
    # by ~1e-4 relative overall and up to ~4e-3 in a few small tensors; a wrong chunk weighting would
    # be off by tens of percent.
    def relative(names) -> float:
        full = torch.cat([grads[0][name].flatten() for name in names])
        chunked = torch.cat([grads[1][name].flatten() for name in names])
        return float((chunked - full).norm() / full.norm())

    assert relative(grads[0]) < 1e-3
    for name in grads[0]:
        assert relative([name]) < 2e-2, name
    for name in ("l1_cycle_a", "g_gan", "readout", "d_gan"):
        assert logs[1][name] == pytest.approx(logs[0][name], rel=1e-4)


def test_bf16_autocast_step_runs(real_pair) -> None:
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False, bf16=True))
    logs = train_step(state, _both_ways(real_pair))
    assert all(math.isfinite(value) for value in logs.values()), logs
    assert all(p.dtype == torch.float32 for p in state.generator.parameters())


def test_missing_vgg_weights_name_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(VGGWeightsNotFoundError, match="perceptual=False"):
        make_train_state(TINY)
    assert make_train_state(TINY, TrainConfig(perceptual=False)).perceptual is None


def test_bad_batches_are_rejected(real_pair) -> None:
    state = make_train_state(TINY, TrainConfig(perceptual=False))
    with pytest.raises(KeyError, match="expression_b"):
        train_step(state, {k: v for k, v in real_pair.items() if k != "expression_b"})
    with pytest.raises(ValueError, match="frame_a"):
        train_step(state, {**real_pair, "frame_a": torch.zeros(1, 3, 16, 16)})
    with pytest.raises(ValueError, match="micro_batches"):
        make_train_state(TINY, TrainConfig(perceptual=False, micro_batches=0))


def test_state_resumes_from_a_checkpoint(real_pair, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False))
    train_step(state, real_pair)
    path = save_checkpoint(tmp_path / "ckpt.pt", models=state.modules(), optimizers=state.optimizers(),
                           step=state.step, config=state.model_config, extra={"train": state.config_dict()})
    torch.manual_seed(1)
    resumed = make_train_state(TINY, TrainConfig(perceptual=False))
    resumed.step = load_checkpoint(path, models=resumed.modules(), optimizers=resumed.optimizers())["step"]

    torch.manual_seed(2)
    expected = _floats(train_step(state, real_pair))
    torch.manual_seed(2)
    assert _floats(train_step(resumed, real_pair)) == pytest.approx(expected, rel=1e-5)


# --- the official objective ---------------------------------------------------------------


def test_official_preset_is_plain_data_and_configures_every_switch(random_vgg_file) -> None:
    official = TrainConfig.official(vgg_weights=random_vgg_file, micro_batches=2)
    assert TrainConfig(**asdict(official)) == official  # survives a checkpoint's asdict round trip
    assert (official.readout_weight, official.leakage_weight, official.d_gan_weight) == (0.0, 0.0, 10.0)
    assert official.micro_batches == 2 and official.g_lr == TrainConfig().g_lr
    state = make_train_state(TINY, official)
    assert state.perceptual.pyramid == "gaussian" and state.perceptual.detach_target
    ours = make_train_state(TINY, TrainConfig(vgg_weights=random_vgg_file))
    assert ours.perceptual.pyramid == "area" and not ours.perceptual.detach_target
    torch.manual_seed(0)
    logs = _floats(train_step(state, random_batch(2, 0)))
    assert all(math.isfinite(value) for value in logs.values()), logs
    assert logs["g_total"] == pytest.approx(
        logs["g_gan"] + sum(v * logs[f"vgg_{k}"] + l * logs[f"l1_{k}"] for k, (v, l) in PAIR_WEIGHTS.items()),
        rel=1e-5,
    )  # the probes are measured but carry no weight


@pytest.mark.parametrize("official", [False, True])
def test_generator_objective_is_the_official_graph_with_the_gan_term_summed(official: bool) -> None:
    """Cycles as in the official training forward; GAN = softplus(-D(cycle_b)).mean() + the same for cycle_a."""
    torch.manual_seed(0)
    config = TrainConfig.official(perceptual=False) if official else TrainConfig(perceptual=False)
    state = make_train_state(TINY, config)
    batch = random_batch(4, 1)
    _, terms, cycles = generator_objective(state, batch)

    G, D = state.generator, state.discriminator
    with torch.no_grad():
        code_a, code_b = G.encode(batch["frame_a"]), G.encode(batch["frame_b"])
        d_a, d_b = G.motion_vector(code_a.latent), G.motion_vector(code_b.latent)
        # official dec_pose/mlp_pose = our expression branch, dec_exp/mlp_exp = our pose branch
        fake_pose_b2a = G.render_expression(code_a.latent + G.expression_offset(d_b), code_a.features)
        code = G.encode(fake_pose_b2a)
        fake_pose_exp_b2a = G.render_pose(code.latent + G.pose_offset(d_b), code.features)
        fake_exp_a2b = G.render_pose(code_b.latent + G.pose_offset(d_a), code_b.features)
        code = G.encode(fake_exp_a2b)
        fake_exp_pose_a2b = G.render_expression(code.latent + G.expression_offset(d_a), code.features)
        gan = F.softplus(-D(fake_pose_exp_b2a)).mean() + F.softplus(-D(fake_exp_pose_a2b)).mean()

    torch.testing.assert_close(cycles["cycle_b"], fake_pose_exp_b2a)
    torch.testing.assert_close(cycles["cycle_a"], fake_exp_pose_a2b)
    assert float(terms["l1_middle"]) == pytest.approx(F.l1_loss(fake_pose_b2a, fake_exp_a2b).item(), rel=1e-5)
    assert float(terms["g_gan"]) == pytest.approx(gan.item(), rel=1e-5)


def test_discriminator_calls_are_separate_per_image_set() -> None:
    """Minibatch-stddev groups make a joint call differ; the step calls D once per image set, official style."""
    torch.manual_seed(0)
    assert TINY.stddev_group > 1
    discriminator = Discriminator(TINY)
    batch = random_batch(4, 2)
    with torch.no_grad():
        joint = discriminator(torch.cat([batch["frame_a"], batch["frame_b"]]))
        separate = torch.cat([discriminator(batch["frame_a"]), discriminator(batch["frame_b"])])
    assert not torch.allclose(joint, separate, rtol=1e-3, atol=0)

    state = make_train_state(TINY, TrainConfig.official(perceptual=False))
    seen: list[torch.Tensor] = []
    state.discriminator.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    train_step(state, batch)
    assert [len(images) for images in seen] == [4] * 6
    cycle_b, cycle_a = seen[:2]  # the generator's adversarial term, then the discriminator's four calls
    expected = [batch["frame_b"], cycle_b, batch["frame_a"], cycle_a]
    for got, want in zip(seen[2:], expected):
        assert torch.equal(got, want)


def test_official_discriminator_loss_weight_scales_its_gradient() -> None:
    batch = random_batch(2, 3)
    grads = []
    for weight in (1.0, 10.0):
        torch.manual_seed(0)
        state = make_train_state(TINY, TrainConfig(perceptual=False, g_lr=0.0, d_lr=0.0, d_gan_weight=weight))
        train_step(state, batch)
        grads.append(torch.cat([p.grad.flatten() for p in state.discriminator.parameters()]))
    torch.testing.assert_close(grads[1], 10 * grads[0], rtol=1e-4, atol=1e-7)


def test_before_gan_start_the_discriminator_neither_judges_nor_learns(real_pair) -> None:
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False, gan_start=2))
    discriminator = {name: p.clone() for name, p in state.discriminator.state_dict().items()}
    warm_up = [train_step(state, real_pair) for _ in range(2)]
    assert all("g_gan" not in logs and "d_gan" not in logs for logs in warm_up), warm_up
    assert all(torch.equal(p, discriminator[name]) for name, p in state.discriminator.state_dict().items())
    adversarial = train_step(state, real_pair)
    assert {"g_gan", "d_gan"} <= set(adversarial)
    assert any(not torch.equal(p, discriminator[name]) for name, p in state.discriminator.state_dict().items())
