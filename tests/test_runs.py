"""One resolver for every command's checkpoint: a file (any name), a checkpoint folder, a run folder or
RUN/latest, local or on an object store; and the one local copy of an object that reads it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from edit_fixtures import tiny_checkpoint  # noqa: F401  (session fixture)

from pipelines.edit.model import CheckpointError, load_weights
from pipelines.runs import CheckpointNotFound, checkpoint_dir_name, point_latest, resolve_checkpoint
from pipelines.storage import OutputStore, local_copy

NOT_A_CHECKPOINT = b"an older checkpoint: a resolver that picks it fails to read it"


def _local_run(base: Path, newest: bytes) -> Path:
    """base/demo: checkpoint 3 (not loadable), checkpoint 12 (`newest`), an unfinished 20 (no model.pt)."""
    for step, content in ((3, NOT_A_CHECKPOINT), (12, newest)):
        model = base / "demo" / checkpoint_dir_name(step) / "model.pt"
        model.parent.mkdir(parents=True)
        model.write_bytes(content)
        point_latest(str(base), "demo", checkpoint_dir_name(step))
    (base / "demo" / checkpoint_dir_name(20)).mkdir()
    (base / "dpe.pt").write_bytes(b"official")
    return base / "demo"


def _object_run(prefix: str, newest: bytes) -> str:
    """The same run on an object store, where there is no `latest` link."""
    store = OutputStore(prefix)
    store.write_bytes_atomic("demo/checkpoint_00000003/model.pt", NOT_A_CHECKPOINT)
    store.write_bytes_atomic("demo/checkpoint_00000012/model.pt", newest)
    store.write_bytes_atomic("demo/checkpoint_00000020/.model.pt.0123456789ab.part", b"unfinished")
    store.write_bytes_atomic("dpe.pt", b"official")
    store.write_bytes_atomic("empty/notes.txt", b"no checkpoint here")
    return f"{prefix}/demo"


def test_every_form_of_a_local_checkpoint_resolves_to_one_file(tmp_path):
    run = _local_run(tmp_path, b"newest")
    newest = f"{run}/checkpoint_00000012/model.pt"
    assert resolve_checkpoint(str(run)) == newest
    assert resolve_checkpoint(f"{run}/") == newest
    assert resolve_checkpoint(f"{run}/latest") == newest
    assert resolve_checkpoint(f"{run}/checkpoint_00000003") == f"{run}/checkpoint_00000003/model.pt"
    assert resolve_checkpoint(newest) == newest
    assert resolve_checkpoint(str(tmp_path / "dpe.pt")) == str(tmp_path / "dpe.pt")
    assert resolve_checkpoint(f"file://{tmp_path}/demo/latest") == f"file://{newest}"


def test_a_relative_or_home_location_is_resolved_against_this_process(tmp_path, monkeypatch):
    run = _local_run(tmp_path, b"newest")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_checkpoint("demo") == f"{run}/checkpoint_00000012/model.pt"
    assert resolve_checkpoint("~/dpe.pt") == str(tmp_path / "dpe.pt")


def test_a_location_without_a_checkpoint_is_named_in_the_error(tmp_path):
    _local_run(tmp_path, b"newest")
    with pytest.raises(CheckpointNotFound, match=re.escape(f"no checkpoint at {tmp_path}/nothing: no such file or")):
        resolve_checkpoint(str(tmp_path / "nothing"))
    with pytest.raises(CheckpointNotFound, match="checkpoint_00000020: the folder holds no model.pt"):
        resolve_checkpoint(str(tmp_path / "demo" / "checkpoint_00000020"))
    (tmp_path / "new-run").mkdir()
    with pytest.raises(CheckpointNotFound, match="new-run/latest: no such file"):
        resolve_checkpoint(str(tmp_path / "new-run" / "latest"))
    with pytest.raises(CheckpointNotFound, match="no checkpoint given: give a checkpoint file"):
        resolve_checkpoint("")
    assert issubclass(CheckpointNotFound, FileNotFoundError)


def test_every_form_of_an_object_store_checkpoint_resolves_to_one_object(s3_server):
    run = _object_run(f"{s3_server.bucket('resolve-runs')}/runs", b"newest")
    newest = f"{run}/checkpoint_00000012/model.pt"
    assert resolve_checkpoint(run) == newest
    assert resolve_checkpoint(f"{run}/latest") == newest
    assert resolve_checkpoint(f"{run}/checkpoint_00000003") == f"{run}/checkpoint_00000003/model.pt"
    assert resolve_checkpoint(newest) == newest
    assert resolve_checkpoint("s3://resolve-runs/runs/dpe.pt") == "s3://resolve-runs/runs/dpe.pt"
    with pytest.raises(CheckpointNotFound, match="no checkpoint at s3://resolve-runs/nothing: no such file"):
        resolve_checkpoint("s3://resolve-runs/nothing")
    with pytest.raises(CheckpointNotFound, match="checkpoint_00000020: the folder holds no model.pt"):
        resolve_checkpoint(f"{run}/checkpoint_00000020")
    with pytest.raises(CheckpointNotFound, match=r"runs/empty \(credentials redacted\): the folder holds no") \
            as caught:
        resolve_checkpoint("s3://KEY:SECRET@resolve-runs/runs/empty")
    assert "SECRET" not in str(caught.value) and "credentials redacted" in str(caught.value)


def test_an_object_is_copied_once_into_the_cache_and_a_local_file_is_used_as_it_is(s3_server, tmp_path):
    prefix = s3_server.bucket("copy-runs")
    OutputStore(prefix).write_bytes_atomic("weights/dpe.pt", b"official")
    copy = local_copy(f"{prefix}/weights/dpe.pt", tmp_path / "cache")
    assert copy.read_bytes() == b"official" and copy.parent.parent == tmp_path / "cache"
    past = time.time() - 7200
    os.utime(copy, (past, past))
    assert local_copy(f"{prefix}/weights/dpe.pt", tmp_path / "cache") == copy
    assert copy.stat().st_mtime > past, "a reused copy counts as recently used"
    with pytest.raises(FileNotFoundError, match="copy-runs/weights/other.pt: no such object"):
        local_copy(f"{prefix}/weights/other.pt", tmp_path / "cache")
    assert local_copy(str(tmp_path / "dpe.pt"), tmp_path / "cache") == tmp_path / "dpe.pt"
    assert local_copy(f"file://{tmp_path}/dpe.pt", tmp_path / "cache") == tmp_path / "dpe.pt"


def test_edit_loads_the_newest_checkpoint_of_a_local_run(tiny_checkpoint, tmp_path):
    run = _local_run(tmp_path, tiny_checkpoint.read_bytes())
    for given in (run, run / "latest"):
        weights = load_weights(str(given))
        assert weights.kind == "dpe-portrait/1" and weights.size == 32
    with pytest.raises(CheckpointError, match="no checkpoint at .*checkpoint_00000020: the folder holds no model.pt"):
        load_weights(str(run / "checkpoint_00000020"))


def test_edit_loads_the_newest_checkpoint_of_an_object_store_run(tiny_checkpoint, s3_server, tmp_path):
    run = _object_run(f"{s3_server.bucket('edit-runs')}/runs", tiny_checkpoint.read_bytes())
    for given in (run, f"{run}/latest"):
        weights = load_weights(given, str(tmp_path / "work"))
        assert weights.kind == "dpe-portrait/1" and weights.size == 32
    assert [path.name for path in (tmp_path / "work" / "checkpoints").glob("*/*")] == ["model.pt"], \
        "both forms name one object, copied once"
    with pytest.raises(CheckpointError, match="no checkpoint at s3://edit-runs/nothing"):
        load_weights("s3://edit-runs/nothing", str(tmp_path / "work"))
