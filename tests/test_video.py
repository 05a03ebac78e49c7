"""Video I/O on the real sample clip: probing without ffprobe, streamed 25 fps frames, atomic encode."""

from __future__ import annotations

import inspect
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.errors import CORRUPT_VIDEO, SPAN_OUTSIDE_VIDEO, VideoError
from pipelines.media.video import (
    VideoInfo,
    check_span,
    decode,
    encode_mp4,
    encode_mp4_bytes,
    ffmpeg_exe,
    probe,
    read_frames,
)
from pipelines.sample.media import source_clip_path

SAMPLE = source_clip_path()


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A faststart copy of the sample, one truncated to 40 %, one with audio, and a garbage file."""
    directory = tmp_path_factory.mktemp("video")
    faststart = directory / "faststart.mp4"
    _ffmpeg("-i", str(SAMPLE), "-c", "copy", "-movflags", "+faststart", str(faststart))
    truncated = directory / "truncated.mp4"
    data = faststart.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.4)])
    with_audio = directory / "audio.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=30", "-f", "lavfi", "-i", "sine", "-t", "1",
            "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(with_audio))
    garbage = directory / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    return {"faststart": faststart, "truncated": truncated, "audio": with_audio, "garbage": garbage}


def test_probe_reads_the_sample_header():
    info = probe(SAMPLE)
    assert (info.width, info.height) == (176, 144)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    assert info.duration_s == pytest.approx(4.0, abs=0.05)
    assert info.has_audio is False


def test_probe_sees_an_audio_track(media):
    info = probe(media["audio"])
    assert info.has_audio is True and (info.width, info.height) == (160, 120)


def test_probe_rejects_a_file_that_is_not_a_video(media):
    with pytest.raises(VideoError) as caught:
        probe(media["garbage"])
    assert caught.value.failure_class == "not_a_video"
    assert str(media["garbage"]) in caught.value.message


def test_probe_tells_empty_audio_only_and_cut_off_files_apart(media, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    sound = tmp_path / "sound.m4a"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", str(sound)],
                   check=True)
    cut = tmp_path / "cut.mp4"  # moov at the end, and the end is gone
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(media["audio"]), "-c", "copy", str(cut)], check=True)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    expected = {empty: ("not_a_video", "empty"), sound: ("no_video_stream", "audio"), cut: (CORRUPT_VIDEO, "moov")}
    for path, (failure_class, words) in expected.items():
        with pytest.raises(VideoError) as caught:
            probe(path)
        assert caught.value.failure_class == failure_class and words in caught.value.message


def test_probe_names_a_missing_file(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        probe(tmp_path / "absent.mp4")


def test_read_frames_streams_frames_resampled_to_25_fps():
    frames = read_frames(SAMPLE, 1.0, 2.0)
    assert inspect.isgenerator(frames)
    first = next(frames)
    rest = list(frames)
    assert first.shape == (144, 193, 3) and first.dtype == np.uint8  # 176 pixels of 128:117 shown square
    assert 1 + len(rest) == 25


def test_read_frames_scales_when_asked():
    frames = list(read_frames(SAMPLE, 0.0, 0.4, size=(88, 72)))
    assert len(frames) == 10 and frames[0].shape == (72, 88, 3)


def test_seeking_lands_on_the_same_frames_as_decoding_from_the_start():
    from_start = list(read_frames(SAMPLE, 0.0, 2.0))
    seeked = list(read_frames(SAMPLE, 1.0, 2.0))
    difference = np.abs(from_start[25].astype(int) - seeked[0].astype(int)).mean()
    neighbour = np.abs(from_start[24].astype(int) - seeked[0].astype(int)).mean()
    assert difference < 1.0 < neighbour


def test_moov_at_end_and_faststart_files_decode_to_the_same_frames(media):
    original = np.stack(list(read_frames(SAMPLE, 0.5, 1.5)))
    faststart = np.stack(list(read_frames(media["faststart"], 0.5, 1.5)))
    np.testing.assert_array_equal(original, faststart)


def test_mpeg_ts_seeks_land_on_the_same_frames(tmp_path):
    """MPEG-TS seeks find packets, not keyframes: decoding falls back to the start instead of losing frames."""
    ts = tmp_path / "clip.ts"
    _ffmpeg("-i", str(SAMPLE), "-c:v", "libx264", "-preset", "ultrafast", "-f", "mpegts", str(ts))
    from_start, seeked = list(read_frames(ts, 0.0, 2.0)), list(read_frames(ts, 1.0, 2.0))
    assert len(seeked) == 25 and all(np.array_equal(a, b) for a, b in zip(from_start[25:], seeked))
    info = probe(ts)
    frames = list(decode(info))
    part = list(decode(info, start_index=60, start_pts=frames[60].pts, count=3))
    assert [f.index for f in part] == [60, 61, 62]
    assert all(np.array_equal(f.image, frames[f.index].image) for f in part)


def test_closing_the_generator_early_stops_ffmpeg():
    frames = read_frames(SAMPLE, 0.0, 4.0)
    next(frames)
    frames.close()  # must not hang or leave a decoder behind
    assert inspect.getgeneratorstate(frames) == inspect.GEN_CLOSED


def test_truncated_file_is_reported_as_corrupt(media):
    info = probe(media["truncated"])
    with pytest.raises(VideoError) as caught:
        for _ in read_frames(media["truncated"], 0.0, info.duration_s, info=info):
            pass
    assert caught.value.failure_class == CORRUPT_VIDEO
    assert "truncated" in caught.value.message or "failed" in caught.value.message


@pytest.mark.parametrize("span", [(3.0, 5.0), (-0.5, 1.0), (2.0, 2.0), (4.5, 6.0)])
def test_span_outside_the_video_is_rejected_before_decoding(span):
    with pytest.raises(VideoError) as caught:
        next(read_frames(SAMPLE, *span))
    assert caught.value.failure_class == SPAN_OUTSIDE_VIDEO


@settings(max_examples=200, deadline=None)
@given(start=st.floats(-5, 10, allow_nan=False), length=st.floats(-1, 10, allow_nan=False))
def test_check_span_accepts_exactly_the_spans_inside(start, length):
    info = VideoInfo(path="video", width=2, height=2, duration_s=4.0, time_base=Fraction(1, 25),
                     average_rate=Fraction(25))
    end = start + length
    inside = 0 <= start < end <= 4.0 + 0.05
    try:
        check_span(info, start, end)
        accepted = True
    except VideoError as error:
        assert error.failure_class == SPAN_OUTSIDE_VIDEO
        accepted = False
    assert accepted == inside


def _moving_gradient(count: int) -> list[np.ndarray]:
    x = np.linspace(0, 255, 64)
    return [np.stack([np.tile(np.roll(x, 3 * i), (48, 1))] * 3, axis=-1).astype(np.uint8) for i in range(count)]


def test_encode_round_trip_is_faststart_h264_at_25_fps(tmp_path):
    frames = _moving_gradient(30)
    target = tmp_path / "out.mp4"
    assert encode_mp4(iter(frames), target, crf=10) == 30
    data = target.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    info = probe(target)
    assert (info.width, info.height, info.fps) == (64, 48, 25.0)
    decoded = list(read_frames(target, 0.0, info.duration_s))
    assert len(decoded) == 30
    assert np.abs(decoded[10].astype(int) - frames[10].astype(int)).mean() < 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_encode_bytes_matches_the_file_format():
    data = encode_mp4_bytes(_moving_gradient(5), preset="ultrafast")
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")


def test_a_failing_frame_source_leaves_no_file_behind(tmp_path):
    def frames():
        yield from _moving_gradient(5)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        encode_mp4(frames(), tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []


def test_encode_refuses_frames_that_change_size(tmp_path):
    frames = _moving_gradient(3) + [np.zeros((50, 64, 3), np.uint8)]
    with pytest.raises(ValueError, match="frame 3"):
        encode_mp4(frames, tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []
