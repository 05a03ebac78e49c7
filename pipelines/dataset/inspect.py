"""Look at a prepared dataset: the manifest summary, its health, and a contact sheet of the clips.

The contact sheet shows one row per clip: frames spread over the clip with their 68 landmarks
drawn, labelled with the clip id and head yaw, so a person sees at a glance whether the crops sit
on the face and stay steady. Reading a dataset imports no Ray, yt-dlp, Prefect or face detector.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import cv2
import numpy as np

from pipelines.dataset import integrity, manifest
from pipelines.dataset.layout import SHARD_INDEX_PATH, read_marker
from pipelines.dataset.schema import ClipSample
from pipelines.dataset.shards import read_store_samples
from pipelines.media.video import read_frames
from pipelines.storage import OutputStore

FRAMES_PER_ROW = 4
TILE = 192
LABEL_HEIGHT = 22
CONTACT_SHEET_PATH = "contact_sheet.png"


def indexed_shards(store: OutputStore) -> list[str]:
    """Every shard in the dataset's shard index, sorted."""
    if not store.exists(SHARD_INDEX_PATH):
        raise FileNotFoundError(f"{store.uri}: no {SHARD_INDEX_PATH}; is this the output of `portrait prepare`?")
    index = json.loads(store.read_bytes(SHARD_INDEX_PATH))
    return sorted(path for shards in index.values() for path in shards)


def _clip_frames(sample: ClipSample, scratch: Path, count: int) -> list[tuple[int, np.ndarray]]:
    """`count` frames spread over the clip, with their frame indices."""
    video = scratch / f"{sample.key}.mp4"
    video.write_bytes(sample.mp4)
    picks = set(np.linspace(0, sample.frames - 1, count).round().astype(int).tolist())
    frames = read_frames(video, 0.0, sample.seconds, fps=sample.meta.fps)
    return [(index, frame) for index, frame in enumerate(frames) if index in picks]


def _tile(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    image = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    for x, y in landmarks:
        cv2.circle(image, (int(round(x)), int(round(y))), 2, (80, 255, 80), -1, lineType=cv2.LINE_AA)
    return cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)


def _row(sample: ClipSample, scratch: Path) -> np.ndarray:
    tiles = [_tile(frame, sample.landmarks[i]) for i, frame in _clip_frames(sample, scratch, FRAMES_PER_ROW)]
    strip = np.concatenate(tiles, axis=1)
    label = np.full((LABEL_HEIGHT, strip.shape[1], 3), 255, np.uint8)
    yaw = np.degrees(np.median(sample.pose[:, 0]))
    text = f"{sample.meta.clip_id}  {sample.frames} frames  yaw {yaw:+.0f} deg"
    cv2.putText(label, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([label, strip], axis=0)


def write_contact_sheet(output: str, sheet: Path | None = None, max_clips: int = 24) -> str:
    """Draw the contact sheet of a prepared output; returns where it was written.

    Shards that cannot be read (missing, truncated) are skipped with a printed line: the sheet
    shows what can be shown.
    """
    store = OutputStore(output)
    shards = [shard for shard in indexed_shards(store) if store.exists(shard)]
    with tempfile.TemporaryDirectory(prefix="portrait-sheet-") as tmp:
        rows = []
        for sample in read_store_samples(store, shards, on_error=lambda where, error: print(f"  skipped {error}")):
            rows.append(_row(sample, Path(tmp)))
            if len(rows) == max_clips:
                break
        if not rows:
            raise RuntimeError(f"{output}: no readable prepared clips to draw (see the manifest for why)")
        ok, png = cv2.imencode(".png", np.concatenate(rows, axis=0))
        if not ok:
            raise RuntimeError("PNG encoding of the contact sheet failed")
    if sheet is None:
        return f"{store.uri.rstrip('/')}/{store.write_bytes_atomic(CONTACT_SHEET_PATH, png.tobytes())}"
    sheet = Path(sheet)
    OutputStore(str(sheet.parent)).write_bytes_atomic(sheet.name, png.tobytes())
    return str(sheet)


def inspect_output(output: str, sheet: Path | None = None) -> int:
    """`portrait inspect`: the summary, the failures, the dataset's health, then the contact sheet.

    Returns 0 for a healthy dataset, 1 when there is nothing to show or shards are missing.
    """
    store = OutputStore(output)
    state = manifest.load_state(store)
    if not state:
        print(f"{output}: no manifest yet (nothing prepared there)")
        return 1
    marker = read_marker(store)
    if marker is not None:
        print(f"dataset format {marker.version}, created {marker.created_at}, "
              f"detector {marker.sample_settings.get('detector')}")
    print(manifest.summary(state.values()).table())
    failed = [row for row in state.values() if row.status == manifest.FAILED]
    for row in sorted(failed, key=lambda r: (r.failure_class or "", r.clip_id)):
        print(f"  {row.failure_class:<20} {row.clip_id}: {row.message[:160]}")
    health = integrity.reconcile(store, manifest.read_states(store), integrity.read_run_records(store),
                                repair=False)
    for shard in health.missing_shards:
        print(f"MISSING shard {shard}: its clips are recorded as prepared; rerun `portrait prepare` with the "
              f"same output to prepare them again")
    for clip_id, reason in sorted(health.lost.items()):
        print(f"  lost clip {clip_id}: {reason}")
    if any(row.status == manifest.OK for row in state.values()) and len(health.lost) < len(
            [r for r in state.values() if r.status == manifest.OK]):
        print(f"contact sheet: {write_contact_sheet(output, sheet)}")
    return 1 if health.lost else 0
