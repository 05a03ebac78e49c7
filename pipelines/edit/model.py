"""The model stage: checkpoint loading (checked before any video work) and batched editing of crops.

`load_weights` accepts an official `dpe.pt` (generator under 'gen') or a project checkpoint
("dpe-portrait/1", as `portrait train` writes `model.pt`), given in any form `runs.resolve_checkpoint`
takes (the file, its checkpoint folder, a run folder or `RUN/latest`: the newest checkpoint), local
or in an object store. The crop size follows the checkpoint's model config. A file of the wrong
architecture is refused with the dpe loaders' message, which names the mismatched keys.

`CropEditor` holds one generator (in a Ray Data actor: loaded once per actor) and edits the crops
of one chunk in batches: each source crop is encoded once, each distinct driving frame once (a
still driver once per chunk), then the chosen branch renders.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpe import editing
from dpe.checkpoint import CHECKPOINT_FORMAT, check_state_dict, config_from_checkpoint, load_official_generator
from dpe.config import ModelConfig
from dpe.model import DPEGenerator
from pipelines.edit.chunks import ChunkWork, timed
from pipelines.edit.stage_io import scratch_dir
from pipelines.runs import resolve_checkpoint
from pipelines.storage import local_copy, redact

LOG = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or of another architecture."""


@dataclass
class ModelWeights:
    """A checked generator: its config, its state dict, and what it was read from (pickled to model actors)."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    kind: str
    """'official' (dpe.pt) or the project format name."""
    source: str

    @property
    def size(self) -> int:
        return self.config.size

    def describe(self) -> str:
        return f"{self.kind} {self.size}px from {self.source}"

    def build(self, device: torch.device | str = "cpu") -> DPEGenerator:
        model = DPEGenerator(self.config)
        model.load_state_dict(self.state)
        return model.to(device).eval()


def _peek(path: Path) -> Any:
    """The checkpoint's top level without reading every tensor (memory-mapped where the format allows)."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # official training snapshots pickle their args
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(uri: str, workdir: str | None = None) -> ModelWeights:
    """Read and check a checkpoint (any form `runs.resolve_checkpoint` takes; an object is copied into the
    scratch folder once); raises `CheckpointError` naming the file and the mismatched keys."""
    try:
        source = resolve_checkpoint(uri)
        path = local_copy(source, scratch_dir(workdir) / "checkpoints")
    except FileNotFoundError as error:  # nothing there (CheckpointNotFound), or an object deleted since
        raise CheckpointError(str(error)) from None
    try:
        payload = _peek(path)
    except Exception as error:  # unpicklable content, a truncated file, not a torch file at all
        raise CheckpointError(f"checkpoint {path}: cannot be read with torch.load(weights_only=True): "
                              f"{error}") from None
    try:
        if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
            config = config_from_checkpoint(payload)
            if config is None:
                raise ValueError(f"{path}: a {CHECKPOINT_FORMAT} checkpoint without a model config")
            models = payload.get("models") or {}
            name = "generator_ema" if "generator_ema" in models else "generator"  # a run's average, if it kept one
            if name not in models:
                raise ValueError(f"{path}: no model 'generator' (has {sorted(models)})")
            model = DPEGenerator(config)
            check_state_dict(model.state_dict(), models[name], f"{path} model '{name}'",
                             hint="The checkpoint's config does not describe its weights; it is damaged.")
            model.load_state_dict(models[name])
            kind = CHECKPOINT_FORMAT
        else:
            del payload
            config = ModelConfig()
            model = load_official_generator(path, DPEGenerator(config))
            kind = "official"
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    LOG.info("model: %s checkpoint %s, %d px crops", kind, redact(source), config.size)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return ModelWeights(config=config, state=state, kind=kind, source=uri)


def keep_large_blocks_on_heap() -> bool:
    """Let glibc serve large blocks from the heap and keep freed memory (CPU inference in this process).

    By default glibc maps every block over 32 MiB afresh and unmaps it when freed, so each large
    activation pays page faults and zeroing in the kernel; `benchmarks/bench_inference.py` measured
    batched CPU inference twice as fast without that. The process then keeps its peak memory, which
    a model worker does anyway. Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on GPU by default; float32 on CPU, where bfloat16 measured slower."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def to_tensor(crops: np.ndarray, device: torch.device, staging: torch.Tensor | None = None) -> torch.Tensor:
    """(N, S, S, 3) uint8 RGB -> (N, 3, S, S) float in [-1, 1].

    On a GPU the uint8 crops travel (4x fewer bytes than floats), from `staging` (page-locked host memory
    of at least N crops) when given: an asynchronous copy the GPU's copy engine runs without the CPU.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(crops))
    if device.type == "cuda" and staging is not None and len(crops) <= len(staging):
        staged = staging[:len(crops)]
        staged.copy_(tensor)
        tensor = staged.to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_crops(images: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) float in [-1, 1] -> (N, S, S, 3) uint8 RGB (converted on the device: uint8 travels back)."""
    scaled = images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def device_batch(device: torch.device, size: int = 256) -> int:
    """Crops per forward pass when --model-batch is 0: 8 on a CPU (larger batches gain nothing there); on a
    GPU 64 with 40 GB or more, else 32, scaled up for crops smaller than 256 px (activations grow with area)."""
    if device.type != "cuda":
        return 8
    memory = torch.cuda.get_device_properties(device).total_memory
    batch = 64 if memory >= 40 * 2**30 else 32
    return batch * max(1, (256 // max(size, 1)) ** 2)


DRIVER_CACHE_FRAMES = 8192
"""Driving codes a model worker remembers (two vectors each: 32 MB at the official size)."""

TRANSFERS = {"expression": editing.expression_transfer, "pose": editing.pose_transfer,
             "both": editing.transfer_both}


class CropEditor:
    """One generator on one device, editing batches of aligned crops."""

    def __init__(self, weights: ModelWeights, precision: str = "auto", batch: int = 0,
                 device: torch.device | str | None = None, threads: int | None = None) -> None:
        """`batch`: crops per forward pass (0: `device_batch`); `threads`: torch CPU threads (on a CPU
        device); None leaves torch's default."""
        self.device = torch.device(device) if device is not None else pick_device()
        if self.device.type == "cpu":
            keep_large_blocks_on_heap()
            if threads is not None:
                torch.set_num_threads(threads)
        self.model = weights.build(self.device)
        self.size = weights.size
        self.batch = batch or device_batch(self.device, self.size)
        self.staging = torch.empty((self.batch, self.size, self.size, 3), dtype=torch.uint8,
                                   pin_memory=True) if self.device.type == "cuda" else None
        self._uploaded: torch.cuda.Event | None = None
        self.amp = amp_dtype(precision, self.device)
        self._driver_codes: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @torch.no_grad()
    def edit(self, source: np.ndarray, driving: np.ndarray, driving_index: np.ndarray, mode: str,
             strength: float, motion: str, reference: np.ndarray | None = None, driving_key: str | None = None,
             driving_frames: np.ndarray | None = None) -> np.ndarray:
        """Edited crops (N, S, S, 3) uint8 for source crops (N, S, S, 3).

        `driving` holds the distinct driving crops (K, S, S, 3); `driving_index[i]` says which one
        drives source crop i. `reference` (1, S, S, 3) is what relative motion is measured from.
        With `driving_key` (the driver's name) and `driving_frames` (K frame numbers), driving codes
        are remembered across calls, so a driver shared by many chunks and videos is encoded once.
        """
        if len(source) == 0:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        if source.shape[1:3] != (self.size, self.size) or driving.shape[1:3] != (self.size, self.size):
            raise ValueError(f"crops are {source.shape[1:3]} / {driving.shape[1:3]}, the model takes {self.size} px")
        keys = [None] * len(driving) if driving_key is None or driving_frames is None else \
            [(driving_key, int(frame)) for frame in driving_frames]
        codes = self._encode_driving(driving, keys)
        reference_code = None
        if motion == "relative":
            if reference is None:
                raise ValueError("relative motion needs a reference crop")
            reference_code = editing.encode_driving(self.model, to_tensor(reference, self.device))
        transfer = TRANSFERS[mode]
        index = torch.as_tensor(np.asarray(driving_index, dtype=np.int64), device=self.device)
        results = []
        for start in range(0, len(source), self.batch):
            stop = min(start + self.batch, len(source))
            picked = index[start:stop]
            driving_code = editing.FrameCode(codes.latent[picked], codes.motion[picked], None)
            out = transfer(self.model, self._upload(source[start:stop]), driving_code, strength=strength,
                           mode=motion, driving_reference=reference_code, amp_dtype=self.amp)
            results.append(to_crops(out))
        return np.concatenate(results)

    def _upload(self, crops: np.ndarray) -> torch.Tensor:
        """`to_tensor` through the page-locked staging buffer, once its previous copy has left it."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        tensor = to_tensor(crops, self.device, self.staging)
        if self.staging is not None:
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()
        return tensor

    def _encode_driving(self, driving: np.ndarray, keys: list[tuple[str, int] | None]) -> editing.FrameCode:
        """Latent and motion of every driving crop: remembered ones from the cache, the others encoded."""
        missing = [i for i, key in enumerate(keys) if key is None or key not in self._driver_codes]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for start in range(0, len(missing), self.batch):
            group = missing[start:start + self.batch]
            with _autocast(self.device, self.amp):
                code = editing.encode_driving(self.model, self._upload(driving[group]))
            for row, i in enumerate(group):
                fresh[i] = (code.latent[row].float(), code.motion[row].float())
                if keys[i] is not None:
                    self._driver_codes[keys[i]] = fresh[i]
        pairs = []
        for i, key in enumerate(keys):
            if i in fresh:
                pairs.append(fresh[i])
            else:
                self._driver_codes.move_to_end(key)
                pairs.append(self._driver_codes[key])
        while len(self._driver_codes) > DRIVER_CACHE_FRAMES:
            self._driver_codes.popitem(last=False)
        return editing.FrameCode(torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), None)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def edit_chunk(chunk: ChunkWork, editor: CropEditor) -> ChunkWork:
    """The model stage for one chunk: edited crops in, driving crops dropped; the source crops go on to the
    paste stage, which matches the edited face's colour to them (so it need not convert frames to RGB)."""
    if not chunk.ok or chunk.reused or chunk.frames_edited == 0:
        return chunk
    chunk.visited()
    with timed(chunk.timings, "model_s"):
        chunk.edited = editor.edit(chunk.source_crops, chunk.driving_crops,
                                   chunk.driving_index[chunk.driving_index >= 0], chunk.job.mode,
                                   chunk.job.strength, chunk.motion, chunk.reference_crop,
                                   driving_key=chunk.job.driving, driving_frames=chunk.driver.frames)
    chunk.driving_crops = chunk.reference_crop = None
    return chunk
