"""Metadata parsers: VoxCeleb trees, clip tables, URL lists; bad input becomes failures, never aborts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.dataset.schema import MAX_KEY_LENGTH, safe_key
from pipelines.errors import BAD_METADATA, DUPLICATE_CLIP
from pipelines.prepare.requests import resolve_url
from pipelines.prepare.sources import (
    InputError,
    SourceInputs,
    SplitPolicy,
    parse_clip_table,
    parse_sources,
    parse_url_list,
    parse_voxceleb_tree,
)
from pipelines.prepare.sources import voxceleb
from pipelines.prepare.sources.common import assign_split
from pipelines.prepare.sources.voxceleb import VoxUtterance, iter_voxceleb_videos, write_voxceleb_tree

VOX1_TEXT = (
    "Identity  : \tid10001 \nReference : \t1zcIwhmdeo4 \nOffset    : \t1 \nFV Conf   : \t17.734 (1)\n"
    "ASD Conf  : \t4.985 \n\nFRAME \tX \tY \tW \tH \n"
    "000245 \t0086 \t0032 \t0107 \t0107 \n000246 \t0087 \t0032 \t0107 \t0108 \n000247 \t0088 \t0033 \t0106 \t0108 \n"
)
VOX2_TEXT = (
    "Identity  : \tid00012\nReference : \t21Uxsk56VDQ\nOffset    : \t1\nFV Conf   : \t16.647\t(1)\n"
    "ASD Conf  : \t4.465\n\nFRAME \tX \tY \tW \tH \n"
    "00001\t0.398\t0.153\t0.164\t0.363\n00002\t0.399\t0.154\t0.164\t0.362\n"
)


def put(root: Path, relpath: str, text: str | bytes) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- VoxCeleb trees ----------------------------------------------------------------------------


def test_voxceleb1_file_gives_pixel_boxes_of_the_360p_video(tmp_path):
    put(tmp_path, "txt/id10001/1zcIwhmdeo4/00001.txt", VOX1_TEXT)
    requests, failures = parse_voxceleb_tree(tmp_path)
    assert failures == []
    (clip,) = requests
    assert clip.clip_id == "id10001/1zcIwhmdeo4/00001"
    assert (clip.identity, clip.video_id, clip.source) == ("id10001", "1zcIwhmdeo4", "voxceleb1")
    assert clip.url == "https://www.youtube.com/watch?v=1zcIwhmdeo4"
    assert clip.start_s == pytest.approx(245 / 25) and clip.end_s == pytest.approx(248 / 25)
    assert [b.t for b in clip.boxes] == pytest.approx([245 / 25, 246 / 25, 247 / 25])
    first = clip.boxes[0]
    assert (first.x, first.y, first.w, first.h) == (86, 32, 107, 107)
    assert first.units == "pixels" and first.reference_height == 360
    # A 720p download doubles the pixel box.
    assert first.to_pixels(1280, 720) == pytest.approx((172, 64, 386, 278))


def test_voxceleb2_file_gives_normalised_boxes(tmp_path):
    put(tmp_path, "txt/id00012/21Uxsk56VDQ/00001.txt", VOX2_TEXT)
    (clip,), failures = parse_voxceleb_tree(tmp_path / "txt")
    assert failures == []
    assert clip.source == "voxceleb2"
    assert {b.units for b in clip.boxes} == {"normalized"}
    assert clip.boxes[1].h == pytest.approx(0.362)
    assert clip.start_s == pytest.approx(1 / 25) and clip.end_s == pytest.approx(3 / 25)


def test_box_rows_are_one_array_and_odd_but_valid_tables_read_the_same(tmp_path):
    put(tmp_path, "a/txt/id00012/21Uxsk56VDQ/00001.txt", VOX2_TEXT)
    # a blank line and spaces instead of tabs: the one-step read refuses it, the checked one accepts it
    odd = VOX2_TEXT.replace("\n00002\t", "\n\n00002 ").replace("\t0.153", "  0.153")
    put(tmp_path, "b/txt/id00012/21Uxsk56VDQ/00001.txt", odd)
    (fast,), _ = parse_voxceleb_tree(tmp_path / "a")
    (checked,), _ = parse_voxceleb_tree(tmp_path / "b")
    assert fast.boxes.rows.shape == (2, 5) and not fast.boxes.rows.flags.writeable
    assert list(fast.boxes) == list(checked.boxes) and (fast.start_s, fast.end_s) == (checked.start_s, checked.end_s)
    shifted = fast.boxes.shifted(0.04)  # times counted from a downloaded section's start
    assert [b.t for b in shifted] == pytest.approx([0.0, 0.04]) and shifted[1].h == fast.boxes[1].h


def test_explicit_version_rejects_boxes_in_the_wrong_units(tmp_path):
    put(tmp_path, "txt/id10001/1zcIwhmdeo4/00001.txt", VOX1_TEXT)
    requests, failures = parse_voxceleb_tree(tmp_path, version=2)
    assert requests == []
    assert "[0, 1]" in failures[0].message and failures[0].failure_class == BAD_METADATA


@pytest.mark.parametrize("video", ["-leadingDash", "_leadingUnd"])
def test_ids_starting_with_dash_or_underscore(tmp_path, video):
    text = VOX2_TEXT.replace("21Uxsk56VDQ", video)
    put(tmp_path, f"txt/id00012/{video}/00001.txt", text)
    (clip,), failures = parse_voxceleb_tree(tmp_path)
    assert failures == []
    assert clip.video_id == video
    assert clip.url.endswith("=" + video)
    assert clip.key[0].isalpha() and "." not in clip.key


MALFORMED = {
    "bad_header": ("Identity  \tid00012\n" + VOX2_TEXT.split("\n", 1)[1], "Key : value"),
    "non_numeric": (VOX2_TEXT + "00003\t0.4\tabc\t0.1\t0.1\n", "non-numeric"),
    "short_row": (VOX2_TEXT + "00003\t0.4\t0.1\n", "expected 5 columns"),
    "empty": ("", "empty file"),
    "no_rows": (VOX2_TEXT.split("00001")[0], "no frame rows"),
    "negative_box": (VOX2_TEXT.replace("0.398", "-0.2"), "[0, 1]"),
    "zero_width": (VOX2_TEXT.replace("0.164", "0.000"), "positive"),
    "pixel_box_off_frame": (
        VOX1_TEXT.replace("0032", "0400").replace("id10001", "id00012").replace("1zcIwhmdeo4", "21Uxsk56VDQ"),
        "outside",
    ),
    "frames_backwards": (VOX2_TEXT + "00001\t0.4\t0.1\t0.1\t0.1\n", "not after"),
    "identity_mismatch": (VOX2_TEXT.replace("id00012", "id99999"), "differs"),
    "wrong_columns": (VOX2_TEXT.replace("FRAME \tX \tY \tW \tH", "FRAME \tX \tY \tWIDTH"), "FRAME X Y W H"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_utterance_becomes_a_failure_and_the_rest_still_parses(tmp_path, case):
    text, expected = MALFORMED[case]
    put(tmp_path, "txt/id00012/21Uxsk56VDQ/00001.txt", text)
    put(tmp_path, "txt/id00012/goodVideo01/00001.txt", VOX2_TEXT.replace("21Uxsk56VDQ", "goodVideo01"))
    requests, failures = parse_voxceleb_tree(tmp_path)
    assert [r.video_id for r in requests] == ["goodVideo01"]
    (failure,) = failures
    assert expected in failure.message
    assert failure.failure_class == BAD_METADATA
    assert failure.origin.split(":")[0].endswith("21Uxsk56VDQ/00001.txt")


def test_row_errors_point_at_the_line(tmp_path):
    put(tmp_path, "txt/id00012/21Uxsk56VDQ/00001.txt", MALFORMED["non_numeric"][0])
    _, (failure,) = parse_voxceleb_tree(tmp_path)
    assert failure.origin.endswith("00001.txt:10")


def test_unreadable_and_misplaced_files_are_failures(tmp_path):
    put(tmp_path, "txt/id00012/21Uxsk56VDQ/00001.txt", b"\xff\xfe\x00garbage")
    (tmp_path / "txt/id00012/21Uxsk56VDQ/00002.txt").mkdir()  # a directory where a file should be
    put(tmp_path, "txt/id00012/stray.txt", VOX2_TEXT)
    requests, failures = parse_voxceleb_tree(tmp_path)
    assert requests == []
    messages = " | ".join(f.message for f in failures)
    assert len(failures) == 3
    assert messages.count("cannot read") == 2 and "misplaced" in messages


def test_missing_tree_is_one_failure(tmp_path):
    requests, failures = parse_voxceleb_tree(tmp_path / "nope")
    assert requests == [] and "holds no VoxCeleb tree" in failures[0].message


def test_same_video_and_span_under_two_utterances_is_a_duplicate(tmp_path):
    put(tmp_path, "txt/id00012/21Uxsk56VDQ/00001.txt", VOX2_TEXT)
    put(tmp_path, "txt/id00012/21Uxsk56VDQ/00002.txt", VOX2_TEXT)
    requests, failures = parse_voxceleb_tree(tmp_path)
    assert [r.clip_id for r in requests] == ["id00012/21Uxsk56VDQ/00001"]
    assert [f.failure_class for f in failures] == [DUPLICATE_CLIP]
    assert failures[0].origin.endswith("00002.txt")
    assert failures[0].record_id != requests[0].clip_id


def _parsing_processes() -> set[int]:
    """This process's children that parse metadata (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            ppid = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("PPid:"))
            command = (entry / "cmdline").read_bytes()
        except (OSError, StopIteration):
            continue
        if int(ppid.split()[1]) == os.getpid() and b"_serve_parsing" in command:
            found.add(int(entry.name))
    return found


def _vox1_and_vox2_tree(root: Path) -> None:
    """Ten video folders: VoxCeleb1 and VoxCeleb2 utterances, a bad line, an unreadable file, misplaced files."""
    for index in range(9):  # VoxCeleb1 (pixels) and VoxCeleb2 (normalised) videos of 2 utterances
        version = 2 if index % 3 == 0 else 1
        box = (0.3, 0.2, 0.35, 0.45) if version == 2 else (86.0, 32.0, 107.0, 107.0)
        write_voxceleb_tree(root, [VoxUtterance(f"id{10001 + index % 2}", f"video{index:06d}", f"{u:05d}",
                                                    [40 * u + 1, 40 * u + 2], [box, box]) for u in (1, 2)], version)
    bad = MALFORMED["non_numeric"][0].replace("id00012", "id10002").replace("21Uxsk56VDQ", "video000005")
    put(root, "txt/id10002/video000005/00003.txt", bad)
    put(root, "txt/id10001/video000006/00003.txt", b"\xff\xfe\x00garbage")
    put(root, "txt/id10001/video000004/deeper/00001.txt", VOX2_TEXT)
    put(root, "txt/id10002/stray.txt", VOX2_TEXT)


def test_a_tree_parsed_by_processes_equals_the_tree_parsed_here(tmp_path, monkeypatch):
    """Past its first folders a large tree is parsed by worker processes: the same videos in the same
    order, the same boxes, the same failures naming the same files and lines; the processes end with
    the stream."""
    _vox1_and_vox2_tree(tmp_path)
    here = list(iter_voxceleb_videos(tmp_path, processes=1))
    monkeypatch.setattr(voxceleb, "IN_LINE_FOLDERS", 2)
    monkeypatch.setattr(voxceleb, "CHUNK_FOLDERS", 2)
    stream = iter_voxceleb_videos(tmp_path, processes=2)
    there = [next(stream), next(stream)]  # the processes start after the first
    assert len(_parsing_processes()) == 2
    there += stream
    assert _parsing_processes() == set()

    assert there == here and len(there) == 10  # requests compare without their boxes: those below
    assert [[(r.boxes.rows.tolist(), r.boxes.units, r.boxes.reference_height) for r in found] for found, _ in there] \
        == [[(r.boxes.rows.tolist(), r.boxes.units, r.boxes.reference_height) for r in found] for found, _ in here]
    assert {r.source for found, _ in there for r in found} == {"voxceleb1", "voxceleb2"}
    assert all(not r.boxes.rows.flags.writeable for found, _ in there for r in found)
    assert sorted(f.origin.removeprefix(str(tmp_path / "txt")) for _, bad in there for f in bad) == [
        "/id10001/video000004/deeper/00001.txt", "/id10001/video000006/00003.txt",
        "/id10002/stray.txt", "/id10002/video000005/00003.txt:10"]


def test_a_parsing_process_that_dies_stops_the_plan_with_an_error(tmp_path, monkeypatch):
    """A killed parsing process (the OOM killer) ends the stream with an error naming it, never a
    hang or a plan that silently lacks its videos."""
    _vox1_and_vox2_tree(tmp_path)
    monkeypatch.setattr(voxceleb, "IN_LINE_FOLDERS", 2)
    monkeypatch.setattr(voxceleb, "CHUNK_FOLDERS", 1)
    monkeypatch.setattr(voxceleb, "CHUNKS_AHEAD_PER_PROCESS", 1)
    stream = iter_voxceleb_videos(tmp_path, processes=2)
    next(stream), next(stream)  # the processes start after the first
    victim = min(_parsing_processes())
    os.kill(victim, signal.SIGKILL)
    while (Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z":
        time.sleep(0.01)  # dead, not yet reaped: more chunks than are in flight are left for it
    with pytest.raises(RuntimeError, match="parsing process ended .exit code -9"):
        list(stream)
    assert _parsing_processes() == set()


def test_vox1_test_identities_set_the_split(tmp_path):
    put(tmp_path, "txt/id10001/1zcIwhmdeo4/00001.txt", VOX1_TEXT)
    put(tmp_path, "txt/id10270/otherVideo1/00001.txt", VOX1_TEXT.replace("id10001", "id10270").replace("1zcIwhmdeo4", "otherVideo1"))
    requests, _ = parse_voxceleb_tree(tmp_path, splits=SplitPolicy(test_identities={"id10270"}))
    assert {r.identity: r.split for r in requests} == {"id10001": "train", "id10270": "test"}


vox_ids = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    identity=vox_ids,
    video=vox_ids,
    first=st.integers(0, 10_000),
    steps=st.lists(st.integers(1, 3), min_size=0, max_size=20),
    version=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_write_then_parse_round_trips(tmp_path_factory, identity, video, first, steps, version, data):
    frames = [first]
    for step in steps:
        frames.append(frames[-1] + step)
    if version == 1:
        value = st.integers(2, 300).map(float)
    else:
        value = st.integers(1, 330).map(lambda v: v / 1000)
    boxes = [data.draw(st.tuples(value, value, value, value)) for _ in frames]
    root = tmp_path_factory.mktemp("vox")
    write_voxceleb_tree(root, [VoxUtterance(identity, video, "00001", frames, boxes)], version=version)
    (clip,), failures = parse_voxceleb_tree(root)
    assert failures == []
    assert (clip.identity, clip.video_id) == (identity, video)
    assert clip.source == f"voxceleb{version}"
    assert [round(b.t * 25) for b in clip.boxes] == frames
    assert [(b.x, b.y, b.w, b.h) for b in clip.boxes] == boxes
    assert clip.end_s - clip.start_s == pytest.approx((frames[-1] - frames[0] + 1) / 25)


# --- splits and URLs ---------------------------------------------------------------------------


def test_assign_split_is_deterministic_and_close_to_the_fraction():
    identities = [f"id{n:05d}" for n in range(4000)]
    first = [assign_split(i, 0.2, seed=7) for i in identities]
    assert first == [assign_split(i, 0.2, seed=7) for i in identities]
    assert 0.17 < first.count("test") / len(identities) < 0.23
    assert first != [assign_split(i, 0.2, seed=8) for i in identities]
    assert {assign_split(i, 0.0) for i in identities} == {"train"}
    assert {assign_split(i, 1.0) for i in identities} == {"test"}
    with pytest.raises(ValueError, match="test_fraction"):
        assign_split("id1", 1.5)


def test_url_template_maps_ids_and_passes_urls_through():
    assert resolve_url("abc", "https://mirror.example/v/{id}.mp4") == "https://mirror.example/v/abc.mp4"
    assert resolve_url("https://x.example/a.mp4", "https://mirror.example/{id}") == "https://x.example/a.mp4"
    with pytest.raises(ValueError, match="placeholder"):
        resolve_url("abc", "https://mirror.example/")


def test_url_template_applies_to_voxceleb_ids(tmp_path):
    put(tmp_path, "txt/id00012/21Uxsk56VDQ/00001.txt", VOX2_TEXT)
    (clip,), _ = parse_voxceleb_tree(tmp_path, url_template="http://127.0.0.1:8000/{id}.mp4")
    assert clip.url == "http://127.0.0.1:8000/21Uxsk56VDQ.mp4"


# --- clip tables -------------------------------------------------------------------------------

FOMM_CSV = (
    "video_id,start,end,bbox,fps,width,height,person_id,partition\n"
    "-abcdefghij,100,200,10-20-110-140,25,640,360,id10001,train\n"
    "_klmnopqrst,0,50,0.1-0.2-0.5-0.7,30,1280,720,id10002,test\n"
)


def test_fomm_style_csv(tmp_path):
    requests, failures = parse_clip_table(put(tmp_path, "vox-metadata.csv", FOMM_CSV))
    assert failures == []
    first, second = requests
    assert (first.video_id, first.identity, first.split) == ("-abcdefghij", "id10001", "train")
    assert (first.start_s, first.end_s) == pytest.approx((4.0, 8.0))
    (box,) = first.boxes
    assert (box.x, box.y, box.w, box.h, box.units, box.reference_height) == (10, 20, 100, 120, "pixels", 360)
    assert second.split == "test" and second.end_s == pytest.approx(50 / 30)
    assert second.boxes[0].units == "normalized"
    assert first.origin.endswith("vox-metadata.csv:2") and second.origin.endswith(":3")


def test_parquet_table_with_other_column_names_and_seconds(tmp_path):
    table = pa.table(
        {
            "Video URL": ["https://www.youtube.com/watch?v=abcdefghijk", "https://cdn.example/talk.mp4"],
            "Start Time": [1.5, 0.0],
            "End Time": [3.0, 2.0],
            "Speaker": ["alice", "bob"],
            "left": [0.1, None],
            "top": [0.1, None],
            "right": [0.3, None],
            "bottom": [0.4, None],
        }
    )
    path = tmp_path / "clips.parquet"
    pq.write_table(table, path)
    (yt, other), failures = parse_clip_table(path, splits=SplitPolicy(test_fraction=1.0))
    assert failures == []
    assert yt.video_id == "abcdefghijk" and yt.url == "https://www.youtube.com/watch?v=abcdefghijk"
    assert (yt.start_s, yt.end_s, yt.identity, yt.split) == (1.5, 3.0, "alice", "test")
    assert yt.boxes[0].w == pytest.approx(0.2)
    assert other.url == "https://cdn.example/talk.mp4" and other.video_id.startswith("talk-")
    assert len(other.boxes) == 0


TABLE_ERRORS = {
    "non_numeric_start": ("v1,abc,20,id1", "not a number"),
    "empty_span": ("v1,20,20,id1", "empty"),
    "fractional_frame": ("v1,1.5,20,id1", "whole frame"),
    "bad_identity": ("v1,1,20,id 1", "identity"),
    "missing_video": (",1,20,id1", "missing video"),
    "too_many_fields": ("v1,1,20,id1,extra", "number of fields"),
    "bad_video": ("not a video!,1,20,id1", "neither"),
}


@pytest.mark.parametrize("case", sorted(TABLE_ERRORS))
def test_bad_table_rows_are_failures_naming_the_line(tmp_path, case):
    row, expected = TABLE_ERRORS[case]
    path = put(tmp_path, "t.csv", f"video,start,end,identity\ngoodvideo1,0,10,id0\n{row}\n")
    requests, failures = parse_clip_table(path)
    assert [r.video_id for r in requests] == ["goodvideo1"]
    (failure,) = failures
    assert expected in failure.message and failure.origin.endswith("t.csv:3")


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [("10-20-5-40", "x0 < x1"), ("1-2-3", "x0-y0-x1-y1"), ("10-400-20-500", "outside a frame")],
)
def test_bad_boxes_in_tables(tmp_path, bbox, expected):
    path = put(tmp_path, "t.csv", f"video_id,start,end,bbox,height\nv1,0,10,{bbox},360\n")
    requests, (failure,) = parse_clip_table(path)
    assert requests == [] and expected in failure.message


def test_table_split_values_are_checked(tmp_path):
    path = put(tmp_path, "t.csv", "video_id,start,end,split\nv1,0,10,Train\nv2,0,10,../etc\n")
    (ok,), (bad,) = parse_clip_table(path)
    assert ok.split == "train" and "split" in bad.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "empty file"), ("person,when\nid1,3\n", "no video column"), ("video_id,start\nv1,3\n", "span columns")],
)
def test_unusable_tables_are_one_failure(tmp_path, text, expected):
    requests, (failure,) = parse_clip_table(put(tmp_path, "t.csv", text))
    assert requests == [] and expected in failure.message


def test_unreadable_parquet_is_a_failure(tmp_path):
    requests, (failure,) = parse_clip_table(put(tmp_path, "t.parquet", b"not parquet at all"))
    assert requests == [] and "cannot read" in failure.message


def test_clip_ids_too_long_for_a_shard_key_are_failures(tmp_path):
    path = put(tmp_path, "t.csv", f"video_id,start,end,clip_id\nv1,0,10,short\nv1,10,20,{'x' * 90}\n")
    (ok,), (failure,) = parse_clip_table(path)
    assert ok.clip_id == "short" and "91 characters" in failure.message and failure.origin.endswith(":3")


def test_duplicate_rows_in_a_table(tmp_path):
    path = put(tmp_path, "t.csv", "video_id,start,end\nv1,0,10\nv1,0,10\nv1,10,20\n")
    requests, failures = parse_clip_table(path)
    assert len(requests) == 2
    assert [(f.failure_class, f.origin.rsplit(":", 1)[1]) for f in failures] == [(DUPLICATE_CLIP, "3")]


# --- URL lists ---------------------------------------------------------------------------------


def test_url_list(tmp_path):
    put(tmp_path, "videos/talk.mp4", b"fake")
    path = put(
        tmp_path,
        "list.txt",
        "# my videos\n\nhttps://youtu.be/-abcdefghij\nvideos/talk.mp4\nhttps://cdn.example/a/talk.mp4\n"
        "_klmnopqrst\nhttps://www.youtube.com/watch?v=-abcdefghij\ntwo tokens\nnope/missing.mp4\n",
    )
    requests, failures = parse_url_list(path, url_template="https://mirror.example/{id}")
    by_id = {r.video_id: r for r in requests}
    assert len(requests) == 4
    assert by_id["-abcdefghij"].url == "https://youtu.be/-abcdefghij"
    assert by_id["_klmnopqrst"].url == "https://mirror.example/_klmnopqrst"
    local = next(r for r in requests if r.url.endswith("videos/talk.mp4"))
    assert Path(local.url).is_absolute() and Path(local.url).exists()
    remote = next(r for r in requests if r.url.startswith("https://cdn"))
    assert local.video_id != remote.video_id and local.video_id.startswith("talk-")
    for request in requests:
        assert request.start_s is None and request.end_s is None
        assert request.identity == request.video_id
        assert safe_key(request.identity)
    classes = sorted((f.failure_class, f.origin.rsplit(":", 1)[1]) for f in failures)
    assert classes == [(BAD_METADATA, "8"), (BAD_METADATA, "9"), (DUPLICATE_CLIP, "7")]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=300).filter(lambda t: "\n" not in t and "\r" not in t))
def test_any_url_file_name_gives_a_short_safe_key(tmp_path, name):
    path = tmp_path / "list.txt"
    path.write_text("https://cdn.example/v/" + quote(name) + ".mp4\n")
    (request,), failures = parse_url_list(path)
    assert failures == []
    assert len(request.key) <= MAX_KEY_LENGTH and "." not in request.key


def test_missing_url_list_is_one_failure(tmp_path):
    requests, (failure,) = parse_url_list(tmp_path / "none.txt")
    assert requests == [] and "cannot read" in failure.message


def test_parse_sources_dispatches_by_kind_and_deduplicates_across_inputs(tmp_path):
    put(tmp_path, "vox/txt/id00012/21Uxsk56VDQ/00001.txt", VOX2_TEXT)
    table = put(tmp_path, "t.csv", "video_id,start,end,identity\n21Uxsk56VDQ,1,3,id00012\nother000001,0,5,id1\n")
    urls = put(tmp_path, "u.txt", "other000002\n")
    requests, failures = parse_sources(SourceInputs(vox2_txt=(str(tmp_path / "vox"),), clips=(str(table),),
                                                    urls=(str(urls),)))
    assert [r.source for r in requests] == ["voxceleb2", "table", "urls"]
    assert [f.failure_class for f in failures] == [DUPLICATE_CLIP]  # same video and span as the utterance


def test_each_input_flag_takes_only_its_own_kind(tmp_path):
    utterance = put(tmp_path, "vox/txt/id00012/21Uxsk56VDQ/00001.txt", VOX2_TEXT)
    empty = tmp_path / "empty"
    empty.mkdir()
    table = put(tmp_path, "t.csv", "video_id,start,end\nabc,0,1\n")
    urls = put(tmp_path, "u.txt", "https://example.com/v.mp4\n")
    SourceInputs(vox2_txt=(str(tmp_path / "vox"),), clips=(str(table),), urls=(str(urls),)).check()
    SourceInputs(vox1_txt=(str(tmp_path / "vox" / "txt"),)).check()  # the txt folder itself is fine too
    refused = {
        SourceInputs(vox1_txt=(str(tmp_path / "nonexistent"),)): "missing",
        SourceInputs(vox2_txt=(str(empty),)): "no VoxCeleb utterance files",
        SourceInputs(vox2_txt=(str(utterance),)): "a file; expected the folder",
        SourceInputs(clips=(str(urls),)): "expected a clip table",
        SourceInputs(clips=(str(tmp_path),)): "a folder",
        SourceInputs(urls=(str(table),)): "give it with --clips",
        SourceInputs(urls=(str(tmp_path / "none.txt"),)): "missing",
    }
    for inputs, complaint in refused.items():
        with pytest.raises(InputError, match=complaint) as caught:
            inputs.check()
        assert str(tmp_path) in str(caught.value)
