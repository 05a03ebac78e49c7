"""Look at a prepared dataset: the manifest summary, and a contact sheet of the clips.

The contact sheet shows one row per clip: frames spread over the clip with their 68 landmarks
drawn, labelled with the clip id and head yaw, so a person sees at a glance whether the crops sit
on the face and stay steady.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from pipelines.dataset import manifest
from pipelines.prepare.job import SHARD_INDEX_PATH
from pipelines.dataset.shards import ShardSample, read_samples
from pipelines.storage import OutputStore
from pipelines.media.video import read_frames

FRAMES_PER_ROW = 4
TILE = 192
LABEL_HEIGHT = 22


def _shard_paths(store: OutputStore, scratch: Path) -> list[str]:
    """Local paths of every shard in the index (copied to `scratch` when the output is remote)."""
    if not store.exists(SHARD_INDEX_PATH):
        raise FileNotFoundError(f"{store.uri}: no {SHARD_INDEX_PATH}; is this the output of `portrait prepare`?")
    index = json.loads(store.read_bytes(SHARD_INDEX_PATH))
    paths = []
    for relpath in sorted(p for shards in index.values() for p in shards):
        if store.is_local:
            paths.append(str(store.local_path(relpath)))
        else:
            local = scratch / relpath.replace("/", "__")
            local.write_bytes(store.read_bytes(relpath))
            paths.append(str(local))
    return paths


def _clip_frames(sample: ShardSample, scratch: Path, count: int) -> list[tuple[int, np.ndarray]]:
    """`count` frames spread over the clip, with their frame indices."""
    video = scratch / f"{sample.key}.mp4"
    video.write_bytes(sample.mp4)
    total = len(sample.landmarks)
    picks = set(np.linspace(0, total - 1, count).round().astype(int).tolist())
    frames = read_frames(video, 0.0, total / float(sample.meta.get("fps", 25.0)))
    return [(index, frame) for index, frame in enumerate(frames) if index in picks]


def _tile(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    image = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 2, (80, 255, 80), -1, lineType=cv2.LINE_AA)
    return cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)


def _row(sample: ShardSample, scratch: Path) -> np.ndarray:
    tiles = [_tile(frame, sample.landmarks[i]) for i, frame in _clip_frames(sample, scratch, FRAMES_PER_ROW)]
    strip = np.concatenate(tiles, axis=1)
    label = np.full((LABEL_HEIGHT, strip.shape[1], 3), 255, np.uint8)
    yaw = np.degrees(np.median(sample.pose[:, 0]))
    text = f"{sample.meta.get('clip_id', sample.key)}  {len(sample.landmarks)} frames  yaw {yaw:+.0f} deg"
    cv2.putText(label, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([label, strip], axis=0)


def write_contact_sheet(output: str, sheet: Path | None = None, max_clips: int = 24) -> str:
    """Draw the contact sheet of a prepared output; returns where it was written."""
    store = OutputStore(output)
    with tempfile.TemporaryDirectory(prefix="portrait-sheet-") as tmp:
        scratch = Path(tmp)
        rows = []
        for sample in read_samples(_shard_paths(store, scratch)):
            rows.append(_row(sample, scratch))
            if len(rows) == max_clips:
                break
        if not rows:
            raise RuntimeError(f"{output}: no prepared clips to draw (see the manifest for why)")
        ok, png = cv2.imencode(".png", np.concatenate(rows, axis=0))
        if not ok:
            raise RuntimeError("PNG encoding of the contact sheet failed")
    if sheet is None:
        return f"{store.uri.rstrip('/')}/{store.write_bytes_atomic('contact_sheet.png', png.tobytes())}"
    sheet = Path(sheet)
    OutputStore(str(sheet.parent)).write_bytes_atomic(sheet.name, png.tobytes())
    return str(sheet)


def inspect_output(output: str, sheet: Path | None = None) -> int:
    """`portrait inspect`: print the manifest summary and the failures, then draw the contact sheet."""
    store = OutputStore(output)
    state = manifest.load_state(store)
    if not state:
        print(f"{output}: no manifest yet (nothing prepared there)")
        return 1
    print(manifest.summary(state.values()).table())
    failed = [row for row in state.values() if row.status == manifest.FAILED]
    for row in sorted(failed, key=lambda r: (r.failure_class or "", r.clip_id)):
        print(f"  {row.failure_class:<20} {row.clip_id}: {row.message[:160]}")
    if any(row.status == manifest.OK for row in state.values()):
        print(f"contact sheet: {write_contact_sheet(output, sheet)}")
    return 0
