"""`portrait edit`: expression or pose transfer on videos, pasted back into the full frames, as a Ray Data job."""

from __future__ import annotations

import argparse
import sys

from flows.commands import add_command, non_negative_float, positive_float, positive_int
from pipelines.edit.settings import (
    DRIVING_POLICIES,
    EXECUTORS,
    MODES,
    MOTIONS,
    PRECISIONS,
    EditSettings,
    JobDefaults,
)
from pipelines.media.faces import DETECTOR_NAMES
from pipelines.media.framing import Framing
from pipelines.media.paste import MaskConfig

NAME = "edit"

OPTIONS = ("source", "driving", "jobs", "sources", "output", "checkpoint", "mode", "strength", "motion",
           "driving_policy", "face", "detector", "detect_every", "face_fraction", "face_centre_x", "face_centre_y",
           "mask_dilate", "mask_feather", "mask_forehead", "colour_match", "chunk_frames", "model_batch", "crf",
           "preset", "previews", "preview_seconds", "preview_height", "retry_failed", "max_chunk_attempts",
           "model_actors", "model_gpus", "model_cpus", "precision", "executor", "workdir", "ray_address")
"""The `edit_videos` flow's parameters, which are these options under the same names."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub, NAME, "edit videos: the driver's expression (or pose) on the source, pasted back, timing and sound kept",
        "Give a source video the driving video's (or image's) facial expression while its head pose stays "
        "(--mode expression), or the driver's head pose (--mode pose), or both. Each video is tracked, its "
        "face cropped the way the model was trained, edited in batches, pasted back into the full frames "
        "with a soft mask and matched colour, and encoded with the source's resolution, frame count, exact "
        "frame timestamps, rotation and every audio stream copied unchanged. Frames without a face pass "
        "through. Long videos are split into chunks edited in parallel.\n\n"
        "examples:\n"
        "  portrait edit --source talk.mp4 --driving smile.mp4 --checkpoint dpe.pt -o out/talk_smile.mp4\n"
        "  portrait edit --source talk.mp4 --driving smile.png --strength 0.7 --checkpoint dpe.pt -o out/x.mp4\n"
        "  portrait edit --jobs jobs.parquet --checkpoint s3://models/dpe.pt --output s3://bucket/edited\n"
        "  portrait edit --sources 's3://bucket/archive/*.mp4' --driving smile.mp4 --checkpoint ckpt/ "
        "--output out/edited\n\n"
        "The output folder gets results.parquet (one row per job: status, failure class, frames, fps, "
        "timings); a rerun does only what is missing or failed. Runs on a local Ray and Prefect's temporary "
        "server unless RAY_ADDRESS / PREFECT_API_URL point at a cluster.")
    inputs = p.add_argument_group("inputs (exactly one of --source, --jobs, --sources)")
    inputs.add_argument("--source", default=None, metavar="VIDEO", help="one video to edit (local or s3:// / gs://)")
    inputs.add_argument("--jobs", default=None, metavar="TABLE",
                        help="job table, CSV or Parquet: source, driving, output, and optionally mode, strength, "
                             "motion, driving_policy, face per row")
    inputs.add_argument("--sources", default=None, metavar="GLOB",
                        help="a glob ('dir/*.mp4', 's3://bucket/archive/*.mp4') or folder / prefix of videos, all "
                             "edited with --driving")
    inputs.add_argument("--driving", default=None, metavar="VIDEO_OR_IMAGE",
                        help="the driver: a video (frame i drives source frame i) or an image (one target "
                             "expression for the whole video); the default for table rows without one")
    p.add_argument("-o", "--output", default=EditSettings.output, metavar="PATH_OR_URI",
                   help="output folder or URI; with --source it may name the file itself (out/x.mp4)")
    p.add_argument("--checkpoint", default=EditSettings.checkpoint, metavar="PATH_OR_URI",
                   help="official dpe.pt, or a `portrait train` checkpoint: model.pt, a checkpoint folder, a run "
                        "folder or RUN/latest (its newest checkpoint); the crop size follows its model")
    edit = p.add_argument_group("the edit (defaults for every job; a job table may set them per row)")
    edit.add_argument("--mode", choices=MODES, default=JobDefaults.mode,
                      help="expression: the driver's expression, the source's head pose kept; pose: the driver's "
                           "head pose, the source's expression kept; both")
    edit.add_argument("--strength", type=non_negative_float, default=JobDefaults.strength,
                      help="how much of the driver's motion (0 = the source as the model reconstructs it, "
                           "1 = all, above 1 exaggerates)")
    edit.add_argument("--motion", choices=MOTIONS, default=JobDefaults.motion,
                      help="relative: the driver's motion since its first frame, added to the source's own (the "
                           "source keeps its head scale); absolute: the official behaviour; auto: relative for a "
                           "driving video, absolute for a driving image")
    edit.add_argument("--driving-policy", choices=DRIVING_POLICIES, default=JobDefaults.driving_policy,
                      help="a driving video shorter than the source: hold its last frame, loop it, or stop "
                           "editing and pass the rest through (the output always has the source's length)")
    edit.add_argument("--face", default=JobDefaults.face, metavar="largest|X,Y",
                      help="which face to edit when there are several: the most prominent, or the one nearest "
                           "the point X,Y (fractions of the frame, e.g. 0.25,0.5 for the left half's centre)")
    look = p.add_argument_group("framing, tracking and paste-back")
    look.add_argument("--detector", choices=DETECTOR_NAMES, default=EditSettings.detector,
                      help="face detector ('auto': face-alignment when its weights are present, else dlib)")
    look.add_argument("--detect-every", type=positive_int, default=None, metavar="N",
                      help=f"detector every N frames, landmarks tracked between "
                           f"(default: {EditSettings().tracking.detect_stride})")
    look.add_argument("--face-fraction", type=positive_float, default=Framing.face_fraction,
                      help="landmark box side / crop side (the official model's training crops: 0.52)")
    look.add_argument("--face-centre-x", type=positive_float, default=Framing.centre_x,
                      help="landmark box centre, fraction of the crop width")
    look.add_argument("--face-centre-y", type=positive_float, default=Framing.centre_y,
                      help="landmark box centre, fraction of the crop height")
    look.add_argument("--mask-dilate", type=non_negative_float, default=MaskConfig.dilate,
                      help="grow the face mask by this fraction of the face size")
    look.add_argument("--mask-feather", type=non_negative_float, default=MaskConfig.feather,
                      help="soft edge of the mask (Gaussian sigma, fraction of the face size)")
    look.add_argument("--mask-forehead", type=non_negative_float, default=MaskConfig.forehead,
                      help="how far above the brows the mask reaches (fraction of chin-to-nose-bridge)")
    look.add_argument("--no-colour-match", dest="colour_match", action="store_false",
                      help="paste the edited face without matching its colour to the source around it")
    out = p.add_argument_group("encoding and previews")
    out.add_argument("--crf", type=int, default=EditSettings.crf, help="x264 quality (lower is better)")
    out.add_argument("--preset", default=EditSettings.preset, help="x264 preset")
    out.add_argument("--previews", action="store_true",
                     help="also write previews/<job>.mp4 (source | driving | result, plays in browsers) and "
                          "previews/<job>.png (contact sheet)")
    out.add_argument("--preview-seconds", type=positive_float, default=EditSettings.preview_seconds,
                     help="previews cover at most this much of each video")
    out.add_argument("--preview-height", type=positive_int, default=EditSettings.preview_height,
                     help="height of each preview panel (even)")
    run = p.add_argument_group("running")
    run.add_argument("--retry-failed", action="store_true",
                     help="also retry jobs that failed for reasons of their input (no face, unreadable file)")
    run.add_argument("--chunk-frames", type=positive_int, default=EditSettings.chunk_frames,
                     help="frames per chunk: chunks are edited in parallel and retried alone")
    run.add_argument("--model-batch", type=positive_int, default=EditSettings.model_batch,
                     help="crops per forward pass")
    run.add_argument("--model-actors", type=positive_int, default=EditSettings.model_actors,
                     help="model replicas (actors), each with one GPU when the cluster has them")
    run.add_argument("--model-gpus", type=float, default=EditSettings.model_gpus,
                     help="GPUs per model actor (-1: one if the cluster has GPUs)")
    run.add_argument("--model-cpus", type=positive_float, default=EditSettings.model_cpus,
                     help="CPUs per model actor (its torch threads without a GPU)")
    run.add_argument("--precision", choices=PRECISIONS, default=EditSettings.precision,
                     help="auto: bfloat16 on GPU, float32 on CPU")
    run.add_argument("--max-chunk-attempts", type=positive_int, default=EditSettings.max_chunk_attempts,
                     help="a chunk whose worker dies this many times is recorded as worker_failed")
    run.add_argument("--executor", choices=EXECUTORS, default=EditSettings.executor,
                     help="ray: a Ray Data job; local: every stage in this process, one chunk at a time")
    run.add_argument("--workdir", default=None, metavar="DIR",
                     help="local scratch for copies of object-store inputs (default: the system temp folder)")
    run.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    return p


def flow_options(args: argparse.Namespace) -> dict:
    """The `edit_videos` flow's parameters from parsed options (the same names)."""
    return {name: getattr(args, name) for name in OPTIONS}


def run(args: argparse.Namespace) -> int:
    from pipelines.edit.job import EditInputs, collect_jobs
    from pipelines.edit.jobs import InputError, split_output
    from pipelines.edit.model import CheckpointError, load_weights
    from pipelines.edit.settings import settings_from_options

    options = flow_options(args)
    try:
        folder, name = split_output(args.output, bool(args.source))
        settings = settings_from_options(**{k: v for k, v in options.items()
                                            if k not in ("source", "driving", "jobs", "sources", "output")},
                                         output=folder)
        inputs = EditInputs(source=args.source, driving=args.driving, jobs=args.jobs, sources=args.sources,
                            output_name=name)
        collect_jobs(inputs, settings)
        load_weights(settings.checkpoint, settings.workdir)  # a wrong checkpoint stops here, before any video work
    except (ValueError, InputError, CheckpointError) as error:
        print(f"portrait edit: {error}", file=sys.stderr)
        return 2

    from flows.services import run_with_services
    from pipelines.edit.results import summary_text

    summary = run_with_services(NAME, settings.ray_address, lambda: _flow()(**options),
                                use_ray=settings.executor == "ray")
    print(summary_text(summary))
    return 0 if summary.get("failed", 0) == 0 else 1


def _flow():
    from flows.edit_flow import edit_videos

    return edit_videos
