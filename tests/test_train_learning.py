"""Proof that the loop trains: a small 64 px model fits the prepared sample on a 2-core CPU machine.

The same pieces the workers run (the pair sampler over the prepared shards, `dpe.train_step`,
the evaluation's self-reconstruction L1 on fixed training pairs), in one process with one torch
thread, as a worker with one CPU runs them (two threads on two cores busy with other work
spin-wait: measured 38 CPU-s per step instead of 0.46). Measured here (seed 0, 2 pairs per step,
about 14 s): L1 1.101 at step 0, 0.626 at step 10, 0.443 at 20, 0.414 at 30, 0.428 at 40 (0.39x;
the flow heads start as a pass-through with open masks, so step 0 copies raw encoder features; with
the official random heads it read 0.735, 0.414, 0.359, 0.334, 0.303). The test asks for under 0.5x
after 40 steps. The tests after it check the mechanisms of the demo's recipe (README, training recipe).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from train_support import prepared_sample, random_batch  # noqa: F401 (a fixture)

from dpe.config import ModelConfig
from dpe.losses import INNER_FACE_CENTRE, gradient_l1_distance, inner_face_weights, l1_distance
from dpe.train_step import TrainConfig, make_train_state, train_step
from pipelines.train.clips import ClipReader, load_catalogue
from pipelines.train.evaluation import self_reconstruction_l1
from pipelines.train.model import build_state, lr_decay_steps, plan_model, sharpness_weight
from pipelines.train.pairs import PairSampler, fixed_pairs
from pipelines.train.settings import SHARPNESS_WITHOUT_VGG, TrainSettings

STEPS = 40
BATCH = 2


@pytest.mark.slow
def test_self_reconstruction_falls_under_half_its_initial_value(prepared_sample):  # noqa: F811
    settings = TrainSettings(data=str(prepared_sample), size=64, batch=BATCH, perceptual="off", seed=0,
                             sharpness=0.0)  # L1 alone, as the curve above was measured
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(settings.seed)
        state = build_state(plan_model(settings), "cpu")
        catalogue = load_catalogue(settings.data, settings.train_split)
        sampler = PairSampler(catalogue, ClipReader(settings.data, settings.size), seed=settings.seed, rank=0)
        fixed = fixed_pairs(catalogue, ClipReader(settings.data, settings.size), 8, seed=settings.seed)
        curve = [self_reconstruction_l1(state.generator, fixed)]
        for step in range(STEPS):
            train_step(state, {k: torch.from_numpy(v) for k, v in sampler.batch(step, BATCH).items()})
            if (step + 1) % 10 == 0:
                curve.append(self_reconstruction_l1(state.generator, fixed))
    finally:
        torch.set_num_threads(threads)
    assert curve[-1] < 0.5 * curve[0], curve
    assert curve[-1] < min(curve[:-1]) * 1.1, curve  # still at its lowest, not a lucky dip


def test_the_sharpness_term_is_zero_for_the_image_and_charges_a_blurred_copy_more_than_l1_does():
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    shifted = image + 0.2  # the same edges, a colour offset
    assert gradient_l1_distance(image, image).tolist() == [0.0, 0.0]
    assert (gradient_l1_distance(blurred, image) > l1_distance(blurred, image)).all()
    assert gradient_l1_distance(shifted, image).abs().max() < 1e-6 < l1_distance(shifted, image).min()


def test_the_inner_face_weights_charge_a_blurred_face_more_and_a_blurred_corner_less_than_uniform_weights_do():
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = F.avg_pool2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    centre_x, centre_y = (round(fraction * 64) for fraction in INNER_FACE_CENTRE)

    def blurred_at(x: int, y: int) -> torch.Tensor:  # the image with one 12 px square blurred
        out = image.clone()
        out[..., y - 6:y + 6, x - 6:x + 6] = blurred[..., y - 6:y + 6, x - 6:x + 6]
        return out

    weights = inner_face_weights(64, focus=8.0)
    assert weights.mean().item() == pytest.approx(1.0)
    assert divmod(int(weights.argmax()), 64) == (centre_y, centre_x)  # (row, column) of the peak
    assert torch.equal(inner_face_weights(64, focus=0.0), torch.ones(64, 64))
    face, corner = blurred_at(centre_x, centre_y), blurred_at(8, 8)
    for distance in (l1_distance, gradient_l1_distance):
        assert distance(blurred, image, torch.ones(64, 64)) == pytest.approx(distance(blurred, image))
        assert distance(face, image, weights) > 3 * distance(face, image)
        assert distance(corner, image, weights) < 0.7 * distance(corner, image)
        assert distance(image, image, weights).item() == 0.0
    assert gradient_l1_distance(face, image, weights) > l1_distance(face, image, weights)  # blur: edges cost more
    assert TrainConfig.official().face_focus == 0.0


def test_flow_heads_hold_their_start_during_the_warmup_to_rgb_convs_get_their_own_rate_and_every_rate_decays():
    assert lr_decay_steps(TrainSettings(steps=600, lr_decay=0.25)) == (450, 600)
    assert lr_decay_steps(TrainSettings(steps=600)) is None and TrainConfig.official().lr_decay is None
    torch.manual_seed(0)
    state = make_train_state(ModelConfig.tiny(), TrainConfig(perceptual=False, flow_warmup=2, to_rgb_lr_mul=4.0,
                                                             sharpness_weight=2.0, face_focus=16.0, lr_decay=(1, 2)))
    optimizers = (state.g_optimizer, state.probe_optimizer, state.d_optimizer)

    def rates() -> list[float]:  # the generator's two groups (to-RGB apart), the probes', the discriminator's
        return [group["lr"] for optimizer in optimizers for group in optimizer.param_groups]

    base = rates()
    assert base[:2] == [0.0016, 0.0064] and len(base) == 4

    def flows_and_rgb() -> tuple[torch.Tensor, torch.Tensor]:
        generator = state.generator.pose_generator
        return generator.to_flows[-1].conv.weight.clone(), generator.to_rgbs[-1].conv[0].weight.clone()

    flow_start, rgb_start = flows_and_rgb()
    for step in range(2):
        logs = train_step(state, random_batch(2, seed=step))
        assert rates() == pytest.approx(base)  # full rates up to the decay's start (step 1)
    flow_warm, rgb_warm = flows_and_rgb()
    assert "sharp_cycle_b" in logs
    assert torch.equal(flow_warm, flow_start) and not torch.equal(rgb_warm, rgb_start)
    train_step(state, random_batch(2, seed=2))
    assert not torch.equal(flows_and_rgb()[0], flow_warm)  # released after the warm-up
    assert rates() == pytest.approx([rate * 0.1 for rate in base])  # a tenth from the decay's end (step 2) on


def test_the_sharpness_term_is_on_by_default_only_for_our_objective_without_vgg():
    def weight(**options) -> float:
        settings = TrainSettings(**options)
        return sharpness_weight(settings, perceptual=settings.perceptual == "on")

    assert weight(perceptual="off") == SHARPNESS_WITHOUT_VGG
    assert weight(perceptual="on") == 0.0
    assert weight(perceptual="off", objective="official") == 0.0
    assert weight(perceptual="on", sharpness=0.5) == 0.5
    assert TrainConfig.official().sharpness_weight == 0.0 and TrainConfig.official().flow_warmup == 0

