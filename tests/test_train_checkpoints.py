"""Run settings, initialisation from official / LIA files, checkpoints found by path, export round trip."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpe.checkpoint import load_checkpoint, load_official_generator, ours_to_official, save_checkpoint
from dpe.config import ModelConfig
from dpe.model import DPEGenerator
from flows.cli import main
from pipelines.runs import CHECKPOINT_FILE, checkpoint_dir_name, latest_checkpoint, point_latest, resolve_checkpoint
from pipelines.train import checkpoints
from pipelines.train.loop import BackgroundVisuals, CheckpointSchedule
from pipelines.train.model import INIT_LIA, INIT_OFFICIAL, apply_init, build_state, detect_init, plan_model
from pipelines.train.settings import TrainSettings, model_shape

SETTINGS = TrainSettings(size=32, perceptual="off")
LIA_NAMES = {"encoder.": "enc.net_app.", "motion.mlp.": "enc.fc.", "motion.directions.": "dec.direction."}


def _random_like(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in state_dict.items()}


@pytest.fixture()
def state():
    torch.manual_seed(0)
    return build_state(plan_model(SETTINGS), "cpu")


def test_settings_are_checked_with_the_option_and_the_fix():
    TrainSettings(workers=2, batch=4, micro_batches=2)
    with pytest.raises(ValueError, match="--batch: 5: must be a multiple of --workers"):
        TrainSettings(workers=2, batch=5)
    with pytest.raises(ValueError, match="--micro-batches: 3: must divide the per-worker batch"):
        TrainSettings(workers=2, batch=4, micro_batches=3)
    with pytest.raises(ValueError, match="--name: '../x'"):
        TrainSettings(name="../x")
    with pytest.raises(ValueError, match="--size: 48: must be a power of two"):
        TrainSettings(size=48)


def test_the_official_preset_takes_the_official_batch_and_says_where_a_run_departs(caplog):
    assert (TrainSettings().batch, TrainSettings(objective="official").batch) == (8, 64)
    assert TrainSettings(objective="official", batch=16).batch == 16
    with pytest.raises(ValueError, match="--ema-decay: 1.0: must lie strictly between 0 and 1"):
        TrainSettings(ema_decay=1.0)
    with caplog.at_level("WARNING"):
        plan = plan_model(TrainSettings(size=32, perceptual="off", objective="official", batch=4, micro_batches=2,
                                        bf16=True, ema_decay=0.999, grad_clip=1.0))
    warnings = caplog.text
    assert "without LIA's vox.pt" in warnings and "--bf16" in warnings and "--micro-batches 2" in warnings
    assert (plan.train.ema_decay, plan.train.grad_clip, plan.train.d_gan_weight) == (0.999, 1.0, 10.0)
    caplog.clear()
    with caplog.at_level("WARNING"):
        plan_model(TrainSettings(size=32, perceptual="off", batch=4, micro_batches=2, bf16=True))
    assert "official" not in caplog.text


def test_model_presets():
    assert ModelConfig(**model_shape(256, "auto")).to_dict() == ModelConfig().to_dict()  # the released model
    small = ModelConfig(**model_shape(64, "auto"))
    assert (small.size, small.style_dim, small.channels[64]) == (64, 32, 16)
    assert ModelConfig(**model_shape(64, "official")).channels[64] == 256


def test_init_from_an_official_file_loads_generator_and_discriminator(state, tmp_path):
    generator = _random_like(state.generator.state_dict(), 1)
    discriminator = _random_like(state.discriminator.state_dict(), 2)
    path = tmp_path / "dpe.pt"
    torch.save({"gen": {ours_to_official(k): v for k, v in generator.items()}, "dis": discriminator}, path)
    assert detect_init(str(path), state.model_config) == INIT_OFFICIAL
    assert apply_init(state, INIT_OFFICIAL, path.read_bytes()) == ["generator", "discriminator"]
    assert all(torch.equal(state.generator.state_dict()[k], v) for k, v in generator.items())
    assert all(torch.equal(state.discriminator.state_dict()[k], v) for k, v in discriminator.items())


def test_init_from_a_lia_file_copies_encoder_motion_and_directions_only(state, tmp_path):
    before = {k: v.clone() for k, v in state.generator.state_dict().items()}
    ours = _random_like({k: v for k, v in before.items() if k.startswith(tuple(LIA_NAMES))}, 3)
    lia = {next(theirs + k[len(mine):] for mine, theirs in LIA_NAMES.items() if k.startswith(mine)): v
           for k, v in ours.items()}
    lia["dec.synthesis.conv1.weight"] = torch.randn(4, 4)  # LIA's own decoder: never copied
    path = tmp_path / "vox.pt"
    torch.save({"gen": lia, "disc": {"convs.0.0.weight": torch.randn(2)}}, path)
    assert detect_init(str(path), state.model_config) == INIT_LIA
    apply_init(state, INIT_LIA, path.read_bytes())
    after = state.generator.state_dict()
    assert ours and all(torch.equal(after[k], v) for k, v in ours.items())
    untouched = [k for k in before if k not in ours]
    assert any(k.startswith("expression_generator.") for k in untouched)
    assert all(torch.equal(after[k], before[k]) for k in untouched)


def test_a_file_of_another_model_is_refused_with_both_reasons(tmp_path):
    other = DPEGenerator(ModelConfig.tiny())
    path = tmp_path / "other.pt"
    torch.save({"gen": {ours_to_official(k): v for k, v in other.state_dict().items()}}, path)
    with pytest.raises(ValueError, match="neither an official DPE checkpoint nor LIA's vox.pt.*size 32"):
        detect_init(str(path), ModelConfig(**model_shape(32, "small")))
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        detect_init(str(tmp_path / "missing.pt"), ModelConfig(**model_shape(32, "small")))


def _write_run_checkpoint(state, run_dir, name: str, step: int):
    dir_name = checkpoint_dir_name(step)
    save_checkpoint(run_dir / name / dir_name / CHECKPOINT_FILE, models=state.modules(),
                    optimizers=state.optimizers(), step=step, config=state.model_config, extra={"settings": {}})
    point_latest(str(run_dir), name, dir_name)


def test_checkpoints_are_found_by_file_folder_run_or_latest(state, tmp_path):
    for step in (3, 12):
        _write_run_checkpoint(state, tmp_path, "demo", step)
    (tmp_path / "demo" / "checkpoint_00000020").mkdir()  # an upload that never finished: no model.pt
    newest = f"{tmp_path}/demo/checkpoint_00000012/model.pt"
    assert latest_checkpoint(str(tmp_path), "demo") == (12, "demo/checkpoint_00000012/model.pt")
    assert resolve_checkpoint(f"{tmp_path}/demo") == newest
    assert resolve_checkpoint(f"{tmp_path}/demo/latest") == newest
    assert resolve_checkpoint(f"{tmp_path}/demo/checkpoint_00000003").endswith("00000003/model.pt")
    assert resolve_checkpoint(newest) == newest
    assert (tmp_path / "demo" / "latest").resolve().name == "checkpoint_00000012"
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint(f"{tmp_path}/demo/checkpoint_00000020")


def test_export_writes_the_official_format_that_the_loader_reads_back(state, tmp_path, capsys):
    _write_run_checkpoint(state, tmp_path, "demo", 7)
    output = tmp_path / "exported.pt"
    assert main(["train", "--export", f"{tmp_path}/demo/latest", str(output)]) == 0
    assert "step 7" in capsys.readouterr().out
    content = torch.load(output, weights_only=True)
    assert list(content) == ["gen"]
    assert list(content["gen"]) == [ours_to_official(k) for k in state.generator.state_dict()]
    config = ModelConfig.from_dict(load_checkpoint(output.parent / "demo/latest/model.pt")["config"])
    loaded = load_official_generator(output, DPEGenerator(config))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.generator.state_dict().items())
    assert main(["train", "--export", str(tmp_path / "nothing"), str(output)]) == 2


def test_export_takes_the_moving_average_when_the_run_kept_one(tmp_path):
    torch.manual_seed(0)
    state = build_state(plan_model(TrainSettings(size=32, perceptual="off", ema_decay=0.5)), "cpu")
    with torch.no_grad():
        for p in state.generator_ema.parameters():
            p.add_(1.0)  # the average differs from the generator
    _write_run_checkpoint(state, tmp_path, "averaged", 3)
    output = tmp_path / "exported.pt"
    assert main(["train", "--export", f"{tmp_path}/averaged/latest", str(output)]) == 0
    loaded = load_official_generator(output, DPEGenerator(state.model_config))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.generator_ema.state_dict().items())


def test_an_object_store_run_gets_atomic_checkpoints_outputs_and_export(state, s3_server, tmp_path):
    from ray.train import Checkpoint

    from pipelines.storage import OutputStore
    from pipelines.train.outputs import RunOutputs

    runs = f"{s3_server.bucket('train-runs')}/runs"
    local = tmp_path / "local"
    save_checkpoint(local / CHECKPOINT_FILE, models=state.modules(), optimizers=state.optimizers(),
                    step=5, config=state.model_config)
    upload = checkpoints.upload_checkpoint(runs, "demo")
    persisted = upload(Checkpoint.from_directory(str(local)), "checkpoint_00000005")
    assert persisted.path.endswith("runs/demo/checkpoint_00000005")
    assert latest_checkpoint(runs, "demo") == (5, "demo/checkpoint_00000005/model.pt")

    outputs = RunOutputs(runs, "demo", steps=5, start_step=0, world_size=1)
    outputs.log(5, {"g_total": 1.5, "pairs_per_s": 3.0}, eta_s=0.0)
    outputs.skip({"kx": ("bad_sample", "sample kx: cut short")})
    outputs.evaluation(5, {"train_self_l1": 0.3})
    final = outputs.finish(5)
    store = OutputStore(runs)
    files = store.list("demo")
    assert {"demo/metrics.csv", "demo/metrics.json", "demo/loss_curve.png", "demo/skipped.json", "demo/starts.json",
            "demo/evaluations.json", "demo/progress.json"} <= set(files)
    assert any(path.startswith("demo/tensorboard/events.out.tfevents.") for path in files)
    assert final["skipped"] == {"bad_sample": 1} and final["last_evaluation"]["train_self_l1"] == 0.3

    output = tmp_path / "exported.pt"
    assert checkpoints.export_official(f"{runs}/demo/latest", str(output)) == (
        f"{runs}/demo/checkpoint_00000005/model.pt", 5)
    loaded = load_official_generator(output, DPEGenerator(state.model_config))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.generator.state_dict().items())


def test_checkpoint_minutes_checkpoints_at_the_first_log_step_after_the_interval_on_rank_0s_clock():
    settings = TrainSettings(steps=50, checkpoint_every=100, checkpoint_minutes=0.5, log_every=5)
    clocks = [0.0, 0.0]  # seconds on rank 0's node and on rank 1's, whose clock runs faster
    schedules = [CheckpointSchedule(settings, clock=lambda rank=rank: clocks[rank]) for rank in (0, 1)]
    taken: list[list[int]] = [[], []]
    for step in range(1, settings.steps + 1):
        clocks[0] += 4.0  # 4 s per step: 30 s are over at step 8, and at 18, 28, ... after a checkpoint at 10, 20, ...
        clocks[1] += 9.0
        gathered = [schedule.overdue() for schedule in schedules] if schedules[0].is_log_step(step) else [False] * 2
        for rank, schedule in enumerate(schedules):
            if schedule.due(step, gathered[0]):
                taken[rank].append(step)
                schedule.checkpointed()
    assert taken[0] == taken[1] == [10, 20, 30, 40, 50]  # log steps only; every rank alike; the last step too
    without = CheckpointSchedule(TrainSettings(steps=50, checkpoint_every=20, log_every=5), clock=lambda: 1e9)
    assert not without.overdue() and [step for step in range(1, 51) if without.due(step, False)] == [20, 40, 50]


def test_grids_and_evaluations_made_beside_training_equal_those_made_between_steps(state):
    from pipelines.train.clips import Pair
    from pipelines.train.evaluation import Evaluator, grid_png, transfers

    rng = np.random.default_rng(0)
    face = np.stack(np.meshgrid(np.linspace(8, 24, 17), np.linspace(8, 24, 4)), -1).reshape(-1, 2)[:68]
    pairs = [Pair(key=f"k{i}", a=0, b=1, frames=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
                  pose=np.zeros((2, 6), np.float32), expression=np.zeros((2, 68, 2), np.float32),
                  landmarks=np.stack([face, face]).astype(np.float32)) for i in range(2)]
    evaluator = Evaluator(pairs, pairs)
    images = transfers(state.generator, pairs)
    between_steps = (grid_png(images), evaluator.evaluate(state.generator, images))
    written: dict = {}
    outputs = SimpleNamespace(grid=lambda step, png: written.update(grid=(step, png)),
                              evaluation=lambda step, metrics: written.update(evaluation=(step, metrics)))
    visuals = BackgroundVisuals(outputs, evaluator, state.model_config, "cpu")
    visuals.submit(state.generator, 7, grid=True, evaluate=True)
    with torch.no_grad():  # training goes on at once: what is evaluated is the weights of step 7
        for parameter in state.generator.parameters():
            parameter.add_(1.0)
    visuals.close()
    assert written == {"grid": (7, between_steps[0]), "evaluation": (7, between_steps[1])}
    assert "train_self_l1" in between_steps[1] and "l1" in between_steps[1]
