"""The media `portrait demo` edits: short clips of the sample's talking face, with sound.

`source.mp4` is the first seconds of the sample talk (a 440 Hz tone as its audio track, 30000/1001
fps as the original); `driver.mp4` a later stretch of the same clip (other expressions and head
movements); `driver.png` one frame of it, a still driver. The jobs table asks for the three edits a
user meets first: the driver's expression with the source's pose kept, the driver's pose with the
source's expression kept, and the still's expression held for the whole video.
"""

from __future__ import annotations

import csv
from pathlib import Path

import ffmpeg

from pipelines.sample.media import make_sample_media, run_ffmpeg
from pipelines.storage import atomic_local_path

SOURCE_SPAN_S = (0.0, 4.0)
DRIVER_SPAN_S = (4.4, 8.4)
STILL_AT_S = 6.0


def make_demo_media(directory: str | Path) -> dict[str, Path]:
    """Write (or reuse) source.mp4, driver.mp4, driver.png and jobs.csv in `directory`."""
    directory = Path(directory)
    talk = make_sample_media(directory / "sample")["talk.mp4"]
    paths = {name: directory / name for name in ("source.mp4", "driver.mp4", "driver.png", "jobs.csv")}
    for name, (start, end) in (("source.mp4", SOURCE_SPAN_S), ("driver.mp4", DRIVER_SPAN_S)):
        if not paths[name].exists():
            with atomic_local_path(paths[name]) as temporary:
                run_ffmpeg(ffmpeg.input(str(talk), ss=start).output(
                    str(temporary), t=end - start, vcodec="libx264", preset="veryfast", crf=20, pix_fmt="yuv420p",
                    acodec="aac", movflags="+faststart", f="mp4"))
    if not paths["driver.png"].exists():
        with atomic_local_path(paths["driver.png"]) as temporary:
            run_ffmpeg(ffmpeg.input(str(talk), ss=STILL_AT_S).output(str(temporary), f="image2", vcodec="png",
                                                                     **{"frames:v": 1}))
    if not paths["jobs.csv"].exists():
        with atomic_local_path(paths["jobs.csv"]) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", "driving", "output", "mode"])
            writer.writerow([paths["source.mp4"], paths["driver.mp4"], "expression.mp4", "expression"])
            writer.writerow([paths["source.mp4"], paths["driver.mp4"], "pose.mp4", "pose"])
            writer.writerow([paths["source.mp4"], paths["driver.png"], "still-expression.mp4", "expression"])
    return paths
