"""pipelines.media.video for editing: frames decoded with their timestamps, re-encoded and joined so
that every timestamp, the rotation and the audio come back exactly as in the source."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from edit_fixtures import edit_clips, ffmpeg  # noqa: F401  (session fixture)
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import errors
from pipelines.errors import VideoError
from pipelines.media import video
from pipelines.media.formats import choose_output
from pipelines.media.pictures import Orientation, interpolate_field


def _instants(path) -> list[Fraction]:
    pts, base = video.video_timestamps(path)
    return [Fraction(int(p)) * base for p in pts]


def _reencode(info: video.VideoInfo, target, splits: list[int], tmp_path, change=None) -> list:
    """Decode `info` in chunks starting at `splits`, encode each as a segment, join them into `target`."""
    frames = list(video.decode(info))
    bounds = [*splits, len(frames)]
    segments = []
    for number, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        path = tmp_path / f"segment{number}.mp4"
        output = choose_output(info, video.container_format(target), preset="ultrafast")
        with video.SegmentWriter(path, info, output) as writer:
            for frame in video.decode(info, start_index=start, start_pts=frames[start].pts, count=stop - start):
                assert frame.pts == frames[frame.index].pts
                if change:
                    writer.write(change(frame.image), frame.pts, frame.duration)
                else:
                    writer.write_frame(frame)
        segments.append(path)
    video.join_segments(segments, target, info, video.container_format(target))
    return frames


@pytest.mark.parametrize("name", ["short.mp4", "vfr.mp4", "moov_end.mp4"])
def test_segments_joined_keep_every_timestamp_and_the_audio_bit_for_bit(edit_clips, tmp_path, name):
    source = edit_clips[name]
    info = video.probe(source)
    out = tmp_path / "out.mp4"
    frames = _reencode(info, out, [0, 7, len(list(video.decode(info))) // 2], tmp_path)
    assert _instants(out) == _instants(source)
    assert len(frames) == len(_instants(out))
    got = video.probe(out)
    assert got.average_rate == info.average_rate
    assert (got.width, got.height) == (info.width, info.height)
    assert got.audio_streams == info.audio_streams == 1
    assert video.audio_packets(out) == video.audio_packets(source)
    # faststart: the index comes before the media data
    head = out.read_bytes()[:64 * 1024]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))


def test_ntsc_rate_stays_rational(edit_clips, tmp_path):
    info = video.probe(edit_clips["short.mp4"])
    assert info.rate_text == "30000/1001"
    out = tmp_path / "out.mp4"
    _reencode(info, out, [0], tmp_path)
    assert video.probe(out).rate_text == "30000/1001"


def test_variable_frame_rate_keeps_its_uneven_gaps(edit_clips, tmp_path):
    source = edit_clips["vfr.mp4"]
    gaps = {b - a for a, b in zip(_instants(source), _instants(source)[1:])}
    assert len(gaps) > 1, "the fixture must really be variable frame rate"
    out = tmp_path / "out.mp4"
    _reencode(video.probe(source), out, [0, 25], tmp_path)
    assert _instants(out) == _instants(source)


def test_rotation_is_applied_for_processing_and_kept_as_metadata(edit_clips, tmp_path):
    rotated, plain = video.probe(edit_clips["rotated.mp4"]), video.probe(edit_clips["short.mp4"])
    assert rotated.rotation == 90 and (rotated.width, rotated.height) == (288, 352)
    assert rotated.display_size == (352, 288)
    upright = next(video.decode(rotated)).image
    shown = next(video.decode(plain)).image
    assert upright.shape == shown.shape == (288, 352, 3)
    assert np.abs(upright.astype(int) - shown.astype(int)).mean() < 3  # the same picture, upright
    out = tmp_path / "out.mp4"
    _reencode(rotated, out, [0], tmp_path)
    written = video.probe(out)
    assert written.rotation == 90 and (written.width, written.height) == (288, 352)
    back = next(video.decode(written)).image
    assert np.abs(back.astype(int) - upright.astype(int)).mean() < 3  # codec noise only


def test_odd_sizes_are_padded_into_4_2_0_and_say_so(edit_clips, tmp_path):
    info = video.probe(edit_clips["odd.mp4"])
    assert (info.width, info.height, info.pix_fmt) == (351, 287, "yuv444p")
    output = choose_output(info, "mp4")
    assert (output.pix_fmt, output.width, output.height) == ("yuv420p", 352, 288)
    assert any("padded to 352x288" in note for note in output.notes)
    out = tmp_path / "out.mp4"
    frames = _reencode(info, out, [0], tmp_path)
    written = video.probe(out)
    assert (written.width, written.height, written.pix_fmt) == (352, 288, "yuv420p")
    back = list(video.decode(written))
    assert np.mean([np.abs(a.image.astype(int) - b.image[:287, :351].astype(int)).mean()
                    for a, b in zip(frames, back)]) < 3
    assert np.array_equal(back[0].image[:287, 351], back[0].image[:287, 350]) or \
        np.abs(back[0].image[:287, 351].astype(int) - back[0].image[:287, 350]).mean() < 3  # the last column repeated


def test_a_one_frame_video_round_trips(edit_clips, tmp_path):
    info = video.probe(edit_clips["one_frame.mp4"])
    out = tmp_path / "out.mp4"
    _reencode(info, out, [0], tmp_path)
    assert _instants(out) == _instants(edit_clips["one_frame.mp4"]) and len(_instants(out)) == 1


def test_changed_pixels_are_what_gets_encoded(edit_clips, tmp_path):
    info = video.probe(edit_clips["short.mp4"])
    out = tmp_path / "out.mp4"
    _reencode(info, out, [0, 20], tmp_path, change=lambda image: 255 - image)
    source = next(video.decode(info)).image.astype(int)
    written = next(video.decode(video.probe(out))).image.astype(int)
    assert np.abs(written - (255 - source)).mean() < 3


def test_decoding_from_a_frame_seeks_to_exactly_that_frame(edit_clips):
    info = video.probe(edit_clips["short.mp4"])
    everything = list(video.decode(info))
    for start in (1, 13, 44):
        part = list(video.decode(info, start_index=start, start_pts=everything[start].pts, count=5))
        assert [f.index for f in part] == list(range(start, min(start + 5, 45)))
        assert all(np.array_equal(f.image, everything[f.index].image) for f in part)


@pytest.mark.parametrize("name, failure", [
    ("zero.mp4", errors.NOT_A_VIDEO), ("not_a_video.mp4", errors.NOT_A_VIDEO),
    ("audio_only.mp4", errors.NO_VIDEO_STREAM), ("missing.mp4", errors.MISSING_VIDEO),
])
def test_inputs_that_are_not_videos_are_named_and_classified(edit_clips, name, failure):
    path = edit_clips["short.mp4"].parent / name
    with pytest.raises(VideoError) as caught:
        video.probe(path)
    assert caught.value.failure_class == failure
    assert name in caught.value.message


def test_a_truncated_file_decodes_fewer_frames_than_its_index_lists(edit_clips):
    info = video.probe(edit_clips["truncated.mp4"])
    assert info.frame_count == 45
    try:
        decoded = sum(1 for _ in video.decode(info))
    except VideoError as error:  # some truncations stop the decoder with an error instead
        assert error.failure_class == errors.DAMAGED_VIDEO
        return
    assert decoded < info.frame_count


def test_segments_of_other_settings_are_refused(edit_clips, tmp_path):
    info = video.probe(edit_clips["short.mp4"])
    frames = list(video.decode(info, count=4))
    paths = []
    for number, preset in enumerate(("ultrafast", "veryslow")):
        path = tmp_path / f"s{number}.mp4"
        with video.SegmentWriter(path, info, choose_output(info, "mp4", preset=preset, crf=18 + 10 * number)) as writer:
            for frame in frames[number * 2:(number + 1) * 2]:
                writer.write_frame(frame)
        paths.append(path)
    with pytest.raises(VideoError) as caught:
        video.join_segments(paths, tmp_path / "out.mp4", info)
    assert caught.value.failure_class == errors.ENCODE_FAILED


@pytest.mark.parametrize("scale, tags", [
    ("out_color_matrix=bt709", ["-colorspace", "bt709"]),
    ("out_range=full", ["-color_range", "pc"]),
])
def test_colours_come_back_in_the_matrix_and_range_the_source_is_tagged_with(tmp_path, scale, tags):
    """Saturated colours through a segment: encoded in BT.601 limited range but tagged BT.709, they
    would come back about 9 levels off on average (40 at the 99th percentile)."""
    source = tmp_path / "tagged.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-frames:v", "5", "-vf", f"scale={scale}", *tags,
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-crf", "10", str(source))
    info = video.probe(source)
    out = tmp_path / "out.mp4"
    frames = _reencode(info, out, [0], tmp_path)
    written = video.probe(out)
    assert {k: written.colour[k] for k in ("colorspace", "color_range")} == \
        {k: info.colour[k] for k in ("colorspace", "color_range")}
    back = list(video.decode(written))
    assert np.mean([np.abs(a.image.astype(int) - b.image.astype(int)).mean() for a, b in zip(frames, back)]) < 3


@pytest.mark.parametrize("flags", [["-display_rotation", "270"], ["-display_rotation", "180"], ["-display_hflip"],
                                   ["-display_vflip"], ["-display_rotation", "90", "-display_hflip"]])
def test_display_matrices_show_what_ffmpeg_shows_and_are_kept(edit_clips, tmp_path, flags):
    """Rotations and flips as players apply them (ffmpeg's own autorotation is the reference), kept through
    an edit's segments and join."""
    import subprocess

    source = tmp_path / "oriented.mp4"
    ffmpeg(*flags, "-i", str(edit_clips["one_frame.mp4"]), "-c", "copy", str(source))
    info = video.probe(source)
    shown = next(video.decode(info)).image
    raw = subprocess.run([video.ffmpeg_exe(), "-v", "error", "-i", str(source), "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-sws_flags", "bicubic+accurate_rnd+full_chroma_int", "-"], capture_output=True, check=True)
    reference = np.frombuffer(raw.stdout, np.uint8).reshape(shown.shape)
    assert np.abs(shown.astype(int) - reference).mean() < 1.0
    out = tmp_path / "out.mp4"
    _reencode(info, out, [0], tmp_path)
    written = video.probe(out)
    assert written.display_matrix == info.display_matrix is not None
    assert np.abs(next(video.decode(written)).image.astype(int) - shown).mean() < 3


@settings(max_examples=60, deadline=None)
@given(turns=st.integers(0, 3), mirrored=st.booleans(), extra=st.integers(0, 3), width=st.integers(1, 9),
       height=st.integers(1, 9), data=st.data())
def test_an_orientation_undoes_itself_and_maps_rectangles_to_the_same_pixels(turns, mirrored, extra, width, height,
                                                                            data):
    orientation = (Orientation(-1, 0, 0, 1) if mirrored else Orientation()).then(Orientation.turn(90 * turns))
    orientation = orientation.then(Orientation.turn(90 * extra))
    coded = np.arange(width * height * 3).reshape(height, width, 3)
    shown = orientation.apply(coded)
    assert shown.shape[:2] == orientation.shown_size(width, height)[::-1]
    assert np.array_equal(orientation.undo(shown), coded)
    left = data.draw(st.integers(0, shown.shape[1] - 1))
    right = data.draw(st.integers(left + 1, shown.shape[1]))
    top = data.draw(st.integers(0, shown.shape[0] - 1))
    bottom = data.draw(st.integers(top + 1, shown.shape[0]))
    x0, y0, x1, y1 = orientation.undo_rect(left, top, right, bottom, (shown.shape[1], shown.shape[0]))
    assert np.array_equal(shown[top:bottom, left:right], orientation.apply(coded[y0:y1, x0:x1]))


def test_a_field_is_kept_and_the_lines_between_are_interpolated():
    woven = np.random.default_rng(0).integers(0, 256, (6, 2, 3)).astype(np.uint8)
    for parity in (0, 1):
        picture = interpolate_field(woven, parity).astype(int)
        assert np.array_equal(picture[parity::2], woven[parity::2])
        between = np.arange(1 + parity, 5 + parity, 2)  # the other field's lines with a field line on each side
        expected = (woven[between - 1].astype(int) + woven[between + 1] + 1) // 2
        assert np.array_equal(picture[between], expected)


def test_a_raw_stream_without_timestamps_is_counted_and_round_trips(edit_clips, tmp_path):
    """A raw H.264 stream has no container timestamps: frames are counted as FFmpeg's tools count them,
    the same on every pass, so it edits like any other file instead of being called damaged."""
    raw = tmp_path / "clip.h264"
    ffmpeg("-i", str(edit_clips["short.mp4"]), "-c:v", "libx264", "-preset", "ultrafast", "-bf", "2", "-an",
           "-f", "h264", str(raw))
    info = video.probe(raw)
    frames = list(video.decode(info))
    assert len(frames) == 45 and len({f.pts for f in frames}) == 45 and frames[0].pts == 0
    part = list(video.decode(info, start_index=30, start_pts=frames[30].pts, count=3))
    assert [f.pts for f in part] == [f.pts for f in frames[30:33]]
    out = tmp_path / "out.mp4"
    _reencode(info, out, [0, 20], tmp_path)
    assert _instants(out) == [Fraction(f.pts) * info.time_base for f in frames]
