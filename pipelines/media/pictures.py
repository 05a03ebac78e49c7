"""A decoded picture between its coded form and what face analysis sees, and the way back.

Analysis (detection, tracking, crops, paste-back geometry) works on RGB images as a viewer sees
them: `View.picture` turns a decoded `av.VideoFrame` into such an image in four steps, each undone
exactly by `View.to_coded` for the edited face:

1. colour: converted to RGB with the frame's own matrix and range (FFmpeg's guess, BT.601 limited,
   where the frame is untagged), with accurate rounding and full chroma interpolation
   (`CONVERSION`): swscale's default path darkens every frame by about a level per conversion;
2. square pixels: anamorphic frames (sample aspect ratio != 1: DV, PAL/NTSC broadcast, HDV) are
   resampled horizontally to the width they are shown at;
3. fields: an interlaced frame shows its first field with the lines between interpolated (two
   instants woven into one frame would show as combing to the detector and the model);
4. orientation: the display matrix (rotation and flips, as players apply it), then any extra
   quarter turn that shows a sideways face upright (`Orientation`).

The way back never converts the rest of the frame: `blend_overlay` converts only the edited
region from RGB to the frame's own pixel format (any planar YUV, RGB or grey layout, any depth;
by the standard's equations, `rgb_to_planes`) and blends it into the frame's planes with the paste
mask, so every pixel outside the mask stays exactly as decoded and goes to the encoder in the
source's format, matrix, range and depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation

from pipelines.media.crop import crop_pixels

CONVERSION = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
"""swscale flags of every conversion between a video's own pixel format and RGB (both ways): an
unchanged round trip then comes back within 0.1 level on average instead of about 1.2 levels darker."""

FULL_RANGE = 2
"""AVCOL_RANGE_JPEG: full-range YUV, as phones record."""

SWS_MATRIX = {1: 1, 4: 4, 5: 5, 6: 5, 7: 7, 9: 9, 10: 9}
"""FFmpeg's AVColorSpace -> the swscale matrix (SWS_CS_*) that converts from and to it (bt709, fcc,
bt470bg and smpte170m (both BT.601), smpte240m, bt2020); unspecified ones get swscale's default, BT.601."""

CARRIER_SIZE = 16
"""Side of a `View.carrier` frame."""

REGION_MARGIN = 16
"""Pixels converted around a region (`View.region`): more than swscale's chroma interpolation reaches."""

CHROMA_SITING = {"mpeg": (0.0, 1.0), "jpeg": (1.0, 1.0)}
"""Where subsampled chroma lies, as (horizontal, vertical) fractions of the way from the first luma sample
it covers to the centre of those it covers: MPEG-2/H.264/HEVC video is left-sited and vertically centred,
JPEG-range (yuvj) centred both ways. A stream's own siting tag is not exposed by PyAV; these are FFmpeg's
defaults for such streams (`View.crop`)."""

LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
"""Limited-range luma levels (16-235) to full range (0-255), as a lookup table."""


def sws_matrix(colorspace: int) -> int | None:
    """The swscale matrix for an AVColorSpace; None (swscale's own default, BT.601) when untagged."""
    return SWS_MATRIX.get(int(colorspace))


@dataclass(frozen=True)
class Orientation:
    """How coded pixels are shown: a signed permutation of the axes (a display matrix, possibly turned).

    In pixel coordinates (x right, y down, about the centre) a coded point (x, y) is shown at
    (a x + c y, b x + d y). `turn(90)` is a quarter turn counter-clockwise, as `np.rot90`.
    """

    a: int = 1
    b: int = 0
    c: int = 0
    d: int = 1

    @classmethod
    def from_display_matrix(cls, matrix: Sequence[int] | None) -> Orientation:
        """From FFmpeg's 3x3 display matrix (16.16 fixed point); identity when None or not a multiple of 90 degrees."""
        if not matrix:
            return cls()
        a, b, c, d = (int(round(matrix[i] / 65536)) for i in (0, 1, 3, 4))
        if sorted((abs(a), abs(b), abs(c), abs(d))) != [0, 0, 1, 1] or a * d - b * c == 0:
            return cls()
        return cls(a, b, c, d)

    @classmethod
    def turn(cls, degrees: int) -> Orientation:
        """A counter-clockwise turn by a multiple of 90 degrees."""
        result = cls()
        for _ in range((degrees // 90) % 4):
            result = result.then(cls(0, -1, 1, 0))
        return result

    def then(self, other: Orientation) -> Orientation:
        """This orientation followed by `other`."""
        return Orientation(a=other.a * self.a + other.c * self.b, b=other.b * self.a + other.d * self.b,
                           c=other.a * self.c + other.c * self.d, d=other.b * self.c + other.d * self.d)

    def inverse(self) -> Orientation:
        return Orientation(a=self.a, b=self.c, c=self.b, d=self.d)

    @property
    def identity(self) -> bool:
        return (self.a, self.b, self.c, self.d) == (1, 0, 0, 1)

    @property
    def transposes(self) -> bool:
        return self.a == 0

    @property
    def mirrored(self) -> bool:
        """Whether a flip is involved (the determinant is negative)."""
        return self.a * self.d - self.b * self.c < 0

    @property
    def rotation(self) -> int:
        """Counter-clockwise degrees (0, 90, 180, 270) of the rotation part (after a horizontal flip, if mirrored)."""
        unflipped = Orientation(-1, 0, 0, 1).then(self) if self.mirrored else self
        return next(d for d in (0, 90, 180, 270) if Orientation.turn(d) == unflipped)

    def shown_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.transposes else (width, height)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image as shown (a contiguous copy unless nothing changes)."""
        if self.identity:
            return image
        if self.transposes:
            image, flip_x, flip_y = image.swapaxes(0, 1), self.c < 0, self.b < 0
        else:
            flip_x, flip_y = self.a < 0, self.d < 0
        if flip_x:
            image = image[:, ::-1]
        if flip_y:
            image = image[::-1]
        return np.ascontiguousarray(image)

    def undo(self, image: np.ndarray) -> np.ndarray:
        """The shown image back in coded orientation."""
        return self.inverse().apply(image)

    def point(self, x: int, y: int, width: int, height: int) -> tuple[int, int]:
        """Where coded pixel (x, y) of a width x height image is shown (pixel indices)."""
        if self.transposes:
            x, y, width, height, flip_x, flip_y = y, x, height, width, self.c < 0, self.b < 0
        else:
            flip_x, flip_y = self.a < 0, self.d < 0
        return (width - 1 - x if flip_x else x), (height - 1 - y if flip_y else y)

    def undo_rect(self, left: int, top: int, right: int, bottom: int,
                  shown: tuple[int, int]) -> tuple[int, int, int, int]:
        """The coded rectangle [left, right) x [top, bottom) of a rectangle of the shown image of size `shown`."""
        inverse = self.inverse()
        corners = [inverse.point(x, y, *shown) for x, y in ((left, top), (right - 1, bottom - 1))]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        return min(xs), min(ys), max(xs) + 1, max(ys) + 1


def square_width(width: int, sample_aspect_ratio: float | None) -> int:
    """The width at which `width` pixels of the given aspect ratio are shown in square pixels."""
    ratio = float(sample_aspect_ratio or 1.0)
    return width if ratio <= 0 or abs(ratio - 1.0) < 1e-9 else max(1, int(round(width * ratio)))


def interpolate_field(image: np.ndarray, parity: int) -> np.ndarray:
    """A frame holding only field `parity` (0: the even lines, 1: the odd ones), the other lines interpolated."""
    field = image[parity::2].astype(np.uint16)
    position = (np.arange(image.shape[0]) - parity) / 2  # each line's place among the field's lines
    below = np.clip(np.floor(position), 0, len(field) - 1).astype(int)
    above = np.clip(np.ceil(position), 0, len(field) - 1).astype(int)
    return ((field[below] + field[above] + 1) // 2).astype(image.dtype)


@dataclass(frozen=True)
class View:
    """How a video's frames are turned into the RGB images analysis sees (see the module docstring)."""

    width: int
    """Coded width and height."""
    height: int
    square: int
    """Width in square pixels (equals `width` unless anamorphic)."""
    orientation: Orientation = Orientation()
    field: int | None = None
    """The first field's parity (0 top, 1 bottom) when interlaced frames show one field; None otherwise."""

    @property
    def shown_size(self) -> tuple[int, int]:
        """(width, height) of the images analysis sees."""
        return self.orientation.shown_size(self.square, self.height)

    def picture(self, frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
        """The frame as an (H, W, 3) uint8 RGB image as shown; `size` = (width, height) as shown scales
        further with area averaging (cheap analysis passes)."""
        if size is None:
            width, height = self.square, self.height
            interpolation = CONVERSION
        else:
            width, height = size[::-1] if self.orientation.transposes else size
            interpolation = Interpolation.AREA | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
        rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation=interpolation).to_ndarray()
        if self.field is not None and height == self.height:
            rgb = interpolate_field(rgb, self.field)
        return self.orientation.apply(rgb)

    def region(self, frame: av.VideoFrame, left: int, top: int, right: int, bottom: int,
               like: av.VideoFrame | None = None) -> np.ndarray:
        """`picture(frame)[top:bottom, left:right]` (shown pixels, clipped to the picture), converting only
        that part of the frame and a margin around it: the crop and paste stages need the face's pixels,
        and converting a whole 1080p frame to RGB costs more than decoding it.

        Exact: the margin (`REGION_MARGIN`, whole chroma samples) covers swscale's chroma interpolation,
        so every returned pixel equals the whole frame's, provided the part has the frame's chroma siting:
        give a `carrier` of the frame's stream as `like` (PyAV cannot set the siting of a new frame, and
        swscale places chroma by it: H.264's left-sited chroma read as centred is up to 12 levels off at
        edges). Anamorphic and one-field views, odd sizes of subsampled formats and layouts without a plane
        per component convert the whole frame.
        """
        shown_width, shown_height = self.shown_size
        left, top, right, bottom = max(0, left), max(0, top), min(shown_width, right), min(shown_height, bottom)
        format_ = frame.format
        if self.square != self.width or self.field is not None or not editable(format_):
            return self.picture(frame)[top:bottom, left:right]
        steps = [_subsampling(format_, plane) for plane in range(len(format_.components))]
        step_x, step_y = max(s[0] for s in steps), max(s[1] for s in steps)
        if frame.width % step_x or frame.height % step_y:  # chroma is scaled by another ratio in every part
            return self.picture(frame)[top:bottom, left:right]
        x0, y0, x1, y1 = self.orientation.undo_rect(left, top, right, bottom, self.shown_size)
        part_x0 = max(0, x0 - REGION_MARGIN) // step_x * step_x
        part_y0 = max(0, y0 - REGION_MARGIN) // step_y * step_y
        part_x1 = min(frame.width, x1 + REGION_MARGIN)
        part_y1 = min(frame.height, y1 + REGION_MARGIN)
        part_x1 += (-part_x1) % step_x
        part_y1 += (-part_y1) % step_y
        part_size = part_x1 - part_x0, part_y1 - part_y0
        part = av.VideoFrame(*part_size, format_.name) if like is None else like.reformat(
            *part_size, format=format_.name, interpolation=Interpolation.POINT)  # the siting of `like`
        for name in ("colorspace", "color_range", "color_primaries", "color_trc"):
            setattr(part, name, getattr(frame, name))
        for plane, (target, source) in enumerate(zip(plane_arrays(part), plane_arrays(frame))):
            sub_x, sub_y = steps[plane]
            row, column = part_y0 // sub_y, part_x0 // sub_x
            target[:] = source[row:row + target.shape[0], column:column + target.shape[1]]
        rgb = part.reformat(format="rgb24", interpolation=CONVERSION).to_ndarray()
        return self.orientation.apply(rgb[y0 - part_y0:y1 - part_y0, x0 - part_x0:x1 - part_x0])

    def crop(self, frame: av.VideoFrame, x0: int, y0: int, side: int, size: int) -> np.ndarray | None:
        """`crop.crop_pixels(picture(frame), x0, y0, side, size)` resampled from the frame's own planes and
        converted to RGB only at the crop's size: the crop stage's cost no longer grows with the face's area
        in the frame (a 1080p face box converted to RGB whole cost about 4 ms, its resample about 2 ms more).

        Luma is resampled exactly as the RGB path resamples (the same window, area averaging when shrinking,
        bicubic when enlarging); chroma is area-averaged then placed with sub-pixel accuracy at its siting
        (`CHROMA_SITING`), so the crop differs from the RGB path's by the order of its rounding (about half a
        level on average on the sample, `tests/test_media_regions.py`). None where this is not covered
        (turned, anamorphic or one-field views, RGB or grey layouts, matrices `rgb_matrix` lacks): the caller
        takes the RGB path."""
        format_ = frame.format
        components = list(format_.components)
        if (not self.orientation.identity or self.square != self.width or self.field is not None
                or not editable(format_) or format_.is_rgb or len(components) < 3):
            return None
        full_range = frame.color_range == FULL_RANGE or format_.name.startswith("yuvj")
        forward = rgb_matrix(format_, frame.colorspace, full_range)
        if forward is None:
            return None
        inverse = np.linalg.inv(forward[:, :3])
        to_rgb = np.concatenate([inverse, -inverse @ forward[:, 3:]], axis=1)
        planes = plane_arrays(frame)
        # output pixel u shows the luma position x0 - 0.5 + (u + 0.5) * side / size (pixel centres at integers)
        step = side / size
        start_x, start_y = x0 - 0.5 + 0.5 * step, y0 - 0.5 + 0.5 * step
        siting_x, siting_y = CHROMA_SITING["jpeg" if format_.name.startswith("yuvj") else "mpeg"]
        resampled = []
        for component in components[:3]:
            plane = planes[component.plane]
            sub_x, sub_y = _subsampling(format_, component.plane)
            if (sub_x, sub_y) == (1, 1):
                resampled.append(crop_pixels(plane, x0, y0, side, size))
                continue
            offset_x = siting_x * (sub_x - 1) / 2  # luma position of chroma sample 0
            offset_y = siting_y * (sub_y - 1) / 2
            resampled.append(_sample_plane(plane, step / sub_x, (start_x - offset_x) / sub_x, step / sub_y,
                                           (start_y - offset_y) / sub_y, size))
        colour = cv2.transform(cv2.merge(resampled), to_rgb)
        if colour.dtype != np.uint8:
            colour = np.minimum(colour, 255).astype(np.uint8)
        return colour

    def grey(self, frame: av.VideoFrame, left: int, top: int, right: int, bottom: int) -> np.ndarray | None:
        """The luma of `picture(frame)[top:bottom, left:right]` (clipped) in full-range 8-bit levels, read from
        the decoded plane without converting colour: a grey image for the landmark model, which reads RGB as
        the mean of R, G and B (luma weighs them differently: see `faces.DlibDetector.landmarks_in`). Adding
        chroma to match that mean cost 2.2 ms more per 1080p face for 0.15 px less landmark drift. None where the
        view turns, resamples or interpolates the picture, or the format has no 8-bit luma plane."""
        format_ = frame.format
        components = list(format_.components)
        if (not self.orientation.identity or self.square != self.width or self.field is not None
                or not editable(format_) or format_.is_rgb or len(components) < 3 or components[0].bits != 8):
            return None
        width, height = self.shown_size
        luma = plane_arrays(frame)[components[0].plane]
        part = luma[max(0, top):min(height, bottom), max(0, left):min(width, right)]
        if frame.color_range == FULL_RANGE or format_.name.startswith("yuvj"):
            return np.ascontiguousarray(part)
        return cv2.LUT(part, LIMITED_TO_FULL)

    @staticmethod
    def carrier(frame: av.VideoFrame) -> av.VideoFrame:
        """A tiny frame with every property of `frame` (chroma siting included) for `region`'s `like`: one
        per stream serves every frame of it."""
        return frame.reformat(CARRIER_SIZE, CARRIER_SIZE, interpolation=Interpolation.POINT)

    def to_coded(self, left: int, top: int, pixels: np.ndarray, weights: np.ndarray) -> tuple[int, int, np.ndarray,
                                                                                              np.ndarray]:
        """An overlay (RGB pixels and blend weights placed at left, top of the shown image) in coded pixels."""
        height, width = weights.shape
        x0, y0, x1, y1 = self.orientation.undo_rect(left, top, left + width, top + height, self.shown_size)
        pixels, weights = self.orientation.undo(pixels), self.orientation.undo(weights)
        if self.square == self.width:
            return x0, y0, pixels, weights
        # square columns x0..x1 back to coded ones: coded column u shows at square x = (u + 0.5) s - 0.5
        scale = self.square / self.width
        first = max(0, int(np.floor((x0 + 0.5) / scale - 0.5)))
        last = min(self.width, int(np.ceil((x1 - 0.5) / scale - 0.5)) + 1)
        columns = (np.arange(first, last, dtype=np.float32) + 0.5) * scale - 0.5 - x0
        map_x = np.broadcast_to(columns, (y1 - y0, last - first)).astype(np.float32)
        map_y = np.broadcast_to(np.arange(y1 - y0, dtype=np.float32)[:, None], map_x.shape).astype(np.float32)
        pixels = cv2.remap(pixels, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        weights = cv2.remap(weights, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return first, y0, pixels, weights


# --- writing an overlay into a frame's own planes -------------------------------------------------

def editable(format_: av.VideoFormat) -> bool:
    """Whether every component of a pixel format has a plane of its own (what `blend_overlay` writes into)."""
    components = format_.components
    return (not format_.has_palette and not format_.is_bit_stream and not format_.is_big_endian
            and len({c.plane for c in components}) == len(components)
            and all(c.bits <= 16 for c in components))


def editable_format(format_: av.VideoFormat) -> str:
    """The format itself when editable, else the nearest planar one (packed, paletted or semi-planar layouts)."""
    if editable(format_):
        return format_.name
    deep = max(c.bits for c in format_.components) > 8
    alpha = any(c.is_alpha for c in format_.components)
    if format_.is_rgb or format_.has_palette:
        return ("gbrap16le" if alpha else "gbrp16le") if deep else ("gbrap" if alpha else "gbrp")
    if len(format_.components) == 1:
        return "gray16le" if deep else "gray"
    return ("yuva444p16le" if alpha else "yuv444p16le") if deep else ("yuva444p" if alpha else "yuv444p")


def plane_arrays(frame: av.VideoFrame) -> list[np.ndarray]:
    """Writable numpy views of an editable frame's planes, each (plane height, plane width), in plane order."""
    format_ = frame.format
    arrays = []
    for component in sorted(format_.components, key=lambda c: c.plane):
        plane = frame.planes[component.plane]
        dtype = np.dtype("<u2") if component.bits > 8 else np.dtype(np.uint8)
        flat = np.frombuffer(plane, dtype)
        rows = flat[: plane.height * (plane.line_size // dtype.itemsize)].reshape(plane.height, -1)
        arrays.append(rows[:, : plane.width])
    return arrays


def _subsampling(format_: av.VideoFormat, plane: int) -> tuple[int, int]:
    component = next(c for c in format_.components if c.plane == plane)
    if not component.is_chroma:
        return 1, 1
    probe = av.VideoFormat(format_.name, 64, 64).components
    chroma = next(c for c in probe if c.plane == plane)
    return 64 // chroma.width, 64 // chroma.height


LUMA_WEIGHTS = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087),
                9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
"""(Kr, Kb) of each AVColorSpace the way back computes itself: BT.709, FCC, BT.601 (bt470bg, smpte170m),
SMPTE 240M, BT.2020. Untagged frames use BT.601, as swscale's conversion to RGB assumed."""


def _sample_plane(plane: np.ndarray, step_x: float, start_x: float, step_y: float, start_y: float,
                  size: int) -> np.ndarray:
    """(size, size) samples of `plane`: output pixel (u, v) at plane position (start_x + u step_x, start_y +
    v step_y), pixel centres at integers, edges replicated. Shrinking area-averages first (no aliasing), so
    the final bilinear placement only moves samples by a fraction of a pixel."""
    height, width = plane.shape
    if step_x > 1 or step_y > 1:
        x_low, y_low = int(np.floor(start_x - step_x)), int(np.floor(start_y - step_y))
        x_high = int(np.ceil(start_x + step_x * size)) + 1
        y_high = int(np.ceil(start_y + step_y * size)) + 1
        window = plane[max(0, y_low):min(height, y_high), max(0, x_low):min(width, x_high)]
        if window.size == 0:
            raise ValueError("crop box lies entirely outside the frame")
        window = cv2.copyMakeBorder(window, max(0, -y_low), max(0, y_high - height), max(0, -x_low),
                                    max(0, x_high - width), cv2.BORDER_REPLICATE)
        columns = max(1, round((x_high - x_low) / max(step_x, 1.0)))
        rows = max(1, round((y_high - y_low) / max(step_y, 1.0)))
        plane = cv2.resize(window, (columns, rows), interpolation=cv2.INTER_AREA)
        ratio_x, ratio_y = columns / (x_high - x_low), rows / (y_high - y_low)
        start_x, step_x = (start_x - x_low + 0.5) * ratio_x - 0.5, step_x * ratio_x
        start_y, step_y = (start_y - y_low + 0.5) * ratio_y - 0.5, step_y * ratio_y
    transform = np.array([[step_x, 0.0, start_x], [0.0, step_y, start_y]])
    return cv2.warpAffine(plane, transform, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def rgb_matrix(format_: av.VideoFormat, colorspace: int, full_range: bool) -> np.ndarray | None:
    """(3, 4) affine map from (R, G, B, 1), RGB in 0..255, to the first three components of `format_` in their
    own levels, by the standard's equations; None for a matrix they do not cover."""
    components = list(format_.components)  # in component order: R, G, B or Y, Cb, Cr (then alpha)
    matrix = np.zeros((3, 4), np.float64)
    if format_.is_rgb:
        for index, c in enumerate(components[:3]):
            matrix[index, index] = ((1 << c.bits) - 1) / 255.0
        return matrix
    weights = LUMA_WEIGHTS.get(int(colorspace), LUMA_WEIGHTS[5] if int(colorspace) == 2 else None)
    if weights is None:
        return None
    kr, kb = weights
    luma = np.array([kr, 1 - kr - kb, kb])
    signals = [luma, (np.array([0.0, 0.0, 1.0]) - luma) / (2 * (1 - kb)),
               (np.array([1.0, 0.0, 0.0]) - luma) / (2 * (1 - kr))]
    for index, c in enumerate(components[:3]):
        top, scale = (1 << c.bits) - 1, 1 << (c.bits - 8)
        if index == 0:
            gain, offset = (top, 0.0) if full_range else (219 * scale, 16 * scale)
        else:
            gain, offset = (top if full_range else 224 * scale), 1 << (c.bits - 1)
        matrix[index, :3], matrix[index, 3] = signals[index] * gain / 255.0, offset
    return matrix


def rgb_to_planes(rgb: np.ndarray, format_: av.VideoFormat, colorspace: int,
                  full_range: bool) -> list[np.ndarray] | None:
    """(h, w, 3) uint8 RGB as the float planes of `format_` (plane order, each at its own subsampled size),
    by the standard's equations; None for a matrix they do not cover (swscale converts those).

    The inverse of the decoding to RGB exactly, where swscale's own way back is not: its full-range
    path comes back about 0.17 levels dark on average. One affine transform per pixel (`cv2.transform`)
    gives each component in its own levels; a subsampled component is computed from the RGB area-averaged
    to its size (the same values, the map being affine, at a quarter of the pixels for 4:2:0)."""
    matrix = rgb_matrix(format_, colorspace, full_range)
    if matrix is None:
        return None
    components = list(format_.components)  # in component order: R, G, B or Y, Cb, Cr (then alpha)
    colour = rgb.astype(np.float32)
    plane_of = {c.plane: index for index, c in enumerate(components[:3])}
    sized = av.VideoFormat(format_.name, rgb.shape[1], rgb.shape[0]).components
    averaged: dict[tuple[int, int], np.ndarray] = {(rgb.shape[1], rgb.shape[0]): colour}
    planes = []
    for c in sorted(sized, key=lambda c: c.plane):
        if c.plane not in plane_of:
            planes.append(np.zeros((1, 1), np.float32))  # alpha: never blended
            continue
        if (c.width, c.height) not in averaged:  # both chroma planes share theirs
            averaged[c.width, c.height] = cv2.resize(colour, (c.width, c.height), interpolation=cv2.INTER_AREA)
        index = plane_of[c.plane]
        planes.append(cv2.transform(averaged[c.width, c.height], matrix[index:index + 1]))
    return planes


def _trimmed(left: int, top: int, pixels: np.ndarray, weights: np.ndarray, step_x: int,
             step_y: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The overlay cut to where its weights are not zero (a face mask fills about half of its box), grown
    to whole chroma samples within the overlay: every sample it changes is computed from the same pixels
    and weights as before, and the conversion from RGB works on fewer pixels."""
    active = weights > 0
    rows, columns = np.flatnonzero(active.any(axis=1)), np.flatnonzero(active.any(axis=0))
    if not len(rows):
        return left, top, pixels[:0, :0], weights[:0, :0]
    height, width = weights.shape
    x0 = max(left, (left + int(columns[0])) // step_x * step_x)
    y0 = max(top, (top + int(rows[0])) // step_y * step_y)
    x1 = min(left + width, -(-(left + int(columns[-1]) + 1) // step_x) * step_x)
    y1 = min(top + height, -(-(top + int(rows[-1]) + 1) // step_y) * step_y)
    return x0, y0, pixels[y0 - top:y1 - top, x0 - left:x1 - left], weights[y0 - top:y1 - top, x0 - left:x1 - left]


def blend_overlay(frame: av.VideoFrame, left: int, top: int, pixels: np.ndarray, weights: np.ndarray) -> av.VideoFrame:
    """A frame with RGB `pixels` blended in by `weights` (both (h, w) at left, top, coded pixels).

    Only the overlay's region is converted from RGB (to the frame's own format, matrix and range);
    the frame's planes are blended there with the weights (averaged over each chroma sample's
    pixels) and are untouched everywhere else, so pixels outside the overlay keep their decoded
    values bit for bit. The decoded frame itself is never written (its buffers may be the decoder's
    references): its buffers are copied first, keeping every property and side data of the frame.
    """
    if not editable(frame.format):
        frame = frame.reformat(format=editable_format(frame.format), interpolation=CONVERSION)
    frame.make_writable()  # a copy of buffers the decoder still holds: its references stay intact
    format_ = frame.format
    steps = [_subsampling(format_, plane) for plane in range(len(format_.components))]
    step_x, step_y = max(s[0] for s in steps), max(s[1] for s in steps)
    left, top, pixels, weights = _trimmed(left, top, pixels, weights, step_x, step_y)
    if weights.size == 0:
        return frame
    # the region grown to whole chroma samples and clipped to the frame
    x0, y0 = max(0, left - left % step_x), max(0, top - top % step_y)
    right, bottom = left + weights.shape[1], top + weights.shape[0]
    x1 = min(frame.width, right + (-right) % step_x)
    y1 = min(frame.height, bottom + (-bottom) % step_y)
    if x0 >= x1 or y0 >= y1:
        return frame
    canvas = np.zeros((y1 - y0, x1 - x0), np.float32)
    colour = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    sx0, sy0 = max(x0, left), max(y0, top)
    sx1, sy1 = min(x1, right), min(y1, bottom)
    if sx0 >= sx1 or sy0 >= sy1:
        return frame
    canvas[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = weights[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
    inner = pixels[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
    colour[:] = cv2.copyMakeBorder(inner, sy0 - y0, y1 - sy1, sx0 - x0, x1 - sx1, cv2.BORDER_REPLICATE)
    full_range = frame.color_range == FULL_RANGE or format_.name.startswith("yuvj")
    sources = rgb_to_planes(colour, format_, frame.colorspace, full_range)
    if sources is None:
        region = av.VideoFrame.from_ndarray(colour, format="rgb24").reformat(
            format=format_.name, dst_colorspace=sws_matrix(frame.colorspace),
            dst_color_range=frame.color_range or None, interpolation=CONVERSION)
        sources = plane_arrays(region)
    targets = plane_arrays(frame)
    weights_by_plane: dict[tuple, np.ndarray] = {}
    for plane, (target, source) in enumerate(zip(targets, sources)):
        component = next(c for c in format_.components if c.plane == plane)
        if component.is_alpha:
            continue  # the source's transparency is kept
        sub_x, sub_y = steps[plane]
        px0, py0 = x0 // sub_x, y0 // sub_y
        area = target[py0:py0 + source.shape[0], px0:px0 + source.shape[1]]
        if (sub_x, sub_y, area.shape) not in weights_by_plane:  # both chroma planes share theirs
            weight = canvas if (sub_x, sub_y) == (1, 1) else cv2.resize(
                canvas, (area.shape[1], area.shape[0]), interpolation=cv2.INTER_AREA)
            weights_by_plane[sub_x, sub_y, area.shape] = weight[: area.shape[0], : area.shape[1]]
        weight = weights_by_plane[sub_x, sub_y, area.shape]
        if not weight.any():
            continue
        # where a weight is 0 this gives the sample back exactly (x + (y - x) * 0), so the whole area is written
        original = area.astype(np.float32)
        mixed = cv2.add(original, cv2.multiply(cv2.subtract(source[: area.shape[0], : area.shape[1]], original),
                                               weight))
        np.rint(mixed, out=mixed)
        np.clip(mixed, 0, (1 << component.bits) - 1, out=mixed)
        area[:] = mixed
    return frame


def pad_frame(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """A copy of an editable frame enlarged to width x height by repeating its last column and row."""
    if not editable(frame.format):
        frame = frame.reformat(format=editable_format(frame.format), interpolation=CONVERSION)
    padded = av.VideoFrame(width, height, frame.format.name)
    for name in ("colorspace", "color_range", "color_primaries", "color_trc"):
        setattr(padded, name, getattr(frame, name))
    for target, source in zip(plane_arrays(padded), plane_arrays(frame)):
        rows, columns = target.shape
        target[:] = np.pad(source, ((0, rows - source.shape[0]), (0, columns - source.shape[1])), mode="edge")
    return padded
