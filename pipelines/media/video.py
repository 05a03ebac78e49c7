"""Video I/O for all three jobs, in-process with PyAV (FFmpeg's libraries): probe, decode, encode, join.

One description of a video (`VideoInfo`, from `probe`) serves every job, and every decoder streams
one frame at a time, so memory never holds a video whatever its length or resolution:

- Dataset preparation wants frames at a fixed rate: `read_frames` yields one frame per 1/fps from a
  span's start (each output instant shows the latest frame at or before it, rounded to the nearest
  output frame as ffmpeg's `fps` filter did), after seeking to the keyframe before the span.
- Editing must keep every frame's own timestamp (rational rates such as 30000/1001 as they are,
  variable frame rate as it is, the last frame's duration too), the orientation and aspect
  metadata, and every other stream bit for bit: `decode` yields frames with their pts and duration,
  optionally from a given frame on.
- Training reads the first frames of a sample's mp4 from memory (`read_clip`), or only the frames a
  pair needs (`read_frames_at`: a seek to the keyframe before each, so a short keyframe interval
  makes random access cheap).

What analysis sees of a frame (`DecodedFrame.image`) is an RGB image as a viewer sees it: in the
frame's own colour matrix and range, in square pixels, upright, one field of an interlaced frame
(`pictures.View`). Edited frames go back to the encoder in the source's own pixel format with only
the pasted face converted (`SegmentWriter.write_frame`); the codec, depth and settings follow the
source (`formats.choose_output`).

Seeking is checked, never trusted: a seek must land on a keyframe at or before the wanted frame,
else it is tried again earlier (MPEG-TS/PS seeks find packets, not keyframes; open-GOP streams
start decoding at a keyframe whose leading pictures cannot be shown), and a container with no
usable index is decoded from its start. Completeness is judged by the last presented timestamp
against the stream's stated duration, so edit lists (frames the container lists but does not
show) are not mistaken for damage.

Encoding has one set-up, `VideoWriter` (frames with given pts, converted to the output's pixel
format in the colour matrix and range the output is tagged with), used by `encode_mp4` (training
crops: a fixed rate, faststart), `SegmentWriter` (edited chunks: the source's time base, pts,
format and colour, no reordering, so independently encoded segments concatenate packet by packet)
and the edit previews (with the source's audio re-encoded to AAC). `join_segments` muxes segments
with every other stream of the source unchanged (audio, subtitles, data, attachments), its
chapters, metadata and timecode, and says what a container could not hold.

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
import struct
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import av
import cv2
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
from pipelines.media.crop import crop_frame, crop_region, pixel_box
from pipelines.media.formats import CONTAINERS, OutputFormat, choose_output
from pipelines.media.paste import Overlay
from pipelines.media.pictures import (
    CONVERSION,
    Orientation,
    View,
    blend_overlay,
    pad_frame,
    square_width,
    sws_matrix,
)
from pipelines.storage import atomic_local_path

SPAN_TOLERANCE_S = 0.05
"""A span may end this far past the reported duration (container durations are rounded)."""

CONTAINER_FORMATS = CONTAINERS
"""Output containers by file extension (`formats.CONTAINERS`)."""

_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")

_FIELD_ORDER_NAMES = {2: "tt", 3: "bb", 4: "tb", 5: "bt"}


@dataclass(frozen=True)
class VideoInfo:
    """A video's first video stream: what preparation checks spans against and what an edited copy
    must reproduce (coded size, orientation, time base, rate, aspect, format, colour, scan, streams)."""

    path: str
    width: int
    """Coded width (before rotation and aspect ratio); `display_size` is what a player shows."""
    height: int
    duration_s: float
    """The video stream's duration (the container's when the stream states none)."""
    time_base: Fraction
    average_rate: Fraction | None
    rotation: int = 0
    """Counter-clockwise display rotation in degrees (0, 90, 180, 270) of the display matrix."""
    frame_count: int | None = None
    """Frames the container lists (None when it does not, as in Matroska); an edit list may show fewer."""
    start_pts: int = 0
    sample_aspect_ratio: Fraction | None = None
    codec: str = ""
    colour: dict[str, int] = field(default_factory=dict)
    """colorspace, color_range, color_primaries, color_trc of the decoded frames (FFmpeg's enum values;
    2 / 0 = unspecified, which decoding and encoding both treat as FFmpeg does: BT.601, limited range)."""
    audio_streams: int = 0
    pix_fmt: str = ""
    """The decoded frames' pixel format (yuv420p, yuv420p10le, yuv422p10le, ...)."""
    profile: str = ""
    display_matrix: tuple[int, ...] | None = None
    """FFmpeg's 3x3 display matrix (16.16 fixed point) when the file has one: rotation and flips."""
    field_order: str = ""
    """'' for progressive frames; for interlaced ones 'tt' (top field first), 'bb', 'tb' or 'bt'."""
    hdr_mastering: str = ""
    """Mastering-display metadata, x265 syntax (G(x,y)B(x,y)R(x,y)WP(x,y)L(max,min)); '' when absent."""
    hdr_light: str = ""
    """Content light level 'MaxCLL,MaxFALL'; '' when absent."""
    duration_stated: bool = True
    """Whether `duration_s` is the video stream's own (else the container's or the packets' span)."""
    one_field: bool = True
    """Interlaced frames are analysed as their first field, lines interpolated (False: --deinterlace off)."""
    turn: int = 0
    """An extra counter-clockwise turn (degrees) that shows the face upright for analysis (found by the editor)."""

    @property
    def orientation(self) -> Orientation:
        """How players show coded pixels (the display matrix)."""
        return Orientation.from_display_matrix(self.display_matrix)

    @property
    def view(self) -> View:
        """How decoded frames become the RGB images analysis sees (`pictures.View`)."""
        field = None
        if self.field_order and self.one_field:
            field = 0 if self.field_order in ("tt", "tb") else 1
        return View(self.width, self.height, square_width(self.width, self.sample_aspect_ratio),
                    self.orientation.then(Orientation.turn(self.turn)), field)

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown: square pixels, swapped for 90 and 270 degree rotations."""
        return self.orientation.shown_size(square_width(self.width, self.sample_aspect_ratio), self.height)

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

    @property
    def scan(self) -> str:
        """'progressive', or 'interlaced tff' / 'interlaced bff'."""
        if not self.field_order:
            return "progressive"
        return "interlaced " + ("tff" if self.field_order in ("tt", "tb") else "bff")


class DecodedFrame:
    """One decoded frame: its index in the stream, pts and duration (time-base units), the decoded
    picture in its own format (`frame`) and, converted on first use, the RGB image analysis sees."""

    __slots__ = ("index", "pts", "duration", "frame", "view", "_image", "_carrier")

    def __init__(self, index: int, pts: int, duration: int, frame: av.VideoFrame, view: View,
                 carrier: list[av.VideoFrame] | None = None) -> None:
        self.index, self.pts, self.duration, self.frame, self.view = index, pts, duration, frame, view
        self._image: np.ndarray | None = None
        self._carrier = [] if carrier is None else carrier
        """`View.carrier` of the stream, made once and shared by the frames of one `decode`."""

    @property
    def image(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB as shown (`pictures.View.picture`)."""
        if self._image is None:
            self._image = self.view.picture(self.frame)
        return self._image


    def region(self, left: int, top: int, right: int, bottom: int) -> np.ndarray:
        """`image[top:bottom, left:right]` (clipped), converting only that part unless `image` is already made."""
        if self._image is not None:
            return self._image[max(0, top):max(0, bottom), max(0, left):max(0, right)]
        if not self._carrier:
            self._carrier.append(View.carrier(self.frame))
        return self.view.region(self.frame, left, top, right, bottom, like=self._carrier[0])

    def grey_region(self, left: int, top: int, right: int, bottom: int) -> np.ndarray | None:
        """The luma of `image[top:bottom, left:right]` as full-range grey levels, read from the decoded plane
        (`pictures.View.grey`); None where the view does not allow it."""
        return self.view.grey(self.frame, left, top, right, bottom)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of `image`."""
        return self.view.shown_size

    def shrunk(self, width: int, height: int) -> np.ndarray:
        """`image` scaled down to width x height with area averaging, converted at that size in one step."""
        if self._image is not None:
            return cv2.resize(self._image, (width, height), interpolation=cv2.INTER_AREA)
        return self.view.picture(self.frame, size=(width, height))

    def crop(self, box: np.ndarray | tuple[float, float, float, float], size: int) -> np.ndarray:
        """`crop.crop_frame(image, box, size)`, resampled from the decoded planes and converted to RGB at the
        crop's size where the view allows (`pictures.View.crop`), else from the box's RGB region."""
        if self._image is not None:
            return crop_frame(self._image, box, size)
        crop = self.view.crop(self.frame, *pixel_box(box), size)
        return crop if crop is not None else crop_region(self.region, self.view.shown_size, box, size)

    def overlaid(self, overlay: Overlay | None) -> av.VideoFrame:
        """The decoded picture with `overlay` (in the coordinates of `image`) blended into its own planes
        (`pictures.blend_overlay`); the picture itself when there is none."""
        if overlay is None:
            return self.frame
        left, top, pixels, weights = self.view.to_coded(*overlay)
        return blend_overlay(self.frame, left, top, pixels, weights)


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


def _first_frame(container: av.container.InputContainer,
                 stream: av.video.stream.VideoStream) -> av.VideoFrame | None:
    """The first decoded frame (None when none decodes): what the decoder says of format, colour and scan."""
    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError:
        return None
    return None


def _side_data(frame: av.VideoFrame | None, name: str) -> bytes | None:
    if frame is None:
        return None
    kind = getattr(av.sidedata.sidedata.Type, name)
    for item in frame.side_data:
        if item.type == kind:
            return bytes(item)
    return None


def _mastering(data: bytes | None) -> str:
    """AVMasteringDisplayMetadata as x265's master-display string (chromaticity in 1/50000, luminance in 1/10000)."""
    if not data or len(data) < 88:
        return ""
    values = struct.unpack("<20i2i", data[:88])
    rationals = [Fraction(values[i], values[i + 1]) if values[i + 1] else Fraction(0) for i in range(0, 20, 2)]
    has_primaries, has_luminance = values[20], values[21]
    if not (has_primaries and has_luminance):
        return ""
    (rx, ry, gx, gy, bx, by, wx, wy), (low, high) = rationals[:8], rationals[8:]

    def xy(x: Fraction, y: Fraction) -> str:
        return f"{round(x * 50000)},{round(y * 50000)}"

    return (f"G({xy(gx, gy)})B({xy(bx, by)})R({xy(rx, ry)})WP({xy(wx, wy)})"
            f"L({round(high * 10000)},{round(low * 10000)})")


def _light_level(data: bytes | None) -> str:
    if not data or len(data) < 8:
        return ""
    max_cll, max_fall = struct.unpack("<2I", data[:8])
    return f"{max_cll},{max_fall}"


def _display_matrix(frame: av.VideoFrame | None) -> tuple[int, ...] | None:
    data = _side_data(frame, "DISPLAYMATRIX")
    if not data or len(data) < 36:
        return None
    matrix = struct.unpack("<9i", data[:36])
    return None if Orientation.from_display_matrix(matrix).identity else matrix


def _stated_duration(stream: av.video.stream.VideoStream) -> float | None:
    """The stream's own duration: its header's, or the DURATION tag Matroska writers leave (H:MM:SS.fraction)."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag and tag.count(":") == 2:
        try:
            hours, minutes, seconds = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        except ValueError:
            return None
    return None


def _duration(path: str | os.PathLike, container: av.container.InputContainer,
              stream: av.video.stream.VideoStream) -> tuple[float, bool]:
    """Seconds of video and whether they are the stream's own: the stream's, else the container's, else
    (local files) from the packets' times."""
    stated = _stated_duration(stream)
    if stated:
        return stated, True
    if container.duration:
        return float(Fraction(container.duration, av.time_base)), False
    if _is_remote(path):
        return 0.0, False
    first, end, clock = None, 0, 0
    with av.open(str(path), "r") as scan:  # from the start: raw streams cannot seek back
        for packet in scan.demux(scan.streams.video[0]):
            if packet.pts is not None:  # raw streams have none: their packets follow each other
                clock = packet.pts
                first = clock if first is None else min(first, clock)
            clock += packet.duration or 0
            end = max(end, clock)
    return float((end - (first or 0)) * stream.time_base), False


def probe(path: str | os.PathLike, *, damaged: str = CORRUPT_VIDEO, timeout_s: float = 60.0) -> VideoInfo:
    """Describe the first video stream of a file (or an http(s) URL: only its duration is then relied on).

    Local files have their first frame decoded: the frames' pixel format, colour tags, scan,
    display matrix and HDR metadata are what the decoder says (the container's and the bitstream's
    tags merged), which is what decoding and encoding must agree on.

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
        first = None if _is_remote(path) else _first_frame(container, stream)  # remote: only the duration is used
        duration, stated = _duration(path, container, stream)
        if not duration:
            raise VideoError(damaged, f"{path}: no duration in its header and no timestamps in its data")
        tags = first if first is not None else context
        interlaced = first is not None and first.interlaced_frame
        field_order = _FIELD_ORDER_NAMES.get(int(context.field_order or 0), "tt") if interlaced else ""
        matrix = _display_matrix(first)
        return VideoInfo(
            path=str(path), width=int(stream.width), height=int(stream.height), duration_s=duration,
            time_base=Fraction(stream.time_base),
            average_rate=Fraction(stream.average_rate) if stream.average_rate else None,
            rotation=Orientation.from_display_matrix(matrix).rotation, frame_count=int(stream.frames) or None,
            start_pts=int(stream.start_time or 0),
            sample_aspect_ratio=Fraction(stream.sample_aspect_ratio) if stream.sample_aspect_ratio else None,
            codec=context.codec.canonical_name,
            colour={name: int(getattr(tags, name) or 0)
                    for name in ("colorspace", "color_range", "color_primaries", "color_trc")},
            audio_streams=len(container.streams.audio),
            pix_fmt=first.format.name if first is not None else (context.pix_fmt or ""),
            profile=stream.profile or "", display_matrix=matrix, field_order=field_order,
            hdr_mastering=_mastering(_side_data(first, "MASTERING_DISPLAY_METADATA")),
            hdr_light=_light_level(_side_data(first, "CONTENT_LIGHT_LEVEL")), duration_stated=stated)
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

SEEK_BACK_S = 1.0
"""A seek that lands past the wanted frame is tried again this much earlier, then twice as much, and so on."""


class _Decoder:
    """A file's first video stream, decoded from its start or from a keyframe at or before a given pts."""

    def __init__(self, path: str | os.PathLike, damaged: str, threads: int = 1) -> None:
        self.path, self.damaged, self.threads = path, damaged, threads
        self._open()

    def _open(self) -> None:
        self.container = _open(self.path, self.damaged)
        self.stream = self.container.streams.video[0]
        self.stream.codec_context.thread_count = self.threads

    def close(self) -> None:
        self.container.close()

    def frames(self, target: int | None = None) -> Iterator[av.VideoFrame]:
        """Decoded frames from a keyframe at or before pts `target` (None: from the start) on.

        A seek counts only when the first keyframe decoded after it lies at or before `target`
        (frames decoded before that keyframe, such as an open GOP's leading pictures, are dropped);
        otherwise it is tried again earlier, and a file that cannot seek there is decoded from its
        start (reopened: some containers cannot seek back to their first packet).
        """
        origin = self.stream.start_time or 0
        if target is not None and target > origin:
            step = max(1, round(Fraction(SEEK_BACK_S) / Fraction(self.stream.time_base)))
            attempt = target
            while attempt > origin:
                try:
                    self.container.seek(attempt, stream=self.stream, backward=True, any_frame=False)
                    frames = self.container.decode(self.stream)
                    key = _first_keyframe(frames, target)
                except av.FFmpegError:
                    break
                if key is not None:
                    yield key
                    yield from frames
                    return
                attempt, step = attempt - step, step * 2
            self.close()
            self._open()
        yield from self._stamped(self.container.decode(self.stream))

    def _stamped(self, frames: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        """Frames from the start, each given a pts where the container has none (raw H.264/HEVC streams):
        the previous frame's end, as FFmpeg's own tools count them. Such streams never seek (a seek needs
        timestamps), so every pass counts the same."""
        rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(25)
        default = max(1, round(1 / (Fraction(rate) * Fraction(self.stream.time_base))))
        clock = self.stream.start_time or 0
        for frame in frames:
            if frame.pts is None and frame.dts is None:
                frame.pts = clock
            stamp = frame.pts if frame.pts is not None else frame.dts
            clock = stamp + (frame.duration or default)
            yield frame


def _first_keyframe(frames: Iterator[av.VideoFrame], target: int) -> av.VideoFrame | None:
    """The first keyframe of `frames` if it lies at or before pts `target` (None once past it)."""
    for frame in frames:
        pts = frame.pts if frame.pts is not None else frame.dts
        if frame.key_frame:
            return frame if pts is not None and pts <= target else None
        if pts is not None and pts > target:
            return None
    return None


def decode(info: VideoInfo, start_index: int = 0, start_pts: int | None = None, count: int | None = None,
           threads: int = 1) -> Iterator[DecodedFrame]:
    """Yield frames of `info.path` in presentation order with their own pts, starting at frame `start_index`.

    Give the start frame's `start_pts` (from an earlier pass) to seek to a keyframe before it
    instead of decoding from the beginning. Stops after `count` frames (None: at the end). Images
    are shown as `info.view` says. Raises `damaged_video` when the data stops decoding before the end.
    """
    decoder = _Decoder(info.path, NOT_A_VIDEO, threads)
    view = info.view
    carrier: list[av.VideoFrame] = []
    try:
        seeked = start_pts is not None and start_index > 0
        index = start_index if seeked else 0
        produced = 0
        last_pts = None
        try:
            for frame in decoder.frames(int(start_pts) if seeked else None):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:
                    raise VideoError(DAMAGED_VIDEO, f"{info.path}: frame {index} has no timestamp")
                if seeked and produced == 0 and pts < start_pts:
                    continue  # between the keyframe and the wanted frame
                if seeked and produced == 0 and pts > start_pts:
                    raise VideoError(DAMAGED_VIDEO, f"{info.path}: no frame at pts {start_pts} on decoding again "
                                                    f"(the next is at {pts}): the stream does not decode the same "
                                                    "twice")
                if not seeked and index < start_index:
                    index += 1
                    continue
                if last_pts is not None and pts <= last_pts:
                    raise VideoError(DAMAGED_VIDEO, f"{info.path}: timestamps go backwards at frame {index} "
                                                    f"({pts} after {last_pts})")
                last_pts = pts
                yield DecodedFrame(index, int(pts), int(frame.duration or 0), frame, view, carrier)
                index += 1
                produced += 1
                if count is not None and produced >= count:
                    return
        except av.FFmpegError as error:
            raise VideoError(DAMAGED_VIDEO, f"{info.path}: decoding stopped at frame {index}: {error}") from None
    finally:
        decoder.close()


def presented_end(info: VideoInfo, last_pts: int, last_duration: int) -> float:
    """Seconds from the stream's start to the end of its last decoded frame (a frame without a
    duration is given the average frame's)."""
    if not last_duration and info.average_rate:
        last_duration = round(1 / (info.average_rate * info.time_base))
    return float((last_pts + last_duration - info.start_pts) * info.time_base)


def check_complete(info: VideoInfo, frames: int, last_pts: int, last_duration: int) -> None:
    """Raise `damaged_video` when decoding ended well before the stream's stated end (a truncated file).

    Judged by the last presented timestamp, not by the frames the container lists: an edit list
    (a file cut without re-encoding) lists frames it does not show. Where the container states no
    duration of its own for the video stream, every frame that decoded is all there is.
    """
    if not info.duration_stated:
        return
    frame_s = float(1 / info.average_rate) if info.average_rate else 0.04
    shown = presented_end(info, last_pts, last_duration)
    if shown < info.duration_s - max(2 * frame_s, SPAN_TOLERANCE_S):
        raise VideoError(DAMAGED_VIDEO, f"{info.path}: decoding ended after {frames} frames at {shown:.3f} s of "
                                        f"{info.duration_s:.3f} s: the file is truncated or damaged")


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
    are skipped (skipped ones are never converted to RGB). Images are shown as `info.view` says
    (square pixels, upright, one field of interlaced frames, the source's colours). `size` =
    (width, height) scales with area averaging (cheap, for analysis passes). The decoder seeks to a
    keyframe before the start and runs one thread: workers already run clips in parallel, and frame
    threads cost about 30 % more CPU per frame on small videos. Pass `info` to skip re-probing.
    Raises `span_outside_video` for a span not inside the video and `corrupt_video` when the file
    ends early or stops decoding (a truncated download).
    """
    info = info or probe(path)
    check_span(info, start_s, end_s, path)
    wanted = expected_frame_count(start_s, end_s, fps)
    produced, problem = 0, ""
    view = info.view
    decoder = _Decoder(path, CORRUPT_VIDEO)
    try:
        clock = _SpanClock(decoder.container, decoder.stream, start_s, fps)
        held, held_slot, end = None, 0, 0
        try:
            for frame in decoder.frames(clock.start_pts if start_s > 0 else None):
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None or pts < clock.start_pts:
                    continue
                slot = clock.slot(pts)
                if held is not None and slot > held_slot:
                    until = min(slot, wanted)
                    yield from _repeat(held, until - produced, view, size)
                    produced = until
                    if produced >= wanted:
                        return
                held, held_slot, end = frame, slot, pts + (frame.duration or clock.frame_ticks)
        except av.FFmpegError as error:
            problem = _reason(error)
        if held is not None:  # the last frame lasts to its end
            until = min(clock.slot(end), wanted)
            yield from _repeat(held, until - produced, view, size)
            produced = max(produced, until)
    finally:
        decoder.close()
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


def _repeat(frame: av.VideoFrame, times: int, view: View, size: tuple[int, int] | None) -> Iterator[np.ndarray]:
    """`frame` as RGB `times` times over (one read-only array, converted once; nothing when times <= 0)."""
    if times <= 0:
        return
    image = view.picture(frame, size)
    image.flags.writeable = False
    for _ in range(times):
        yield image


def read_clip(mp4: bytes, size: int, limit: int | None = None) -> np.ndarray:
    """The first `limit` frames (all when None) of an mp4 held in memory, as (T, size, size, 3) uint8 RGB.

    Decoded from a BytesIO (no temporary file) in the matrix and range the clip is tagged with,
    resized with area averaging when shrinking and bicubic when enlarging (as the crops were made).
    Raises `damaged_video` when it cannot be decoded or holds no video frames.
    """
    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(mp4)) as container:
            for frame in container.decode(video=0):
                frames.append(_model_size(frame, size))
                if limit is not None and len(frames) >= limit:
                    break
    except (av.FFmpegError, ValueError, IndexError) as error:
        raise VideoError(DAMAGED_VIDEO, f"the mp4 cannot be decoded ({type(error).__name__}: {error})") from None
    if not frames:
        raise VideoError(DAMAGED_VIDEO, "the mp4 holds no video frames")
    return np.stack(frames)


def _model_size(frame: av.VideoFrame, size: int) -> np.ndarray:
    """A decoded frame as `read_clip` gives it: RGB, resized to `size` (area when shrinking, bicubic else)."""
    import cv2

    image = frame.reformat(format="rgb24", interpolation=CONVERSION).to_ndarray()
    if image.shape[:2] != (size, size):
        shrink = image.shape[0] > size
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return image


def read_frames_at(mp4: bytes, indices: Iterable[int], size: int, *, frames: int, threads: int = 1) -> np.ndarray:
    """Frames `indices` (in that order) of a constant-rate mp4 held in memory, as `read_clip` gives them.

    The container must list `frames` video packets, all present (a cut-short file is refused
    whatever frames are asked for, so a sample's usability does not depend on which frames a draw
    picks). Each wanted frame is reached by seeking to the keyframe at or before it and decoding
    forward: the cost is the distance to that keyframe, not the frame's place in the clip.
    `threads` > 1 lets FFmpeg decode with that many threads. Raises `damaged_video` otherwise.
    """
    wanted = list(indices)
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.video[0]
            if threads > 1:
                stream.thread_type = "AUTO"
                stream.codec_context.thread_count = threads
            present = sum(1 for packet in container.demux(stream) if packet.size)
            if present != frames:
                raise VideoError(DAMAGED_VIDEO, f"the mp4 holds {present} video frames where {frames} are recorded")
            start, step = stream.start_time or 0, 1 / (stream.time_base * stream.average_rate)
            for index in sorted(set(wanted)):
                if not 0 <= index < frames:
                    raise ValueError(f"frame {index} is outside the clip's {frames} frames")
                target = start + round(index * step)
                container.seek(target, backward=True, any_frame=False, stream=stream)
                for frame in container.decode(stream):
                    if frame.pts is None or frame.pts < target:
                        continue
                    if frame.pts == target:
                        found[index] = _model_size(frame, size)
                    break
                if index not in found:
                    raise VideoError(DAMAGED_VIDEO, f"frame {index} cannot be decoded after a seek")
    except (av.FFmpegError, ValueError, IndexError, ZeroDivisionError, TypeError) as error:
        raise VideoError(DAMAGED_VIDEO, f"the mp4 cannot be decoded ({type(error).__name__}: {error})") from None
    return np.stack([found[index] for index in wanted])


# --- encoding ------------------------------------------------------------------------------------

def container_format(path: str | os.PathLike) -> str:
    """The muxer for an output file name (`formats.CONTAINERS`)."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINER_FORMATS:
        raise ValueError(f"{path}: output must end in one of {', '.join(CONTAINER_FORMATS)}")
    return CONTAINER_FORMATS[suffix]


def _exact_timing(time_base: Fraction) -> dict[str, str]:
    """mp4/mov options that keep every pts exact: by default the movie timescale is 1/1000 s, and an
    edit list (written when a file starts at a pts other than 0, as a chunk does) would round its
    start to the millisecond; in the stream's own time base it is exact."""
    return {"movie_timescale": str(time_base.denominator)}


RGB_TAGS = {"colorspace": 1, "color_range": 1}
"""What RGB frames are encoded as when no source says otherwise: BT.709 matrix, limited range (tagged)."""


def rgb_colour(source: Mapping[str, int] | None = None) -> dict[str, int]:
    """Colour tags for a video made from RGB images of `source`: BT.709 limited range, tagged, with the
    source's primaries and transfer (the RGB values are still in those)."""
    source = dict(source or {})
    return {**RGB_TAGS, "color_primaries": int(source.get("color_primaries", 2) or 2),
            "color_trc": int(source.get("color_trc", 2) or 2)}


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
    """Encode frames with given pts into a file: the project's one encoder set-up.

    Timestamps are in `time_base`, the container's; the encoder counts in `codec_time_base` (the same
    unless an encoder needs its frame rate's, as MPEG-2 does: exact for its constant rates).
    `write` takes (H, W, 3) uint8 RGB images, converted to the output pixel format in the colour
    matrix and range the stream is tagged with (`colour`, FFmpeg's enum values as in
    `VideoInfo.colour`; by default BT.709 limited range, tagged), so a player shows the colours that
    went in; `write_picture` takes decoded frames as they are (converted only where the pixel format
    or size differs). Each frame's duration is written with its packet. `audio_from` re-encodes
    that video's first audio stream to AAC alongside, up to `audio_seconds` after its start.
    Raises `encode_failed` when the encoder cannot be set up or writing fails.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, *, time_base: Fraction,
                 rate: Fraction | None, crf: int = 18, preset: str = "medium", codec: str = "libx264",
                 pix_fmt: str = "yuv420p", options: Mapping[str, str] | None = None, threads: int = 1,
                 b_frames: bool = True, colour: Mapping[str, int] | None = None,
                 sample_aspect_ratio: Fraction | None = None, field_order: int = 0, container: str = "mp4",
                 muxer_options: Mapping[str, str] | None = None, audio_from: VideoInfo | None = None,
                 audio_seconds: float = math.inf, codec_time_base: Fraction | None = None,
                 keyframe_interval: int | None = None) -> None:
        self.path = Path(path)
        self.time_base = time_base
        self.codec_time_base = codec_time_base or time_base
        self.frames = 0
        self.width, self.height, self.pix_fmt = width, height, pix_fmt
        self.colour = dict(RGB_TAGS if colour is None else colour)
        self._durations: dict[int, int] = {}
        self._audio: _AudioTrack | None = None
        if codec == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration to stderr otherwise
        self._container = av.open(str(self.path), "w", format=container, options=dict(muxer_options or {}))
        try:
            stream = self._container.add_stream(codec, rate=rate)
            stream.width, stream.height = width, height
            stream.pix_fmt = pix_fmt
            stream.time_base = time_base
            context = stream.codec_context
            context.time_base = self.codec_time_base
            context.thread_count = threads
            if sample_aspect_ratio:
                context.sample_aspect_ratio = sample_aspect_ratio
            if field_order:
                context.field_order = field_order
            for name, value in self.colour.items():
                setattr(context, name, value)
            stream.options = dict(options) if options is not None else {
                "crf": str(crf), "preset": preset, **({} if b_frames else {"bf": "0"}),
                **({"g": str(keyframe_interval)} if keyframe_interval else {})}
            if audio_from is not None:
                self._audio = _AudioTrack(self._container, audio_from, audio_seconds)
        except (av.FFmpegError, ValueError) as error:
            self._container.close()
            raise VideoError(ENCODE_FAILED, f"{self.path}: cannot set up the {codec} encoder: {error}") from None
        self._stream = stream

    def write(self, image: np.ndarray, pts: int, duration: int = 0) -> None:
        """Encode one RGB frame (coded orientation, the stream's size) at `pts` in the stream's time base."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(
            format=self.pix_fmt, dst_colorspace=sws_matrix(self.colour.get("colorspace", 2)),
            dst_color_range=self.colour.get("color_range") or None, interpolation=CONVERSION)
        self.write_picture(frame, pts, duration)

    def write_picture(self, frame: av.VideoFrame, pts: int, duration: int = 0) -> None:
        """Encode a frame at `pts` (converted to the stream's pixel format and padded to its size if needed)."""
        if frame.format.name != self.pix_fmt:
            frame = frame.reformat(format=self.pix_fmt, interpolation=CONVERSION)
        if (frame.width, frame.height) != (self.width, self.height):
            frame = pad_frame(frame, self.width, self.height)
        frame.pts = int(pts)
        frame.time_base = self.time_base
        frame.pict_type = 0  # the encoder chooses its own frame types (a decoded I-frame would force one)
        if duration:
            scale = self.time_base / self.codec_time_base
            self._durations[round(pts * scale)] = round(duration * scale)
        try:
            packets = self._stream.encode(frame)
        except av.FFmpegError as error:
            raise VideoError(ENCODE_FAILED, f"{self.path}: encoding frame {self.frames} failed: {error}") from None
        self._mux(packets)
        self.frames += 1
        if self._audio is not None:
            self._audio.write_until(float(pts * self.time_base))

    def _mux(self, packets: Iterable[av.Packet]) -> None:
        """Mux encoded packets, each with its frame's duration: encoders leave durations out, and the
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
            try:
                packets = self._stream.encode(None)
            except av.FFmpegError as error:
                raise VideoError(ENCODE_FAILED, f"{self.path}: flushing the encoder failed: {error}") from None
            self._mux(packets)
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


@functools.lru_cache(maxsize=None)
def encoder_opens(name: str) -> bool:
    """Whether this process can encode with `name` (NVENC needs a GPU and its driver): one small frame is tried."""
    try:
        context = av.CodecContext.create(name, "w")
        context.width, context.height, context.pix_fmt = 256, 256, "yuv420p"
        context.time_base = Fraction(1, 25)
        frame = av.VideoFrame(256, 256, "yuv420p")
        frame.pts = 0
        context.encode(frame)
        context.encode(None)
        return True
    except Exception:  # a missing encoder, device or driver: each raises its own kind of error
        return False


def segment_container(codec: str) -> str:
    """Segments are ISO media files, exact to the tick in any time base: MP4, or QuickTime for ProRes."""
    return "mov" if codec == "prores" else "mp4"


class SegmentWriter(VideoWriter):
    """Encode one chunk of a source into a video-only segment, in `output`'s format with the source's pts.

    The stream uses the source's time base for both the encoder and the container, so every pts
    comes back unchanged; size, pixel format, aspect, scan and colour tags follow `output` (by
    default the source's, `formats.choose_output`), and nothing is reordered, so segments join
    packet by packet (`join_segments`). `write_frame` takes decoded frames: passed through as
    decoded, or with an edited face blended into the frame's own planes (`pictures.blend_overlay`).
    """

    def __init__(self, path: str | os.PathLike, info: VideoInfo, output: OutputFormat | None = None,
                 threads: int = 1) -> None:
        output = output or choose_output(info, "mp4")
        codec_time_base = 1 / info.average_rate if output.frame_rate_clock and info.average_rate else None
        super().__init__(path, output.width, output.height, time_base=info.time_base, rate=info.average_rate,
                         codec=output.encoder, pix_fmt=output.pix_fmt, options=output.options, threads=threads,
                         colour=output.colour, sample_aspect_ratio=info.sample_aspect_ratio,
                         field_order=output.field_order, container=segment_container(output.codec),
                         muxer_options=_exact_timing(info.time_base), codec_time_base=codec_time_base)
        self.info = info
        self.output = output

    def write_frame(self, frame: DecodedFrame, overlay: Overlay | None = None) -> None:
        """Encode a decoded frame at its own pts, with `overlay` (in the coordinates of `frame.image`) blended in."""
        self.write_picture(frame.overlaid(overlay), frame.pts, frame.duration)

    def write(self, image: np.ndarray, pts: int, duration: int = 0) -> None:
        """Encode one (H, W, 3) uint8 RGB frame as analysis sees them (`info.view`) at `pts` (source time base)."""
        view = self.info.view
        if image.shape[:2] != view.shown_size[::-1]:
            raise ValueError(f"{self.path}: frame {self.frames} is {image.shape[1]}x{image.shape[0]}, expected "
                             f"{view.shown_size[0]}x{view.shown_size[1]} (as shown)")
        coded = view.orientation.undo(image)
        if view.square != view.width:
            import cv2

            coded = cv2.resize(coded, (view.width, view.height), interpolation=cv2.INTER_AREA
                               if view.square > view.width else cv2.INTER_CUBIC)
        super().write(coded, pts, duration)


def encode_mp4(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: float = 25.0, crf: int = 18,
               preset: str = "medium", colour: Mapping[str, int] | None = None,
               keyframe_interval: int | None = None) -> int:
    """Encode RGB uint8 frames at `fps` to an H.264 yuv420p faststart mp4 at `path`; return the frame count.

    The clip is BT.709 limited range, tagged so, with the primaries and transfer of `colour` (the
    source's tags the frames were decoded from: their RGB values are still in those), so decoding
    it gives back the colours that went in. `keyframe_interval` caps the frames between keyframes
    (None: x264's default, 250). Frames are encoded as they come (nothing is buffered
    here), on one thread: preparation runs clips in parallel already. The file appears under its
    final name only once complete.
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
                         colour=rgb_colour(colour), muxer_options={"movflags": "+faststart"},
                         keyframe_interval=keyframe_interval) as writer:
            for frame in _chain(first, frames):
                if frame.shape != shape or frame.dtype != np.uint8:
                    raise ValueError(f"frame {count} for {path} is {frame.shape} {frame.dtype}, "
                                     f"expected {shape} uint8 like the first")
                writer.write(np.ascontiguousarray(frame), count)
                count += 1
    return count


def encode_mp4_bytes(frames: Iterable[np.ndarray], fps: float = 25.0, crf: int = 18,
                     preset: str = "medium", colour: Mapping[str, int] | None = None,
                     keyframe_interval: int | None = None) -> bytes:
    """Encode frames like `encode_mp4` and return the mp4 file's bytes (faststart needs a real file)."""
    with tempfile.TemporaryDirectory(prefix="encode-") as directory:
        target = Path(directory) / "clip.mp4"
        encode_mp4(frames, target, fps=fps, crf=crf, preset=preset, colour=colour,
                   keyframe_interval=keyframe_interval)
        return target.read_bytes()


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


# --- joining and reading packets -----------------------------------------------------------------

_STALE_TAGS = {"duration", "encoder", "bps", "number_of_frames", "number_of_bytes", "_statistics_writing_app",
               "_statistics_writing_date_utc", "_statistics_tags", "vendor_id"}
"""Tags that describe an encoding, not the content: a re-encoded video stream must not keep them."""
_BRAND_TAGS = {"major_brand", "minor_version", "compatible_brands", "encoder"}
"""Container tags the muxer writes itself."""


@dataclass(frozen=True)
class StreamNote:
    """What became of one stream of the source in the edited file."""

    index: int
    kind: str
    """audio, subtitle, data, attachment or video (a second video stream, cover art)."""
    codec: str
    kept: bool
    reason: str = ""

    @property
    def text(self) -> str:
        return f"#{self.index} {self.kind} {self.codec or 'unknown'}" + (f": {self.reason}" if self.reason else "")


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


def _copied_packets(source: Path, outputs: dict[int, av.stream.Stream]) -> Iterator[tuple[float, int, av.Packet]]:
    """Every packet of the copied streams, in the source's order, unchanged (discarded ones included:
    an edit list's audio priming is written with its own edit list)."""
    with av.open(str(source), "r") as container:
        streams = [container.streams[i] for i in outputs]
        for packet in container.demux(streams):
            if packet.size == 0 or (packet.dts is None and packet.pts is None):
                continue
            packet.stream = outputs[packet.stream.index]
            yield _seconds(packet), 1, packet


def _timecode(stream: av.stream.Stream) -> str:
    return stream.metadata.get("timecode", "")


def _is_timecode(stream: av.stream.Stream) -> bool:
    """A QuickTime timecode track (tmcd, a data stream with a timecode tag): MOV/MP4 muxers write their own
    from the video stream's timecode tag."""
    return stream.type == "data" and bool(_timecode(stream))


def _holds(container_name: str, stream: av.stream.Stream) -> str:
    """'' when a `container_name` file can hold `stream` as it is, else why not (from writing a header in memory)."""
    try:
        with av.open(io.BytesIO(), "w", format=container_name) as trial:
            trial.add_stream_from_template(stream)
            trial.start_encoding()
    except (av.FFmpegError, ValueError, TypeError) as error:
        return str(getattr(error, "strerror", None) or error)
    return ""


def _codec_name(stream: av.stream.Stream) -> str:
    context = stream.codec_context
    return context.codec.canonical_name if context is not None else (getattr(stream, "name", None) or "")


def _keep_tags(tags: Mapping[str, str], drop: set[str]) -> dict[str, str]:
    return {key: value for key, value in tags.items() if key.lower() not in drop}


def join_segments(segments: list[str | os.PathLike], target: str | os.PathLike, info: VideoInfo,
                  container_name: str = "mp4", copy_streams: bool = True) -> list[StreamNote]:
    """Write `target`: the segments' video packets in order plus every other stream of `info.path`, unchanged.

    Copied unchanged: every audio, subtitle, data and attachment stream (and further video streams,
    such as cover art), with their tags and dispositions; the container's tags (title, creation
    time, ...) and chapters; the video stream's tags (language, title, timecode: MOV/MP4 muxers
    write a timecode track from it), dispositions and display matrix (rotation and flips).
    Packets are interleaved by time (nothing buffered beyond a packet per stream), and in mp4/mov
    the index comes first (faststart). The segments must come from `SegmentWriter` with the same
    settings (their codec parameters are compared: concatenating different ones would make an
    unplayable stream). Returns a note per other stream of the source: kept, or dropped and why
    (a subtitle, data or attachment stream the container cannot hold). Raises
    `audio_not_copyable` when the container cannot hold an audio codec as it is (a video without
    its sound is no deliverable), and `encode_failed` for other muxing errors.
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
    quicktime = container_name in ("mp4", "mov")
    options = {"movflags": "+faststart", **_exact_timing(info.time_base)} if quicktime else {}
    notes: list[StreamNote] = []
    with av.open(str(paths[0]), "r") as first, av.open(info.path, "r") as source, \
            av.open(str(target), "w", format=container_name, options=options) as output:
        edited = source.streams.video[0]
        video = output.add_stream_from_template(first.streams.video[0], opaque=True)
        video.time_base = info.time_base
        if info.sample_aspect_ratio:  # ProRes and VP9 keep it in the container only
            video.sample_aspect_ratio = info.sample_aspect_ratio
        if info.average_rate:  # Matroska's default duration: what a last frame without its own lasts
            video.codec_context.framerate = info.average_rate
        if quicktime and video.codec_context.name == "hevc":
            video.codec_tag = "hvc1"  # what Apple players require of HEVC in mp4/mov
        if info.display_matrix:
            video.set_display_matrix(list(info.display_matrix))
        video.metadata.update(_keep_tags(edited.metadata, _STALE_TAGS))
        video.disposition = edited.disposition
        outputs: dict[int, av.stream.Stream] = {}
        for stream in source.streams if copy_streams else ():
            if stream.index == edited.index:
                continue
            codec = _codec_name(stream)
            if _is_timecode(stream):
                timecode = _timecode(stream) or _timecode(edited)
                if timecode:
                    video.metadata["timecode"] = timecode
                notes.append(StreamNote(stream.index, stream.type, "tmcd", timecode != "",
                                        f"timecode {timecode} kept as the video stream's timecode" if timecode else
                                        "a timecode track without a start time"))
                continue
            problem = _holds(container_name, stream)
            if problem:
                if stream.type == "audio":
                    raise VideoError(AUDIO_NOT_COPYABLE, f"{info.path}: its {codec} audio (stream {stream.index}) "
                                                         f"cannot be copied into a {container_name} file unchanged "
                                                         f"({problem}); name the output .mkv or .mov")
                notes.append(StreamNote(stream.index, stream.type, codec, False,
                                        f"a {container_name} file cannot hold it ({problem}); name the output .mkv "
                                        "to keep it"))
                continue
            copied = output.add_stream_from_template(stream)
            copied.time_base = stream.time_base
            copied.metadata.update(_keep_tags(stream.metadata, {"duration"}))
            copied.disposition = stream.disposition
            outputs[stream.index] = copied
            notes.append(StreamNote(stream.index, stream.type, codec, True))
        output.metadata.update(_keep_tags(source.metadata, _BRAND_TAGS))
        chapters = source.chapters()
        if chapters:
            output.set_chapters(chapters)
        try:
            output.start_encoding()
        except av.FFmpegError as error:
            raise VideoError(ENCODE_FAILED,
                             f"{target}: the {container_name} header cannot be written: {error}") from None
        merged = heapq.merge(_segment_packets(paths, video),
                             _copied_packets(Path(info.path), outputs) if outputs else iter(()),
                             key=lambda item: (item[0], item[1]))
        try:
            for _, _, packet in merged:
                output.mux(packet)
        except av.FFmpegError as error:
            raise VideoError(ENCODE_FAILED, f"{target}: muxing failed: {error}") from None
    return notes


def video_timestamps(path: str | os.PathLike) -> tuple[np.ndarray, Fraction]:
    """Sorted pts of every presented video packet of `path` (no decoding; packets an edit list
    discards are left out) and the stream's time base."""
    container = _open(path, NOT_A_VIDEO)
    try:
        stream = container.streams.video[0]
        pts = [packet.pts for packet in container.demux(stream)
               if packet.size and packet.pts is not None and not packet.is_discard]
        return np.sort(np.asarray(pts, dtype=np.int64)), Fraction(stream.time_base)
    finally:
        container.close()


def stream_packets(path: str | os.PathLike, kind: str = "audio") -> list[list[tuple[Fraction | None, bytes]]]:
    """Per stream of `kind` (audio, subtitle, data), every packet's (time in seconds, bytes): what
    "copied unchanged" is checked against."""
    container = _open(path, NOT_A_VIDEO)
    try:
        streams = [s for s in container.streams if s.type == kind and not _is_timecode(s)]
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


def audio_packets(path: str | os.PathLike) -> list[list[tuple[Fraction | None, bytes]]]:
    """Per audio stream, every packet's (time in seconds, bytes) (`stream_packets`)."""
    return stream_packets(path, "audio")
