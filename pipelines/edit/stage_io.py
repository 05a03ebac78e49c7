"""What every editing stage reads and writes where it runs: local copies of inputs, the source's
stream, a chunk's frames, a driver image, outputs written locally and then stored, and the columns
chunks travel in between stages (`to_columns`, `from_columns`, `payload_table`).

Video decoding seeks, so an input that lives in an object store needs a real file here.
An input is copied once per machine (`storage.local_copy`, into the run's scratch folder, a cache
bounded by `storage.LOCAL_COPIES_BYTES`) and shared by every stage and chunk that runs there; local
paths are used as they are.
"""

from __future__ import annotations

import contextlib
import pickle
import posixpath
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from pipelines.edit.chunks import ChunkWork, timed_iter
from pipelines.edit.settings import EditSettings
from pipelines.errors import DAMAGED_VIDEO, MISSING_VIDEO, NOT_A_VIDEO, VideoError
from pipelines.media.video import DecodedFrame, VideoInfo, decode
from pipelines.storage import OutputStore, atomic_local_path, local_copy


def scratch_dir(workdir: str | None) -> Path:
    """The machine-local scratch folder of editing runs."""
    return Path(workdir).expanduser() if workdir else Path(tempfile.gettempdir()) / "dpe-portrait-edit"


def local_input(path: str, workdir: str | None) -> Path:
    """A local file with the content of input `path` (a local path, or an s3:// / gs:// URI copied once)."""
    try:
        return local_copy(path, scratch_dir(workdir) / "inputs")
    except FileNotFoundError as error:
        raise VideoError(MISSING_VIDEO, str(error)) from None


@contextlib.contextmanager
def store_output(store: OutputStore, relpath: str) -> Iterator[Path]:
    """A local path to write `relpath` of `store` to; it appears in the store, complete, when the block ends.

    Local stores: a temporary name beside the final file, renamed (`atomic_local_path`). Object
    stores: a local temporary file, uploaded only once complete (`OutputStore.open_output_atomic`).
    """
    if store.is_local:
        with atomic_local_path(store.local_path(relpath)) as temporary:
            yield temporary
        return
    with tempfile.TemporaryDirectory(prefix="edit-output-") as directory:
        temporary = Path(directory) / posixpath.basename(relpath)
        yield temporary
        with store.open_output_atomic(relpath) as output, open(temporary, "rb") as source:
            shutil.copyfileobj(source, output.file, length=8 << 20)


def local_info(chunk: ChunkWork, settings: EditSettings) -> VideoInfo:
    """The chunk's stream description pointing at this machine's copy of the source."""
    return replace(chunk.info, path=str(local_input(chunk.job.source, settings.workdir)))


def decode_chunk(chunk: ChunkWork, info: VideoInfo, timings: dict[str, float]) -> Iterator[DecodedFrame]:
    """The chunk's frames, decoded again, each checked against the pts the analysis pass saw."""
    expected = chunk.pts
    frames = decode(info, start_index=chunk.start, start_pts=int(expected[0]), count=len(expected))
    produced = 0
    for frame in timed_iter(frames, timings, "decode_s"):
        if frame.pts != expected[produced]:
            raise VideoError(DAMAGED_VIDEO, f"{info.path}: frame {frame.index} has pts {frame.pts} on this pass, "
                                            f"{expected[produced]} on the first; the video does not decode the same "
                                            "twice")
        produced += 1
        yield frame
    if produced != len(expected):
        raise VideoError(DAMAGED_VIDEO, f"{info.path}: chunk from frame {chunk.start} decoded {produced} of "
                                        f"{len(expected)} frames")


def read_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); raises `not_a_video` when it cannot be read as an image."""
    if not path.is_file():
        raise VideoError(MISSING_VIDEO, f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise VideoError(NOT_A_VIDEO, f"{path}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


PIXEL_COLUMNS = ("source_crops", "driving_crops", "reference_crop", "edited")
"""`ChunkWork` fields that hold crops: (N, S, S, 3) uint8 arrays that travel as tensor columns."""

_ABSENT = np.zeros((0, 0, 0, 3), np.uint8)
"""A crop column's value where the chunk holds none (a tensor column has no null)."""


def to_columns(items: Iterable[object]) -> dict[str, np.ndarray]:
    """Rows for a Ray Data batch: each item pickled without its crops ('payload'), and the crops of each
    `ChunkWork` as ndarray columns, which Ray Data keeps as tensors: no pickling of the pixels, and a
    stage reading them gets views of the block's buffer."""
    payloads, pixels = [], {name: [] for name in PIXEL_COLUMNS}
    for item in items:
        arrays = {name: getattr(item, name, None) for name in PIXEL_COLUMNS}
        if any(array is not None for array in arrays.values()):
            item = replace(item, **dict.fromkeys(PIXEL_COLUMNS))
        payloads.append(pickle.dumps(item, protocol=5))
        for name, array in arrays.items():
            pixels[name].append(_ABSENT if array is None else np.ascontiguousarray(array, dtype=np.uint8))
    columns = {"payload": np.array(payloads, dtype=object)}
    for name, arrays in pixels.items():
        column = np.empty(len(arrays), dtype=object)
        for row, array in enumerate(arrays):
            column[row] = array
        columns[name] = column
    return columns


def payload_table(items: Iterable[object]):
    """Items without pixels (groups of jobs) as an Arrow table of `to_columns`' payload column: the block a
    read task yields, which `from_columns` reads back like any stage's batch."""
    import pyarrow as pa

    return pa.table({"payload": pa.array([pickle.dumps(item, protocol=5) for item in items], pa.binary())})


def from_columns(batch: dict[str, np.ndarray]) -> list:
    """The items of a batch `to_columns` made, with their crops put back."""
    items = [pickle.loads(blob) for blob in batch["payload"]]
    for name in PIXEL_COLUMNS:
        if name not in batch:
            continue
        for item, array in zip(items, batch[name]):
            if array.ndim == 4 and array.shape[1] > 0:
                setattr(item, name, array)
    return items
