"""The editing job's model stage: which checkpoints it takes (and refuses, naming the keys) and how it
edits batches of crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edit_fixtures import tiny_checkpoint  # noqa: F401  (session fixture)

from dpe.checkpoint import export_official_generator, save_checkpoint
from dpe.config import ModelConfig
from dpe.model import DPEGenerator
from pipelines.edit.model import CheckpointError, CropEditor, load_weights


def test_a_train_checkpoint_file_or_its_folder_is_accepted_and_sets_the_crop_size(tiny_checkpoint):
    for given in (tiny_checkpoint, tiny_checkpoint.parent):
        weights = load_weights(str(given))
        assert weights.kind == "dpe-portrait/1" and weights.size == 32
        model = weights.build()
        assert isinstance(model, DPEGenerator) and model.cfg.size == 32


def test_an_official_dpe_checkpoint_is_accepted(tmp_path):
    torch.manual_seed(1)
    model = DPEGenerator(ModelConfig())
    export_official_generator(model, tmp_path / "dpe.pt")
    del model
    weights = load_weights(str(tmp_path / "dpe.pt"))
    assert weights.kind == "official" and weights.size == 256
    assert len(weights.state) == len(DPEGenerator(ModelConfig()).state_dict())


def test_missing_checkpoints_are_refused_before_any_work(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_weights(str(tmp_path / "dpe.pt"))
    with pytest.raises(CheckpointError, match="holds no model.pt"):
        load_weights(str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        load_weights("")


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    tiny = DPEGenerator(ModelConfig.tiny())
    export_official_generator(tiny, tmp_path / "tiny_official.pt")  # official layout, wrong sizes for dpe.pt
    with pytest.raises(CheckpointError) as caught:
        load_weights(str(tmp_path / "tiny_official.pt"))
    assert "shape mismatches" in str(caught.value) and "enc.net_app" in str(caught.value)
    torch.save({"state": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'gen' state dict"):
        load_weights(str(tmp_path / "other.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_weights(str(tmp_path / "text.pt"))


def test_a_project_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    small = ModelConfig.tiny()
    other = ModelConfig(size=32, style_dim=64, motion_dim=5, channels={4: 32, 8: 32, 16: 16, 32: 16})
    save_checkpoint(tmp_path / "model.pt", models={"generator": DPEGenerator(other)}, config=small)
    with pytest.raises(CheckpointError, match="model 'generator'.*shape mismatches"):
        load_weights(str(tmp_path / "model.pt"))
    save_checkpoint(tmp_path / "nogen.pt", models={"discriminator": torch.nn.Linear(1, 1)}, config=small)
    with pytest.raises(CheckpointError, match="no model 'generator'"):
        load_weights(str(tmp_path / "nogen.pt"))


@pytest.fixture(scope="module")
def editor(tiny_checkpoint):
    return CropEditor(load_weights(str(tiny_checkpoint)), precision="float32", batch=3, device="cpu", threads=1)


def _crops(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def test_a_still_driver_edits_like_the_same_frame_repeated(editor):
    source, still = _crops(7, 0), _crops(1, 1)
    once = editor.edit(source, still, np.zeros(7, int), "expression", 1.0, "absolute")
    repeated = editor.edit(source, np.repeat(still, 7, axis=0), np.arange(7), "expression", 1.0, "absolute")
    assert once.shape == (7, 32, 32, 3) and once.dtype == np.uint8
    assert np.abs(once.astype(int) - repeated.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["expression", "pose", "both"])
def test_relative_motion_from_the_driver_itself_leaves_the_source_as_strength_zero_does(editor, mode):
    source, driver = _crops(4, 2), _crops(1, 3)
    relative = editor.edit(source, driver, np.zeros(4, int), mode, 1.0, "relative", reference=driver)
    unchanged = editor.edit(source, driver, np.zeros(4, int), mode, 0.0, "absolute")
    driven = editor.edit(source, driver, np.zeros(4, int), mode, 1.0, "absolute")
    assert np.abs(relative.astype(int) - unchanged.astype(int)).max() <= 1
    assert np.abs(driven.astype(int) - unchanged.astype(int)).max() > 1, "the driver must change something"


def test_crops_of_another_size_are_refused(editor):
    with pytest.raises(ValueError, match="32 px"):
        editor.edit(_crops(1, 0)[:, :16, :16], _crops(1, 1), np.zeros(1, int), "expression", 1.0, "absolute")


def test_a_shared_driver_is_encoded_once_across_chunks_and_videos(editor):
    source, driver = _crops(5, 4), _crops(3, 5)
    frames = np.array([10, 11, 12])
    first = editor.edit(source, driver, np.array([0, 1, 2, 2, 1]), "expression", 1.0, "absolute",
                        driving_key="smile.mp4", driving_frames=frames)
    # The same frames of the same driver come from the cache: what is passed as their crops is not looked at.
    again = editor.edit(source, np.zeros_like(driver), np.array([0, 1, 2, 2, 1]), "expression", 1.0, "absolute",
                        driving_key="smile.mp4", driving_frames=frames)
    assert np.abs(first.astype(int) - again.astype(int)).max() <= 1
    other = editor.edit(source, np.zeros_like(driver), np.array([0, 1, 2, 2, 1]), "expression", 1.0, "absolute",
                        driving_key="other.mp4", driving_frames=frames)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 1, "another driver is encoded afresh"
