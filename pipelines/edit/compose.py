"""The paste and encode stage: decode the chunk again, paste each edited face back, encode a segment.

Each frame with an edited face gets the edited crop blended into the full-resolution frame
(`media.paste`: soft landmark mask, colour matched around the face; for pose edits the mask also
covers the face where the edit moved it, found by the landmark model on the edited crop), in the
decoded frame's own pixel format: only the face's region is converted from RGB, so every other
pixel reaches the encoder exactly as decoded (`media.pictures.blend_overlay`). The colour is
matched against the source crops the crop stage made, so this stage decodes frames but never
converts them to RGB. Frames without an edit are written as decoded. The segment is encoded in the job's output format (`media.formats`:
the source's codec, depth and colour unless overridden), frames keep their pts and durations
(`media.video`), and the segment appears in the output store only once complete.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import replace

import cv2
import numpy as np

from pipelines.edit.chunks import ChunkWork, timed
from pipelines.edit.settings import EditSettings
from pipelines.edit.stage_io import decode_chunk, local_info, store_output
from pipelines.errors import UNSUPPORTED_OUTPUT, RecordedFailure
from pipelines.media.crop import landmarks_to_crop
from pipelines.media.faces import FaceDetector, make_detector
from pipelines.media.formats import NVENC, OutputFormat, choose_output, container_of
from pipelines.media.paste import MaskConfig, Overlay, face_mask, match_colour, paste_overlay
from pipelines.media.video import SegmentWriter, VideoInfo, encoder_opens
from pipelines.storage import OutputStore

LANDMARK_INPUT_SIZE = 256
"""Edited crops smaller than this are enlarged before the landmark model looks at them."""


@functools.lru_cache(maxsize=2)
def cached_detector(name: str) -> FaceDetector:
    """One detector per worker process and name (loading the models takes about a second), on the GPU only
    where this process was given one (`worker_device`)."""
    return make_detector(name, device=worker_device())


def worker_device() -> str:
    """'cuda' where this process may use a GPU, else 'cpu'. In a Ray worker that is where Ray gave it one:
    a CPU task that reached for CUDA on its own would load models onto GPU 0 beside a model actor Ray
    placed there, unseen by Ray's accounting."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        import ray
    except ImportError:
        return "cuda"
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return "cuda"
    return "cuda" if ray.get_gpu_ids() else "cpu"


@functools.lru_cache(maxsize=1)
def _every_node_has_a_gpu() -> bool:
    """Whether each alive node of the connected Ray cluster has a GPU (True outside Ray: this machine only)."""
    try:
        import ray
    except ImportError:
        return True
    if not ray.is_initialized():
        return True
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return bool(nodes) and all(node.get("Resources", {}).get("GPU", 0) >= 1 for node in nodes)


def use_nvenc(choice: str, codec: str = "h264") -> bool:
    """Whether segments are encoded by NVENC (`--encoder`): never for 'cpu'; for 'nvenc' wherever it opens;
    for 'auto' only where it opens and every node of the cluster has a GPU, so that all segments of a
    video come from one kind of encoder (segments of different encoders cannot be joined)."""
    if choice == "cpu":
        return False
    opens = encoder_opens(NVENC.get(codec, NVENC["h264"]))
    return opens if choice == "nvenc" else opens and _every_node_has_a_gpu()


def output_format(info: VideoInfo, output: str, settings: EditSettings) -> OutputFormat:
    """How a job's video is encoded (`formats.choose_output` with the run's overrides); `unsupported_output`
    when --codec or --pix-fmt asks for what the output file cannot hold."""
    try:
        chosen = choose_output(info, container_of(output), codec=settings.codec, pix_fmt=settings.pix_fmt,
                               crf=settings.crf, preset=settings.preset)
        if settings.encoder == "cpu" or chosen.codec not in NVENC:
            return chosen
        if not use_nvenc(settings.encoder, chosen.codec):
            if settings.encoder == "nvenc":
                return replace(chosen, notes=(*chosen.notes, f"--encoder nvenc: {NVENC[chosen.codec]} does not open "
                                                             f"on {socket.gethostname()}: encoded on the CPU"))
            return chosen
        return choose_output(info, container_of(output), codec=settings.codec, pix_fmt=settings.pix_fmt,
                             crf=settings.crf, preset=settings.preset, nvenc=True)
    except ValueError as error:
        raise RecordedFailure(UNSUPPORTED_OUTPUT, f"{output}: {error}") from None


def edited_landmarks(detector: FaceDetector, crop: np.ndarray, source_points: np.ndarray) -> np.ndarray:
    """68 landmarks of the face in an edited crop (crop pixels), searched where the source face was: a pose
    edit moves the face, and the mask must cover where it went as well as where it was."""
    scale = max(1.0, LANDMARK_INPUT_SIZE / crop.shape[0])
    image = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale > 1 else crop
    low, high = source_points.min(axis=0) * scale, source_points.max(axis=0) * scale
    margin = 0.1 * (high - low)
    box = (*(low - margin), *(high + margin))
    return detector.landmarks(np.ascontiguousarray(image), tuple(float(v) for v in box)) / scale


def paste_face(frame_size: tuple[int, int], edited: np.ndarray, source: np.ndarray, box: np.ndarray,
               landmarks: np.ndarray, weight: float, mask_config: MaskConfig, colour_match: bool,
               detector: FaceDetector | None) -> Overlay | None:
    """The overlay that pastes `edited` (a crop of `box`) over the face whose landmarks (frame pixels) are
    given, in a frame of `frame_size` (width, height as analysis sees it); `source` is the same crop of
    the source frame, which the crop stage made (the colour is matched against it); None when it would
    change nothing.

    With a `detector`, the mask is the union of the source face and the face found in the edited crop.
    """
    size = edited.shape[0]
    points = landmarks_to_crop(landmarks, box, size)
    regions = [points]
    if detector is not None:
        regions.append(edited_landmarks(detector, edited, points))
    mask = face_mask(regions, size, mask_config) * np.float32(weight)
    if colour_match:
        edited = match_colour(edited, source, mask)
    return paste_overlay(frame_size, edited, mask, box)


def compose_chunk(chunk: ChunkWork, settings: EditSettings, store: OutputStore) -> ChunkWork:
    """Write the chunk's segment into the store; failures are recorded on the chunk."""
    if not chunk.ok or chunk.reused:
        return chunk
    chunk.visited()
    timings = chunk.timings
    edited = np.flatnonzero(chunk.driving_index >= 0)
    position = {int(i): n for n, i in enumerate(edited)}
    detector = cached_detector(settings.detector) if chunk.job.mode != "expression" and len(edited) else None
    try:
        info = local_info(chunk, settings)
        output = output_format(info, chunk.job.output, settings)
        with store_output(store, chunk.segment) as path:
            writer = SegmentWriter(path, info, output)
            try:
                for offset, frame in enumerate(decode_chunk(chunk, info, timings)):
                    picture = frame.frame
                    if offset in position:
                        with timed(timings, "paste_s"):
                            overlay = paste_face(frame.view.shown_size, chunk.edited[position[offset]],
                                                 chunk.source_crops[position[offset]], chunk.boxes[offset],
                                                 chunk.landmarks[offset], float(chunk.weights[offset]),
                                                 settings.mask, settings.colour_match, detector)
                            picture = frame.overlaid(overlay)
                    with timed(timings, "encode_s"):
                        writer.write_picture(picture, frame.pts, frame.duration)
                with timed(timings, "encode_s"):
                    writer.close()
            except BaseException:
                writer.abort()
                raise
    except RecordedFailure as error:
        chunk.fail(error.failure_class, f"{chunk.label}: {error.message}")
    chunk.edited = chunk.source_crops = None
    return chunk
