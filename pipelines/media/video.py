"""Video I/O through the ffmpeg binary that ships in imageio-ffmpeg: probe, stream frames, encode.

There is no ffprobe in that build, so `probe` parses the stream summary that `ffmpeg -i` prints.
Frames are streamed from a child ffmpeg through a pipe one at a time, resampled by ffmpeg's `fps`
filter, so memory stays at one frame whatever the length or resolution of the source. Decoding
reads from a file, never from a pipe: an mp4 whose index (moov) sits at the end cannot be decoded
from a pipe. Encoded files are H.264 yuv420p with the index at the front (faststart) so they stream,
and are written under a temporary name then renamed, so a crash never leaves a half file behind.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from pipelines.errors import (
    CORRUPT_VIDEO,
    ENCODE_FAILED,
    MISSING_VIDEO,
    NO_VIDEO_STREAM,
    NOT_A_VIDEO,
    SPAN_OUTSIDE_VIDEO,
    VideoError,
)
from pipelines.storage import atomic_local_path

SPAN_TOLERANCE_S = 0.05
"""A span may end this far past the reported duration (container durations are rounded)."""

_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: (.*)")
_SIZE = re.compile(r",\s*(\d+)x(\d+)(?=[\s,\[]|$)")
_FPS = re.compile(r"([\d.]+)(k?) (?:fps|tbr)")
_ROTATION = re.compile(r"rotation of (-?[\d.]+) degrees")
_DECODED_TIME = re.compile(r"time=(\d+):(\d+):(\d+(?:\.\d+)?)")
_CORRUPT_MARKERS = ("Invalid data found", "Error opening input", "could not find codec")


@dataclass(frozen=True)
class VideoInfo:
    """What dataset preparation needs to know about a video before decoding it.

    `width`/`height` are the decoded frame size (after ffmpeg's automatic rotation);
    `frame_count` is None when the container does not state it (ffmpeg -i never does).
    """

    width: int
    height: int
    fps: float
    duration_s: float
    has_audio: bool
    frame_count: int | None = None


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The static ffmpeg binary of imageio-ffmpeg (no system ffmpeg is assumed)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe(path: str | os.PathLike, timeout_s: float = 60.0) -> VideoInfo:
    """Read size, frame rate, duration and audio presence of a video file (or an http(s) URL).

    Raises `VideoError`: `missing_video` (no such file), `not_a_video` (empty, or not media ffmpeg
    can open), `no_video_stream` (audio only), `corrupt_video` (an mp4 cut off before its index, a
    stream without size, rate or duration).
    """
    remote = str(path).startswith(("http://", "https://"))
    if not remote:
        path = Path(path)
        if not path.is_file():
            raise VideoError(MISSING_VIDEO, f"{path}: no such file")
        if path.stat().st_size == 0:
            raise VideoError(NOT_A_VIDEO, f"{path}: the file is empty (0 bytes)")
    timeout = ["-rw_timeout", str(int(timeout_s * 1e6))] if remote else []
    try:
        result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", *timeout, "-i", str(path)],
                                capture_output=True, text=True, errors="replace", timeout=timeout_s + 5)
    except subprocess.TimeoutExpired:
        raise VideoError(CORRUPT_VIDEO, f"{path}: ffmpeg could not read its header within {timeout_s:.0f} s") from None
    report = result.stderr
    if "moov atom not found" in report:
        if not remote and not _looks_like_mp4(path):
            raise VideoError(NOT_A_VIDEO, f"{path}: not a video (named like an mp4, but holds no mp4 structure)")
        raise VideoError(CORRUPT_VIDEO, f"{path}: an mp4 without its index (moov): cut off, or a damaged "
                                        f"transfer ({_tail(report)})")
    if any(marker in report for marker in _CORRUPT_MARKERS):
        raise VideoError(NOT_A_VIDEO, f"{path}: not a video ffmpeg can open ({_tail(report)})")
    stream = _VIDEO_STREAM.search(report)
    if stream is None:
        if re.search(r"Stream #\d+:\d+.*?: Audio:", report):
            raise VideoError(NO_VIDEO_STREAM, f"{path}: holds audio but no video stream")
        raise VideoError(NOT_A_VIDEO, f"{path}: no video stream found ({_tail(report)})")
    size = _SIZE.search(stream.group(1))
    if size is None:
        raise VideoError(CORRUPT_VIDEO, f"{path}: cannot read the frame size from {stream.group(0)!r}")
    width, height = int(size.group(1)), int(size.group(2))
    rotation = _ROTATION.search(report)
    if rotation and round(abs(float(rotation.group(1)))) % 180 == 90:
        width, height = height, width
    fps_match = _FPS.search(stream.group(1))
    fps = float(fps_match.group(1)) * (1000.0 if fps_match and fps_match.group(2) else 1.0) if fps_match else 0.0
    duration = _parse_duration(report)
    if duration is None and not remote:
        duration = _decoded_duration(path)
    if not fps or not duration:
        raise VideoError(CORRUPT_VIDEO, f"{path}: no usable frame rate or duration in {stream.group(0)!r}")
    has_audio = re.search(r"Stream #\d+:\d+.*?: Audio:", report) is not None
    return VideoInfo(width=width, height=height, fps=fps, duration_s=duration, has_audio=has_audio)


_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")


def _looks_like_mp4(path: Path) -> bool:
    """Whether the file starts with an ISO media box (an mp4/mov, perhaps cut short)."""
    with open(path, "rb") as handle:
        return handle.read(8)[4:8] in _MP4_BOXES


def check_span(info: VideoInfo, start_s: float, end_s: float, path: str | os.PathLike = "video") -> None:
    """Raise `span_outside_video` unless 0 <= start < end <= duration (with a small tolerance)."""
    if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s < 0 or end_s <= start_s \
            or end_s > info.duration_s + SPAN_TOLERANCE_S:
        raise VideoError(SPAN_OUTSIDE_VIDEO,
                         f"{path}: span {start_s:.3f}-{end_s:.3f} s is not inside the video "
                         f"(0-{info.duration_s:.3f} s); check the clip's times against the downloaded video")


def expected_frame_count(start_s: float, end_s: float, fps: float) -> int:
    """How many frames `read_frames` yields for a span: one per 1/fps from the start."""
    return max(1, round((end_s - start_s) * fps))


def read_frames(path: str | os.PathLike, start_s: float, end_s: float, fps: float = 25.0,
                size: tuple[int, int] | None = None, info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames (H, W, 3) of [start_s, end_s) resampled to `fps`, one at a time.

    `size` = (width, height) scales with area averaging in ffmpeg (cheap, for analysis passes).
    Seeking is input-side (`-ss` before `-i`): fast, and frame-accurate because ffmpeg decodes
    from the previous keyframe and drops what precedes the start. Pass `info` to skip re-probing.
    The decoder runs one thread: workers already run clips in parallel, and frame threads cost
    about 30 % more CPU per frame on small videos.
    Raises `span_outside_video` for a span not inside the video and `corrupt_video` when ffmpeg
    fails or the file ends early (a truncated download).
    """
    info = info or probe(path)
    check_span(info, start_s, end_s, path)
    width, height = size or (info.width, info.height)
    wanted = expected_frame_count(start_s, end_s, fps)
    filters = [f"fps={fps:g}"]
    if size is not None:
        filters.append(f"scale={width}:{height}:flags=area")
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error",
               "-threads", "1", "-ss", f"{start_s:.6f}", "-t", f"{end_s - start_s + 1.0 / fps:.6f}", "-i", str(path),
               "-map", "0:v:0", "-vf", ",".join(filters), "-frames:v", str(wanted),
               "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, bufsize=frame_bytes)
        produced = 0
        try:
            while True:
                data = _read_exactly(process.stdout, frame_bytes)
                if data is None:
                    break
                produced += 1
                yield np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
        report = _read_report(errors)
    if returncode != 0:
        raise VideoError(CORRUPT_VIDEO, f"{path}: ffmpeg failed decoding {start_s:.3f}-{end_s:.3f} s "
                                        f"(exit {returncode}): {_tail(report)}")
    if produced < wanted - 1:
        raise VideoError(CORRUPT_VIDEO, f"{path}: ended after {produced} of {wanted} frames of "
                                        f"{start_s:.3f}-{end_s:.3f} s: the file is truncated or damaged "
                                        f"({_tail(report) or 'no decoder message'}); download it again")


def encode_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 25.0, crf: int = 18,
               preset: str = "medium") -> int:
    """Encode RGB uint8 frames to an H.264 yuv420p faststart mp4 at `path`; return the frame count.

    Frames go to ffmpeg through a pipe as they come (nothing is buffered here). The file appears
    under its final name only once complete (temporary name in the same folder, then rename).
    """
    path = Path(path)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"no frames to encode into {path}")
    height, width = first.shape[:2]
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3 or width % 2 or height % 2:
        raise ValueError(f"frames for {path} must be (H, W, 3) uint8 RGB with even H and W, "
                         f"got {first.shape} {first.dtype}")
    with atomic_local_path(path) as temporary:
        return _encode_pipe(_chain(first, frames), first.shape, temporary, path, fps, crf, preset)


def _encode_pipe(frames: Iterable[np.ndarray], shape: tuple[int, ...], target: Path, label: Path, fps: float,
                 crf: int, preset: str) -> int:
    """Pipe frames of `shape` into an ffmpeg that writes `target`; raise `encode_failed` if it fails."""
    height, width = shape[:2]
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps:g}",
               "-i", "pipe:0", "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
               "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4", str(target)]
    count = 0
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            for frame in frames:
                if frame.shape != shape or frame.dtype != np.uint8:
                    raise ValueError(f"frame {count} for {label} is {frame.shape} {frame.dtype}, "
                                     f"expected {shape} uint8 like the first")
                process.stdin.write(np.ascontiguousarray(frame).data)
                count += 1
            process.stdin.close()
            returncode = process.wait()
        except BrokenPipeError:
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdin and not process.stdin.closed:
                try:
                    process.stdin.close()
                except BrokenPipeError:
                    pass
        if returncode != 0:
            raise VideoError(ENCODE_FAILED, f"{label}: ffmpeg encode failed (exit {returncode}): "
                                            f"{_tail(_read_report(errors))}")
    return count


def encode_mp4_bytes(frames: Iterable[np.ndarray], fps: float = 25.0, crf: int = 18,
                     preset: str = "medium") -> bytes:
    """Encode frames like `encode_mp4` and return the mp4 file's bytes (faststart needs a real file)."""
    with tempfile.TemporaryDirectory(prefix="encode-") as directory:
        target = Path(directory) / "clip.mp4"
        encode_mp4(frames, target, fps=fps, crf=crf, preset=preset)
        return target.read_bytes()


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    """One whole frame from the pipe, or None at the end (a partial frame counts as the end)."""
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _read_report(errors: IO[bytes]) -> str:
    errors.seek(0)
    return errors.read().decode("utf-8", "replace")


def _parse_duration(report: str) -> float | None:
    match = _DURATION.search(report)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _decoded_duration(path: Path) -> float | None:
    """Duration by decoding the video stream, for containers that do not state it."""
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0",
                             "-f", "null", "-"], capture_output=True, text=True, errors="replace")
    times = _DECODED_TIME.findall(result.stderr)
    if not times:
        return None
    hours, minutes, seconds = times[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _tail(report: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in report.strip().splitlines()[-lines:])
