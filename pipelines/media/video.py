"""Video I/O for all three jobs, in-process with PyAV (FFmpeg's libraries): probe, decode, encode, join.

One description of a video (`VideoInfo`, from `probe`) serves every job, and every decoder streams
one frame at a time, so memory never holds a video whatever its length or resolution:

- Dataset preparation wants frames at a fixed rate: `read_frames` yields one frame per 1/fps from a
  span's start (each output instant shows the latest frame at or before it, rounded to the nearest
  output frame as ffmpeg's `fps` filter did), after seeking to the keyframe before the span.
- Editing must keep every frame's own timestamp (rational rates such as 30000/1001 as they are,
  variable frame rate as it is), the rotation and aspect metadata, and every audio stream bit for
  bit: `decode` yields frames with their pts and duration, optionally from a given frame on.
- Training reads the first frames of a sample's mp4 from memory: `read_clip`.

Encoding has one set-up, `VideoWriter` (H.264 from RGB frames with given pts, converted to YUV in the
colour matrix and range the output is tagged with), used by `encode_mp4` (training crops: a fixed
rate, faststart), `SegmentWriter` (edited chunks: the source's time base, pts, orientation and colour
tags, no B-frames, so decode order equals presentation order and independently encoded segments
concatenate packet by packet) and the edit previews (with the source's audio re-encoded to AAC).
`join_segments` muxes segments with the source's audio packets unchanged; `video_timestamps` and
`audio_packets` read back what an output must match.

Decoding reads files or bytes, never a pipe: an mp4 whose index (moov) sits at the end cannot be
decoded from a pipe. Written files appear under their final names only once complete (a temporary
name, then a rename). The ffmpeg binary (`ffmpeg_exe`) is left to yt-dlp's section downloads and to
making sample media.
"""

from __future__ import annotations

import functools
import heapq
import io
import math
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import av
import numpy as np

from pipelines.errors import (
    AUDIO_NOT_COPYABLE,
    CORRUPT_VIDEO,
    DAMAGED_VIDEO,
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

CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
"""Output containers by file extension (the only ones the editing job writes)."""

_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")

_SWS_COLORSPACE = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
"""FFmpeg's AVColorSpace of a stream -> the swscale matrix (SWS_CS_*) that converts to and from it
(bt709, fcc, bt470bg and smpte170m (both BT.601), smpte240m, bt2020); others use swscale's default, BT.601."""


@dataclass(frozen=True)
class VideoInfo:
    """A video's first video stream: what preparation checks spans against and what an edited copy
    must reproduce (coded size, rotation, time base, rate, aspect, colour tags, audio streams)."""

    path: str
    width: int
    """Coded width (before rotation); `display_size` is what a player shows."""
    height: int
    duration_s: float
    """The video stream's duration (the container's when the stream states none)."""
    time_base: Fraction
    average_rate: Fraction | None
    rotation: int = 0
    """Counter-clockwise display rotation in degrees (0, 90, 180, 270), as PyAV's `VideoFrame.rotation`."""
    frame_count: int | None = None
    """Frames the container states (None when it does not, as in Matroska)."""
    start_pts: int = 0
    sample_aspect_ratio: Fraction | None = None
    codec: str = ""
    colour: dict[str, int] = field(default_factory=dict)
    """colorspace, color_range, color_primaries, color_trc of the source (FFmpeg's enum values)."""
    audio_streams: int = 0

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown: swapped for 90 and 270 degree rotations."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)

    @property
    def fps(self) -> float:
        """The average frame rate as a number (0.0 when the container does not give one)."""
        return float(self.average_rate) if self.average_rate else 0.0

    @property
    def rate_text(self) -> str:
        """The average frame rate as an exact fraction, e.g. '30000/1001' ('' when unknown)."""
        rate = self.average_rate
        return "" if rate is None else f"{rate.numerator}/{rate.denominator}"

    @property
    def has_audio(self) -> bool:
        """Whether the file holds an audio stream."""
        return self.audio_streams > 0


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame: its index in the stream, pts and duration (time-base units) and RGB pixels."""

    index: int
    pts: int
    duration: int
    image: np.ndarray
    """(H, W, 3) uint8 RGB in display orientation."""


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The static ffmpeg binary of imageio-ffmpeg (no system ffmpeg is assumed): for yt-dlp and sample media."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


# --- probing -------------------------------------------------------------------------------------

def _is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(("http://", "https://"))


def _looks_like_mp4(path: Path) -> bool:
    """Whether the file starts with an ISO media box (an mp4/mov, perhaps cut short)."""
    with open(path, "rb") as handle:
        return handle.read(8)[4:8] in _MP4_BOXES


def _reason(error: av.FFmpegError) -> str:
    return getattr(error, "strerror", None) or str(error)


def _open(path: str | os.PathLike, damaged: str, timeout_s: float | None = None) -> av.container.InputContainer:
    """Open a local file (or an http(s) URL) for reading; a `VideoError` naming it when it cannot be.

    `damaged` is the class of an mp4 cut off before its index (see `probe`).
    """
    if _is_remote(path):
        try:
            return av.open(str(path), "r", timeout=timeout_s)
        except av.FFmpegError as error:
            raise VideoError(NOT_A_VIDEO, f"{path}: cannot be read as a video ({_reason(error)})") from None
    path = Path(path)
    if not path.is_file():
        raise VideoError(MISSING_VIDEO, f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(NOT_A_VIDEO, f"{path}: the file is empty (0 bytes)")
    try:
        return av.open(str(path), "r")
    except av.FFmpegError as error:
        if _looks_like_mp4(path):
            raise VideoError(damaged, f"{path}: an mp4 without its index (moov): cut off before its end, or "
                                      f"damaged in transfer ({_reason(error)})") from None
        raise VideoError(NOT_A_VIDEO, f"{path}: not a video file that can be opened ({_reason(error)})") from None


def _rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """The display rotation, read from the first decoded frame's display matrix (0 when absent)."""
    try:
        for frame in container.decode(stream):
            return int(round(frame.rotation)) % 360
    except av.FFmpegError:
        return 0
    return 0


def _duration(path: str | os.PathLike, container: av.container.InputContainer,
              stream: av.video.stream.VideoStream) -> float:
    """Seconds of video: the stream's, else the container's, else (local files) from the packets' times."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(Fraction(container.duration, av.time_base))
    if _is_remote(path):
        return 0.0
    first, end, clock = None, 0, 0
    with av.open(str(path), "r") as scan:  # from the start: raw streams cannot seek back
        for packet in scan.demux(scan.streams.video[0]):
            if packet.pts is not None:  # raw streams have none: their packets follow each other
                clock = packet.pts
                first = clock if first is None else min(first, clock)
            clock += packet.duration or 0
            end = max(end, clock)
    return float((end - (first or 0)) * stream.time_base)


def probe(path: str | os.PathLike, *, damaged: str = CORRUPT_VIDEO, timeout_s: float = 60.0) -> VideoInfo:
    """Describe the first video stream of a file (or an http(s) URL: only its duration is then relied on).

    Raises `VideoError`: `missing_video` (no such file), `not_a_video` (empty, or not media that can
    be opened), `no_video_stream` (audio only), and `damaged` for a header that is damaged (an mp4
    cut off before its index, a stream without frame size, time base or duration): `corrupt_video`
    by default, as for a download, which a new transfer may mend; the editing job passes
    `not_a_video`, as it is a user's file that a rerun cannot mend.
    `timeout_s` bounds reading a remote header.
    """
    container = _open(path, damaged, timeout_s)
    try:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams}))
            if not kinds:
                raise VideoError(NOT_A_VIDEO, f"{path}: holds no media streams")
            raise VideoError(NO_VIDEO_STREAM, f"{path}: no video stream ({kinds}); give a video file")
        stream = container.streams.video[0]
        context = stream.codec_context
        if not stream.width or not stream.height or stream.time_base is None:
            raise VideoError(damaged, f"{path}: the video stream has no frame size or time base")
        rotation = 0 if _is_remote(path) else _rotation(container, stream)  # remote: only the duration is used
        duration = _duration(path, container, stream)
        if not duration:
            raise VideoError(damaged, f"{path}: no duration in its header and no timestamps in its data")
        return VideoInfo(
            path=str(path), width=int(stream.width), height=int(stream.height), duration_s=duration,
            time_base=Fraction(stream.time_base),
            average_rate=Fraction(stream.average_rate) if stream.average_rate else None,
            rotation=rotation, frame_count=int(stream.frames) or None, start_pts=int(stream.start_time or 0),
            sample_aspect_ratio=Fraction(stream.sample_aspect_ratio) if stream.sample_aspect_ratio else None,
            codec=context.name,
            colour={name: int(getattr(context, name))
                    for name in ("colorspace", "color_range", "color_primaries", "color_trc")},
            audio_streams=len(container.streams.audio))
    except av.FFmpegError as error:
        raise VideoError(damaged, f"{path}: reading its header failed ({_reason(error)})") from None
    finally:
        container.close()


def check_span(info: VideoInfo, start_s: float, end_s: float, path: str | os.PathLike = "video") -> None:
    """Raise `span_outside_video` unless 0 <= start < end <= duration (with a small tolerance)."""
    if not (math.isfinite(start_s) and math.isfinite(end_s)) or start_s < 0 or end_s <= start_s \
            or end_s > info.duration_s + SPAN_TOLERANCE_S:
        raise VideoError(SPAN_OUTSIDE_VIDEO,
                         f"{path}: span {start_s:.3f}-{end_s:.3f} s is not inside the video "
                         f"(0-{info.duration_s:.3f} s); check the clip's times against the downloaded video")


# --- decoding ------------------------------------------------------------------------------------

def to_display(image: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate a coded frame counter-clockwise by `rotation` degrees: what a player shows."""
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def to_coded(image: np.ndarray, rotation: int) -> np.ndarray:
    """The inverse of `to_display`: back to the orientation the encoder stores."""
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(image, -turns)) if turns else image


def _rgb(frame: av.VideoFrame, rotation: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A frame's RGB pixels in display orientation, converted in the matrix and range it is tagged with;
    `size` = (width, height) as displayed scales with area averaging."""
    if size is None:
        return to_display(frame.to_ndarray(format="rgb24"), rotation)
    width, height = size if rotation % 180 == 0 else size[::-1]
    scaled = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    return to_display(scaled.to_ndarray(), rotation)


def _frames_from(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 target: int | None) -> Iterator[av.VideoFrame]:
    """Decoded frames of `stream` from the keyframe at or before pts `target` (None: from the beginning).

    Seeks there; decodes from the beginning instead when the seek fails or lands past `target` (as
    in MPEG-TS, whose seeks find packets, not keyframes), so callers never miss the frame they want.
    """
    origin = stream.start_time or 0
    if target is not None and target > origin:
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
            first = next(frames, None)
            if first is not None and first.pts is not None and first.pts <= target:
                yield first
                yield from frames
                return
        except av.FFmpegError:
            pass
        container.seek(origin, stream=stream, backward=True, any_frame=True)
    yield from container.decode(stream)


def decode(info: VideoInfo, start_index: int = 0, start_pts: int | None = None, count: int | None = None,
           threads: int = 1) -> Iterator[DecodedFrame]:
    """Yield frames of `info.path` in presentation order with their own pts, starting at frame `start_index`.

    Give the start frame's `start_pts` (from an earlier pass) to seek to the keyframe before it
    instead of decoding from the beginning. Stops after `count` frames (None: at the end).
    Raises `damaged_video` when the data stops decoding before the end.
    """
    container = _open(info.path, NOT_A_VIDEO)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        seeked = start_pts is not None and start_index > 0
        index = start_index if seeked else 0
        produced = 0
        last_pts = None
        try:
            for frame in _frames_from(container, stream, int(start_pts) if seeked else None):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    raise VideoError(DAMAGED_VIDEO, f"{info.path}: frame {index} has no timestamp")
                if seeked and produced == 0 and pts < start_pts:
                    continue  # between the keyframe and the wanted frame
                if seeked and produced == 0 and pts > start_pts:
                    raise VideoError(DAMAGED_VIDEO, f"{info.path}: seeking to pts {start_pts} landed at {pts}; "
                                                    "the index does not match the frames")
                if not seeked and index < start_index:
                    index += 1
                    continue
                if last_pts is not None and pts <= last_pts:
                    raise VideoError(DAMAGED_VIDEO, f"{info.path}: timestamps go backwards at frame {index} "
                                                    f"({pts} after {last_pts})")
                last_pts = pts
                yield DecodedFrame(index=index, pts=int(pts), duration=int(frame.duration or 0),
                                   image=_rgb(frame, info.rotation))
                index += 1
                produced += 1
                if count is not None and produced >= count:
                    return
        except av.FFmpegError as error:
            raise VideoError(DAMAGED_VIDEO, f"{info.path}: decoding stopped at frame {index}: {error}") from None
    finally:
        container.close()


def expected_frame_count(start_s: float, end_s: float, fps: float) -> int:
    """How many frames `read_frames` yields for a span: one per 1/fps from the start."""
    return max(1, round((end_s - start_s) * fps))


def read_frames(path: str | os.PathLike, start_s: float, end_s: float, fps: float = 25.0,
                size: tuple[int, int] | None = None, info: VideoInfo | None = None) -> Iterator[np.ndarray]:
    """Yield read-only RGB uint8 frames (H, W, 3) of [start_s, end_s) resampled to `fps`, one at a time.

    Output frame k stands for the instant start + k/fps: it shows the latest frame whose time from
    the start, rounded to whole output frames (halves up, in integer arithmetic), is at most k;
    frames before the start are dropped, and the instants before the first frame show the frame
    that stands for the first frame's instant. This is what ffmpeg's `fps` filter gave (the
    decoder before this one) for files with audio, so datasets keep their frames. Frames repeat or
    are skipped (skipped ones are never converted to RGB). `size` = (width, height) scales with area averaging
    (cheap, for analysis passes). The decoder seeks to the keyframe before the start and runs one
    thread: workers already run clips in parallel, and frame threads cost about 30 % more CPU per
    frame on small videos. Pass `info` to skip re-probing. Raises `span_outside_video` for a span
    not inside the video and `corrupt_video` when the file ends early or stops decoding (a
    truncated download).
    """
    info = info or probe(path)
    check_span(info, start_s, end_s, path)
    wanted = expected_frame_count(start_s, end_s, fps)
    produced, problem = 0, ""
    container = _open(path, CORRUPT_VIDEO)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        clock = _SpanClock(container, stream, start_s, fps)
        held, held_slot, end = None, 0, 0
        try:
            for frame in _frames_from(container, stream, clock.start_pts if start_s > 0 else None):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None or pts < clock.start_pts:
                    continue
                slot = clock.slot(pts)
                if held is not None and slot > held_slot:
                    until = min(slot, wanted)
                    yield from _repeat(held, until - produced, info.rotation, size)
                    produced = until
                    if produced >= wanted:
                        return
                held, held_slot, end = frame, slot, pts + (frame.duration or clock.frame_ticks)
        except av.FFmpegError as error:
            problem = _reason(error)
        if held is not None:  # the last frame lasts to its end
            until = min(clock.slot(end), wanted)
            yield from _repeat(held, until - produced, info.rotation, size)
            produced = max(produced, until)
    finally:
        container.close()
    if produced < wanted - 1:
        raise VideoError(CORRUPT_VIDEO, f"{path}: ended after {produced} of {wanted} frames of "
                                        f"{start_s:.3f}-{end_s:.3f} s: the file is truncated or damaged "
                                        f"({problem or 'no decoder message'}); download it again")


class _SpanClock:
    """A span's time in stream ticks and output frames, with ffmpeg's integer rounding: the start is
    counted in microseconds from the file's start, and times round to the nearest tick or frame."""

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                 start_s: float, fps: float) -> None:
        self.time_base = Fraction(stream.time_base)
        self.rate = Fraction(fps).limit_denominator(1_001_000)
        start_us = (container.start_time or 0) + round(start_s * 1_000_000)
        self.start_pts = _round_half_away(Fraction(start_us, 1_000_000) / self.time_base)
        frame_rate = stream.average_rate or self.rate
        self.frame_ticks = max(1, _round_half_away(1 / (Fraction(frame_rate) * self.time_base)))

    def slot(self, pts: int) -> int:
        """The output frame a stream time falls on, counted from the start."""
        return _round_half_away((pts - self.start_pts) * self.time_base * self.rate)


def _round_half_away(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2)) if value >= 0 else -math.floor(-value + Fraction(1, 2))


def _repeat(frame: av.VideoFrame, times: int, rotation: int, size: tuple[int, int] | None) -> Iterator[np.ndarray]:
    """`frame` as RGB `times` times over (one read-only array, converted once; nothing when times <= 0)."""
    if times <= 0:
        return
    image = _rgb(frame, rotation, size)
    image.flags.writeable = False
    for _ in range(times):
        yield image


def read_clip(mp4: bytes, size: int, limit: int | None = None) -> np.ndarray:
    """The first `limit` frames (all when None) of an mp4 held in memory, as (T, size, size, 3) uint8 RGB.

    Decoded from a BytesIO (no temporary file), resized with area averaging when shrinking and
    bicubic when enlarging (as the crops were made). Raises `damaged_video` when it cannot be decoded
    or holds no video frames.
    """
    import cv2

    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(mp4)) as container:
            for frame in container.decode(video=0):
                image = frame.to_ndarray(format="rgb24")
                if image.shape[:2] != (size, size):
                    shrink = image.shape[0] > size
                    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
                frames.append(image)
                if limit is not None and len(frames) >= limit:
                    break
    except (av.FFmpegError, ValueError, IndexError) as error:
        raise VideoError(DAMAGED_VIDEO, f"the mp4 cannot be decoded ({type(error).__name__}: {error})") from None
    if not frames:
        raise VideoError(DAMAGED_VIDEO, "the mp4 holds no video frames")
    return np.stack(frames)


# --- encoding ------------------------------------------------------------------------------------

def output_pixel_format(width: int, height: int) -> str:
    """yuv420p (what every player takes) for even sizes; 4:2:0 cannot hold odd sizes, so yuv444p there."""
    return "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"


def container_format(path: str | os.PathLike) -> str:
    """The muxer for an output file name (.mp4, .m4v, .mov, .mkv)."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINER_FORMATS:
        raise ValueError(f"{path}: output must end in one of {', '.join(CONTAINER_FORMATS)}")
    return CONTAINER_FORMATS[suffix]


def _exact_timing(time_base: Fraction) -> dict[str, str]:
    """mp4/mov options that keep every pts exact: by default the movie timescale is 1/1000 s, and an
    edit list (written when a file starts at a pts other than 0, as a chunk does) would round its
    start to the millisecond; in the stream's own time base it is exact."""
    return {"movie_timescale": str(time_base.denominator)}


class _AudioTrack:
    """A source's first audio stream re-encoded to AAC, written in step with the video frames."""

    def __init__(self, container: av.container.OutputContainer, info: VideoInfo, limit_s: float) -> None:
        self._source = av.open(info.path, "r")
        source = self._source.streams.audio[0]
        rate = source.rate or 48000
        layout = source.layout.name if source.layout.nb_channels <= 2 else "stereo"
        self._container = container
        self._stream = container.add_stream("aac", rate=rate, layout=layout)
        self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        self._start = float(info.start_pts * info.time_base)
        self._limit = limit_s
        self._frames = self._source.decode(source)
        self._next = next(self._frames, None)

    def write_until(self, seconds: float) -> None:
        """Encode source audio up to `seconds` after the video's start (and never past the limit)."""
        while self._next is not None and (self._next.time or 0.0) - self._start <= min(seconds, self._limit):
            frame, self._next = self._next, next(self._frames, None)
            frame.pts = None
            for resampled in self._resampler.resample(frame):
                self._container.mux(self._stream.encode(resampled))

    def finish(self) -> None:
        self.write_until(self._limit)
        for resampled in self._resampler.resample(None):
            self._container.mux(self._stream.encode(resampled))
        self._container.mux(self._stream.encode(None))

    def close(self) -> None:
        self._source.close()


class VideoWriter:
    """Encode (H, W, 3) uint8 RGB frames with given pts into an mp4 file: the project's one encoder set-up.

    Frames are converted to the output pixel format in the colour matrix and range the stream is
    tagged with (`colour`, FFmpeg's enum values as in `VideoInfo.colour`; untagged: BT.601, limited
    range), so a player shows the colours that went in. Each frame's duration is written with its
    packet. `audio_from` re-encodes that video's first audio stream to AAC alongside, up to
    `audio_seconds` after its start. Raises `encode_failed` when the encoder cannot be set up or
    writing fails.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, *, time_base: Fraction,
                 rate: Fraction | None, crf: int = 18, preset: str = "medium", codec: str = "libx264",
                 threads: int = 1, b_frames: bool = True, colour: Mapping[str, int] | None = None,
                 sample_aspect_ratio: Fraction | None = None, muxer_options: Mapping[str, str] | None = None,
                 audio_from: VideoInfo | None = None, audio_seconds: float = math.inf) -> None:
        self.path = Path(path)
        self.time_base = time_base
        self.frames = 0
        self._durations: dict[int, int] = {}
        self._audio: _AudioTrack | None = None
        self._container = av.open(str(self.path), "w", format="mp4", options=dict(muxer_options or {}))
        try:
            stream = self._container.add_stream(codec, rate=rate)
            stream.width, stream.height = width, height
            stream.pix_fmt = output_pixel_format(width, height)
            stream.time_base = time_base
            context = stream.codec_context
            context.time_base = time_base
            context.thread_count = threads
            if sample_aspect_ratio:
                context.sample_aspect_ratio = sample_aspect_ratio
            colour = dict(colour or {})
            for name, value in colour.items():
                setattr(context, name, value)
            stream.options = {"crf": str(crf), "preset": preset, **({} if b_frames else {"bf": "0"})}
            if audio_from is not None:
                self._audio = _AudioTrack(self._container, audio_from, audio_seconds)
        except (av.FFmpegError, ValueError) as error:
            self._container.close()
            raise VideoError(ENCODE_FAILED, f"{self.path}: cannot set up the {codec} encoder: {error}") from None
        self._stream = stream
        self._conversion = {"format": stream.pix_fmt, "dst_colorspace": _SWS_COLORSPACE.get(colour.get("colorspace")),
                            "dst_color_range": colour.get("color_range") or None, "interpolation": "BICUBIC"}

    def write(self, image: np.ndarray, pts: int, duration: int = 0) -> None:
        """Encode one RGB frame (coded orientation, the stream's size) at `pts` in the stream's time base."""
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(**self._conversion)
        frame.pts = int(pts)
        frame.time_base = self.time_base
        if duration:
            self._durations[int(pts)] = int(duration)
        self._mux(self._stream.encode(frame))
        self.frames += 1
        if self._audio is not None:
            self._audio.write_until(float(pts * self.time_base))

    def _mux(self, packets: Iterable[av.Packet]) -> None:
        """Mux encoded packets, each with its frame's duration: x264 leaves durations out, and the
        muxer would then guess the last frame's, changing the stream's length and average rate."""
        try:
            for packet in packets:
                duration = self._durations.pop(packet.pts, 0)
                if duration and not packet.duration:
                    packet.duration = duration
                self._container.mux(packet)
        except av.FFmpegError as error:
            raise VideoError(ENCODE_FAILED, f"{self.path}: writing frame {self.frames} failed: {error}") from None

    def close(self) -> None:
        """Flush the encoder (and the audio) and finish the file."""
        try:
            self._mux(self._stream.encode(None))
            if self._audio is not None:
                self._audio.finish()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without flushing (the file is incomplete; the caller deletes it)."""
        if self._audio is not None:
            self._audio.close()
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class SegmentWriter(VideoWriter):
    """Encode display-orientation frames into a video-only H.264 mp4 with the source's pts.

    The stream uses the source's time base for both the encoder and the container, so every pts
    comes back unchanged; size, pixel format, aspect and colour tags follow the source (coded
    orientation), and there are no B-frames, so segments join packet by packet (`join_segments`).
    """

    def __init__(self, path: str | os.PathLike, info: VideoInfo, crf: int = 18, preset: str = "medium",
                 codec: str = "libx264", threads: int = 1) -> None:
        super().__init__(path, info.width, info.height, time_base=info.time_base, rate=info.average_rate, crf=crf,
                         preset=preset, codec=codec, threads=threads, b_frames=False, colour=info.colour,
                         sample_aspect_ratio=info.sample_aspect_ratio, muxer_options=_exact_timing(info.time_base))
        self.info = info

    def write(self, image: np.ndarray, pts: int, duration: int = 0) -> None:
        """Encode one (H, W, 3) uint8 RGB frame in display orientation at `pts` (source time base)."""
        coded = to_coded(image, self.info.rotation)
        if coded.shape[:2] != (self.info.height, self.info.width):
            raise ValueError(f"{self.path}: frame {self.frames} is {image.shape[1]}x{image.shape[0]}, expected the "
                             f"display size {self.info.display_size[0]}x{self.info.display_size[1]}")
        super().write(coded, pts, duration)


def encode_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 25.0, crf: int = 18,
               preset: str = "medium") -> int:
    """Encode RGB uint8 frames at `fps` to an H.264 yuv420p faststart mp4 at `path`; return the frame count.

    Frames are encoded as they come (nothing is buffered here), on one thread: preparation runs
    clips in parallel already. The file appears under its final name only once complete.
    """
    path = Path(path)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"no frames to encode into {path}")
    shape = first.shape
    if first.dtype != np.uint8 or first.ndim != 3 or shape[2] != 3 or shape[0] % 2 or shape[1] % 2:
        raise ValueError(f"frames for {path} must be (H, W, 3) uint8 RGB with even H and W, "
                         f"got {shape} {first.dtype}")
    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with atomic_local_path(path) as temporary:
        with VideoWriter(temporary, shape[1], shape[0], time_base=1 / rate, rate=rate, crf=crf, preset=preset,
                         muxer_options={"movflags": "+faststart"}) as writer:
            for frame in _chain(first, frames):
                if frame.shape != shape or frame.dtype != np.uint8:
                    raise ValueError(f"frame {count} for {path} is {frame.shape} {frame.dtype}, "
                                     f"expected {shape} uint8 like the first")
                writer.write(np.ascontiguousarray(frame), count)
                count += 1
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


# --- joining and reading packets -----------------------------------------------------------------

def _seconds(packet: av.Packet) -> float:
    stamp = packet.dts if packet.dts is not None else packet.pts
    return float(stamp * packet.time_base)


def _segment_packets(segments: list[Path],
                     output: av.video.stream.VideoStream) -> Iterator[tuple[float, int, av.Packet]]:
    for segment in segments:
        with av.open(str(segment), "r") as container:
            for packet in container.demux(container.streams.video[0]):
                if packet.size == 0:
                    continue
                packet.stream = output
                yield _seconds(packet), 0, packet


def _audio_packets(source: Path,
                   outputs: dict[int, av.audio.stream.AudioStream]) -> Iterator[tuple[float, int, av.Packet]]:
    with av.open(str(source), "r") as container:
        streams = [container.streams[i] for i in outputs]
        for packet in container.demux(streams):
            if packet.size == 0 or (packet.dts is None and packet.pts is None):
                continue
            packet.stream = outputs[packet.stream.index]
            yield _seconds(packet), 1, packet


def join_segments(segments: list[str | os.PathLike], target: str | os.PathLike, info: VideoInfo,
                  container_name: str = "mp4", copy_audio: bool = True) -> None:
    """Write `target`: the segments' video packets in order plus every audio stream of `info.path`, unchanged.

    Packets are interleaved by time (nothing buffered beyond a packet per stream), with the display
    rotation set and, in mp4/mov, the index at the front (faststart). The segments must come from
    `SegmentWriter` with the same settings (their codec parameters are compared: concatenating
    different ones would make an unplayable stream). Raises `audio_not_copyable` when the container
    cannot hold an audio codec as it is, and `encode_failed` for other muxing errors.
    """
    paths = [Path(s) for s in segments]
    if not paths:
        raise ValueError(f"{target}: no segments to join")
    with av.open(str(paths[0]), "r") as first:
        template = first.streams.video[0]
        extradata = bytes(template.codec_context.extradata or b"")
    for path in paths[1:]:
        with av.open(str(path), "r") as other:
            if bytes(other.streams.video[0].codec_context.extradata or b"") != extradata:
                raise VideoError(ENCODE_FAILED, f"{path}: its codec parameters differ from {paths[0]}'s; "
                                                "segments encoded with other settings cannot be joined")
    options = {"movflags": "+faststart", **_exact_timing(info.time_base)} if container_name in ("mp4", "mov") else {}
    with av.open(str(paths[0]), "r") as first, av.open(str(target), "w", format=container_name,
                                                        options=options) as output:
        video = output.add_stream_from_template(first.streams.video[0])
        video.time_base = info.time_base
        if info.rotation:
            video.set_display_rotation(info.rotation)
        audio_outputs: dict[int, av.audio.stream.AudioStream] = {}
        if copy_audio and info.audio_streams:
            with av.open(info.path, "r") as source:
                for stream in source.streams.audio:
                    copied = output.add_stream_from_template(stream)
                    copied.time_base = stream.time_base
                    copied.metadata.update(stream.metadata)
                    audio_outputs[stream.index] = copied
        try:
            output.start_encoding()
        except av.FFmpegError as error:
            raise VideoError(AUDIO_NOT_COPYABLE, f"{info.path}: its audio cannot be copied into a "
                                                 f"{container_name} file unchanged ({error}); name the output "
                                                 ".mkv or .mov") from None
        merged = heapq.merge(_segment_packets(paths, video),
                             _audio_packets(Path(info.path), audio_outputs) if audio_outputs else iter(()),
                             key=lambda item: (item[0], item[1]))
        try:
            for _, _, packet in merged:
                output.mux(packet)
        except av.FFmpegError as error:
            raise VideoError(ENCODE_FAILED, f"{target}: muxing failed: {error}") from None


def video_timestamps(path: str | os.PathLike) -> tuple[np.ndarray, Fraction]:
    """Sorted pts of every video packet of `path` (no decoding) and the stream's time base."""
    container = _open(path, NOT_A_VIDEO)
    try:
        stream = container.streams.video[0]
        pts = [packet.pts for packet in container.demux(stream) if packet.size and packet.pts is not None]
        return np.sort(np.asarray(pts, dtype=np.int64)), Fraction(stream.time_base)
    finally:
        container.close()


def audio_packets(path: str | os.PathLike) -> list[list[tuple[Fraction | None, bytes]]]:
    """Per audio stream, every packet's (time in seconds, bytes): what "copied unchanged" is checked against."""
    container = _open(path, NOT_A_VIDEO)
    try:
        streams = list(container.streams.audio)
        result: list[list[tuple[Fraction | None, bytes]]] = [[] for _ in streams]
        if streams:
            position = {stream.index: number for number, stream in enumerate(streams)}
            for packet in container.demux(streams):
                if packet.size:
                    stamp = None if packet.pts is None else Fraction(packet.pts) * Fraction(packet.time_base)
                    result[position[packet.stream.index]].append((stamp, bytes(packet)))
        return result
    finally:
        container.close()
