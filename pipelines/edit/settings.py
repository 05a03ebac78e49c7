"""The settings of an editing run: each option of `portrait edit` declared once, as a field.

`EditInputs` (what to edit) and `EditSettings` (how) are the command's options; its flags, its
YAML config keys and the `edit_videos` flow's parameters are derived from them
(`pipelines.options`); workers receive the settings pickled. Only light modules are imported here
(no torch, Ray or PyAV), so `portrait --help` stays fast.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any, Mapping

from pipelines.media.faces import DETECTOR_NAMES
from pipelines.media.formats import CODEC_CHOICES, CONTAINERS, ENCODER_CHOICES, is_pixel_format
from pipelines.media.framing import FramingOptions
from pipelines.media.paste import MaskConfig
from pipelines.media.tracking import TrackingConfig
from pipelines.options import NOT_NEGATIVE, POSITIVE, Rule, at_least, at_most, build, check, option

MODES = ("expression", "pose", "both")
"""expression: the driver's expression, the source's head pose kept (official `exp`); pose: the
driver's head pose, the source's expression kept (official `pose`); both."""

MOTIONS = ("auto", "relative", "absolute")
"""relative: the driver's motion relative to its first frame, added to the source's own (the source
keeps its head scale); absolute: the driver's motion as it is (official). auto: relative for a
driving video, absolute for a driving image (a still has no motion of its own to be relative to)."""

DRIVING_POLICIES = ("hold", "loop", "stop")
"""What drives source frames past the driver's end: hold its last frame, loop it from the start,
or stop editing and pass the rest of the source through unedited."""

EXECUTORS = ("ray", "local")
"""ray: a Ray Data job (a local Ray, or the cluster at RAY_ADDRESS); local: the same stages run
one after another in this process (debugging, profiling, machines without Ray)."""

PRECISIONS = ("auto", "float32", "bfloat16")
"""auto: bfloat16 autocast on GPU, float32 on CPU (where bfloat16 measured slower)."""


DEINTERLACE = ("auto", "off")
"""auto: frames the stream flags as interlaced are analysed as their first field (lines interpolated)
and the face is pasted into both fields, encoded interlaced; off: the woven frames are analysed as
they are (for progressive pictures flagged interlaced)."""

OUTPUT_EXTENSIONS = tuple(CONTAINERS)
_INPUTS = "inputs (exactly one of --source, --jobs, --sources)"
_EDIT = "the edit (defaults for every job; a job table may set them per row)"
_LOOK = "tracking and paste-back"
_OUTPUT = "encoding and previews"
_RUN = "running"


@dataclass(frozen=True)
class JobDefaults:
    """Per-job options: the job table may set each of them per row; these are the defaults."""

    mode: str = "expression"
    strength: float = 1.0
    motion: str = "auto"
    driving_policy: str = "hold"
    face: str = "largest"
    """Which face to edit when there are several: 'largest' (the most prominent over the video:
    frames covered x face size), or 'X,Y' with X, Y in 0..1: the face nearest that point of the frame."""


@dataclass(frozen=True)
class EditInputs:
    """What to edit: one `source` (with `output_name` inside the output folder), a `jobs` table, or a
    `sources` glob / prefix; `driving` is the driver for one source or a glob, and the default driver
    of table rows without one."""

    source: str | None = option(None, "one video to edit (local or s3:// / gs://)", group=_INPUTS, metavar="VIDEO",
                                path=True)
    jobs: str | None = option(None, "job table, CSV or Parquet: source, driving, output, and optionally mode, "
                                    "strength, motion, driving_policy, face per row", group=_INPUTS, metavar="TABLE",
                              path=True)
    sources: str | None = option(None, "a glob ('dir/*.mp4', 's3://bucket/archive/*.mp4') or folder / prefix of "
                                       "videos, all edited with --driving", group=_INPUTS, metavar="GLOB", path=True)
    driving: str | None = option(None, "the driver: a video (frame i drives source frame i) or an image (one target "
                                       "expression for the whole video); the default for table rows without one",
                                 group=_INPUTS, metavar="VIDEO_OR_IMAGE", path=True)
    output_name: str | None = None
    """With `source`: the output's file name inside the output folder (from `-o out/x.mp4`)."""

    def __post_init__(self) -> None:
        check(self)

    def check(self) -> None:
        """Raise `InputError` unless exactly one kind of input is given, with a driver where one is needed."""
        from pipelines.edit.job_table import InputError

        given = [name for name in ("source", "jobs", "sources") if getattr(self, name)]
        if len(given) != 1:
            raise InputError("give exactly one of --source, --jobs, --sources "
                             f"(got {', '.join('--' + g for g in given) or 'none'})")
        if (self.source or self.sources) and not self.driving:
            raise InputError("--driving is needed with --source and --sources (a video or an image)")


@dataclass(frozen=True)
class EditSettings(FramingOptions):
    """Everything an editing run needs besides its job list: the options of `portrait edit` and the
    `edit_videos` flow (one field each; workers get it pickled)."""

    output: str = option("out/edited", "output folder or URI; with --source it may name the file itself "
                                       "(out/x.mp4); the results table and previews go here too", short="-o",
                         metavar="PATH_OR_URI", path=True)
    checkpoint: str = option("", "official dpe.pt, or a `portrait train` checkpoint: model.pt, a checkpoint folder, "
                                 "a run folder or RUN/latest (its newest checkpoint); local or s3:// / gs://; the "
                                 "crop size follows its model", metavar="PATH_OR_URI", path=True)
    mode: str = option(JobDefaults.mode, "expression: the driver's expression, the source's head pose kept; pose: "
                       "the driver's head pose, the source's expression kept; both", group=_EDIT, choices=MODES)
    strength: float = option(JobDefaults.strength, "how much of the driver's motion (0 = the source as the model "
                             "reconstructs it, 1 = all, above 1 exaggerates)", group=_EDIT, rules=(NOT_NEGATIVE,))
    motion: str = option(JobDefaults.motion, "relative: the driver's motion since its first frame, added to the "
                         "source's own (the source keeps its head scale); absolute: the official behaviour; auto: "
                         "relative for a driving video, absolute for a driving image", group=_EDIT, choices=MOTIONS)
    driving_policy: str = option(JobDefaults.driving_policy, "a driving video shorter than the source: hold its last "
                                 "frame, loop it, or stop editing and pass the rest through (the output always has "
                                 "the source's length)", group=_EDIT, choices=DRIVING_POLICIES)
    face: str = option(JobDefaults.face, "which face to edit when there are several: the most prominent, or the one "
                       "nearest the point X,Y (fractions of the frame, e.g. 0.25,0.5 for the left half's centre)",
                       group=_EDIT, metavar="largest|X,Y", parse=lambda text: parse_face(text))
    detector: str = option("auto", "face detector ('auto': face-alignment when its weights are present, else dlib)",
                           group=_LOOK, choices=DETECTOR_NAMES)
    detect_every: int = option(10, "detector every N frames, landmarks tracked between: a lost face or a scene cut "
                                   "is found again within a third of a second", group=_LOOK, metavar="N",
                               rules=(at_least(1),))
    mask_dilate: float = option(MaskConfig.dilate, "grow the face mask by this fraction of the face size",
                                group=_LOOK, rules=(NOT_NEGATIVE,))
    mask_feather: float = option(MaskConfig.feather, "soft edge of the mask (Gaussian sigma, fraction of the face "
                                 "size)", group=_LOOK, rules=(NOT_NEGATIVE,))
    mask_forehead: float = option(MaskConfig.forehead, "how far above the brows the mask reaches (fraction of "
                                  "chin-to-nose-bridge)", group=_LOOK, rules=(NOT_NEGATIVE,))
    colour_match: bool = option(True, "paste the edited face without matching its colour to the source around it "
                                      "(the switch turns matching off)", group=_LOOK, flag="no-colour-match")
    crf: int = option(18, "quality of the edited videos, lower is better: the CRF of H.264, HEVC, VP9 and AV1 "
                          "(MPEG-2: a fixed quantiser of crf/6; ProRes: its profile decides)", group=_OUTPUT,
                      rules=(at_least(0), at_most(51)))
    preset: str = option("veryfast", "encoder speed, x264 names (ultrafast .. veryslow), mapped onto the other "
                                     "encoders' speed settings (NVENC: p1 .. p7); veryfast: a third of medium's CPU "
                                     "time at 1080p, the quality is --crf's", group=_OUTPUT)
    encoder: str = option("auto", "video encoder: nvenc (the GPU's, h264_nvenc/hevc_nvenc), cpu, or auto: NVENC "
                                  "when every node has a GPU and NVENC opens there, else the CPU's", group=_OUTPUT,
                          choices=ENCODER_CHOICES)
    previews: bool = option(False, "also write previews/<job>.mp4 (source | driving | result, plays in browsers) and "
                                   "previews/<job>.png (contact sheet)", group=_OUTPUT)
    preview_seconds: float = option(60.0, "previews cover at most this much of the start of each video",
                                    group=_OUTPUT, rules=(POSITIVE,))
    preview_height: int = option(256, "height of each preview panel (even)", group=_OUTPUT,
                                 rules=(Rule("must be an even number of pixels, at least 16",
                                             lambda height: height >= 16 and height % 2 == 0),))
    retry_failed: bool = option(False, "also retry jobs that failed for reasons of their input (no face, unreadable "
                                       "file)", group=_RUN)
    chunk_frames: int = option(240, "frames per chunk: chunks are edited in parallel and retried alone; the largest "
                                    "buffers hold one chunk's crops", group=_RUN, rules=(at_least(1),))
    model_batch: int = option(0, "crops per forward pass (0: sized for the device: 64 on a GPU of 40 GB or more, 32 "
                                 "on a smaller one, 8 on a CPU)", group=_RUN, rules=(at_least(0),))
    model_actors: int = option(0, "model replicas (actors), each with its GPUs when the cluster has them; 0: with "
                                  "GPUs, a pool growing from one to one per GPU of the cluster as work waits; "
                                  "without, one", group=_RUN, rules=(at_least(0),))
    model_gpus: float = option(-1.0, "GPUs per model actor (-1: one if the cluster has GPUs)", group=_RUN)
    model_cpus: float = option(1.0, "CPUs per model actor (its torch threads without a GPU)", group=_RUN,
                               rules=(POSITIVE,))
    precision: str = option("auto", "auto: bfloat16 on GPU, float32 on CPU", group=_RUN, choices=PRECISIONS)
    max_chunk_attempts: int = option(2, "a chunk whose worker dies this many times is recorded as worker_failed",
                                     group=_RUN, rules=(at_least(1),))
    executor: str = option("ray", "ray: a Ray Data job; local: every stage in this process, one chunk at a time",
                           group=_RUN, choices=EXECUTORS)
    workdir: str | None = option(None, "local scratch for copies of object-store inputs (default: the system temp "
                                       "folder)", group=_RUN, metavar="DIR", path=True)
    ray_address: str | None = option(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)",
                                     group=_RUN, metavar="ADDR")
    codec: str = option("auto", "codec of the edited videos: auto keeps the source's (h264, hevc, vp9, av1, prores, "
                                "mpeg2video; others become h264; a container that cannot hold it, or an encoder "
                                "without its bit depth, gets the nearest, and the results row says so)",
                        group=_OUTPUT, choices=CODEC_CHOICES)
    pix_fmt: str = option("auto", "pixel format of the edited videos: auto keeps the source's chroma subsampling and "
                                  "bit depth (odd frame sizes: 4:2:0, padded to even sides); or a name the encoder "
                                  "takes, e.g. yuv420p (browsers) or yuv422p10le", group=_OUTPUT,
                          metavar="auto|NAME", rules=(Rule("must be 'auto' or an FFmpeg pixel format name "
                                                           "(yuv420p, yuv420p10le, ...)", is_pixel_format),))
    deinterlace: str = option("auto", "interlaced sources (by their stream flags): auto finds the face on each "
                                      "frame's first field (lines interpolated), pastes it into both fields and "
                                      "encodes interlaced with the source's field order; off analyses the woven "
                                      "frames as they are (progressive pictures flagged interlaced)", group=_LOOK,
                              choices=DEINTERLACE)
    min_face_px: float = 32.0
    """Faces whose landmark extent is smaller than this (source pixels) are not edited (passed through)."""
    min_track_frames: int = 5
    """Face tracks shorter than this are ignored (detector false positives); shorter videos: their length."""
    fade_frames: int = 4
    """Where a face appears or is lost mid-video, the edit fades in or out over this many frames."""
    sheet_frames: int = 6

    def __post_init__(self) -> None:
        check(self)

    @property
    def defaults(self) -> JobDefaults:
        return JobDefaults(mode=self.mode, strength=self.strength, motion=self.motion,
                           driving_policy=self.driving_policy, face=self.face)

    @property
    def tracking(self) -> TrackingConfig:
        return TrackingConfig(detect_stride=self.detect_every)

    @property
    def mask(self) -> MaskConfig:
        return MaskConfig(forehead=self.mask_forehead, dilate=self.mask_dilate, feather=self.mask_feather)


def parse_face(text: str) -> tuple[float, float] | None:
    """'largest' -> None; 'X,Y' (fractions of the frame) -> (X, Y). Raises ValueError otherwise."""
    if text == "largest":
        return None
    try:
        x, y = (float(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError("must be 'largest' or 'X,Y' with X, Y in 0..1 (e.g. 0.3,0.5)") from None
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError("X and Y must lie in 0..1 (fractions of the frame width and height)")
    return x, y


def split_output(output: str, single_source: bool) -> tuple[str, str | None]:
    """`-o out/x.mp4` with one source names a file: (folder 'out', name 'x.mp4'); anything else is the
    output folder (name None: outputs are named after their sources)."""
    if single_source and PurePosixPath(output).suffix.lower() in OUTPUT_EXTENSIONS:
        folder, name = posixpath.split(output) if "://" in output else os.path.split(output)
        return folder or ".", name
    return output, None


def inputs_and_settings(values: Mapping[str, Any]) -> tuple[EditInputs, EditSettings]:
    """The run's inputs and settings from option values (`portrait edit`, its config file, or the flow's
    parameters): `output` may name the file of a single source; local paths become absolute here."""
    inputs = build(EditInputs, values)
    folder, name = split_output(str(values.get("output", EditSettings.output)), bool(inputs.source))
    return replace(inputs, output_name=name), build(EditSettings, {**values, "output": folder})
