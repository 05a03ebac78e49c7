"""The bundled sample as all three kinds of input, good clips and deliberately bad ones.

The sample video's face boxes are found by the real detector and written as VoxCeleb1 (pixels of
the 360p frame) and VoxCeleb2 (normalised) metadata, so `prepare --sample` exercises the same
parsers, downloads and face work as a real VoxCeleb run. The clip table and URL list add the bad
inputs users meet in real archives (a removed video, a file with no face, two faces, a corrupt
file, a span past the end, a malformed line, a duplicate), so a first run already shows how
failures are recorded without stopping the good work.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Iterator

import numpy as np

from pipelines.media.faces import FaceDetector, make_detector
from pipelines.media.video import probe, read_frames
from pipelines.prepare.requests import VOX_FPS
from pipelines.prepare.sources import SourceInputs
from pipelines.prepare.sources.voxceleb import VOX1_REFERENCE_HEIGHT, VoxUtterance, write_voxceleb_tree
from pipelines.sample.media import SAMPLE_PORT, SAMPLE_SIZE, make_sample_media
from pipelines.sample.server import serve_directory

SAMPLE_CLIPS_S = ((0.4, 3.6), (4.4, 7.6), (8.4, 11.6))
"""Three utterances of the ~12 s sample video: one VoxCeleb1 and two VoxCeleb2."""


def face_boxes(video: Path, start_s: float, end_s: float, detector: FaceDetector, stride: int = 5) -> np.ndarray:
    """(x, y, w, h) pixel boxes of the largest face at 25 fps over the span, detected every `stride` frames."""
    keyframes, keyboxes, frame_count = [], [], 0
    for index, frame in enumerate(read_frames(video, start_s, end_s, fps=VOX_FPS)):
        frame_count = index + 1
        if index % stride:
            continue
        faces = detector.detect(frame)
        if faces:
            x0, y0, x1, y1 = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).box
            keyframes.append(index)
            keyboxes.append((x0, y0, x1 - x0, y1 - y0))
    if not keyframes:
        raise RuntimeError(f"no face found in {video} between {start_s} and {end_s} s")
    keyboxes = np.asarray(keyboxes, dtype=np.float64)
    all_frames = np.arange(frame_count)
    return np.stack([np.interp(all_frames, keyframes, keyboxes[:, k]) for k in range(4)], axis=1)


def _utterance(identity: str, video: Path, span: tuple[float, float], name: str, scale: np.ndarray,
               detector: FaceDetector) -> VoxUtterance:
    boxes = face_boxes(video, *span, detector) * scale
    first = round(span[0] * VOX_FPS)
    return VoxUtterance(identity=identity, video_id=video.stem, utterance=name,
                        frames=list(range(first, first + len(boxes))), boxes=[tuple(b) for b in boxes])


def write_sample_inputs(directory: str | Path, url_base: str) -> dict[str, Path]:
    """Write sample media and inputs under `directory`; URLs point at `url_base` (the loopback server).

    Returns the paths by role: media, vox1 and vox2 trees, clip table, URL list.
    """
    directory = Path(directory)
    media = make_sample_media(directory / "media")
    talk = media["talk.mp4"]
    width, height = SAMPLE_SIZE
    info = probe(talk)
    if info.display_size != (width, height):
        shown = "x".join(map(str, info.display_size))
        raise RuntimeError(f"sample video {talk} is {shown}, expected {width}x{height}")

    vox1 = directory / "vox1"
    vox2 = directory / "vox2"
    pixels_360p = np.full(4, VOX1_REFERENCE_HEIGHT / height)
    normalised = np.array([1 / width, 1 / height, 1 / width, 1 / height])
    detector = make_detector("dlib")
    write_voxceleb_tree(vox1, [_utterance("id10001", talk, SAMPLE_CLIPS_S[0], "00001", pixels_360p, detector)],
                        version=1)
    write_voxceleb_tree(vox2, [_utterance("id00002", talk, span, f"{n:05d}", normalised, detector)
                               for n, span in enumerate(SAMPLE_CLIPS_S[1:], start=1)], version=2)
    malformed = vox2 / "txt" / "id00002" / "talk" / "00009.txt"
    malformed.write_text("Identity  : \tid00002\nReference : \ttalk\n\nFRAME \tX \tY \tW \tH \n00010\tnot-a-number\n")

    table = directory / "clips.csv"
    rows = [
        # identity, video, start frame, end frame, split: what the row demonstrates
        ("id20001", "talk", 20, 95, "test"),        # a good clip, test split
        ("id20002", "missing", 0, 50, "train"),     # HTTP 404: permanent download failure
        ("id20003", "noface", 0, 75, "train"),      # no face in the video
        ("id20004", "twofaces", 0, 75, "train"),    # two faces, no box to choose one
        ("id20005", "corrupt", 150, 225, "train"),  # truncated file: the span lies in the lost part
        ("id20001", "talk", 500, 600, "test"),      # span past the end of the video
        ("id20001", "talk", 20, 95, "test"),        # duplicate of the first row
    ]
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["identity", "video_id", "start", "end", "fps", "split"])
        writer.writerows((ident, video, start, end, 25, split) for ident, video, start, end, split in rows)

    urls = directory / "urls.txt"
    urls.write_text(f"# whole videos: faces are found automatically\n{url_base.rstrip('/')}/talk.mp4\n")
    return {"media": talk.parent, "vox1": vox1, "vox2": vox2, "clips": table, "urls": urls}


def sample_url_template(url_base: str) -> str:
    """The URL template that maps the sample's video ids to the loopback server."""
    return url_base.rstrip("/") + "/{id}.mp4"


@contextlib.contextmanager
def serve_sample_inputs(directory: str | Path) -> Iterator[tuple[SourceInputs, str]]:
    """Serve the bundled sample on loopback while the block runs; yield its inputs (written under
    `directory`) and the URL template that maps its video ids to the server."""
    directory = Path(directory)
    media = make_sample_media(directory / "media")
    with serve_directory(next(iter(media.values())).parent, port=SAMPLE_PORT) as server:
        written = write_sample_inputs(directory, server.base_url)
        yield (SourceInputs(vox1_txt=(str(written["vox1"]),), vox2_txt=(str(written["vox2"]),),
                            clips=(str(written["clips"]),), urls=(str(written["urls"]),)),
               sample_url_template(server.base_url))
