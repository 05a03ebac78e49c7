"""Editing jobs from every kind of input, per-frame driving and fading, the results table and what a
rerun redoes: the parts of `portrait edit` that need no video."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import errors
from pipelines.edit import results
from pipelines.edit.analyse import driving_indices, edit_weights
from pipelines.edit.chunks import ChunkWork, JobWork, bundle_chunks
from pipelines.edit.job_table import (
    EditJob,
    InputError,
    drop_duplicate_outputs,
    jobs_from_sources,
    jobs_from_table,
    single_job,
)
from pipelines.edit.runner import MAX_JOBS_PER_BLOCK, block_sizes, crop_cpus, stage_cpus
from pipelines.edit.settings import EditSettings, JobDefaults, split_output
from pipelines.edit.stage_io import from_columns, to_columns
from pipelines.storage import OutputStore

DEFAULTS = JobDefaults()


def test_a_single_video_is_a_job_table_of_one(tmp_path):
    job = single_job("talk.mp4", "smile.png", None, DEFAULTS)
    assert job.output == "talk.mp4" and job.mode == "expression" and job.strength == 1.0
    assert job.source == str((tmp_path.cwd() / "talk.mp4").resolve())
    assert job.driving_is_image and job.resolved_motion() == "absolute"
    assert single_job("talk.mp4", "smile.mp4", "x.mov", DEFAULTS).resolved_motion() == "relative"
    assert split_output("out/x.mp4", True) == ("out", "x.mp4")
    assert split_output("s3://b/edited/x.mp4", True) == ("s3://b/edited", "x.mp4")
    assert split_output("out/x.mp4", False) == ("out/x.mp4", None)
    assert split_output("out/edited", True) == ("out/edited", None)


def test_job_table_rows_with_per_row_options_and_paths_relative_to_the_table(tmp_path):
    (tmp_path / "tables").mkdir()
    table = tmp_path / "tables" / "jobs.csv"
    table.write_text("Source,Driving,Output,Mode,Strength,Driving-Policy\n"
                     "a.mp4,smile.mp4,,pose,0.5,loop\n"
                     "videos/b.mp4,s3://bucket/smile.png,b/out.mkv,,,\n")
    jobs, rejected = jobs_from_table(str(table), DEFAULTS)
    assert rejected == []
    first, second = jobs
    assert first.source == str(tmp_path / "tables" / "a.mp4") and first.output == "a.mp4"
    assert (first.mode, first.strength, first.driving_policy) == ("pose", 0.5, "loop")
    assert second.driving == "s3://bucket/smile.png" and second.output == "b/out.mkv"
    assert (second.mode, second.strength, second.driving_policy) == ("expression", 1.0, "hold")
    assert first.origin.endswith("jobs.csv:2") and second.origin.endswith("jobs.csv:3")


def test_parquet_tables_and_a_default_driver(tmp_path):
    table = tmp_path / "jobs.parquet"
    pq.write_table(pa.table({"source": ["/v/a.mp4", "/v/b.mp4"], "strength": [0.3, None]}), table)
    jobs, rejected = jobs_from_table(str(table), DEFAULTS, driving="/d/smile.mp4")
    assert rejected == [] and [j.driving for j in jobs] == ["/d/smile.mp4"] * 2
    assert [j.strength for j in jobs] == [0.3, 1.0]


def test_bad_rows_fail_alone_and_name_their_column(tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text("source,driving,mode,strength,output,face\n"
                     "a.mp4,d.mp4,smile,,,\n"
                     "b.mp4,d.mp4,,lots,,\n"
                     "c.mp4,,,,,\n"
                     "d.mp4,d.mp4,,,../escape.mp4,\n"
                     "e.mp4,d.mp4,,,e.flv,\n"
                     "f.mp4,d.mp4,,,,left\n"
                     "g.mp4,d.mp4,,,,\n")
    jobs, rejected = jobs_from_table(str(table), DEFAULTS)
    assert [j.output for j in jobs] == ["g.mp4"]
    assert all(r.failure_class == errors.BAD_JOB for r in rejected)
    messages = [r.message for r in rejected]
    for column, message in zip(["mode", "strength", "driving", "..", "output", "face"], messages):
        assert column in message
    assert len({r.job_id for r in rejected}) == len(rejected), "rejected rows keep distinct ids"


def test_unknown_columns_and_unreadable_tables_refuse_the_whole_table(tmp_path):
    table = tmp_path / "jobs.csv"
    table.write_text("source,driving,strenght\na.mp4,d.mp4,0.5\n")
    with pytest.raises(InputError, match="strenght"):
        jobs_from_table(str(table), DEFAULTS)
    table.write_text("video,driving\na.mp4,d.mp4\n")
    with pytest.raises(InputError, match="no 'source' column"):
        jobs_from_table(str(table), DEFAULTS)
    with pytest.raises(InputError, match="cannot be read"):
        jobs_from_table(str(tmp_path / "missing.csv"), DEFAULTS)


def test_two_jobs_writing_one_output_keep_the_first(tmp_path):
    a = single_job("a.mp4", "d.mp4", "same.mp4", DEFAULTS)
    b = dataclasses.replace(single_job("b.mp4", "d.mp4", "same.mp4", DEFAULTS), origin="row 3")
    kept, rejected = drop_duplicate_outputs([a, b])
    assert kept == [a]
    assert rejected[0].failure_class == errors.DUPLICATE_OUTPUT and "row 3" in rejected[0].message
    assert rejected[0].job_id != a.job_id


def test_a_glob_of_sources_keeps_their_folder_structure(tmp_path):
    for name in ("archive/a.mp4", "archive/day2/b.MOV", "archive/notes.txt", "archive/.hidden.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    jobs, _ = jobs_from_sources(str(tmp_path / "archive"), str(tmp_path / "smile.mp4"), DEFAULTS)
    assert [j.output for j in jobs] == ["a.mp4", "day2/b.MOV"]  # in the source's own container
    jobs, _ = jobs_from_sources(str(tmp_path / "archive" / "*.mp4"), str(tmp_path / "smile.mp4"), DEFAULTS)
    assert [j.output for j in jobs] == ["a.mp4"]
    with pytest.raises(InputError, match="no video matches"):
        jobs_from_sources(str(tmp_path / "archive" / "*.webm"), "smile.mp4", DEFAULTS)


def test_job_keys_are_safe_file_names_and_specs_follow_every_option():
    job = single_job("a b/../x.mp4", "d.mp4", "sub dir/x y.mp4", DEFAULTS)
    assert "/" not in job.key and " " not in job.key and len(job.key) <= 71
    context = {"model": "m"}
    assert job.digest(context) == dataclasses.replace(job, origin="elsewhere").digest(context)
    assert job.digest(context) != dataclasses.replace(job, strength=0.5).digest(context)
    assert job.digest(context) != job.digest({"model": "other"})


@pytest.mark.parametrize("policy, expected", [
    ("hold", [0, 1, 2, 3, 3, 3, 3]), ("loop", [0, 1, 2, 3, 0, 1, 2]), ("stop", [0, 1, 2, 3, -1, -1, -1])])
def test_frame_i_drives_frame_i_then_the_policy_decides(policy, expected):
    assert driving_indices(7, 4, policy, is_image=False).tolist() == expected
    assert driving_indices(7, 1, policy, is_image=True).tolist() == [0] * 7


def test_edits_fade_in_and_out_mid_video_but_not_at_its_ends():
    edited = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1], bool)
    weights = edit_weights(edited, fade_frames=2)
    assert weights[0] == 1.0 and weights[-1] == 1.0  # the video's own start and end
    assert weights[3] == weights[4] == 0.0
    assert 0 < weights[2] < 1 and 0 < weights[5] < weights[6] < 1  # fading out, fading in
    assert np.array_equal(edit_weights(edited, 0) > 0, edited)


def _row(job: EditJob, status: str, spec: str, failure: str | None = None) -> results.ResultRow:
    return results.base_row(job, f"out/{job.output}", status=status, failure_class=failure, spec=spec)


def test_a_rerun_redoes_missing_changed_and_machine_failures_only(tmp_path):
    jobs = [single_job(f"{name}.mp4", "d.mp4", None, DEFAULTS) for name in "abcdef"]
    store = OutputStore(tmp_path)
    results.write_results(store, {row.job_id: row for row in [
        _row(jobs[0], results.OK, "s1"), _row(jobs[1], results.OK, "s1"),
        _row(jobs[2], results.FAILED, "s1", errors.NO_FACE), _row(jobs[3], results.FAILED, "s1", errors.WORKER_FAILED),
        _row(jobs[4], results.OK, "s0")]})
    state = results.read_state(store)
    store.write_bytes_atomic("a.mp4", b"video")  # b's output is gone
    listing = results.output_listing(store)

    def plan(retry_failed: bool) -> tuple[list[tuple[str, int]], results.Pending]:
        counts = results.Pending()
        attempts = [(job.output, results.pending_attempt(job, "s1", state.get(job.job_id), listing, retry_failed,
                                                          counts)) for job in jobs]
        return [(output, attempt) for output, attempt in attempts if attempt], counts

    todo, counts = plan(retry_failed=False)
    assert todo == [("b.mp4", 2), ("d.mp4", 2), ("e.mp4", 2), ("f.mp4", 1)]
    assert (counts.todo, counts.done, counts.recorded_failures, counts.changed, counts.missing_outputs) == (4, 1, 1, 1, 1)
    assert "c.mp4" in dict(plan(retry_failed=True)[0])


def test_rows_are_appended_as_parts_read_in_order_and_compacted_once(tmp_path, monkeypatch):
    store = OutputStore(tmp_path)
    monkeypatch.setattr(results, "PART_ROWS", 2)
    first = results.ResultsTable(store, "run1")
    rows = [results.base_row(single_job(f"{name}.mp4", "d.mp4", None, DEFAULTS), "", status=results.FAILED,
                             failure_class=errors.NO_FACE, message=name) for name in "abc"]
    for row in rows:
        first.record(row)
    assert len(store.list(results.PARTS_PATH)) == 1, "a part per PART_ROWS rows; the third row waits"
    first.flush()
    again = results.ResultsTable(store, "run2")
    again.record(dataclasses.replace(rows[0], status=results.OK, failure_class=None, message="", frames=3))
    again.flush()
    assert results.has_results(store) and not store.exists(results.RESULTS_PATH)
    back = results.read_results(store)
    assert sorted(back) == ["a.mp4", "b.mp4", "c.mp4"] and back["a.mp4"].status == results.OK, "a later row wins"
    assert results.read_state(store)["a.mp4"].frames == 3
    assert results.compact(store) == 3
    assert store.list() == [results.RESULTS_PATH] and results.read_results(store) == back
    assert first.tally.summary()["by_failure_class"] == {errors.NO_FACE: 3}


def test_the_results_table_round_trips_every_column(tmp_path):
    store = OutputStore(tmp_path)
    job = single_job("a.mp4", "d.mp4", None, DEFAULTS)
    row = results.base_row(job, "out/a.mp4", status=results.OK, frames=45, frames_edited=40, frames_passed_through=5,
                           input_fps="30000/1001", output_fps="30000/1001", decode_s=1.5, total_s=2.0, spec="s")
    failed = results.base_row(single_job("b.mp4", "d.mp4", None, DEFAULTS), "", status=results.FAILED,
                              failure_class=errors.NOT_A_VIDEO, message="b.mp4: empty")
    results.write_results(store, {row.job_id: row, failed.job_id: failed})
    back = results.read_results(store)
    assert back[row.job_id] == row and back[failed.job_id] == failed
    assert store.list() == [results.RESULTS_PATH]
    with pytest.raises(KeyError):
        results.base_row(job, "", status=results.FAILED, failure_class="made_up")


def test_summary_counts_frames_and_failures():
    job = single_job("a.mp4", "d.mp4", None, DEFAULTS)
    rows = [results.base_row(job, "", status=results.OK, frames=10, frames_edited=8, frames_passed_through=2,
                             output_duration_s=0.4),
            results.base_row(job, "", job_id="x", status=results.FAILED, failure_class=errors.NO_FACE)]
    summary = results.summary(rows, output="out")
    assert (summary["ok"], summary["failed"], summary["frames_edited"]) == (1, 1, 8)
    assert summary["by_failure_class"] == {errors.NO_FACE: 1}
    text = results.summary_text(summary)
    assert "no_face" in text and "results.parquet" in text


def test_settings_refuse_bad_values_by_name():
    for options, name in [({"mode": "smile"}, "--mode"), ({"strength": -1}, "--strength"), ({"chunk_frames": 0},
                          "--chunk-frames"), ({"face": "left"}, "--face"), ({"preview_height": 255}, "--preview-height"),
                          ({"face_fraction": 0.0}, "--face-fraction"), ({"executor": "spark"}, "--executor")]:
        with pytest.raises(ValueError, match=name):
            EditSettings(**options)
    assert EditSettings(detect_every=4).tracking.detect_stride == 4
    assert EditSettings().tracking.detect_stride == 10
    assert not math.isnan(EditSettings().defaults.strength)


def test_inspecting_a_results_folder_lists_failures_and_missing_outputs(tmp_path, capsys):
    store = OutputStore(tmp_path)
    ok = results.base_row(single_job("a.mp4", "d.mp4", None, DEFAULTS), f"{tmp_path}/a.mp4", status=results.OK,
                          frames=3, frames_edited=3, output_duration_s=0.1)
    failed = results.base_row(single_job("b.mp4", "d.mp4", None, DEFAULTS), "", status=results.FAILED,
                              failure_class=errors.NO_FACE, message="b.mp4: no face to edit")
    results.write_results(store, {ok.job_id: ok, failed.job_id: failed})
    store.write_bytes_atomic("a.mp4", b"video")
    assert results.inspect_results(str(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "FAILED b.mp4: no_face: b.mp4: no face to edit" in printed and "MISSING" not in printed
    store.delete("a.mp4")
    assert results.inspect_results(str(tmp_path)) == 1
    assert "MISSING output of a.mp4" in capsys.readouterr().out
    assert results.inspect_results(str(tmp_path / "elsewhere")) == 1


def test_the_local_cache_of_object_store_inputs_evicts_the_least_recently_used_first(tmp_path):
    import os
    import time

    from pipelines.storage import evict_least_recently_used

    now = time.time()
    for number, age in enumerate((7200, 5400, 60)):  # two old copies, one in use
        copy = tmp_path / f"digest{number}" / "video.mp4"
        copy.parent.mkdir()
        copy.write_bytes(b"x" * 1000)
        os.utime(copy, (now - age, now - age))
    deleted = evict_least_recently_used(tmp_path, limit_bytes=1500)
    assert [path.parent.name for path in deleted] == ["digest0", "digest1"]
    assert (tmp_path / "digest2" / "video.mp4").exists() and not (tmp_path / "digest0").exists()
    assert evict_least_recently_used(tmp_path, limit_bytes=0) == [], "a copy in use is never deleted"


def _planner(settings, record, **options):
    from pipelines.edit.job import Planner

    return Planner(settings, "tiny 64px", 64, record, state={}, listing=set(), **options)


def test_an_output_that_would_overwrite_its_source_is_refused_and_outputs_are_never_sources(tmp_path):
    from pipelines.edit.job import EditInputs, job_windows

    archive = tmp_path / "archive"
    (archive / "edited").mkdir(parents=True)
    for name in ("a.mp4", "edited/a.mp4", "d.png"):
        (archive / name).write_bytes(b"x")
    settings = EditSettings(output=str(archive / "edited"))
    recorded = []
    planner = _planner(settings, recorded.append, filter_outputs=True)
    works = [w for window in job_windows(EditInputs(sources=str(archive), driving=str(archive / "d.png")), settings)
             for w in planner.window(window)]
    assert [w.job.source for w in works] == [str(archive / "a.mp4")] and recorded == [] and planner.left_out == 1
    same = EditSettings(output=str(archive))
    planner = _planner(same, recorded.append, filter_outputs=False)
    inputs = EditInputs(source=str(archive / "a.mp4"), driving=str(archive / "d.png"), output_name="a.mp4")
    assert [w for window in job_windows(inputs, same) for w in planner.window(window)] == []
    assert recorded[0].failure_class == errors.BAD_JOB and "overwrite" in recorded[0].message


def test_rows_that_cannot_run_are_recorded_while_planning_and_never_become_work(tmp_path):
    from pipelines.edit.job import EditInputs, job_windows

    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "d.png").write_bytes(b"x")
    table = tmp_path / "jobs.csv"
    table.write_text("source,driving,output,strength\n"
                     "a.mp4,d.png,one.mp4,\n"        # runs
                     "gone.mp4,d.png,two.mp4,\n"     # missing source
                     "a.mp4,nowhere.png,three.mp4,\n"  # missing driver
                     "a.mp4,d.png,one.mp4,\n"        # duplicate output
                     "a.mp4,d.png,four.mp4,lots\n")  # bad value
    settings = EditSettings(output=str(tmp_path / "out"))
    recorded = []
    planner = _planner(settings, recorded.append, filter_outputs=False)
    works = [w for window in job_windows(EditInputs(jobs=str(table)), settings) for w in planner.window(window)]
    assert [w.job.output for w in works] == ["one.mp4"] and planner.pending.todo == 3
    by_class = {row.failure_class: row for row in recorded}
    assert sorted(by_class) == sorted([errors.MISSING_VIDEO, errors.DUPLICATE_OUTPUT, errors.BAD_JOB]) \
        and len(recorded) == 4
    assert [r.message for r in recorded if r.failure_class == errors.MISSING_VIDEO] == [
        f"{tmp_path / 'gone.mp4'}: no such file", f"driving {tmp_path / 'nowhere.png'}: no such file"]
    assert f"{table}:2" in by_class[errors.DUPLICATE_OUTPUT].message, "the duplicate names the row it collides with"


def _chunk(job_id: str, frames: int, index: int = 0, total: int = 1, **pixels) -> ChunkWork:
    job = EditJob(source=f"{job_id}.mp4", driving="d.png", output=f"{job_id}.mp4", mode="expression", strength=1.0,
                  motion="relative", driving_policy="hold", face="largest")
    return ChunkWork(JobWork(job, "0" * 16, 0, 8), index=index, total=total, pts=np.arange(frames), **pixels)


def test_short_chunks_travel_packed_to_one_chunks_worth_of_frames_and_come_back_with_their_crops():
    rng = np.random.default_rng(5)
    crops = {name: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for name, n in (("a", 4), ("b", 3), ("c", 16))}
    chunks = [_chunk("a", 4, source_crops=crops["a"], driving_crops=crops["a"][:1]),
              _chunk("b", 3, source_crops=crops["b"]),
              _chunk("bad", 9).fail(errors.MISSING_VIDEO, "gone"),  # no work: it rides along
              _chunk("long", 16, 0, 2, source_crops=crops["c"]), _chunk("long", 16, 1, 2), _chunk("d", 5)]
    bundles = list(bundle_chunks(chunks, frames=16))
    assert [[c.job.job_id for c in b.chunks] for b in bundles] == [["a.mp4", "b.mp4", "bad.mp4"], ["long.mp4"],
                                                                   ["long.mp4"], ["d.mp4"]]
    assert all(c.source_crops is None for b in bundles for c in b.chunks), "the pixels travel in the bundle's columns"
    back = [c for bundle in from_columns(to_columns(bundles)) for c in bundle.unbundle()]
    assert [(c.job.job_id, c.index) for c in back] == [(c.job.job_id, c.index) for c in chunks]
    np.testing.assert_array_equal(back[0].source_crops, crops["a"])
    np.testing.assert_array_equal(back[0].driving_crops, crops["a"][:1])
    np.testing.assert_array_equal(back[1].source_crops, crops["b"])
    assert back[1].driving_crops is None and back[2].source_crops is None and not back[2].ok
    np.testing.assert_array_equal(back[3].source_crops, crops["c"])
    assert len(list(bundle_chunks(chunks, frames=0))) == len(chunks), "no packing: a chunk per bundle"


def test_blocks_are_sized_by_the_queue_a_small_run_spreads_and_a_long_one_is_packed():
    assert block_sizes(todo=6, cpus=3, chunk_frames=240) == (1, 0)
    assert block_sizes(todo=2000, cpus=2, chunk_frames=16) == (MAX_JOBS_PER_BLOCK, 16)
    assert block_sizes(todo=50, cpus=2, chunk_frames=16) == (3, 16)
    assert block_sizes(todo=10**6, cpus=2000, chunk_frames=240)[0] == MAX_JOBS_PER_BLOCK
    # a CPU stage's task asks for the share of a small cluster that lets one task of every stage run at once
    assert stage_cpus(2, EditSettings(model_cpus=0.5)) == 0.5
    assert stage_cpus(2, EditSettings(model_cpus=1.0)) == 0.33
    assert stage_cpus(8, EditSettings(model_cpus=1.0)) == stage_cpus(4, EditSettings(model_cpus=0.5)) == 1.0
    # the crop stage asks for a little less than its neighbours (equal requests would let Ray Data fuse it into
    # the analysis task or the model actors), and still for a CPU share
    for share in (1.0, 0.5, 0.33, 0.01):
        for model_cpus in (1.0, 0.5, round(share * 0.99, 4)):
            crop = crop_cpus(share, model_cpus)
            assert 0 < crop < share and crop != model_cpus, (share, model_cpus, crop)
