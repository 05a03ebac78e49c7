"""The crop stage: decode one chunk of the source (seeking to it) and cut the model's aligned crops.

Only the crops travel on to the model stage (a chunk of 240 frames at 256 px is about 47 MB),
never full frames: the paste stage decodes the chunk again, which costs far less than shipping
full-resolution frames between workers (a 1080p frame decodes in about 3 ms on one core; shipping
it is 3 MB). Nothing of the frame is converted to RGB: the box is resampled in the decoded planes and
only the crop is converted (`DecodedFrame.crop`: about 1.8 ms per 1080p face against 6.6 ms for the
box's RGB region and its resample), once: the source crops go on with the edited ones to the paste stage,
which matches colour against them and so converts nothing to RGB. The driver's
frames this chunk needs, and the reference frame relative motion is measured from, are cropped here too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.edit.chunks import ChunkWork, timed, timed_iter
from pipelines.edit.settings import EditSettings
from pipelines.edit.stage_io import decode_chunk, local_info, local_input, read_image
from pipelines.errors import DAMAGED_VIDEO, NOT_A_VIDEO, RecordedFailure, VideoError
from pipelines.media.crop import crop_frame
from pipelines.media.video import DecodedFrame, VideoInfo, decode, probe


def crop_decoded(frame: DecodedFrame, box: np.ndarray, size: int) -> np.ndarray:
    """`crop_frame(frame.image, box, size)`, resampled from the decoded planes and converted to RGB at the
    crop's size (`DecodedFrame.crop`: within rounding of the RGB path, a quarter of its cost at 1080p)."""
    return frame.crop(box, size)


def _selected_frames(path: Path, frames: np.ndarray, pts: np.ndarray,
                     timings: dict[str, float]) -> dict[int, DecodedFrame]:
    """Decode the given (ascending) frame indices of a video, seeking to the first."""
    info = probe(path, damaged=NOT_A_VIDEO)
    wanted = set(int(i) for i in frames)
    first, last = int(frames[0]), int(frames[-1])
    found = {}
    for frame in timed_iter(decode(info, start_index=first, start_pts=int(pts[0]), count=last - first + 1),
                            timings, "decode_s"):
        if frame.index in wanted:
            found[frame.index] = frame
    missing = wanted - set(found)
    if missing:
        raise VideoError(DAMAGED_VIDEO, f"{path}: driving frames {sorted(missing)[:5]} could not be decoded again")
    return found


def crop_chunk(chunk: ChunkWork, settings: EditSettings) -> ChunkWork:
    """Fill `source_crops`, `driving_crops` and `reference_crop`; failures are recorded on the chunk."""
    if not chunk.ok or chunk.reused or chunk.frames_edited == 0:
        return chunk
    chunk.visited()
    size = chunk.work.model_size
    timings = chunk.timings
    try:
        info = local_info(chunk, settings)
        edited = np.flatnonzero(chunk.driving_index >= 0)
        crops = np.empty((len(edited), size, size, 3), np.uint8)
        position = {int(i): n for n, i in enumerate(edited)}
        for offset, frame in enumerate(decode_chunk(chunk, info, timings)):
            if offset in position:
                with timed(timings, "crop_s"):
                    crops[position[offset]] = crop_decoded(frame, chunk.boxes[offset], size)
        driver = chunk.driver
        driver_path = local_input(chunk.job.driving, settings.workdir)
        if driver.is_image:
            with timed(timings, "decode_s"):
                image = read_image(driver_path)
            with timed(timings, "crop_s"):
                driving = crop_frame(image, driver.boxes[0], size)[None]
        else:
            decoded = _selected_frames(driver_path, driver.frames, driver.pts, timings)
            with timed(timings, "crop_s"):
                driving = np.stack([crop_decoded(decoded[int(i)], box, size)
                                    for i, box in zip(driver.frames, driver.boxes)])
        chunk.source_crops, chunk.driving_crops = crops, driving
        chunk.reference_crop = _reference_crop(chunk, info, driver_path, timings, size)
    except RecordedFailure as error:
        chunk.fail(error.failure_class, f"{chunk.label}: {error.message}")
    return chunk


def _reference_crop(chunk: ChunkWork, info: VideoInfo, driver_path: Path, timings: dict[str, float],
                    size: int) -> np.ndarray | None:
    if chunk.reference is None:
        return None
    kind, index, pts, box = chunk.reference
    if kind == "source":
        frame = next(timed_iter(decode(info, start_index=index, start_pts=pts, count=1), timings, "decode_s"))
    else:
        frame = _selected_frames(driver_path, np.array([index]), np.array([pts]), timings)[index]
    with timed(timings, "crop_s"):
        return crop_decoded(frame, box, size)[None]
