"""The training step's safety and efficiency features: the non-finite guard, gradient norms and
clipping, the EMA generator, float16 with a gradient scaler, and the bucketed all-reduce
(two real processes under gloo)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpe.checkpoint import load_checkpoint, save_checkpoint
from dpe.config import ModelConfig
from dpe.train_step import TrainConfig, make_train_state, train_step
from train_support import random_batch

TINY = ModelConfig.tiny()


def _snapshot(state) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint would hold: weights, buffers (probe statistics) and optimiser moments."""
    tensors = {f"{owner}.{name}": t.detach().clone() for owner, module in state.modules().items()
               for name, t in module.state_dict().items()}
    for owner, optimizer in state.optimizers().items():
        for index, values in optimizer.state_dict().get("state", {}).items():
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"{owner}.{index}.{key}"] = value.clone()
    return tensors


def test_a_nan_in_the_batch_skips_the_step_and_changes_nothing() -> None:
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False, ema_decay=0.9))
    train_step(state, random_batch(2, 0))  # optimiser moments exist from here on
    before = _snapshot(state)
    poisoned = random_batch(2, 1)
    poisoned["frame_a"][1, 0, 3, 3] = float("nan")
    logs = train_step(state, poisoned)
    assert logs["skipped"] == 1.0 and not math.isfinite(logs["g_grad_norm"])
    after = _snapshot(state)
    assert after.keys() == before.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == list(before), sorted(set(before) - set(unchanged))
    assert state.step == 2  # the step counter (and so the data of later steps) goes on
    logs = train_step(state, random_batch(2, 2))
    assert logs["skipped"] == 0.0
    assert all(torch.isfinite(t).all() for t in _snapshot(state).values())


def test_a_non_finite_value_anywhere_in_a_checkpoint_is_found() -> None:
    from pipelines.train.loop import nonfinite_values

    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False, ema_decay=0.9))
    train_step(state, random_batch(2, 0))
    assert nonfinite_values(state) == []
    next(iter(state.d_optimizer.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
    next(state.generator_ema.parameters()).data.view(-1)[0] = float("nan")
    found = nonfinite_values(state)
    assert len(found) == 2 and found[1].startswith("discriminator.state.") and found[1].endswith("exp_avg_sq")
    assert found[0].startswith("generator_ema.")


def test_gradient_norms_are_logged_before_clipping_and_clipping_bounds_them() -> None:
    norms = []
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        state = make_train_state(TINY, TrainConfig(perceptual=False, grad_clip=clip))
        logs = train_step(state, random_batch(2, 0))
        grads = [p.grad for p in state.generator.parameters() if p.grad is not None]
        grads += [p.grad for p in state.probes.parameters() if p.grad is not None]
        norms.append((float(logs["g_grad_norm"]), float(torch.nn.utils.get_total_norm(grads))))
    (logged, applied), (logged_clipped, applied_clipped) = norms
    assert logged == pytest.approx(applied, rel=1e-5) and logged > 1e-2
    assert logged_clipped == pytest.approx(logged, rel=1e-5)  # the norm before clipping
    assert applied_clipped == pytest.approx(1e-3, rel=1e-3)


def test_the_ema_generator_averages_is_checkpointed_and_resumes_exactly(tmp_path: Path) -> None:
    decay = 0.75
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False, ema_decay=decay))
    initial = {name: p.detach().clone() for name, p in state.generator.named_parameters()}
    train_step(state, random_batch(2, 0))
    for name, p in state.generator.named_parameters():
        average = dict(state.generator_ema.named_parameters())[name]
        torch.testing.assert_close(average, decay * initial[name] + (1 - decay) * p.detach())
    assert state.evaluated_generator() is state.generator_ema
    assert not any(p.requires_grad for p in state.generator_ema.parameters())

    path = save_checkpoint(tmp_path / "model.pt", models=state.modules(), optimizers=state.optimizers(),
                           step=state.step, config=state.model_config)
    torch.manual_seed(1)
    resumed = make_train_state(TINY, TrainConfig(perceptual=False, ema_decay=decay))
    resumed.step = load_checkpoint(path, models=resumed.modules(), optimizers=resumed.optimizers())["step"]
    for s in (state, resumed):
        torch.manual_seed(5)
        train_step(s, random_batch(2, 3))
    for (name, a), b in zip(state.generator_ema.state_dict().items(), resumed.generator_ema.state_dict().values()):
        assert torch.equal(a, b), name


def test_float16_trains_with_a_gradient_scaler_that_is_checkpointed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = make_train_state(TINY, TrainConfig(perceptual=False, fp16=True))
    assert state.amp_dtype == torch.float16 and "grad_scaler" in state.optimizers()
    before = {name: p.detach().clone() for name, p in state.generator.named_parameters()}
    # At the initial scale (2**16) the float16 gradients overflow: not applied, the scale halves.
    logs = train_step(state, random_batch(2, 0))
    assert (logs["overflow"], logs["skipped"], state.scaler.get_scale()) == (1.0, 0.0, 2.0**15)
    assert all(torch.equal(before[name], p) for name, p in state.generator.named_parameters())
    state.scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # as after a few halvings
    logs = train_step(state, random_batch(2, 1))
    assert (logs["overflow"], logs["skipped"]) == (0.0, 0.0) and math.isfinite(logs["g_grad_norm"])
    assert all(p.dtype == torch.float32 for p in state.generator.parameters())
    assert any(not torch.equal(before[name], p) for name, p in state.generator.named_parameters())
    path = save_checkpoint(tmp_path / "model.pt", models=state.modules(), optimizers=state.optimizers(),
                           step=state.step, config=state.model_config)
    resumed = make_train_state(TINY, TrainConfig(perceptual=False, fp16=True))
    load_checkpoint(path, models=resumed.modules(), optimizers=resumed.optimizers())
    assert resumed.scaler.get_scale() == state.scaler.get_scale()


def test_bad_ema_decay_is_refused() -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        make_train_state(TINY, TrainConfig(perceptual=False, ema_decay=1.0))


# --- two processes: the bucketed all-reduce -------------------------------------------------------

RANK = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[5])
from test_train_safety import TINY
from train_support import random_batch
from dpe.train_step import TrainConfig, make_train_state, train_step
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)  # one core per rank, as a Ray Train worker gets: spinning OpenMP threads of two
                          # ranks on two cores can slow each other a hundredfold
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
torch.manual_seed(0)
config = TrainConfig(perceptual=False, g_lr=0.0, d_lr=0.0, probe_lr=0.0, micro_batches=2)
state = make_train_state(TINY, config, bucket_mb=0.05)
assert len(state.g_reducer.buckets) > 2 and len(state.d_reducer.buckets) > 2
train_step(state, random_batch(4, 10 + rank))
grads = {f"{owner}.{name}": p.grad.clone() for owner, module in state.modules().items()
         for name, p in module.named_parameters() if p.grad is not None}
before = {name: p.detach().clone() for name, p in state.generator.named_parameters()}
poisoned = random_batch(4, 20)
if rank == 1:
    poisoned["expression_b"][0, 0, 0] = float("inf")  # a non-finite loss on one worker only
skipped = float(train_step(state, poisoned)["skipped"])
unchanged = all(torch.equal(before[name], p) for name, p in state.generator.named_parameters())
torch.save({"grads": grads, "skipped": skipped, "unchanged": unchanged}, out)
dist.destroy_process_group()
"""


def test_two_workers_average_gradients_in_buckets_and_skip_together(tmp_path: Path) -> None:
    world = 2
    here = str(Path(__file__).parent)
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(world), str(tmp_path / "init"),
                               str(tmp_path / f"rank{rank}.pt"), here]) for rank in range(world)]
    try:
        assert [process.wait(timeout=240) for process in ranks] == [0] * world
    finally:
        for process in ranks:  # a rank left waiting on its peer must not outlive the test
            process.kill()
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world)]

    alone = []
    for rank in range(world):  # each worker's own gradient, computed in this process
        torch.manual_seed(0)
        config = TrainConfig(perceptual=False, g_lr=0.0, d_lr=0.0, probe_lr=0.0, micro_batches=2)
        state = make_train_state(TINY, config)
        train_step(state, random_batch(4, 10 + rank))
        alone.append({f"{owner}.{name}": p.grad for owner, module in state.modules().items()
                      for name, p in module.named_parameters() if p.grad is not None})
    assert results[0]["grads"].keys() == alone[0].keys()
    for name, reduced in results[0]["grads"].items():
        torch.testing.assert_close(reduced, (alone[0][name] + alone[1][name]) / 2, rtol=1e-5, atol=1e-7)
        assert torch.equal(reduced, results[1]["grads"][name]), name
    assert [r["skipped"] for r in results] == [1.0, 1.0]
    assert all(r["unchanged"] for r in results)
