"""A corpus of odd and broken media through `portrait prepare --urls`: every file gets its true class.

The corpus is made at test time from the sample clip and lavfi sources (nothing is committed) and
served from the loopback server; the usable files become clips, the others are recorded with the
class of what they are and a message naming their URL, and a rerun tries again only what a rerun
can fix.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.cli import main
from pipelines import errors
from pipelines.dataset import manifest
from pipelines.media.video import ffmpeg_exe
from pipelines.prepare import job
from pipelines.prepare.settings import PrepareSettings
from pipelines.prepare.sources import SourceInputs
from pipelines.sample.server import serve_directory
from pipelines.storage import OutputStore

pytestmark = pytest.mark.slow

EXPECTED = {
    "zero.mp4": errors.NOT_A_VIDEO,
    "notes.mp4": errors.NOT_A_VIDEO,
    "sound.m4a": errors.NO_VIDEO_STREAM,
    "truncated.mp4": errors.CORRUPT_VIDEO,
    "noface.mp4": errors.NO_FACE,
    "oneframe.mp4": errors.CLIP_TOO_SHORT,
    "twofaces.mp4": errors.MULTIPLE_FACES,
    "good.mp4": manifest.OK,
    "odd.mp4": manifest.OK,
    "portrait.mp4": manifest.OK,
    "rotated.mp4": manifest.OK,
    "huge.mp4": manifest.OK,
    "vfr.mp4": manifest.OK,
    "moovend.mp4": manifest.OK,
    "grey.mp4": manifest.OK,
}


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def corpus(sample_media, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    talk = str(sample_media["talk.mp4"])
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "23"]
    fast = [*h264, "-c:a", "aac", "-movflags", "+faststart"]
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("a text file with a video's name\n" * 40)
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(folder / "sound.m4a"))
    _ffmpeg("-i", talk, "-t", "3", *fast, str(folder / "good.mp4"))
    data = (folder / "good.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) * 2 // 5])
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=352x288:rate=25", "-t", "2", *h264, str(folder / "noface.mp4"))
    _ffmpeg("-i", talk, "-frames:v", "1", *h264, str(folder / "oneframe.mp4"))
    _ffmpeg("-i", str(sample_media["twofaces.mp4"]), "-t", "2", *fast, str(folder / "twofaces.mp4"))
    _ffmpeg("-i", talk, "-t", "2", "-vf", "crop=351:287:0:0", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv444p", str(folder / "odd.mp4"))
    _ffmpeg("-i", talk, "-t", "2", "-vf", "crop=216:288:68:0", *fast, str(folder / "portrait.mp4"))
    sideways = folder / "sideways.tmp.mp4"  # stored turned on its side, with a display matrix that turns it back
    _ffmpeg("-i", talk, "-t", "2", "-vf", "transpose=2", *fast, str(sideways))
    _ffmpeg("-display_rotation", "-90", "-i", str(sideways), "-c", "copy", str(folder / "rotated.mp4"))
    sideways.unlink()
    _ffmpeg("-i", talk, "-t", "1", "-vf", "scale=3840:2160", *fast, str(folder / "huge.mp4"))
    _ffmpeg("-i", talk, "-t", "3", "-vf", r"select=not(eq(mod(n\,5)\,2)),setpts=N/(25*TB)+0.04*floor(N/4)/TB",
            "-fps_mode", "vfr", *fast, str(folder / "vfr.mp4"))
    _ffmpeg("-i", talk, "-t", "2", *h264, "-c:a", "aac", str(folder / "moovend.mp4"))  # index at the end
    _ffmpeg("-i", talk, "-t", "2", "-vf", "format=gray,format=yuv420p", *fast, str(folder / "grey.mp4"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPECTED)
    return folder


def test_every_file_of_the_corpus_gets_its_true_class_and_a_rerun_retries_only_what_it_can_fix(
        corpus, ray_cluster, prefect_harness, tmp_path):
    with serve_directory(corpus) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(server.url(name) + "\n" for name in EXPECTED))
        output = tmp_path / "ds"
        options = ["--urls", str(urls), "--output", str(output), "--detector", "dlib", "--retries", "0",
                   "--videos-per-batch", "8", "--workdir", str(tmp_path / "work")]
        assert main(["prepare", *options]) == 0

        rows = {row.url.rsplit("/", 1)[1]: row for row in manifest.load_state(OutputStore(str(output))).values()}
        outcomes = {name: row.status if row.status == manifest.OK else row.failure_class for name, row in rows.items()}
        assert outcomes == EXPECTED
        for name, row in rows.items():
            if row.status == manifest.FAILED:
                assert server.url(name) in row.message and str(tmp_path / "work") not in row.message, row.message
                assert "[?-? s]" not in row.message and "whole video" in row.message

        settings = PrepareSettings(output=str(output), detector="dlib", retries=0,
                                   workdir=str(tmp_path / "work"))
        plan = job.plan(SourceInputs(urls=(str(urls),)), settings)
        retried = {r.url.rsplit("/", 1)[1] for batch in plan.batches for group in batch.groups for r in group}
        assert retried == {name for name, outcome in EXPECTED.items()
                           if outcome != manifest.OK and errors.retried_on_rerun(outcome)}
        assert retried == {"truncated.mp4"}  # a damaged transfer might come right; nothing permanent is redone
