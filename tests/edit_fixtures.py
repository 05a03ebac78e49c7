"""Test media for the editing job, cut from the sample talking-face clip with the bundled ffmpeg.

Every clip is short (the editing tests run a tiny model on CPU) and exercises one property the
editing job must keep or one kind of bad input it must report. Imported by tests/test_edit_*.py
and tests/test_media_stream.py; the session fixture makes the clips once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipelines.media.video import ffmpeg_exe

_X264 = ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "20", "-pix_fmt", "yuv420p"]


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def make_clips(talk: Path, noface: Path, twofaces: Path, directory: Path) -> dict[str, Path]:
    """name -> path of every test clip (see the comments for what each one is for)."""
    directory.mkdir(parents=True, exist_ok=True)
    d = {name: directory / name for name in (
        "short.mp4", "vfr.mp4", "rotated.mp4", "odd.mp4", "portrait.mp4", "one_frame.mp4", "moov_end.mp4",
        "gap.mp4", "fourk.mp4", "audio_only.mp4", "zero.mp4", "not_a_video.mp4", "truncated.mp4", "smile.png",
        "noface.png", "driving.mp4", "twofaces.mp4", "noface.mp4", "long.mp4")}
    # 45 frames at 30000/1001 with the sample's AAC track copied.
    ffmpeg("-i", str(talk), "-frames:v", "45", *_X264, "-c:a", "copy", "-t", "1.5", "-movflags", "+faststart",
           str(d["short.mp4"]))
    # Variable frame rate: every frame of the first 20, then every third one (uneven pts).
    ffmpeg("-i", str(talk), "-vf", r"select='lt(n\,20)+not(mod(n\,3))'", "-fps_mode", "vfr", "-frames:v", "40",
           *_X264, "-c:a", "copy", "-t", "3", str(d["vfr.mp4"]))
    # A phone-style file: pixels stored turned 90 degrees clockwise (288x352) with display rotation
    # metadata (90 degrees counter-clockwise) that shows them upright (352x288).
    turned = directory / "turned.mp4"
    ffmpeg("-i", str(d["short.mp4"]), "-vf", "transpose=1", *_X264, "-c:a", "copy", str(turned))
    ffmpeg("-display_rotation", "90", "-i", str(turned), "-c", "copy", str(d["rotated.mp4"]))
    # Odd width and height (4:2:0 cannot hold them).
    ffmpeg("-i", str(talk), "-frames:v", "20", "-vf", "scale=351:287", "-c:v", "libx264", "-preset", "ultrafast",
           "-pix_fmt", "yuv444p", "-an", str(d["odd.mp4"]))
    # Portrait orientation stored as such (216 wide, 288 high).
    ffmpeg("-i", str(talk), "-frames:v", "30", "-vf", "crop=216:288", *_X264, "-an", str(d["portrait.mp4"]))
    ffmpeg("-i", str(talk), "-frames:v", "1", *_X264, "-an", str(d["one_frame.mp4"]))
    # The index (moov) after the data: cannot be streamed from a pipe.
    ffmpeg("-i", str(talk), "-frames:v", "30", *_X264, "-c:a", "copy", "-t", "1", str(d["moov_end.mp4"]))
    # 60 frames whose frames 20..39 show no face (blacked out): a stretch that must pass through.
    ffmpeg("-i", str(talk), "-frames:v", "60", "-vf", "drawbox=enable='between(n,20,39)':color=black:t=fill",
           *_X264, "-c:a", "copy", "-t", "2", str(d["gap.mp4"]))
    ffmpeg("-i", str(talk), "-frames:v", "3", "-vf", "scale=3840:2160:flags=bicubic", *_X264, "-an",
           str(d["fourk.mp4"]))
    ffmpeg("-i", str(talk), "-vn", "-c:a", "copy", "-t", "1", str(d["audio_only.mp4"]))
    d["zero.mp4"].write_bytes(b"")
    d["not_a_video.mp4"].write_text("this is a text file, not a video\n")
    # A complete index but only the first 40 % of the data.
    data = d["short.mp4"].read_bytes()
    d["truncated.mp4"].write_bytes(data[: int(len(data) * 0.4)])
    ffmpeg("-i", str(talk), "-vf", "select='eq(n\\,30)'", "-frames:v", "1", str(d["smile.png"]))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=352x288", "-frames:v", "1", str(d["noface.png"]))
    # A driving video shorter than the sources (20 frames, from later in the clip).
    ffmpeg("-ss", "5", "-i", str(talk), "-frames:v", "20", *_X264, "-an", str(d["driving.mp4"]))
    ffmpeg("-i", str(twofaces), "-frames:v", "20", *_X264, "-c:a", "copy", "-t", "0.66", str(d["twofaces.mp4"]))
    ffmpeg("-i", str(noface), "-frames:v", "20", *_X264, "-c:a", "copy", "-t", "0.8", str(d["noface.mp4"]))
    ffmpeg("-i", str(talk), "-frames:v", "300", *_X264, "-c:a", "copy", "-t", "10", str(d["long.mp4"]))
    return d


@pytest.fixture(scope="session")
def edit_clips(sample_media, tmp_path_factory) -> dict[str, Path]:
    return make_clips(sample_media["talk.mp4"], sample_media["noface.mp4"], sample_media["twofaces.mp4"],
                      tmp_path_factory.mktemp("edit-clips"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 32 px DPE generator with random weights in the project's checkpoint format (as `portrait train` writes)."""
    import torch

    from dpe.checkpoint import save_checkpoint
    from dpe.config import ModelConfig
    from dpe.model import DPEGenerator

    torch.manual_seed(0)
    config = ModelConfig.tiny()
    folder = tmp_path_factory.mktemp("checkpoint")
    generator = DPEGenerator(config)
    with torch.no_grad():  # random flow heads (the official initialisation): the edits depend on the motion
        for head in [*generator.expression_generator.to_flows, *generator.pose_generator.to_flows]:
            head.conv.weight.normal_()
            head.bias.zero_()
    save_checkpoint(folder / "model.pt", models={"generator": generator}, config=config, step=1)
    return folder / "model.pt"
