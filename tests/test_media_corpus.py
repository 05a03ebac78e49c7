"""`portrait edit` on a miniature media archive (tests/media_corpus.py): every file edits, in its own
container and codec, with its frames, timing, colour, depth, geometry, scan and other streams kept,
and the pixels away from the face as they were up to compression noise.

The whole corpus is edited once per module (a tiny random-weight model: what is checked is what
the job keeps, not what the model draws); each test then reads what that run wrote.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from edit_fixtures import tiny_checkpoint  # noqa: F401  (session fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from media_corpus import KINDS, SUBTITLES, ffmpeg, make_corpus

from pipelines import errors
from pipelines.edit import job, results
from pipelines.edit.analyse import analyse_source
from pipelines.edit.settings import EditSettings
from pipelines.media import video
from pipelines.media.crop import pixel_box
from pipelines.media.faces import make_detector
from pipelines.media.pictures import plane_arrays
from pipelines.storage import OutputStore

CHUNK_FRAMES = 14
"""Chunks of 14 frames: starts at 14, 28, 42, 56, 70 fall on and beside the open-GOP files' keyframes
(every 8 and 10 frames), among them leading B-pictures of a CRA."""


@dataclass
class Edited:
    sources: dict[str, Path]
    output: Path
    rows: dict[str, results.ResultRow]
    settings: EditSettings


@pytest.fixture(scope="module")
def corpus(sample_media, tmp_path_factory) -> dict[str, Path]:
    return make_corpus(sample_media["talk.mp4"], tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def driver(sample_media, tmp_path_factory) -> Path:
    still = tmp_path_factory.mktemp("driver") / "smile.png"
    ffmpeg("-ss", "5", "-i", str(sample_media["talk.mp4"]), "-frames:v", "1", str(still))
    return still


def run(sources: job.EditInputs, output: Path, checkpoint: Path, **options) -> tuple[EditSettings, dict]:
    settings = EditSettings(output=str(output), checkpoint=str(checkpoint), detector="dlib", preset="ultrafast",
                            chunk_frames=CHUNK_FRAMES, executor="local", workdir=str(output.parent / "work"),
                            **options)
    edit_plan, weights = job.plan(sources, settings)
    job.run(edit_plan, weights, settings)
    return settings, results.read_results(OutputStore(settings.output))


@pytest.fixture(scope="module")
def edited(corpus, driver, tiny_checkpoint, tmp_path_factory) -> Edited:
    """The archive folder edited with --sources: outputs keep the sources' names and containers."""
    archive = tmp_path_factory.mktemp("archive")
    for name in (*KINDS, "sideways.mp4"):
        shutil.copy(corpus[name], archive / name)
    output = archive.parent / "edited"
    settings, rows = run(job.EditInputs(sources=str(archive), driving=str(driver)), output, tiny_checkpoint)
    return Edited({name: archive / name for name in (*KINDS, "sideways.mp4")}, output, rows, settings)


def presented(info: video.VideoInfo) -> list[tuple[Fraction, Fraction]]:
    """(start, duration) in seconds of every frame a player shows."""
    return [(f.pts * info.time_base, f.duration * info.time_base) for f in video.decode(info)]


def away_from_face(source: video.VideoInfo, output: video.VideoInfo, settings: EditSettings,
                   samples: int = 5) -> list[float]:
    """Mean absolute RGB difference outside the face's crop box, on `samples` frames spread over the video,
    in the orientation analysis found the face in."""
    faces = analyse_source(source, make_detector("dlib"), "largest", settings, {})
    source, output = replace(source, turn=faces.turn), replace(output, turn=faces.turn)
    width, height = source.view.shown_size
    wanted = set(np.linspace(0, len(faces.pts) - 1, samples).round().astype(int).tolist())
    errors = []
    for before, after in zip(video.decode(source), video.decode(output)):
        if before.index not in wanted:
            continue
        outside = np.ones((height, width), bool)
        if np.isfinite(faces.boxes[before.index]).all():
            x0, y0, side = pixel_box(faces.boxes[before.index])
            outside[max(0, y0 - 2):y0 + side + 2, max(0, x0 - 2):x0 + side + 2] = False
        difference = np.abs(after.image[:height, :width].astype(int) - before.image.astype(int)).mean(axis=-1)
        errors.append(float(difference[outside].mean()))
    return errors


def depth(pix_fmt: str) -> int:
    return max(c.bits for c in av.VideoFormat(pix_fmt).components)


@pytest.mark.parametrize("name", KINDS)
def test_every_file_of_the_archive_edits_with_its_format_timing_colour_and_streams_kept(edited, name):
    row = edited.rows[name]
    assert row.status == results.OK, f"{name}: {row.failure_class}: {row.message}"
    source, output = edited.sources[name], edited.output / name  # the source's own container
    before, after = video.probe(source), video.probe(output)
    assert row.frames_edited > 0
    # every presented frame at its instant, each with its duration (the last one's too)
    shown_before, shown_after = presented(before), presented(after)
    assert [t for t, _ in shown_after] == [t for t, _ in shown_before]
    assert abs(shown_after[-1][1] - shown_before[-1][1]) <= after.time_base
    # every other stream packet for packet
    for kind in ("audio", "subtitle"):
        assert video.stream_packets(output, kind) == video.stream_packets(source, kind), kind
    # codec, depth, colour, HDR metadata, geometry and scan
    assert after.codec == before.codec and row.output_codec.split()[0] == before.codec
    assert depth(after.pix_fmt) == depth(before.pix_fmt)
    assert after.colour == before.colour
    assert (after.hdr_mastering, after.hdr_light) == (before.hdr_mastering, before.hdr_light)
    assert after.display_matrix == before.display_matrix
    padded = (before.width + before.width % 2, before.height + before.height % 2)  # 4:2:0 and 4:2:2 outputs
    assert (after.width, after.height) == padded and ("padded" in row.format_notes) == (padded != (before.width,
                                                                                                   before.height))
    assert (after.sample_aspect_ratio or 1) == (before.sample_aspect_ratio or 1)
    assert after.field_order == before.field_order
    # and away from the face, the source's pixels up to compression noise
    assert max(away_from_face(before, after, edited.settings)) < 3.0


def test_the_corpus_covers_what_it_claims(corpus):
    """The corpus must really hold each kind (else the test above proves less than it says)."""
    info = {name: video.probe(corpus[name]) for name in KINDS}
    assert info["hd709.mp4"].colour["colorspace"] == 1 and info["hd709.mp4"].height == 720
    assert info["hd709.mp4"].rate_text == "30000/1001" and info["hd709.mp4"].has_audio
    assert info["sd601.mp4"].colour["colorspace"] == 6
    phone = info["phone.mp4"]
    assert phone.colour["color_range"] == 2 and phone.rotation == 90
    gaps = {b - a for a, b in zip(*(lambda t: (t, t[1:]))([p for p, _ in presented(phone)]))}
    assert len(gaps) > 1, "variable frame rate"
    hdr = info["hdr10.mp4"]
    assert (hdr.codec, hdr.pix_fmt, hdr.colour["color_trc"], hdr.colour["color_primaries"]) == \
        ("hevc", "yuv420p10le", 16, 9) and hdr.hdr_mastering and hdr.hdr_light == "1000,400"
    pal = info["pal.ts"]
    assert (pal.codec, pal.field_order, pal.sample_aspect_ratio, pal.width, pal.height) == \
        ("mpeg2video", "tt", Fraction(16, 15), 720, 576)
    edit_list = info["editlist.mp4"]
    assert edit_list.frame_count > len(presented(edit_list)), "the container lists frames it does not show"
    ntsc = info["ntsc.mov"]
    assert (ntsc.codec, ntsc.sample_aspect_ratio) == ("prores", Fraction(10, 11))
    assert (info["vp9.mkv"].codec, info["long.mp4"].codec) == ("vp9", "av1")
    assert (info["odd.mp4"].width, info["odd.mp4"].height) == (351, 287)
    assert len(presented(info["long.mp4"])) > 8 * CHUNK_FRAMES
    with av.open(str(corpus["vp9.mkv"])) as container:
        kinds = sorted(s.type for s in container.streams)
        assert kinds == ["attachment", "audio", "subtitle", "subtitle", "video"] and len(container.chapters()) == 2


def test_interlaced_frames_keep_both_fields_outside_the_face(edited):
    """The woven frames (both fields, as stored) come back as they were away from the face, still
    interlaced; the source's fields really differ (else keeping them would prove nothing)."""
    source, output = video.probe(edited.sources["pal.ts"]), video.probe(edited.output / "pal.ts")
    woven_before, woven_after = replace(source, one_field=False), replace(output, one_field=False)
    first = next(video.decode(woven_before)).image.astype(int)
    assert np.abs(first[0::2] - first[1::2]).mean() > 4, "the two fields show different instants"
    with av.open(str(edited.output / "pal.ts")) as container:
        assert all(frame.interlaced_frame for frame in container.decode(video=0))
    assert max(away_from_face(woven_before, woven_after, edited.settings)) < 3.0
    assert "interlaced tff" in edited.rows["pal.ts"].scan and "both fields" in edited.rows["pal.ts"].scan


def test_chapters_tags_dispositions_and_timecode_are_kept(edited):
    with av.open(str(edited.sources["vp9.mkv"])) as before, av.open(str(edited.output / "vp9.mkv")) as after:
        assert after.metadata["title"] == before.metadata["title"] == "Corpus interview"
        assert [(c["start"] * c["time_base"], c["metadata"]) for c in after.chapters()] == \
            [(c["start"] * c["time_base"], c["metadata"]) for c in before.chapters()]
        described = [(s.type, s.metadata.get("language"), s.metadata.get("title"), int(s.disposition))
                     for s in after.streams]
        assert described == [(s.type, s.metadata.get("language"), s.metadata.get("title"), int(s.disposition))
                             for s in before.streams]
    with av.open(str(edited.output / "ntsc.mov")) as after:
        assert after.streams.video[0].metadata["timecode"] == "01:00:00;00"
        assert any(s.type == "data" and s.metadata.get("timecode") == "01:00:00;00" for s in after.streams)
    assert edited.rows["vp9.mkv"].streams_copied == 4 and edited.rows["vp9.mkv"].streams_dropped == ""
    with av.open(str(edited.output / "vp9.mkv")) as after:
        attachment = next(s for s in after.streams if s.type == "attachment")
        assert attachment.data.decode() == SUBTITLES and attachment.mimetype == "text/plain"


def test_a_face_turned_sideways_is_found_and_edited_in_its_own_orientation(edited):
    row = edited.rows["sideways.mp4"]
    assert row.status == results.OK and row.frames_edited == row.frames
    assert "turned 270 degrees" in row.format_notes
    before, after = video.probe(edited.sources["sideways.mp4"]), video.probe(edited.output / "sideways.mp4")
    assert (after.width, after.height, after.rotation) == (before.width, before.height, 0)
    assert max(away_from_face(before, after, edited.settings, samples=3)) < 3.0


def test_what_a_container_cannot_hold_is_recorded_with_the_reason(corpus, driver, tiny_checkpoint, tmp_path):
    """Subtitles an MP4 cannot hold are dropped and named; ProRes, which MP4 cannot hold, becomes the
    nearest codec at the same depth and chroma; an explicit codec the container refuses fails the job."""
    table = tmp_path / "jobs.csv"
    table.write_text("source,output,mode\n"
                     f"{corpus['vp9.mkv']},vp9.mp4,\n{corpus['ntsc.mov']},ntsc.mp4,\n")
    _, rows = run(job.EditInputs(jobs=str(table), driving=str(driver)), tmp_path / "out", tiny_checkpoint)
    vp9, ntsc = rows["vp9.mp4"], rows["ntsc.mp4"]
    assert vp9.status == ntsc.status == results.OK, (vp9.message, ntsc.message)
    assert vp9.streams_copied == 1 and vp9.streams_dropped.count("subtitle") == 2
    assert vp9.streams_dropped.count("attachment") == 1
    assert "mp4 file cannot hold it" in vp9.streams_dropped
    assert video.stream_packets(tmp_path / "out" / "vp9.mp4", "audio") == \
        video.stream_packets(corpus["vp9.mkv"], "audio")
    assert ntsc.output_codec == "h264 yuv422p10le" and "cannot hold prores" in ntsc.format_notes
    assert video.probe(tmp_path / "out" / "ntsc.mp4").pix_fmt == "yuv422p10le"
    _, refused = run(job.EditInputs(source=str(corpus["ntsc.mov"]), driving=str(driver), output_name="x.mp4"),
                     tmp_path / "refused", tiny_checkpoint, codec="prores")
    assert refused["x.mp4"].failure_class == errors.UNSUPPORTED_OUTPUT and ".mov" in refused["x.mp4"].message


def _planes(frame: video.DecodedFrame) -> list[np.ndarray]:
    return [np.array(plane) for plane in plane_arrays(frame.frame)]


@pytest.fixture(scope="module")
def decoded_from_start(corpus) -> dict[str, tuple[video.VideoInfo, list[int], list[list[np.ndarray]]]]:
    result = {}
    for name in ("opengop.mkv", "opengop.ts", "pal.ts"):
        info = video.probe(corpus[name])
        frames = list(video.decode(info))
        result[name] = (info, [f.pts for f in frames], [_planes(f) for f in frames])
    return result


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["opengop.mkv", "opengop.ts", "pal.ts"]), position=st.floats(0.0, 1.0),
       count=st.integers(1, 6))
def test_a_chunk_decoded_after_a_seek_equals_the_same_frames_decoded_from_the_start(decoded_from_start, name,
                                                                                      position, count):
    info, pts, planes = decoded_from_start[name]
    start = int(round(position * (len(pts) - 1)))
    chunk = list(video.decode(info, start_index=start, start_pts=pts[start], count=count))
    assert [f.pts for f in chunk] == pts[start:start + count]
    assert [f.index for f in chunk] == list(range(start, min(start + count, len(pts))))
    for frame in chunk:
        assert all(np.array_equal(a, b) for a, b in zip(_planes(frame), planes[frame.index]))


def test_deinterlace_off_analyses_the_woven_frames_and_says_so(corpus, driver, tiny_checkpoint, tmp_path):
    _, rows = run(job.EditInputs(source=str(corpus["pal.ts"]), driving=str(driver)), tmp_path / "out",
                  tiny_checkpoint, deinterlace="off")
    row = rows["pal.ts"]
    assert row.status == results.OK and "woven frames (--deinterlace off)" in row.scan
    assert video.probe(tmp_path / "out" / "pal.ts").field_order == "tt"
