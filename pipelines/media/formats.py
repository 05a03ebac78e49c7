"""What an edited video is written as: codec, pixel format and encoder settings that follow its source.

By default the output keeps what the source is: its codec (H.264 stays H.264, HEVC, VP9, AV1,
ProRes and MPEG-2 likewise), its chroma subsampling and bit depth (10-bit stays 10-bit, with its
transfer and mastering-display metadata), its colour tags and its scan (interlaced stays
interlaced, with the same field order). Where that cannot be, the nearest choice is taken and
said in `OutputFormat.notes` (the results row's `format_notes`): a container that cannot hold the
codec, an encoder here without that depth, a codec with no encoder here, and odd frame sizes (4:2:0,
which players need, takes even sizes only: the frame is padded by repeating its last column or
row). `--codec`, `--pix-fmt`, `--crf` and `--preset` override the choice.

Encoder settings shared by every codec: no B-frames or other reordering across a segment's end
(segments are encoded independently and joined packet by packet), the source's time base, and
the source's colour tags, so players convert the pixels back with the matrix they were made in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FULL_RANGE = 2
"""AVCOL_RANGE_JPEG: full-range YUV (as phones record, and as FFmpeg's old yuvj* formats mean)."""

ENCODERS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1", "prores": "prores_ks",
            "mpeg2video": "mpeg2video"}
"""The encoder of each codec an output can have (FFmpeg codec name -> encoder)."""

CODEC_CHOICES = ("auto", *ENCODERS)
"""--codec: auto (the source's codec when it is one of these, else H.264) or a codec name."""

CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".ts": "mpegts",
              ".m2ts": "mpegts", ".mts": "mpegts", ".mpg": "mpeg", ".mpeg": "mpeg"}
"""Output containers by file extension: the three general ones (.mp4, .mov, .mkv) and the source's own
kinds, so that an archive's files come back in the container they came in."""

HOLDS = {
    "mp4": {"h264", "hevc", "vp9", "av1", "mpeg2video"},
    "mov": {"h264", "hevc", "prores", "mpeg2video"},
    "matroska": set(ENCODERS),
    "webm": {"vp9", "av1"},
    "mpegts": {"h264", "hevc", "mpeg2video"},
    "mpeg": {"mpeg2video"},
}
"""Which output codecs each container holds (as players expect them there)."""

FALLBACKS = {"vp9": ("av1", "hevc", "h264"), "av1": ("vp9", "hevc", "h264"), "prores": ("h264", "hevc"),
             "mpeg2video": ("h264",), "hevc": ("h264",), "h264": ("hevc",)}
"""Where a source's codec cannot be kept (container, depth), the codecs tried next, nearest first."""

NVENC = {"h264": "h264_nvenc", "hevc": "hevc_nvenc"}
"""The GPU encoder of each codec that has one (`--encoder`)."""

ENCODER_CHOICES = ("auto", "cpu", "nvenc")
"""--encoder: auto (NVENC where every node has a GPU and it opens, else the CPU's), cpu, or nvenc."""

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
"""--preset: x264/x265 speed names, mapped onto the speed settings of the other encoders."""

_VP9_SPEED = dict(zip(PRESETS, ("8", "8", "7", "6", "5", "4", "2", "1", "0")))
_SVT_AV1_PRESET = dict(zip(PRESETS, ("12", "11", "10", "9", "8", "7", "5", "4", "2")))
_NVENC_PRESETS = dict(zip(PRESETS, ("p1", "p2", "p3", "p4", "p4", "p5", "p6", "p7", "p7")))
_PRORES_PROFILES = {"Proxy": "proxy", "LT": "lt", "Standard": "standard", "HQ": "hq", "4444": "4444",
                    "XQ": "4444xq", "4444 XQ": "4444xq"}


def container_of(path: str | Path) -> str:
    """The muxer for an output file name; ValueError naming the extensions for any other."""
    suffix = Path(str(path)).suffix.lower()
    if suffix not in CONTAINERS:
        raise ValueError(f"{path}: output must end in one of {', '.join(CONTAINERS)}")
    return CONTAINERS[suffix]


@dataclass(frozen=True)
class OutputFormat:
    """How one edited video is encoded (every chunk of it the same, so the segments join)."""

    codec: str
    encoder: str
    pix_fmt: str
    width: int
    """Coded size written: the source's, padded to even sizes where the pixel format needs it."""
    height: int
    options: dict[str, str] = field(default_factory=dict)
    """Encoder options (AVOptions of the encoder)."""
    colour: dict[str, int] = field(default_factory=dict)
    """colorspace, color_range, color_primaries, color_trc written (the source's)."""
    field_order: int = 0
    """FFmpeg's AVFieldOrder for the container (0 unknown, 1 progressive, 2 tt, 3 bb, 4 tb, 5 bt)."""
    notes: tuple[str, ...] = ()
    """Every choice that departs from the source, in words (empty when the output is the source's format)."""

    @property
    def frame_rate_clock(self) -> bool:
        """Whether the encoder counts time in frames (MPEG-2 takes only its standard frame rates as its clock)."""
        return self.codec == "mpeg2video"

    @property
    def text(self) -> str:
        return f"{self.codec} {self.pix_fmt}"


@dataclass(frozen=True)
class _Shape:
    shift_x: int
    shift_y: int
    depth: int
    alpha: bool
    rgb: bool
    grey: bool


def _shape(name: str) -> _Shape:
    import av  # here, not at the top: the options import this module, and `--help` stays fast

    format_ = av.VideoFormat(name, 64, 64)
    components = format_.components
    chroma = [c for c in components if c.is_chroma]
    shift_x = (64 // chroma[0].width).bit_length() - 1 if chroma else 0
    shift_y = (64 // chroma[0].height).bit_length() - 1 if chroma else 0
    return _Shape(shift_x, shift_y, max(c.bits for c in components), any(c.is_alpha for c in components),
                  bool(format_.is_rgb), len(components) - any(c.is_alpha for c in components) == 1)


def _nearest_format(source: str, offered: list[str], four_two_zero: bool) -> str:
    """The offered pixel format nearest the source's: the same kind (YUV, RGB, grey), then nothing lost
    (chroma detail, depth, alpha), then nothing added; `four_two_zero` asks for 4:2:0 chroma at most."""
    want = _shape(source)
    want_x, want_y = (max(1, want.shift_x), max(1, want.shift_y)) if four_two_zero else (want.shift_x, want.shift_y)

    def cost(name: str) -> tuple:
        have = _shape(name)
        lost_chroma = max(0, have.shift_x - want_x) + max(0, have.shift_y - want_y)
        extra_chroma = max(0, want_x - have.shift_x) + max(0, want_y - have.shift_y)
        return (have.rgb != want.rgb, have.grey != want.grey, lost_chroma, max(0, want.depth - have.depth),
                want.alpha and not have.alpha, extra_chroma, abs(have.depth - want.depth), have.alpha != want.alpha,
                name)

    return min(offered, key=cost)


def _plain(name: str) -> tuple[str, bool]:
    """yuvj* (FFmpeg's old full-range names) as the plain format plus a full-range flag."""
    return (name.replace("yuvj", "yuv", 1), True) if name.startswith("yuvj") else (name, False)


def is_pixel_format(name: str) -> bool:
    """Whether FFmpeg knows the pixel format `name` ('auto' too: the source's own)."""
    if name == "auto":
        return True
    import av  # only for a named format: `portrait --help` stays fast

    try:
        av.VideoFormat(name)
    except (ValueError, TypeError):
        return False
    return True


def encoder_formats(encoder: str) -> list[str]:
    """The pixel formats an encoder of this PyAV build takes."""
    import av

    return [f.name for f in (av.Codec(encoder, "w").video_formats or [])]


def choose_output(info, container: str, *, codec: str = "auto", pix_fmt: str = "auto", crf: int = 18,
                  preset: str = "veryfast", nvenc: bool = False) -> OutputFormat:
    """The output format of an edited copy of `info` (a `video.VideoInfo`) in `container`.

    With `nvenc`, H.264 and HEVC are encoded by the GPU's encoder (`NVENC`) at the same pixel format
    and quality target (its constant-quality mode at `crf`), where it takes that format and the scan
    is progressive; otherwise by the CPU's, and a note says why.

    Raises ValueError naming the option when an explicit --codec or --pix-fmt cannot be written
    into that container or by that encoder.
    """
    notes: list[str] = []
    source_format, source_full = _plain(info.pix_fmt or "yuv420p")
    odd = info.width % 2 or info.height % 2
    if codec != "auto":
        if codec not in ENCODERS:
            raise ValueError(f"--codec {codec}: not one of {', '.join(CODEC_CHOICES)}")
        if codec not in HOLDS[container]:
            raise ValueError(f"--codec {codec}: a {container} file cannot hold it; name the output .mkv or .mov")
        chosen = codec
    else:
        chosen = info.codec if info.codec in ENCODERS else "h264"
        if info.codec not in ENCODERS:
            notes.append(f"{info.codec or 'the source codec'} has no encoder here: encoded as h264")
        candidates = [chosen, *FALLBACKS.get(chosen, ())]
        holdable = [c for c in candidates if c in HOLDS[container]]
        if not holdable:
            holdable = [c for c in ("h264", "hevc", "vp9", "av1", "mpeg2video") if c in HOLDS[container]]
        if holdable[0] != chosen:
            notes.append(f"a {container} file cannot hold {chosen}: encoded as {holdable[0]} (name the output "
                         f".mkv to keep {chosen})")
        chosen = holdable[0]
        if pix_fmt == "auto":  # keep the depth: the first holdable codec whose encoder has it
            depth = _shape(source_format).depth
            for candidate in holdable:
                best = _nearest_format(source_format, encoder_formats(ENCODERS[candidate]), bool(odd))
                if _shape(best).depth >= depth:
                    if candidate != chosen:
                        notes.append(f"the {ENCODERS[chosen]} encoder here has no {depth}-bit formats: encoded as "
                                     f"{candidate} to keep the depth")
                    chosen = candidate
                    break
    encoder = ENCODERS[chosen]
    offered = encoder_formats(encoder)
    if pix_fmt != "auto":
        if pix_fmt not in offered:
            raise ValueError(f"--pix-fmt {pix_fmt}: the {encoder} encoder takes {', '.join(offered)}")
        target = pix_fmt
    else:
        target = _nearest_format(source_format, [f for f in offered if not f.startswith(("yuvj", "nv"))] or offered,
                                 bool(odd))
        if _plain(target)[0] != source_format:
            notes.append(f"pixel format {info.pix_fmt} -> {target}" + (
                " (4:2:0, what players take, for an odd frame size)" if odd and target != source_format else
                f" (the nearest the {encoder} encoder takes)"))
    width, height = info.width, info.height
    shape = _shape(target)
    width += (-width) % (1 << shape.shift_x)
    height += (-height) % (1 << shape.shift_y)
    if (width, height) != (info.width, info.height):
        notes.append(f"{info.width}x{info.height} has odd sides, which {target} cannot hold: padded to "
                     f"{width}x{height} by repeating the last column/row")
    colour = dict(info.colour)
    if source_full:
        colour["color_range"] = FULL_RANGE
    options, more = _encoder_options(chosen, info, crf, preset, target)
    notes.extend(more)
    if nvenc:
        gpu_encoder = NVENC.get(chosen)
        if gpu_encoder is None:
            notes.append(f"{chosen} has no GPU encoder: encoded on the CPU")
        elif info.field_order:
            notes.append("interlaced: encoded on the CPU, which codes fields")
        elif info.hdr_mastering or info.hdr_light:
            notes.append("HDR mastering metadata: encoded on the CPU, which writes it")
        elif target not in encoder_formats(gpu_encoder):
            notes.append(f"{gpu_encoder} does not take {target}: encoded on the CPU")
        else:
            encoder, options = gpu_encoder, _nvenc_options(crf, preset)
    field_order = _FIELD_ORDERS.get(info.field_order, 0) if info.field_order else 1
    return OutputFormat(codec=chosen, encoder=encoder, pix_fmt=target, width=width, height=height, options=options,
                        colour=colour, field_order=field_order, notes=tuple(notes))


_FIELD_ORDERS = {"tt": 2, "bb": 3, "tb": 4, "bt": 5}


def _nvenc_options(crf: int, preset: str) -> dict[str, str]:
    """NVENC's constant-quality mode at the CRF, no B-frames (segments join packet by packet)."""
    return {"rc": "vbr", "cq": str(crf), "b": "0", "bf": "0", "preset": _NVENC_PRESETS.get(preset, "p4"),
            "tune": "hq"}


def _encoder_options(codec: str, info, crf: int, preset: str, pix_fmt: str) -> tuple[dict[str, str], list[str]]:
    """AVOptions of the codec's encoder for the quality, speed, scan and HDR metadata; notes where they differ."""
    top_first = info.field_order in ("tt", "tb")
    notes: list[str] = []
    if codec == "h264":
        params = [("tff=1" if top_first else "bff=1")] if info.field_order else []
        options = {"crf": str(crf), "preset": preset, "bf": "0"}
        if params:
            options["x264-params"] = ":".join(params)
        return options, notes
    if codec == "hevc":
        params = ["bframes=0", "log-level=error"]
        if info.hdr_mastering:
            params.append(f"master-display={info.hdr_mastering}")
        if info.hdr_light:
            params.append(f"max-cll={info.hdr_light}")
        if info.field_order:
            notes.append("hevc: interlaced frames are coded as frames (both fields woven), the field order tagged")
        return {"crf": str(crf), "preset": preset, "x265-params": ":".join(params)}, notes
    if codec == "vp9":
        return {"crf": str(crf), "b": "0", "deadline": "good", "cpu-used": _VP9_SPEED.get(preset, "4"),
                "row-mt": "1", "lag-in-frames": "0", "auto-alt-ref": "0"}, notes
    if codec == "av1":
        return {"crf": str(crf), "preset": _SVT_AV1_PRESET.get(preset, "7"),
                "svtav1-params": "pred-struct=1"}, notes
    if codec == "prores":
        profile = _PRORES_PROFILES.get(info.profile or "", "4444" if pix_fmt.startswith("yuv444") else "hq")
        notes.append(f"prores: quality follows the profile ({profile}); --crf does not apply")
        return {"profile": profile, "vendor": "apl0"}, notes
    if codec == "mpeg2video":
        quantiser = max(1, min(31, round(crf / 6)))
        flags = "+qscale" + ("+ildct+ilme" if info.field_order else "")
        notes.append(f"mpeg2video: --crf {crf} is a fixed quantiser q={quantiser}")
        return {"flags": flags, "global_quality": str(quantiser * 118), "bf": "0"}, notes
    raise ValueError(f"no encoder settings for {codec}")


__all__ = ["CODEC_CHOICES", "CONTAINERS", "ENCODER_CHOICES", "ENCODERS", "HOLDS", "NVENC", "OutputFormat",
           "choose_output", "container_of"]
