"""`portrait prepare`: VoxCeleb-style metadata -> WebDataset shards plus a Parquet manifest."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flows.commands import (
    add_command,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from pipelines.media.faces import DETECTOR_NAMES
from pipelines.media.framing import Framing
from pipelines.media.tracking import FACE_POLICIES, TrackingConfig
from pipelines.prepare.settings import (
    DEFAULT_URL_TEMPLATE,
    DownloadOptions,
    PrepareSettings,
    SampleFormat,
    parse_rate,
    settings_from_options,
)

LOG = logging.getLogger(__name__)
NAME = "prepare"
INPUT_KINDS = ("vox1_txt", "vox2_txt", "clips", "urls")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub, NAME, "prepare VoxCeleb-style clips into WebDataset shards (Prefect flow, work on Ray)",
        "Download only the needed time spans of each video with yt-dlp, track the face, crop it to "
        "256x256 at 25 fps with per-frame landmarks and head pose, and write WebDataset shards plus a "
        "Parquet manifest (one row per requested clip, with its status and failure class).\n\n"
        "The output must be a new or empty folder, or a dataset prepared before with the same sample "
        "settings: anything else is refused before work starts. A rerun with the same output completes "
        "only what is missing. Runs on a local Ray and Prefect's temporary server unless RAY_ADDRESS / "
        "PREFECT_API_URL point at a cluster.")
    inputs = p.add_argument_group("inputs (at least one, or --sample; each flag takes only its own kind)")
    inputs.add_argument("--vox1-txt", action="append", default=[], metavar="DIR",
                        help="VoxCeleb1 metadata folder txt/<identity>/<video>/<utterance>.txt (boxes in 360p pixels)")
    inputs.add_argument("--vox2-txt", action="append", default=[], metavar="DIR",
                        help="VoxCeleb2 metadata folder (boxes normalised 0..1)")
    inputs.add_argument("--clips", action="append", default=[], metavar="TABLE",
                        help="clip table, CSV/TSV or Parquet, in the style of vox-metadata.csv")
    inputs.add_argument("--urls", action="append", default=[], metavar="FILE",
                        help="text file of video URLs (or local files with --allow-file-urls), one per line: "
                             "whole videos, faces found automatically")
    inputs.add_argument("--sample", action="store_true",
                        help="add the bundled sample: a real talking-face clip served from a loopback HTTP "
                             "server and described by generated VoxCeleb-format metadata (offline)")
    p.add_argument("--output", default=PrepareSettings.output, metavar="PATH_OR_URI",
                   help="dataset folder or object-store URI (s3://bucket/prefix, gs://...)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="local scratch and download cache, kept for reruns (default: a folder per output "
                        "under ~/.cache/dpe-portrait/work)")
    p.add_argument("--url-template", default=DEFAULT_URL_TEMPLATE,
                   help="maps video ids to URLs ({id} is replaced); use it for mirrors and local servers")
    p.add_argument("--detector", choices=DETECTOR_NAMES, default=PrepareSettings.detector,
                   help="face detector: 'auto' takes face-alignment when its weights are in "
                        "$TORCH_HOME/hub/checkpoints, else the embedded dlib models (logged)")
    faces = p.add_argument_group("face policies (recorded in the dataset's marker: a dataset keeps one set)")
    faces.add_argument("--detect-every", type=positive_int, default=TrackingConfig.detect_stride, metavar="N",
                       help="run the detector every N frames and track landmarks in between")
    faces.add_argument("--min-face-px", type=positive_float, default=TrackingConfig.min_face_px, metavar="PX",
                       help="smallest face kept: median landmark extent in source pixels")
    faces.add_argument("--min-track-fraction", type=fraction, default=TrackingConfig.min_track_fraction,
                       metavar="F", help="the face must be tracked in at least this fraction of the clip")
    faces.add_argument("--max-outside-fraction", type=fraction, default=TrackingConfig.max_outside_fraction,
                       metavar="F", help="largest part of a crop allowed outside the frame (filled from the edge)")
    faces.add_argument("--face", choices=FACE_POLICIES, default=TrackingConfig.face_policy,
                       help="with several faces and no metadata box: reject the clip ('only'), or keep the "
                            "largest or the most central face; the choice is recorded in each sample")
    faces.add_argument("--face-fraction", type=fraction, default=Framing.face_fraction, metavar="F",
                       help="side of the face's landmark box as a fraction of the crop side (0.52: as in the data "
                            "the official DPE model was trained on)")
    faces.add_argument("--face-centre-x", type=fraction, default=Framing.centre_x, metavar="X",
                       help="where the landmark box centre sits across the crop (0..1)")
    faces.add_argument("--face-centre-y", type=fraction, default=Framing.centre_y, metavar="Y",
                       help="where the landmark box centre sits down the crop (0..1; 0.62 leaves room for hair)")
    faces.add_argument("--min-clip-frames", type=positive_int, default=SampleFormat.min_clip_frames, metavar="N",
                       help="shortest clip kept, in frames at 25 fps; a span running past the end of the video "
                            "keeps the frames that exist when at least N remain")
    p.add_argument("--shard-size-mb", type=positive_float, default=PrepareSettings.shard_bytes / 2**20,
                   help="target size of one tar shard")
    p.add_argument("--videos-per-batch", type=positive_int, default=PrepareSettings.videos_per_batch,
                   help="videos per Prefect task (one manifest part); each video is one Ray task")
    p.add_argument("--test-fraction", type=fraction, default=PrepareSettings.test_fraction,
                   help="fraction of identities put in the test split when an input names no split")
    p.add_argument("--retry-failed", action="store_true",
                   help="retry every clip that failed in an earlier run, permanent failures (404, no face) included")
    p.add_argument("--allow-file-urls", action="store_true",
                   help="accept file:// URLs and local paths as video sources (refused by default)")
    p.add_argument("--rate-limit", type=_rate, default=None, metavar="RATE",
                   help="download rate limit in bytes/s with an optional K, M or G, e.g. 2M")
    p.add_argument("--sleep", type=non_negative_float, default=DownloadOptions.sleep_between_s, metavar="S",
                   help="seconds to sleep before each download")
    p.add_argument("--cookies", default=None, metavar="FILE", help="cookies.txt for yt-dlp")
    p.add_argument("--proxy", default=None, metavar="URL", help="proxy for yt-dlp")
    p.add_argument("--retries", type=non_negative_int, default=DownloadOptions.retries,
                   help="retries of transient download errors (timeouts, 5xx, 429), with backoff")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--contact-sheet", action="store_true",
                   help="also write contact_sheet.png: frames of each prepared clip with their landmarks")
    return p


def _flow():
    from flows.prepare_flow import prepare_dataset

    return prepare_dataset


def _rate(text: str) -> str:
    try:
        parse_rate(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def flow_options(args: argparse.Namespace) -> dict:
    """The `prepare_dataset` flow's parameters from parsed options (the same names)."""
    names = ("output", *INPUT_KINDS, "sample", "workdir", "url_template", "detector", "detect_every", "min_face_px",
             "min_track_fraction", "max_outside_fraction", "face", "min_clip_frames", "face_fraction",
             "face_centre_x", "face_centre_y",
             "shard_size_mb", "videos_per_batch", "test_fraction", "retry_failed", "allow_file_urls", "rate_limit",
             "sleep", "cookies", "proxy", "retries", "ray_address")
    return {name: getattr(args, name) for name in names}


def run(args: argparse.Namespace) -> int:
    from flows.services import run_with_services
    from pipelines.dataset.layout import OutputRefused, claim_output
    from pipelines.media.faces import make_detector
    from pipelines.prepare.sources import InputError, SourceInputs
    from pipelines.storage import OutputStore, split_credentials

    options = flow_options(args)
    options["output"], credentials = split_credentials(options["output"])
    if credentials:  # kept out of logs, summaries and Prefect's parameter records
        os.environ.update(credentials)
        LOG.warning("credentials in --output moved to %s for this run; pass them that way next time",
                    ", ".join(sorted(credentials)))
    inputs = SourceInputs(*(tuple(options[kind]) for kind in INPUT_KINDS))
    if not inputs and not args.sample:
        raise SystemExit("portrait prepare: give at least one input (--vox1-txt, --vox2-txt, --clips, --urls) "
                         "or --sample; see `portrait prepare --help`")
    try:
        settings = settings_from_options(**{k: v for k, v in options.items() if k not in (*INPUT_KINDS, "sample")})
        inputs.check()
        detector = make_detector(settings.detector).name
        claim_output(OutputStore(settings.output), settings.sample_format.record(detector))
    except (ValueError, InputError, OutputRefused, FileNotFoundError) as error:
        print(f"portrait prepare: {error}", file=sys.stderr)
        return 2

    summary = run_with_services(NAME, settings.ray_address, lambda: _flow()(**options))
    if args.contact_sheet and summary.get("ok"):
        from pipelines.dataset.inspect import write_contact_sheet

        print(f"contact sheet: {write_contact_sheet(settings.output)}")
    return 0 if summary.get("ok", 0) > 0 or not summary.get("requested", 0) else 1
