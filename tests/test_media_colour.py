"""Colours through every path that converts them: decoding to RGB for analysis, frames back to the
encoder (as decoded, or with RGB pasted in), and training crops. Per colour case (BT.709 and BT.601
limited range, BT.709 full range as phones record, untagged, 10-bit BT.2020 with PQ): SMPTE HD colour
bars, whose saturated flat fields show a wrong matrix or range plainly, for decoding; the sample's
talking face (natural colours, inside the RGB gamut, as a pasted face is) for the round trips."""

from __future__ import annotations

import io
from dataclasses import replace

import av
import numpy as np
import pytest
from edit_fixtures import ffmpeg

from pipelines.media import video
from pipelines.media.formats import choose_output
from pipelines.media.paste import Overlay
from pipelines.media.pictures import plane_arrays

LUMA_WEIGHTS = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114), "bt2020": (0.2627, 0.0593)}

CASES = {  # name: (ffmpeg scale matrix, setparams, pixel format, matrix, full range, bits)
    "bt709": ("bt709", "colorspace=bt709:range=tv:color_primaries=bt709:color_trc=bt709", "yuv420p", "bt709",
              False, 8),
    "bt601": ("smpte170m", "colorspace=smpte170m:range=tv", "yuv420p", "bt601", False, 8),
    "bt709-full": ("bt709", "colorspace=bt709:range=pc", "yuv420p", "bt709", True, 8),
    "untagged": ("bt601", "colorspace=unknown:range=unknown:color_primaries=unknown:color_trc=unknown", "yuv420p",
                 "bt601", False, 8),
    "bt2020-pq-10bit": ("bt2020", "colorspace=bt2020nc:range=tv:color_primaries=bt2020:color_trc=smpte2084",
                        "yuv420p10le", "bt2020", False, 10),
}


def _clips(source: list[str], folder, scale: str) -> dict[str, video.VideoInfo]:
    """A 4-frame lossless H.264 clip per case, encoded in its matrix, range and depth."""
    made = {}
    for name, (matrix, tags, pix_fmt, _, full, _) in CASES.items():
        path = folder / f"{name}.mp4"
        ffmpeg(*source, "-frames:v", "4", "-vf",
               f"{scale}:out_color_matrix={matrix}:out_range={'full' if full else 'limited'},setsar=1,"
               f"format={pix_fmt},setparams={tags}", "-c:v", "libx264", "-qp", "0", "-preset", "ultrafast", str(path))
        made[name] = video.probe(path)
    return made


@pytest.fixture(scope="module")
def bars(tmp_path_factory) -> dict[str, video.VideoInfo]:
    return _clips(["-f", "lavfi", "-i", "smptehdbars=size=640x360:rate=25"], tmp_path_factory.mktemp("bars"),
                  "scale=640:360")


@pytest.fixture(scope="module")
def faces(sample_media, tmp_path_factory) -> dict[str, video.VideoInfo]:
    return _clips(["-i", str(sample_media["talk.mp4"])], tmp_path_factory.mktemp("faces"), "scale=352:288")


def reference_rgb(frame: av.VideoFrame, matrix: str, full: bool, bits: int) -> np.ndarray:
    """RGB by the standard's equations (Y'CbCr -> R'G'B', chroma repeated), independent of swscale."""
    y, u, v = (plane.astype(np.float64) for plane in plane_arrays(frame))
    u, v = (np.repeat(np.repeat(c, 2, 0), 2, 1)[: y.shape[0], : y.shape[1]] for c in (u, v))
    top, scale = 2 ** bits - 1, 2 ** (bits - 8)
    if full:
        luma, blue, red = y / top, (u - 2 ** (bits - 1)) / top, (v - 2 ** (bits - 1)) / top
    else:
        luma, blue, red = (y - 16 * scale) / (219 * scale), (u - 128 * scale) / (224 * scale), \
            (v - 128 * scale) / (224 * scale)
    kr, kb = LUMA_WEIGHTS[matrix]
    r, b = luma + 2 * (1 - kr) * red, luma + 2 * (1 - kb) * blue
    g = (luma - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.stack([r, g, b], axis=-1) * 255, 0, 255)


@pytest.mark.parametrize("name", CASES)
def test_frames_are_decoded_in_their_own_matrix_and_range(bars, name):
    _, _, _, matrix, full, bits = CASES[name]
    frame = next(video.decode(bars[name]))
    ours = frame.image.astype(np.float64)
    error = np.abs(ours - reference_rgb(frame.frame, matrix, full, bits)).mean()
    other = "bt601" if matrix != "bt601" else "bt709"
    wrong_matrix = np.abs(ours - reference_rgb(frame.frame, other, full, bits)).mean()
    wrong_range = np.abs(ours - reference_rgb(frame.frame, matrix, not full, bits)).mean()
    assert error < 1.2 and wrong_matrix > 2 * error and wrong_range > 4 * error, (error, wrong_matrix, wrong_range)


def _round_trip(info: video.VideoInfo, target, overlay: bool) -> video.VideoInfo:
    output = choose_output(info, "mp4", preset="ultrafast")
    options = {key: value for key, value in output.options.items() if key != "crf"}
    output = replace(output, options={**options, "qp": "0"})  # lossless: what remains is the conversions
    with video.SegmentWriter(target, info, output) as writer:
        for frame in video.decode(info):
            pasted = Overlay(0, 0, frame.image, np.ones(frame.image.shape[:2], np.float32)) if overlay else None
            writer.write_frame(frame, pasted)
    return video.probe(target)


def _planes(info: video.VideoInfo) -> list[np.ndarray]:
    with av.open(info.path) as container:
        return [np.concatenate([p.astype(np.int64).ravel() for p in plane_arrays(f)])
                for f in container.decode(video=0)]


@pytest.mark.parametrize("name", CASES)
def test_an_unchanged_frame_reaches_the_encoder_exactly_as_decoded(faces, name, tmp_path):
    info = faces[name]
    written = _round_trip(info, tmp_path / "out.mp4", overlay=False)
    assert (written.pix_fmt, written.colour) == (info.pix_fmt, info.colour)
    assert all(np.array_equal(a, b) for a, b in zip(_planes(written), _planes(info)))


@pytest.mark.parametrize("name", CASES)
def test_rgb_pasted_back_converts_with_the_matrix_and_range_it_was_decoded_with(faces, name, tmp_path):
    """Every pixel pasted back as the RGB decoded from it: the planes come back within rounding, with no
    drift (swscale's default rounding made each such round trip about 0.7 levels darker)."""
    info = faces[name]
    written = _round_trip(info, tmp_path / "out.mp4", overlay=True)
    scale = 2 ** (CASES[name][5] - 8)
    differences = [(a - b) / scale for a, b in zip(_planes(written), _planes(info))]
    assert np.mean([np.abs(d).mean() for d in differences]) < 0.5
    assert abs(np.mean([d.mean() for d in differences])) < 0.1
    assert written.colour == info.colour


@pytest.mark.parametrize("name", ["bt709", "bt709-full", "bt2020-pq-10bit"])
def test_training_crops_keep_the_sources_colours(faces, name):
    """Crops are RGB encoded as tagged BT.709 clips: decoding one gives back the colours that went in,
    whatever the source's matrix and range, and it carries the source's primaries and transfer."""
    info = faces[name]
    frames = [np.ascontiguousarray(frame[:256, :256]) for frame in video.read_frames(info.path, 0.0, 0.16, info=info)]
    clip = video.encode_mp4_bytes(frames, crf=0, preset="ultrafast", colour=info.colour)
    back = video.read_clip(clip, 256)
    difference = back.astype(np.float64) - np.stack(frames)
    assert np.abs(difference).mean() < 1.0 and abs(difference.mean()) < 0.2
    with av.open(io.BytesIO(clip)) as container:
        frame = next(container.decode(video=0))
        assert (frame.colorspace, frame.color_range) == (1, 1)
        assert (frame.color_primaries, frame.color_trc) == (info.colour["color_primaries"], info.colour["color_trc"])
