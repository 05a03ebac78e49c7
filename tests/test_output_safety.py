"""A dataset folder holds only what the dataset wrote: foreign files are never deleted or overwritten.

Refusals happen before any service starts (the CLI checks the output first), on local folders and
on a real S3-compatible server alike; clean-up deletes only shards of batches the dataset's own
records name and temporaries of its own atomic writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from flows.cli import main
from pipelines.dataset import integrity, manifest
from pipelines.dataset.layout import MARKER_PATH, OutputRefused, claim_output, read_marker
from pipelines.dataset.shards import ShardWriter
from pipelines.prepare.requests import ClipRequest, manifest_row
from pipelines.prepare.settings import SampleFormat
from pipelines.storage import OutputStore
from tests.test_shards import make_sample

SETTINGS = SampleFormat().record("dlib")
FOREIGN = {
    "train/receipt.tar": b"a receipt",
    "backups/photos-2024.tar": b"photos",
    "old_webdataset/shards/shard-000001.tar": b"someone's shard",
    "Downloads/.draft.part": b"a draft",
    "manifest.parquet": b"PAR1 someone else's table",
    "summary.json": b"{}",
}


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _plant(root: Path, files: dict[str, bytes]) -> None:
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)


def test_a_folder_of_someone_elses_files_is_refused_before_anything_starts(tmp_path, capsys):
    output = tmp_path / "mixed"
    _plant(output, FOREIGN)
    before = _tree(output)
    code = main(["prepare", "--sample", "--output", str(output), "--detector", "dlib"])
    assert code == 2
    message = capsys.readouterr().err
    assert str(output) in message and "not a dataset folder" in message and "new or empty folder" in message
    assert _tree(output) == before, "nothing may be written, overwritten or deleted"


def test_an_empty_folder_becomes_a_dataset_and_keeps_its_settings(tmp_path):
    store = OutputStore(tmp_path / "new")
    marker = claim_output(store, SETTINGS)
    assert store.list() == [MARKER_PATH] and read_marker(store) == marker
    assert claim_output(store, SETTINGS) == marker  # a rerun with the same settings is welcome


def test_changed_sample_settings_are_refused_with_the_differences(tmp_path):
    store = OutputStore(tmp_path / "ds")
    claim_output(store, SETTINGS)
    tighter = SampleFormat(crop_size=128, fps=30.0).record("face-alignment")
    with pytest.raises(OutputRefused) as refused:
        claim_output(store, tighter)
    text = str(refused.value)
    for difference in ("crop_size: 256 -> 128", "fps: 25.0 -> 30.0", "detector: 'dlib' -> 'face-alignment'"):
        assert difference in text
    assert json.loads(store.read_bytes(MARKER_PATH))["sample_settings"]["crop_size"] == 256


def test_the_keyframe_interval_is_recorded_and_a_dataset_made_before_it_still_takes_reruns(tmp_path):
    store = OutputStore(tmp_path / "ds")
    claim_output(store, SETTINGS)
    assert read_marker(store).sample_settings["keyframe_interval"] == SampleFormat().keyframe_interval
    old = OutputStore(tmp_path / "old")
    claim_output(old, {name: value for name, value in SETTINGS.items() if name != "keyframe_interval"})
    assert "keyframe_interval" not in claim_output(old, SETTINGS).sample_settings  # how it stores, not what
    assert claim_output(store, SampleFormat(keyframe_interval=250).record("dlib")).sample_settings == \
        read_marker(store).sample_settings
    with pytest.raises(OutputRefused, match="crf: 18 -> 30"):  # what a sample shows still counts
        claim_output(store, SampleFormat(crf=30, keyframe_interval=250).record("dlib"))


def test_folders_inside_or_above_a_dataset_are_refused(tmp_path):
    claim_output(OutputStore(tmp_path / "outer" / "ds"), SETTINGS)
    with pytest.raises(OutputRefused, match="lies inside the dataset"):
        claim_output(OutputStore(tmp_path / "outer" / "ds" / "train" / "nested"), SETTINGS)
    with pytest.raises(OutputRefused, match="holds other datasets"):
        claim_output(OutputStore(tmp_path / "outer"), SETTINGS)


def _dataset_with_an_interrupted_batch(store: OutputStore) -> tuple[list[str], str]:
    """A dataset whose batch b1 committed and whose batch b2 died after writing a shard."""
    claim_output(store, SETTINGS)
    integrity.write_run_record(store, integrity.RunRecord("r1", ("r1-0000", "r1-0001"), ("train",)))
    rows, committed = [], []
    with ShardWriter(store, "train", 10**6, "r1-0000") as writer:
        for index in range(3):
            sample = make_sample(index)
            request = ClipRequest(sample.meta.clip_id, sample.meta.video_id, sample.meta.url, sample.meta.identity)
            shard = writer.write(sample)
            rows.append(manifest_row(request, status=manifest.OK, attempt=1, shard=shard, frames=sample.frames,
                                     seconds=sample.seconds,
                                     timings=dict.fromkeys(manifest.TIMING_COLUMNS, 0.1)))
    committed = [record.path for record in writer.records]
    manifest.write_part(store, "r1-0000", rows)
    with ShardWriter(store, "train", 10**6, "r1-0001") as writer:
        writer.write(make_sample(7))
    return committed, writer.records[0].path


def _clean_up_touches_only_its_own_files(store: OutputStore, foreign: dict[str, bytes]) -> None:
    committed, orphan = _dataset_with_an_interrupted_batch(store)
    for relpath, data in foreign.items():
        store.write_bytes_atomic(relpath, data)
    leftover = store.open_output_atomic("train/r1-0001-0001.tar")  # a writer of ours that died
    leftover.file.write(b"half")
    result = integrity.reconcile(store, manifest.read_states(store), integrity.read_run_records(store), repair=True)
    assert result.removed_shards == [orphan] and result.lost == {}
    assert len(result.removed_temporaries) == (1 if store.is_local else 0)  # object stores spool locally
    files = set(store.list(include_temporaries=True))
    assert set(foreign) <= files, "a foreign file was deleted"
    assert set(committed) <= files and orphan not in files


LOOKALIKES = {
    "train/receipt.tar": b"x",
    "train/2025-0001-0000.tar": b"a shard-like name of a batch we never planned",
    "train/.draft.part": b"a temporary-like name we never use",
    "train/deeper/r1-0001-0000.tar": b"our batch's name, but not where we write",
    "backups/r1-0001-0000.tar": b"same",
}


def test_clean_up_deletes_only_what_the_dataset_wrote_on_a_local_folder(tmp_path):
    _clean_up_touches_only_its_own_files(OutputStore(tmp_path / "ds"), LOOKALIKES)


def test_clean_up_deletes_only_what_the_dataset_wrote_on_an_object_store(s3_server):
    _clean_up_touches_only_its_own_files(OutputStore(s3_server.bucket("cleanup") + "/ds"), LOOKALIKES)


def test_a_bucket_root_holding_another_dataset_and_a_backup_is_refused(s3_server, capsys):
    root = s3_server.bucket("bucket2")
    claim_output(OutputStore(root + "/ds-a"), SETTINGS)
    OutputStore(root).write_bytes_atomic("backups/2025-archive.tar", b"precious")
    assert main(["prepare", "--sample", "--output", root, "--detector", "dlib"]) == 2
    assert "holds other datasets (ds-a)" in capsys.readouterr().err
    assert OutputStore(root).read_bytes("backups/2025-archive.tar") == b"precious"
    with pytest.raises(OutputRefused, match="lies inside the dataset"):
        claim_output(OutputStore(root + "/ds-a/train"), SETTINGS)


@pytest.mark.slow
def test_prepare_into_an_object_store_resumes_and_redoes_a_lost_shard(s3_server, ray_cluster, prefect_harness,
                                                                      tmp_path, capsys):
    output = s3_server.bucket("datasets") + "/vox-sample"
    argv = ["prepare", "--sample", "--output", output, "--workdir", str(tmp_path / "work"), "--detector", "dlib",
            "--shard-size-mb", "1", "--videos-per-batch", "3", "--retries", "0"]
    assert main(argv) == 0
    store = OutputStore(output)
    first = json.loads(store.read_bytes("summary.json"))
    shards = [path for path in store.list() if path.endswith(".tar")]
    lost = shards[0]
    store.delete(lost)
    assert main(["inspect", output, "--sheet", str(tmp_path / "sheet.png")]) == 1
    assert f"MISSING shard {lost}" in capsys.readouterr().out
    assert main(argv) == 0
    again = json.loads(store.read_bytes("summary.json"))
    assert (again["ok"], again["failed"]) == (first["ok"], first["failed"])
    state = manifest.load_state(store)
    ok_keys = sorted(row.key for row in state.values() if row.status == manifest.OK)
    on_disk = [key for path in store.list() if path.endswith(".tar.stats.json")
               for key in json.loads(store.read_bytes(path))["keys"]]
    assert sorted(on_disk) == ok_keys, "every prepared clip in exactly one shard"
    assert main(["inspect", output, "--sheet", str(tmp_path / "sheet.png")]) == 0


@pytest.mark.slow
def test_credentials_in_an_output_uri_are_used_but_never_printed_or_stored(s3_server, sample_server, ray_cluster,
                                                                          prefect_harness, tmp_path, monkeypatch,
                                                                          capsys, caplog):
    import asyncio

    from prefect.client.orchestration import get_client

    secret = "SeCrEt-4c1d"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # only the URI can give them
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    bucket = s3_server.bucket("private")
    urls = tmp_path / "urls.txt"
    urls.write_text(sample_server.url("talk.mp4") + "\n")
    output = f"{bucket}/ds?access_key=testing&secret_key={secret}"
    assert main(["prepare", "--urls", str(urls), "--output", output, "--detector", "dlib", "--retries", "0",
                 "--workdir", str(tmp_path / "work")]) == 0
    store = OutputStore(f"{bucket}/ds")
    assert json.loads(store.read_bytes("summary.json"))["ok"] == 1
    stored = b"".join(store.read_bytes(path) for path in store.list() if not path.endswith(".tar"))
    printed = capsys.readouterr()
    logged = caplog.text

    async def parameters() -> str:
        async with get_client() as client:
            return json.dumps([run.parameters for run in await client.read_flow_runs()])

    recorded = asyncio.run(parameters())
    for where, text in (("files", stored.decode("utf-8", "replace")), ("stdout", printed.out),
                        ("stderr", printed.err), ("logs", logged), ("Prefect parameters", recorded)):
        assert secret not in text, f"the secret leaked into {where}"
    assert f"{bucket}/ds" in recorded
