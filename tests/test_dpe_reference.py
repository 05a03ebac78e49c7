"""Faithfulness: our networks reproduce the official DPE code on its reference data.

The reference (computed by running the official networks on CPU) uses deterministic weights that
can be rebuilt from the state-dict layout alone: every tensor is
``torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key)))``, times 0.1 for
keys ending in ``bias``; the ``.kernel`` blur buffers are not random and come from our model.
The state dict built that way goes through the official-checkpoint loader, so the test also
checks the official -> ours name mapping.

Tolerance: intermediates agree to ~1e-6 relative. The images agree to ~2e-4 in max|diff|/max|ref|
(median |diff| ~4e-7): a float64 run of this implementation is ~2e-4 away from the float32
reference as well, so that is the float32 noise of the reference itself (a few isolated
pixels), not a modelling difference. Where a flow vector lands next to a pixel boundary, the CPU's
summation order decides which side `grid_sample` reads from, so a lone pixel can reach ~2e-3 on one
machine and 2e-4 on another. We therefore bound the mean at 1e-5 and the relative L2 at 1e-4 for
every array, the max at 1e-4 for intermediates, and for images allow at most a handful of isolated
elements (out of ~400k) above 1e-3 and none above 1e-2.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pytest
import torch

from dpe.checkpoint import load_official_discriminator, load_official_generator, ours_to_official
from dpe.config import ModelConfig
from dpe.discriminator import Discriminator
from dpe.model import DPEGenerator

DATA = Path(__file__).parent / "data"
LAYOUT_PATH = DATA / "dpe_state_dict_layout.json"
# pixels kept by the reduced copy in tests/data (see tests/data/README.md)
REDUCED = ("out_exp", "out_pose", "out_both", "feat_source_1")


def crc32_randn(key: str, shape: list[int]) -> torch.Tensor:
    """The reference README's rule for every non-kernel tensor."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    return t * 0.1 if key.endswith("bias") else t


def official_state_dict_from_layout(layout: Mapping[str, list[int]], kernels: Mapping[str, torch.Tensor],
                                    seed_rule: Callable[[str, list[int]], torch.Tensor] = crc32_randn
                                    ) -> dict[str, torch.Tensor]:
    """A state dict with exactly the layout's keys (official names and order).

    ``kernels`` gives the ``.kernel`` blur buffers by official name (take them from our model).
    """
    out = {}
    for key, shape in layout.items():
        if key.endswith(".kernel"):
            out[key] = kernels[key].detach().clone()
        else:
            out[key] = seed_rule(key, shape)
    return out


def load_layout() -> dict:
    return json.loads(LAYOUT_PATH.read_text())


def _reference_file() -> tuple[Path, bool]:
    """(path, full) of the reference npz: the full shared file when available, else the reduced copy."""
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "reference"
    for folder in (os.environ.get("DPE_REFERENCE_DIR"), beside_checkout):
        if folder and (Path(folder) / "dpe_reference.npz").is_file():
            return Path(folder) / "dpe_reference.npz", True
    return DATA / "dpe_reference_small.npz", False


@pytest.fixture(scope="module")
def reference_run():
    return run_reference(*_reference_file())


def run_reference(path: Path, full: bool) -> tuple[dict, dict]:
    """(reference arrays, our arrays) for the reference file at ``path``."""
    ref = dict(np.load(path))
    layout = load_layout()
    cfg = ModelConfig()
    gen, disc = DPEGenerator(cfg).eval(), Discriminator(cfg).eval()
    gen_kernels = {ours_to_official(k): v for k, v in gen.state_dict().items() if k.endswith(".kernel")}
    load_official_generator({"gen": official_state_dict_from_layout(layout["generator"], gen_kernels)}, gen)
    dis_kernels = {k: v for k, v in disc.state_dict().items() if k.endswith(".kernel")}
    load_official_discriminator({"dis": official_state_dict_from_layout(layout["discriminator"], dis_kernels)},
                                disc)

    source, driving = torch.from_numpy(ref["source"]), torch.from_numpy(ref["driving"])
    ours = {}
    with torch.no_grad():
        src = gen.encode(source)
        drv = gen.encode(driving)
        ours["w_source"], ours["w_driving"] = src.latent, drv.latent
        ours["feat_source_0"], ours["feat_source_1"] = src.features[0], src.features[1]
        ours["alpha_driving"] = gen.motion_coefficients(drv.latent)
        d = gen.motion_vector(drv.latent)
        ours["directions_driving"] = d
        ours["mlp_pose_driving"] = gen.expression_offset(d)  # official mlp_pose = our expression head
        ours["mlp_exp_driving"] = gen.pose_offset(d)  # official mlp_exp = our pose head
        # official `exp`: dec_pose(w_S + mlp_pose(d_D), feats_S)
        ours["out_exp"] = gen.render_expression(src.latent + gen.expression_offset(d), src.features)
        # official `pose`: dec_exp(w_S + mlp_exp(d_D), feats_S)
        ours["out_pose"] = gen.render_pose(src.latent + gen.pose_offset(d), src.features)
        # official `both`: re-encode the `exp` result, then dec_exp(w_X + mlp_exp(d_D), feats_X)
        x = gen.encode(ours["out_exp"])
        ours["out_both"] = gen.render_pose(x.latent + gen.pose_offset(d), x.features)
        ours["disc_source"] = disc(source)
    arrays = {}
    for name, value in ours.items():
        value = value.numpy()
        if not full and name in REDUCED:
            value = value[..., 1::4, 2::4]
        arrays[name] = value
    return ref, arrays


REFERENCE_ARRAYS = ["w_source", "w_driving", "feat_source_0", "feat_source_1", "alpha_driving",
                    "directions_driving", "mlp_pose_driving", "mlp_exp_driving", "out_exp", "out_pose",
                    "out_both", "disc_source"]


def test_every_reference_array_is_checked(reference_run):
    ref, _ = reference_run
    assert set(ref) - {"source", "driving"} == set(REFERENCE_ARRAYS)


@pytest.mark.parametrize("name", REFERENCE_ARRAYS)
def test_matches_official(reference_run, name):
    ref, ours = reference_run
    expected, got = ref[name], ours[name]
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    max_rel = np.abs(got - expected).max() / scale
    mean_rel = np.abs(got - expected).mean() / scale
    if name.startswith("out_"):
        isolated = int((np.abs(got - expected) / scale > 1e-3).sum())
        assert isolated <= 8, f"{name}: {isolated} elements above 1e-3 relative error"
        assert max_rel < 1e-2, f"{name}: max rel error {max_rel:.2e}"
    else:
        assert max_rel < 1e-4, f"{name}: max rel error {max_rel:.2e}"
    assert mean_rel < 1e-5, f"{name}: mean rel error {mean_rel:.2e}"
    norm_rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert norm_rel < 1e-4, f"{name}: relative L2 error {norm_rel:.2e}"


def test_layout_counts_match_our_models():
    layout = load_layout()
    cfg = ModelConfig()
    assert sum(int(np.prod(s)) for k, s in layout["generator"].items() if not k.endswith(".kernel")) \
        == layout["generator_parameters"] == 69_101_798
    assert sum(p.numel() for p in DPEGenerator(cfg).parameters()) == layout["generator_parameters"]
    assert sum(p.numel() for p in Discriminator(cfg).parameters()) == layout["discriminator_parameters"] \
        == 24_001_089
