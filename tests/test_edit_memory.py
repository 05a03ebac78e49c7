"""Editing memory does not grow with video length: the sample looped to 10x its length peaks at the
same resident memory as the sample itself (each run in a fresh process, every stage in-process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from edit_fixtures import ffmpeg, tiny_checkpoint  # noqa: F401  (session fixture)

from pipelines.media import video

RUN = textwrap.dedent("""
    import sys
    from pipelines.edit import job
    from pipelines.edit.settings import EditSettings
    source, output, checkpoint = sys.argv[1:4]
    settings = EditSettings(output=output, checkpoint=checkpoint, detector="dlib", preset="ultrafast",
                            chunk_frames=30, executor="local")
    from pipelines.edit import results
    from pipelines.storage import OutputStore
    edit_plan, weights = job.plan(job.EditInputs(source=source, driving=source), settings)
    job.run(edit_plan, weights, settings)
    row, = results.read_results(OutputStore(output)).values()
    assert row.status == "ok", row.message
    # VmHWM: this process's own peak (ru_maxrss would also count the parent's pages seen at fork time)
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(row.frames, peak_kb // 1024)
""")


@pytest.mark.slow
def test_peak_memory_is_flat_from_1x_to_10x_the_length(sample_media, tiny_checkpoint, tmp_path):
    once, ten_times = tmp_path / "once.mp4", tmp_path / "ten_times.mp4"
    ffmpeg("-i", str(sample_media["talk.mp4"]), "-frames:v", "30", "-c:v", "libx264", "-preset", "ultrafast",
           "-c:a", "copy", "-t", "1.001", str(once))
    ffmpeg("-stream_loop", "9", "-i", str(once), "-c", "copy", str(ten_times))
    assert video.probe(ten_times).frame_count == 300
    script = tmp_path / "run.py"
    script.write_text(RUN)
    peaks = {}
    for clip in (once, ten_times):
        done = subprocess.run([sys.executable, str(script), str(clip), str(tmp_path / clip.stem), str(tiny_checkpoint)],
                              capture_output=True, text=True, check=True)
        frames, peak_mb = map(int, done.stdout.split()[-2:])
        peaks[frames] = peak_mb
    assert sorted(peaks) == [30, 300]
    # Holding the frames would add 300 x 0.3 MB; the per-frame face data adds well under 1 MB.
    assert peaks[300] <= peaks[30] * 1.03 + 10, f"peak resident memory (MB) by frames edited: {peaks}"
