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
    LIA_PREFIXES,
    config_from_checkpoint,
    export_official_generator,
    initialise_from_official,
    load_checkpoint,
    load_lia_initialisation,
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


# ------------------------------------------------------------------------------ training initialisation and export
def _random_from_layout(layout: dict[str, list[int]], kernels: dict[str, torch.Tensor], seed: int) -> dict:
    """Random tensors with exactly the layout's keys and shapes; blur kernels (buffers) as given."""
    g = torch.Generator().manual_seed(seed)
    return {k: kernels[k].clone() if k.endswith(".kernel") else torch.randn(shape, generator=g)
            for k, shape in layout.items()}


def _lia_layout() -> dict[str, list[int]]:
    """LIA's vox.pt generator layout (wyhsirius/LIA networks/generator.py, encoder.py, styledecoder.py).

    Its encoder is DPE's ``enc.net_app``; its motion MLP ``enc.fc`` is DPE's ``mlp``; its single
    decoder ``dec`` is one DPE generator plus the direction matrix ``dec.direction``.
    """
    official = LAYOUT["generator"]
    layout = {k: s for k, s in official.items() if k.startswith("enc.net_app.")}
    layout.update({"enc.fc." + k[len("mlp."):]: s for k, s in official.items() if k.startswith("mlp.")})
    layout["dec.direction.weight"] = official["dir.weight"]
    layout.update({"dec." + k[len("dec_pose."):]: s for k, s in official.items() if k.startswith("dec_pose.")})
    return layout


def _lia_kernels(model: DPEGenerator) -> dict[str, torch.Tensor]:
    ours = model.state_dict()
    kernels = {ours_to_official(k): v for k, v in ours.items() if k.endswith(".kernel")}
    kernels.update({"dec." + k[len("dec_pose."):]: v for k, v in kernels.items() if k.startswith("dec_pose.")})
    return kernels


def _lia_from(model: DPEGenerator) -> dict[str, torch.Tensor]:
    """A LIA-format generator dict for ``model``'s size: its three shared parts plus a decoder to ignore."""
    out = {}
    for key, value in model.state_dict().items():
        for lia, ours in LIA_PREFIXES:
            if key.startswith(ours):
                out[lia + key[len(ours):]] = value.clone()
    prefix = "expression_generator."
    out.update({"dec." + k[len(prefix):]: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)})
    return out


def _unchanged(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_initialise_from_an_official_training_snapshot(tmp_path):
    torch.manual_seed(0)
    gen, disc = DPEGenerator(ModelConfig()), Discriminator(ModelConfig())
    kernels = {ours_to_official(k): v for k, v in gen.state_dict().items()}
    official_gen = _random_from_layout(LAYOUT["generator"], kernels, 1)
    official_dis = _random_from_layout(LAYOUT["discriminator"], disc.state_dict(), 2)
    path = tmp_path / "000300.pt"
    torch.save({"gen": official_gen, "dis": official_dis, "g_optim": {}, "d_optim": {},
                "args": argparse.Namespace(size=256)}, path)

    assert initialise_from_official(path, gen, disc) == ["generator", "discriminator"]
    for key, value in gen.state_dict().items():
        assert torch.equal(value, official_gen[ours_to_official(key)]), key
    for key, value in disc.state_dict().items():
        assert torch.equal(value, official_dis[key]), key


def test_initialise_from_the_released_file_keeps_the_discriminator(tiny_pair):
    source, target = tiny_pair
    torch.manual_seed(2)
    disc = Discriminator(TINY)
    disc_before = {k: v.clone() for k, v in disc.state_dict().items()}
    assert initialise_from_official({"gen": _official(source)}, target, disc) == ["generator"]
    assert _unchanged(source.state_dict(), target) and _unchanged(disc_before, disc)


def test_initialise_from_official_checks_both_networks_before_copying(tiny_pair):
    source, target = tiny_pair
    torch.manual_seed(2)
    disc = Discriminator(TINY)
    bad_dis = {k: v for k, v in disc.state_dict().items() if k != "final_linear.1.bias"}
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="final_linear.1.bias"):
        initialise_from_official({"gen": _official(source), "dis": bad_dis}, target, disc)
    assert _unchanged(before, target)  # the generator was valid but is not half-loaded


def test_lia_initialisation_copies_exactly_the_three_shared_parts(tmp_path):
    torch.manual_seed(0)
    model = DPEGenerator(ModelConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lia = _random_from_layout(_lia_layout(), _lia_kernels(model), 3)
    path = tmp_path / "vox.pt"
    torch.save({"gen": lia, "dis": {}, "args": argparse.Namespace(size=256)}, path)

    loaded = load_lia_initialisation(path, model)
    shared = ("encoder.", "motion.mlp.", "motion.directions.")
    assert loaded == [k for k in before if k.startswith(shared)]
    assert len(loaded) == 45 + 10 + 1
    after = model.state_dict()
    assert torch.equal(after["encoder.convs.7.weight"], lia["enc.net_app.convs.7.weight"])
    assert torch.equal(after["motion.mlp.4.bias"], lia["enc.fc.4.bias"])
    assert torch.equal(after["motion.directions.weight"], lia["dec.direction.weight"])
    for key in loaded:
        lia_key = next(theirs + key[len(ours):] for theirs, ours in LIA_PREFIXES if key.startswith(ours))
        assert torch.equal(after[key], lia[lia_key]), key
    for key, value in after.items():
        if key not in loaded:
            assert torch.equal(value, before[key]), f"{key} changed"  # heads and both generators stay


def _lia_refused(model: DPEGenerator, state: dict, *needles: str) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_lia_initialisation({"gen": state}, model)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert _unchanged(before, model)
    return message


def test_lia_initialisation_refuses_other_files(tiny_pair):
    source, target = tiny_pair
    assert load_lia_initialisation(_lia_from(source), target)  # a bare LIA state dict is fine
    assert torch.equal(target.motion.directions.weight, source.motion.directions.weight)

    torch.manual_seed(4)
    model = DPEGenerator(TINY)
    # an official DPE file: no enc.fc.* / dec.direction.* (mlp.* and dir.* are DPE's names)
    _lia_refused(model, _official(source), "missing keys 11", "enc.fc.0.weight", "initialise_from_official")
    wrong = _lia_from(source)
    wrong["enc.fc.4.weight"] = torch.zeros(3, 3)
    wrong["enc.net_app.convs.9.weight"] = torch.zeros(3)
    _lia_refused(model, wrong, "enc.fc.4.weight (3, 3)", "unexpected keys 1: enc.net_app.convs.9.weight")
    del wrong["dec.direction.weight"]
    _lia_refused(model, wrong, "missing keys 1: dec.direction.weight")
    # vox.pt itself against the tiny model
    _lia_refused(model, {k: torch.zeros(s) for k, s in _lia_layout().items()}, "shape mismatches", "ModelConfig()")


def test_export_round_trip_gives_identical_outputs(tmp_path, tiny_pair):
    source, target = tiny_pair
    path = export_official_generator(source, tmp_path / "out" / "dpe.pt")
    assert [p.name for p in path.parent.iterdir()] == ["dpe.pt"]  # written atomically, no temp file left
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["gen"] and list(raw["gen"]) == list(_official(source))
    load_official_generator(path, target)
    x = torch.rand(2, 3, TINY.size, TINY.size, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        for model_output in ("reconstruct_expression", "reconstruct_pose"):
            expected = getattr(source, model_output)(source.encode(x))
            assert torch.equal(getattr(target, model_output)(target.encode(x)), expected)


def test_export_has_the_official_layout(tmp_path):
    raw = torch.load(export_official_generator(DPEGenerator(ModelConfig()), tmp_path / "dpe.pt"), weights_only=True)
    assert list(raw["gen"]) == list(LAYOUT["generator"])
    assert {k: list(v.shape) for k, v in raw["gen"].items()} == LAYOUT["generator"]


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
