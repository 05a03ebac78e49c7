"""The settings of an editing run and their defaults: the one place those defaults are stated.

`portrait edit`, its YAML config files and the `edit_videos` Prefect flow read their defaults from
these dataclasses; workers receive them as plain data. Only the standard library and other
settings dataclasses are imported here (no torch, Ray or PyAV), so `portrait --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipelines.media.framing import Framing
from pipelines.media.paste import MaskConfig
from pipelines.media.tracking import TrackingConfig

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
class EditSettings:
    """Everything an editing run needs besides its job list (plain data: workers get it pickled)."""

    output: str = "out/edited"
    """A local folder or an object-store URI; the results table and previews go here too."""
    checkpoint: str = ""
    """An official dpe.pt or a `portrait train` checkpoint (model.pt, its folder, a run folder or RUN/latest);
    local or object store (`runs.resolve_checkpoint`)."""
    defaults: JobDefaults = field(default_factory=JobDefaults)
    detector: str = "auto"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(detect_stride=10))
    """Detection runs every 10 frames while editing (25 in dataset preparation): a lost face or a
    scene cut is found again within a third of a second."""
    framing: Framing = field(default_factory=Framing)
    mask: MaskConfig = field(default_factory=MaskConfig)
    colour_match: bool = True
    min_face_px: float = 32.0
    """Faces whose landmark extent is smaller than this (source pixels) are not edited (passed through)."""
    min_track_frames: int = 5
    """Face tracks shorter than this are ignored (detector false positives); shorter videos: their length."""
    fade_frames: int = 4
    """Where a face appears or is lost mid-video, the edit fades in or out over this many frames."""
    chunk_frames: int = 240
    """Frames per chunk: chunks of one video are edited and encoded independently (in parallel on a
    cluster) and retried alone; the largest buffers hold one chunk's crops."""
    model_batch: int = 8
    """Crops per forward pass of the model."""
    crf: int = 18
    """x264 quality of the edited video (lower is better)."""
    preset: str = "medium"
    previews: bool = False
    """Also write previews/<job>.mp4 (source | driving | result, browser-playable) and previews/<job>.png."""
    preview_height: int = 256
    preview_seconds: float = 60.0
    """Previews cover at most this much of the start of each video."""
    sheet_frames: int = 6
    retry_failed: bool = False
    """Retry jobs that failed for reasons of their input in an earlier run (others are always retried)."""
    max_chunk_attempts: int = 2
    """A chunk whose worker process dies this many times is recorded as worker_failed (never an endless loop)."""
    model_actors: int = 1
    """Model actors in the pool (each holds one GPU when GPUs are used)."""
    model_gpus: float = -1.0
    """GPUs per model actor; -1: one if the Ray cluster has GPUs, else none."""
    model_cpus: float = 1.0
    """CPUs reserved per model actor (its torch threads on a CPU-only machine)."""
    precision: str = "auto"
    executor: str = "ray"
    workdir: str | None = None
    """Local scratch for copies of object-store inputs; None: a folder under the system temp dir."""
    ray_address: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.defaults.mode in MODES, "mode", self.defaults.mode, f"must be one of {', '.join(MODES)}"),
            (self.defaults.motion in MOTIONS, "motion", self.defaults.motion, f"must be one of {', '.join(MOTIONS)}"),
            (self.defaults.driving_policy in DRIVING_POLICIES, "driving_policy", self.defaults.driving_policy,
             f"must be one of {', '.join(DRIVING_POLICIES)}"),
            (self.defaults.strength >= 0, "strength", self.defaults.strength, "must not be negative"),
            (self.executor in EXECUTORS, "executor", self.executor, f"must be one of {', '.join(EXECUTORS)}"),
            (self.precision in PRECISIONS, "precision", self.precision, f"must be one of {', '.join(PRECISIONS)}"),
            (self.chunk_frames >= 1, "chunk_frames", self.chunk_frames, "must be at least 1"),
            (self.model_batch >= 1, "model_batch", self.model_batch, "must be at least 1"),
            (self.model_actors >= 1, "model_actors", self.model_actors, "must be at least 1"),
            (self.max_chunk_attempts >= 1, "max_chunk_attempts", self.max_chunk_attempts, "must be at least 1"),
            (self.preview_height >= 16 and self.preview_height % 2 == 0, "preview_height", self.preview_height,
             "must be an even number of pixels, at least 16"),
            (0 <= self.crf <= 51, "crf", self.crf, "must lie in 0..51"),
        ]
        for ok, name, value, rule in checks:
            if not ok:
                raise ValueError(f"{name}: {value!r} {rule}")
        parse_face(self.defaults.face)


def parse_face(text: str) -> tuple[float, float] | None:
    """'largest' -> None; 'X,Y' (fractions of the frame) -> (X, Y). Raises ValueError otherwise."""
    if text == "largest":
        return None
    try:
        x, y = (float(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"face: {text!r} must be 'largest' or 'X,Y' with X, Y in 0..1 (e.g. 0.3,0.5)") from None
    if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
        raise ValueError(f"face: {text!r}: X and Y must lie in 0..1 (fractions of the frame width and height)")
    return x, y


def settings_from_options(
    *,
    output: str = EditSettings.output,
    checkpoint: str = EditSettings.checkpoint,
    mode: str = JobDefaults.mode,
    strength: float = JobDefaults.strength,
    motion: str = JobDefaults.motion,
    driving_policy: str = JobDefaults.driving_policy,
    face: str = JobDefaults.face,
    detector: str = EditSettings.detector,
    detect_every: int | None = None,
    face_fraction: float = Framing.face_fraction,
    face_centre_x: float = Framing.centre_x,
    face_centre_y: float = Framing.centre_y,
    mask_dilate: float = MaskConfig.dilate,
    mask_feather: float = MaskConfig.feather,
    mask_forehead: float = MaskConfig.forehead,
    colour_match: bool = EditSettings.colour_match,
    chunk_frames: int = EditSettings.chunk_frames,
    model_batch: int = EditSettings.model_batch,
    crf: int = EditSettings.crf,
    preset: str = EditSettings.preset,
    previews: bool = EditSettings.previews,
    preview_seconds: float = EditSettings.preview_seconds,
    preview_height: int = EditSettings.preview_height,
    retry_failed: bool = EditSettings.retry_failed,
    max_chunk_attempts: int = EditSettings.max_chunk_attempts,
    model_actors: int = EditSettings.model_actors,
    model_gpus: float = EditSettings.model_gpus,
    model_cpus: float = EditSettings.model_cpus,
    precision: str = EditSettings.precision,
    executor: str = EditSettings.executor,
    workdir: str | None = None,
    ray_address: str | None = None,
) -> EditSettings:
    """`EditSettings` from the plain options of `portrait edit` and the `edit_videos` flow (the same
    names); a bad value raises ValueError naming the option."""
    base = EditSettings()
    tracking = base.tracking if detect_every is None else replace(base.tracking, detect_stride=int(detect_every))
    if tracking.detect_stride < 1:
        raise ValueError(f"detect_every: {detect_every!r} must be at least 1")
    try:
        framing = Framing(face_fraction=face_fraction, centre_x=face_centre_x, centre_y=face_centre_y)
        mask = MaskConfig(forehead=mask_forehead, dilate=mask_dilate, feather=mask_feather)
    except ValueError as error:
        raise ValueError(f"framing / mask: {error}") from None
    return EditSettings(
        output=output, checkpoint=checkpoint,
        defaults=JobDefaults(mode=mode, strength=float(strength), motion=motion, driving_policy=driving_policy,
                             face=face),
        detector=detector, tracking=tracking, framing=framing, mask=mask, colour_match=colour_match,
        chunk_frames=chunk_frames, model_batch=model_batch, crf=crf, preset=preset, previews=previews,
        preview_seconds=preview_seconds, preview_height=preview_height, retry_failed=retry_failed,
        max_chunk_attempts=max_chunk_attempts, model_actors=model_actors, model_gpus=model_gpus,
        model_cpus=model_cpus, precision=precision, executor=executor, workdir=workdir, ray_address=ray_address)
