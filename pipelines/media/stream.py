"""Frame-exact video streaming with PyAV: decode with timestamps, encode with the same, join without re-encoding.

`media.video` resamples to a fixed frame rate, which is right for training clips and wrong for
editing someone's video: an edited video must keep every frame's timestamp (rational rates such
as 30000/1001 kept as they are, variable frame rate kept as it is), its rotation and aspect
metadata, and every audio stream bit for bit. So here:

- `open_info` reads what the output must reproduce (coded size, rotation, time base, average
  rate, sample aspect ratio, colour tags, audio streams) and refuses what is not a video with a
  registered failure class.
- `decode` streams RGB frames in display orientation with each frame's pts and duration, one at
  a time, optionally from a given frame on (seeking to the keyframe before it), so memory never
  holds more than one frame whatever the length.
- `SegmentWriter` encodes frames with the source's exact pts in the source's time base, back in
  the coded orientation. Segments are H.264 without B-frames: decode order equals presentation
  order, so segments encoded independently can be concatenated packet by packet with
  monotonic timestamps.
- `join_segments` muxes the segments' packets, unchanged, together with every audio stream's
  packets copied from the source, interleaved by time (nothing buffered beyond a packet per
  stream), with the display rotation set and the index at the front (faststart).
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from pipelines.errors import (
    AUDIO_NOT_COPYABLE,
    DAMAGED_VIDEO,
    ENCODE_FAILED,
    MISSING_VIDEO,
    NO_VIDEO_STREAM,
    NOT_A_VIDEO,
    VideoError,
)

CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
"""Output containers by file extension (the only ones the editing job writes)."""


@dataclass(frozen=True)
class StreamInfo:
    """What an edited copy of a video must reproduce, read from its first video stream."""

    path: str
    width: int
    """Coded width (before rotation)."""
    height: int
    rotation: int
    """Counter-clockwise display rotation in degrees (0, 90, 180, 270), as PyAV's `VideoFrame.rotation`."""
    time_base: Fraction
    average_rate: Fraction | None
    frame_count: int | None
    """Frames the container states (None when it does not, as in Matroska)."""
    duration_s: float
    start_pts: int
    sample_aspect_ratio: Fraction | None
    codec: str
    colour: dict[str, int]
    """colorspace, color_primaries, color_trc of the source (copied to the output)."""
    audio_streams: int

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown: swapped for 90 and 270 degree rotations."""
        return (self.height, self.width) if self.rotation % 180 else (self.width, self.height)

    @property
    def rate_text(self) -> str:
        """The average frame rate as an exact fraction, e.g. '30000/1001' ('' when unknown)."""
        rate = self.average_rate
        return "" if rate is None else f"{rate.numerator}/{rate.denominator}"


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame: its index in the stream, pts and duration (time-base units) and RGB pixels."""

    index: int
    pts: int
    duration: int
    image: np.ndarray
    """(H, W, 3) uint8 RGB in display orientation."""


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise VideoError(MISSING_VIDEO, f"{path}: no such file")
    if path.stat().st_size == 0:
        raise VideoError(NOT_A_VIDEO, f"{path}: the file is empty (0 bytes)")
    try:
        return av.open(str(path), "r")
    except av.error.FFmpegError as error:
        raise VideoError(NOT_A_VIDEO, f"{path}: cannot be opened as a media file ({error}); a file cut off "
                                      f"before its index (moov atom) reads like this too") from None


def _rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """The display rotation, read from the first decoded frame's display matrix (0 when absent)."""
    try:
        for frame in container.decode(stream):
            return int(round(frame.rotation)) % 360
    except av.error.FFmpegError:
        return 0
    return 0


def open_info(path: str | os.PathLike) -> StreamInfo:
    """Describe the first video stream of `path`.

    Raises `VideoError`: `missing_video` (no file), `not_a_video` (empty or unreadable),
    `no_video_stream` (audio only).
    """
    container = _open(path)
    try:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise VideoError(NO_VIDEO_STREAM, f"{path}: no video stream ({kinds}); give a video file")
        stream = container.streams.video[0]
        context = stream.codec_context
        if not stream.width or not stream.height or stream.time_base is None:
            raise VideoError(NOT_A_VIDEO, f"{path}: the video stream has no frame size or time base")
        time_base = Fraction(stream.time_base)
        if stream.duration:
            duration = float(stream.duration * time_base)
        else:
            duration = float(container.duration or 0) / av.time_base
        info = StreamInfo(
            path=str(path), width=int(stream.width), height=int(stream.height),
            rotation=_rotation(container, stream), time_base=time_base,
            average_rate=Fraction(stream.average_rate) if stream.average_rate else None,
            frame_count=int(stream.frames) or None, duration_s=duration,
            start_pts=int(stream.start_time or 0),
            sample_aspect_ratio=Fraction(stream.sample_aspect_ratio) if stream.sample_aspect_ratio else None,
            codec=context.name,
            colour={name: int(getattr(context, name)) for name in ("colorspace", "color_primaries", "color_trc")},
            audio_streams=len(container.streams.audio))
    finally:
        container.close()
    return info


def to_display(image: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate a coded frame counter-clockwise by `rotation` degrees: what a player shows."""
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def to_coded(image: np.ndarray, rotation: int) -> np.ndarray:
    """The inverse of `to_display`: back to the orientation the encoder stores."""
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(image, -turns)) if turns else image


def decode(info: StreamInfo, start_index: int = 0, start_pts: int | None = None, count: int | None = None,
           threads: int = 1) -> Iterator[DecodedFrame]:
    """Yield frames of `info.path` in presentation order, starting at frame `start_index`.

    Give the start frame's `start_pts` (from an earlier pass) to seek to the keyframe before it
    instead of decoding from the beginning. Stops after `count` frames (None: at the end).
    Raises `damaged_video` when the data stops decoding before the end.
    """
    container = _open(info.path)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        seeked = start_pts is not None and start_index > 0
        if seeked:
            container.seek(int(start_pts), stream=stream, backward=True, any_frame=False)
        index = start_index if seeked else 0
        produced = 0
        last_pts = None
        try:
            for frame in container.decode(stream):
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
                image = to_display(frame.to_ndarray(format="rgb24"), info.rotation)
                yield DecodedFrame(index=index, pts=int(pts), duration=int(frame.duration or 0), image=image)
                index += 1
                produced += 1
                if count is not None and produced >= count:
                    return
        except av.error.FFmpegError as error:
            raise VideoError(DAMAGED_VIDEO, f"{info.path}: decoding stopped at frame {index}: {error}") from None
    finally:
        container.close()


def _exact_timing(time_base: Fraction) -> dict[str, str]:
    """mp4/mov options that keep every pts exact: by default the movie timescale is 1/1000 s, and an
    edit list (written when a file starts at a pts other than 0, as a chunk does) would round its
    start to the millisecond; in the stream's own time base it is exact."""
    return {"movie_timescale": str(time_base.denominator)}


def output_pixel_format(width: int, height: int) -> str:
    """yuv420p (what every player takes) for even sizes; 4:2:0 cannot hold odd sizes, so yuv444p there."""
    return "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"


def container_format(path: str | os.PathLike) -> str:
    """The muxer for an output file name (.mp4, .m4v, .mov, .mkv)."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINER_FORMATS:
        raise ValueError(f"{path}: output must end in one of {', '.join(CONTAINER_FORMATS)}")
    return CONTAINER_FORMATS[suffix]


class SegmentWriter:
    """Encode display-orientation RGB frames into a video-only H.264 file with given pts.

    The stream uses the source's time base for both the encoder and the container, so every pts
    comes back unchanged; the frame size and pixel format follow the source (coded orientation).
    """

    def __init__(self, path: str | os.PathLike, info: StreamInfo, crf: int = 18, preset: str = "medium",
                 codec: str = "libx264", threads: int = 1) -> None:
        self.path = Path(path)
        self.info = info
        self._container = av.open(str(self.path), "w", format="mp4", options=_exact_timing(info.time_base))
        try:
            stream = self._container.add_stream(codec, rate=info.average_rate)
            stream.width, stream.height = info.width, info.height
            stream.pix_fmt = output_pixel_format(info.width, info.height)
            stream.time_base = info.time_base
            context = stream.codec_context
            context.time_base = info.time_base
            context.thread_count = threads
            if info.sample_aspect_ratio:
                context.sample_aspect_ratio = info.sample_aspect_ratio
            for name, value in info.colour.items():
                setattr(context, name, value)
            stream.options = {"crf": str(crf), "preset": preset, "bf": "0"}
        except (av.error.FFmpegError, ValueError) as error:
            self._container.close()
            raise VideoError(ENCODE_FAILED, f"{self.path}: cannot set up the {codec} encoder: {error}") from None
        self._stream = stream
        self._durations: dict[int, int] = {}
        self.frames = 0

    def write(self, image: np.ndarray, pts: int, duration: int = 0) -> None:
        """Encode one (H, W, 3) uint8 RGB frame in display orientation at `pts` (source time base)."""
        coded = to_coded(image, self.info.rotation)
        if coded.shape[:2] != (self.info.height, self.info.width):
            raise ValueError(f"{self.path}: frame {self.frames} is {image.shape[1]}x{image.shape[0]}, expected the "
                             f"display size {self.info.display_size[0]}x{self.info.display_size[1]}")
        frame = av.VideoFrame.from_ndarray(coded, format="rgb24")
        frame.pts = int(pts)
        frame.time_base = self.info.time_base
        if duration:
            self._durations[int(pts)] = int(duration)
        self._mux(self._stream.encode(frame))
        self.frames += 1

    def _mux(self, packets: Iterable[av.Packet]) -> None:
        """Mux encoded packets, each with its frame's duration: x264 leaves durations out, and the
        muxer would then guess the last frame's, changing the stream's length and average rate."""
        try:
            for packet in packets:
                duration = self._durations.pop(packet.pts, 0)
                if duration and not packet.duration:
                    packet.duration = duration
                self._container.mux(packet)
        except av.error.FFmpegError as error:
            raise VideoError(ENCODE_FAILED, f"{self.path}: writing frame {self.frames} failed: {error}") from None

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        try:
            self._mux(self._stream.encode(None))
        finally:
            self._container.close()

    def abort(self) -> None:
        """Close without flushing (the file is incomplete; the caller deletes it)."""
        self._container.close()

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


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


def join_segments(segments: list[str | os.PathLike], target: str | os.PathLike, info: StreamInfo,
                  container_name: str = "mp4", copy_audio: bool = True) -> None:
    """Write `target`: the segments' video packets in order plus every audio stream of `info.path`, unchanged.

    The segments must come from `SegmentWriter` with the same settings (their codec parameters are
    compared: concatenating different ones would make an unplayable stream). Raises
    `audio_not_copyable` when the container cannot hold an audio codec as it is, and
    `encode_failed` for other muxing errors.
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
        except av.error.FFmpegError as error:
            raise VideoError(AUDIO_NOT_COPYABLE, f"{info.path}: its audio cannot be copied into a "
                                                 f"{container_name} file unchanged ({error}); name the output "
                                                 ".mkv or .mov") from None
        merged = heapq.merge(_segment_packets(paths, video),
                             _audio_packets(Path(info.path), audio_outputs) if audio_outputs else iter(()),
                             key=lambda item: (item[0], item[1]))
        try:
            for _, _, packet in merged:
                output.mux(packet)
        except av.error.FFmpegError as error:
            raise VideoError(ENCODE_FAILED, f"{target}: muxing failed: {error}") from None


def video_timestamps(path: str | os.PathLike) -> tuple[np.ndarray, Fraction]:
    """Sorted pts of every video packet of `path` (no decoding) and the stream's time base."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        pts = [packet.pts for packet in container.demux(stream) if packet.size and packet.pts is not None]
        return np.sort(np.asarray(pts, dtype=np.int64)), Fraction(stream.time_base)
    finally:
        container.close()


def audio_packets(path: str | os.PathLike) -> list[list[tuple[Fraction | None, bytes]]]:
    """Per audio stream, every packet's (time in seconds, bytes): what "copied unchanged" is checked against."""
    container = _open(path)
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
