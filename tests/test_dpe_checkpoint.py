"""Official checkpoint loading (name mapping, refusal of mismatching files) and our own checkpoints."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import pytest
import torch

from dpe.checkpoint import (
    config_from_checkpoint,
    load_checkpoint,
    load_official_discriminator,
    load_official_generator,
    official_to_ours,
    ours_to_official,
    save_checkpoint,
)
from dpe.config import ModelConfig
from dpe.discriminator import Discriminator
from dpe.model import DPEGenerator

LAYOUT = json.loads((Path(__file__).parent / "data" / "dpe_state_dict_layout.json").read_text())
TINY = ModelConfig.tiny()


def _official(model: DPEGenerator) -> dict[str, torch.Tensor]:
    """The model's weights under official names (what dpe.pt would hold for this config)."""
    return {ours_to_official(k): v.clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def tiny_pair():
    torch.manual_seed(0)
    source = DPEGenerator(TINY)
    torch.manual_seed(1)
    target = DPEGenerator(TINY)
    return source, target


def test_official_names_and_shapes_match_layout():
    model = DPEGenerator(ModelConfig())
    mapped = {ours_to_official(k): list(v.shape) for k, v in model.state_dict().items()}
    assert mapped == LAYOUT["generator"]
    assert list(mapped) == list(LAYOUT["generator"])  # same order, too
    assert all(ours_to_official(official_to_ours(k)) == k for k in LAYOUT["generator"])
    disc = Discriminator(ModelConfig())
    assert {k: list(v.shape) for k, v in disc.state_dict().items()} == LAYOUT["discriminator"]


def test_behaviour_names_map_to_swapped_official_modules():
    assert official_to_ours("dec_pose.convs.0.conv.weight") == "expression_generator.convs.0.conv.weight"
    assert official_to_ours("dec_exp.input.input") == "pose_generator.input.input"
    assert official_to_ours("mlp_pose.0.weight") == "expression_head.0.weight"
    assert official_to_ours("mlp_exp.2.bias") == "pose_head.2.bias"
    assert official_to_ours("mlp.4.weight") == "motion.mlp.4.weight"
    assert official_to_ours("dir.weight") == "motion.directions.weight"
    assert official_to_ours("enc.net_app.convs.7.weight") == "encoder.convs.7.weight"


def test_load_official_file_with_training_args(tmp_path, tiny_pair):
    source, target = tiny_pair
    path = tmp_path / "dpe.pt"
    torch.save({"gen": _official(source), "args": argparse.Namespace(size=TINY.size, lr=0.002)}, path)
    load_official_generator(path, target)
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_bare_state_dict(tiny_pair):
    source, target = tiny_pair
    load_official_generator(_official(source), target)
    assert torch.equal(source.motion.directions.weight, target.motion.directions.weight)


def _refused(target: DPEGenerator, state: dict, *needles: str) -> str:
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_official_generator({"gen": state}, target)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    # nothing was copied
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    return message


def test_refuses_missing_keys(tiny_pair):
    source, target = tiny_pair
    state = _official(source)
    for key in ("dir.weight", "dec_exp.convs.0.conv.weight"):
        del state[key]
    msg = _refused(target, state, "missing keys 2", "dir.weight", "dec_exp.convs.0.conv.weight")
    assert "official DPE checkpoint" in msg  # says what to do


def test_refuses_unexpected_keys(tiny_pair):
    source, target = tiny_pair
    state = _official(source)
    state["dec.direction.weight"] = torch.zeros(3)  # a LIA key
    state["enc.net_app.convs.9.weight"] = torch.zeros(3)
    _refused(target, state, "unexpected keys 2", "dec.direction.weight", "enc.net_app.convs.9.weight")


def test_refuses_wrong_shapes_and_lists_the_first_few(tiny_pair):
    source, target = tiny_pair
    state = _official(source)
    wrong = [k for k in state if k.endswith("modulation.weight")]
    for k in wrong:
        state[k] = torch.zeros(2, 2)
    msg = _refused(target, state, f"shape mismatches {len(wrong)}", wrong[0], "(2, 2)",
                   f"+{len(wrong) - 5} more")
    assert wrong[-1] not in msg


def test_refuses_official_file_for_other_config(tiny_pair):
    """The official 256-px layout against the tiny model: every kind of mismatch, one message."""
    _, target = tiny_pair
    state = {k: torch.zeros(s) for k, s in LAYOUT["generator"].items()}
    _refused(target, state, "missing keys", "unexpected keys", "shape mismatches", "ModelConfig")


def test_refuses_files_that_are_not_checkpoints(tmp_path, tiny_pair):
    _, target = tiny_pair
    path = tmp_path / "evil.pt"
    torch.save({"gen": {"x": datetime.datetime(2024, 1, 1)}}, path)  # an arbitrary pickled object
    with pytest.raises(ValueError, match="weights_only"):
        load_official_generator(path, target)
    with pytest.raises(ValueError, match="'gen'"):
        load_official_generator({"something": 1}, target)


def test_discriminator_loader(tiny_pair):
    torch.manual_seed(3)
    source, target = Discriminator(TINY), Discriminator(TINY)
    load_official_discriminator({"gen": {}, "dis": source.state_dict()}, target)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    load_official_discriminator({"disc": source.state_dict()}, target)
    with pytest.raises(ValueError, match="no discriminator"):
        load_official_discriminator({"gen": _official(tiny_pair[0])}, target)
    bad = dict(source.state_dict())
    bad.pop("final_linear.1.bias")
    with pytest.raises(ValueError, match="final_linear.1.bias"):
        load_official_discriminator({"dis": bad}, target)


# ------------------------------------------------------------------------------ own checkpoints
def _train_step(gen, disc, g_opt, d_opt):
    x = torch.rand(2, 3, TINY.size, TINY.size) * 2 - 1
    code = gen.encode(x)
    out = gen.reconstruct_expression(code)
    loss = (out - x).abs().mean() + torch.nn.functional.softplus(-disc(out)).mean()
    g_opt.zero_grad(), d_opt.zero_grad()
    loss.backward()
    g_opt.step(), d_opt.step()


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    gen, disc = DPEGenerator(TINY), Discriminator(TINY)
    g_opt = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=1e-3, betas=(0.0, 0.99))
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.0, 0.99))
    _train_step(gen, disc, g_opt, d_opt)
    path = save_checkpoint(tmp_path / "ckpt" / "step-000001.pt", models={"generator": gen, "discriminator": disc},
                           optimizers={"generator": g_opt, "discriminator": d_opt}, step=1, config=TINY,
                           extra={"run": "test", "losses": [0.5, 0.25]})
    assert [p.name for p in path.parent.iterdir()] == ["step-000001.pt"]  # no temp file left behind
    # plain data only: loadable with weights_only=True without our help
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 1 and raw["extra"]["losses"] == [0.5, 0.25]

    torch.manual_seed(1)
    gen2, disc2 = DPEGenerator(config_from_checkpoint(raw)), Discriminator(TINY)
    g_opt2 = torch.optim.Adam([p for p in gen2.parameters() if p.requires_grad], lr=1e-3, betas=(0.0, 0.99))
    d_opt2 = torch.optim.Adam(disc2.parameters(), lr=1e-3, betas=(0.0, 0.99))
    payload = load_checkpoint(path, models={"generator": gen2, "discriminator": disc2},
                              optimizers={"generator": g_opt2, "discriminator": d_opt2})
    assert payload["step"] == 1 and config_from_checkpoint(payload) == TINY
    for a, b in zip(gen.state_dict().values(), gen2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(disc.state_dict().values(), disc2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(g_opt.state_dict()["state"][0]["exp_avg_sq"], g_opt2.state_dict()["state"][0]["exp_avg_sq"])
    # training continues identically from the restored state
    torch.manual_seed(5)
    _train_step(gen, disc, g_opt, d_opt)
    torch.manual_seed(5)
    _train_step(gen2, disc2, g_opt2, d_opt2)
    for a, b in zip(gen.parameters(), gen2.parameters()):
        assert torch.equal(a, b)


def test_own_checkpoint_refuses_other_config(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", models={"generator": DPEGenerator(TINY)}, step=3, config=TINY)
    other = ModelConfig(size=32, style_dim=32, motion_dim=6, channels=TINY.channels)
    with pytest.raises(ValueError, match=r"motion\.directions.*config_from_checkpoint"):
        load_checkpoint(path, models={"generator": DPEGenerator(other)})
    with pytest.raises(ValueError, match="no model 'discriminator'"):
        load_checkpoint(path, models={"discriminator": Discriminator(TINY)})
    official = tmp_path / "dpe.pt"
    torch.save({"gen": {}}, official)
    with pytest.raises(ValueError, match="load_official_generator"):
        load_checkpoint(official)


def test_save_is_atomic(tmp_path, monkeypatch):
    gen = DPEGenerator(TINY)
    path = save_checkpoint(tmp_path / "c.pt", models={"generator": gen}, step=1, config=TINY)
    before = path.read_bytes()

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, models={"generator": gen}, step=2, config=TINY)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # and the temp file is gone
