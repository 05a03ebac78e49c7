"""Parse the three kinds of metadata input into `ClipRequest`s, never stopping on bad input.

Inputs:
1. VoxCeleb1/2 metadata trees: ``txt/<identity>/<youtube id>/<utterance>.txt`` (`parse_voxceleb_tree`).
2. Clip tables, CSV/TSV or Parquet, in the style of ``vox-metadata.csv`` (`parse_clip_table`).
3. Plain lists of video URLs, local files or video ids, one per line (`parse_url_list`).

Every parser returns ``(requests, failures)``: a malformed line or file becomes one `ParseFailure`
(recorded in the manifest with failure class ``bad_metadata``) and the rest of the input is still
parsed; repeated clips become ``duplicate_clip`` failures. `write_voxceleb_tree` writes metadata in
the VoxCeleb format, so tests and the demo can describe a sample video the way VoxCeleb would.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from pipelines.prepare.requests import MAX_KEY_LENGTH, VOX_FPS, ClipRequest, MetaBox, clip_id_for
from pipelines.prepare.download import DEFAULT_URL_TEMPLATE, resolve_url

BAD_METADATA = "bad_metadata"
DUPLICATE_CLIP = "duplicate_clip"

VOX1_REFERENCE_HEIGHT = 360.0
"""VoxCeleb1 boxes are pixels of the 360p version of each video."""

VOX1_TEST_IDENTITIES = frozenset(f"id{n}" for n in range(10270, 10310))
"""The 40 identities of the official VoxCeleb1 test split (id10270..id10309)."""

_ID = re.compile(r"[A-Za-z0-9_-]+")
_SPLIT = re.compile(r"[a-z0-9][a-z0-9-]*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_YOUTUBE_HOSTS = {"youtube.com", "www.youtube.com", "m.youtube.com", "youtu.be", "www.youtube-nocookie.com"}
_SLUG_LENGTH = 40

@dataclass(frozen=True)
class ParseFailure:
    """One input that could not become a clip: where it is (``file:line``) and why."""

    origin: str
    message: str
    failure_class: str = BAD_METADATA

    @property
    def record_id(self) -> str:
        """A manifest id for this failure, unique per input location (it has no usable clip id)."""
        return f"invalid:{self.origin}"


ParseResult = tuple[list[ClipRequest], list[ParseFailure]]


class _Invalid(ValueError):
    """Raised inside a parser for one bad line or file; turned into a `ParseFailure`."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


# ---------------------------------------------------------------------------------------------
# Splits and video references shared by all parsers


def assign_split(identity: str, test_fraction: float, seed: int = 0) -> str:
    """Return "test" for a stable, seed-dependent `test_fraction` of identities, else "train".

    Hash-based (not Python's salted `hash`) so that every process and every rerun agrees, and
    all clips of one identity land in the same split (no identity leaks between splits).
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if position < test_fraction else "train"


@dataclass(frozen=True)
class SplitPolicy:
    """How identities are split when the input has no split column.

    `test_identities` (e.g. `VOX1_TEST_IDENTITIES`) wins over the hash-based `test_fraction`.
    """

    test_fraction: float = 0.0
    seed: int = 0
    test_identities: Collection[str] | None = None

    def split_for(self, identity: str) -> str:
        if self.test_identities is not None:
            return "test" if identity in self.test_identities else "train"
        return assign_split(identity, self.test_fraction, self.seed)


def _slug_with_hash(name: str, full: str) -> str:
    """A short, path-safe id for a non-YouTube video: readable stem plus a hash of the full reference."""
    # '_' is replaced too: `safe_key` escapes it to four characters, and keys have a length limit.
    slug = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:_SLUG_LENGTH] or "video"
    return f"{slug}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"


def _youtube_id(url: str) -> str | None:
    parsed = urlparse(url)
    if (parsed.hostname or "").lower() not in _YOUTUBE_HOSTS:
        return None
    if parsed.hostname == "youtu.be":
        candidate = parsed.path.strip("/")
    elif parsed.path.startswith(("/shorts/", "/embed/")):
        candidate = parsed.path.split("/")[2]
    else:
        candidate = (parse_qs(parsed.query).get("v") or [""])[0]
    return candidate if _ID.fullmatch(candidate) else None


def resolve_video(value: str, base_dir: Path, url_template: str = DEFAULT_URL_TEMPLATE) -> tuple[str, str]:
    """Return ``(video_id, url)`` for a URL, an existing local file or a bare video id.

    YouTube URLs keep their video id; other URLs and local files get a readable, hashed id so that
    two files both called ``video.mp4`` stay distinct. Relative paths are resolved against
    `base_dir` (the directory of the list or table) and returned absolute.
    """
    value = value.strip()
    if not value:
        raise _Invalid("empty video reference")
    if _URL.fullmatch(value):
        youtube = _youtube_id(value)
        if youtube:
            return youtube, value
        return _slug_with_hash(Path(urlparse(value).path).stem, value), value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        resolved = str(path.resolve())
        return _slug_with_hash(path.stem, resolved), resolved
    if _ID.fullmatch(value):
        return value, resolve_url(value, url_template)
    raise _Invalid(f"{value!r} is neither a URL, an existing file nor a video id ([A-Za-z0-9_-]+)")


def _check_split(value: str) -> str:
    split = value.strip().lower()
    if not _SPLIT.fullmatch(split):
        raise _Invalid(f"split {value!r} must be lower-case letters, digits and '-' (it names a directory)")
    return split


def _finish(requests: list[ClipRequest], failures: list[ParseFailure]) -> ParseResult:
    """Reject clips whose key would not fit a shard member name, then drop duplicates."""
    fitting, too_long = [], []
    for request in requests:
        if len(request.key) <= MAX_KEY_LENGTH:
            fitting.append(request)
        else:
            too_long.append(
                ParseFailure(
                    request.origin,
                    f"clip id {request.clip_id!r} gives a key of {len(request.key)} characters, more than "
                    f"{MAX_KEY_LENGTH}; shorten the identity, video id or clip id",
                )
            )
    kept, duplicates = drop_duplicates(fitting)
    return kept, failures + too_long + duplicates


def drop_duplicates(requests: Iterable[ClipRequest]) -> ParseResult:
    """Keep the first request per clip id and per (video, span); later ones become failures."""
    kept: list[ClipRequest] = []
    failures: list[ParseFailure] = []
    by_id: dict[str, ClipRequest] = {}
    by_span: dict[tuple[str, float | None, float | None], ClipRequest] = {}
    for request in requests:
        span = (request.video_id, request.start_s, request.end_s)
        first = by_id.get(request.clip_id) or by_span.get(span)
        if first is not None:
            failures.append(
                ParseFailure(
                    request.origin,
                    f"clip {request.clip_id!r} repeats clip {first.clip_id!r} from {first.origin} "
                    "(same clip id or same video and span); the first one is kept",
                    DUPLICATE_CLIP,
                )
            )
            continue
        by_id[request.clip_id] = request
        by_span[span] = request
        kept.append(request)
    return kept, failures


# ---------------------------------------------------------------------------------------------
# 1. VoxCeleb metadata trees


@dataclass(frozen=True)
class VoxUtterance:
    """The content of one VoxCeleb utterance file; boxes are (x, y, w, h) per frame."""

    identity: str
    video_id: str
    utterance: str
    frames: Sequence[int]
    boxes: Sequence[tuple[float, float, float, float]]
    offset: int = 1
    fv_conf: float = 17.0
    asd_conf: float = 5.0


def write_voxceleb_tree(directory: str | Path, utterances: Iterable[VoxUtterance], version: int = 1) -> list[Path]:
    """Write utterances as ``<directory>/txt/<identity>/<video>/<utterance>.txt`` in VoxCeleb `version` 1 or 2.

    Version 1 writes integer pixel boxes with the trailing spaces of the VoxCeleb1 release;
    version 2 writes normalised boxes with three decimals, as VoxCeleb2 does.
    """
    if version not in (1, 2):
        raise ValueError(f"VoxCeleb version must be 1 or 2, got {version}")
    written = []
    for utt in utterances:
        if len(utt.frames) != len(utt.boxes):
            raise ValueError(f"{utt.utterance}: {len(utt.frames)} frames but {len(utt.boxes)} boxes")
        path = Path(directory) / "txt" / utt.identity / utt.video_id / f"{utt.utterance}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_vox_text(utt, version))
        written.append(path)
    return written


def _vox_text(utt: VoxUtterance, version: int) -> str:
    if version == 1:
        header = [
            f"Identity  : \t{utt.identity} ",
            f"Reference : \t{utt.video_id} ",
            f"Offset    : \t{utt.offset} ",
            f"FV Conf   : \t{utt.fv_conf:.3f} (1)",
            f"ASD Conf  : \t{utt.asd_conf:.3f} ",
            "",
            "FRAME \tX \tY \tW \tH ",
        ]
        rows = [f"{f:06d} \t" + " \t".join(f"{round(v):04d}" for v in box) + " " for f, box in zip(utt.frames, utt.boxes)]
    else:
        header = [
            f"Identity  : \t{utt.identity}",
            f"Reference : \t{utt.video_id}",
            f"Offset    : \t{utt.offset}",
            f"FV Conf   : \t{utt.fv_conf:.3f}\t(1)",
            f"ASD Conf  : \t{utt.asd_conf:.3f}",
            "",
            "FRAME \tX \tY \tW \tH ",
        ]
        rows = [f"{f:05d}\t" + "\t".join(f"{v:.3f}" for v in box) for f, box in zip(utt.frames, utt.boxes)]
    return "\n".join(header + rows) + "\n"


def parse_voxceleb_tree(
    root: str | Path,
    *,
    version: int | None = None,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
) -> ParseResult:
    """Parse every ``txt/<identity>/<video>/<utterance>.txt`` under `root` (or `root` itself if it is ``txt``).

    `version` 1 (pixel boxes of the 360p video) or 2 (normalised boxes); None detects it per file
    (all values <= 1 means normalised). One `ClipRequest` per utterance, spanning its first to last
    frame (inclusive) at 25 fps, with one `MetaBox` per row.
    """
    if version not in (None, 1, 2):
        raise ValueError(f"VoxCeleb version must be 1, 2 or None (detect), got {version}")
    root = Path(root)
    txt_root = root / "txt" if (root / "txt").is_dir() else root
    if not txt_root.is_dir():
        return [], [ParseFailure(str(root), "not a directory; expected a VoxCeleb tree txt/<identity>/<video>/<utt>.txt")]
    requests: list[ClipRequest] = []
    failures: list[ParseFailure] = []
    for path in sorted(txt_root.rglob("*.txt")):
        try:
            requests.append(_parse_utterance(path, txt_root, version, url_template, splits))
        except _Invalid as error:
            origin = f"{path}:{error.line}" if error.line else str(path)
            failures.append(ParseFailure(origin, str(error)))
    return _finish(requests, failures)


def _parse_utterance(
    path: Path, txt_root: Path, version: int | None, url_template: str, splits: SplitPolicy
) -> ClipRequest:
    parts = path.relative_to(txt_root).parts
    if len(parts) != 3:
        raise _Invalid("misplaced utterance file: expected txt/<identity>/<video>/<utterance>.txt")
    identity, video_id, utterance = parts[0], parts[1], path.stem
    for label, value in (("identity", identity), ("video id", video_id), ("utterance", utterance)):
        if not _ID.fullmatch(value):
            raise _Invalid(f"{label} {value!r} has characters outside [A-Za-z0-9_-]")
    lines = _read_lines(path)
    header, rows_start = _parse_vox_header(lines)
    if header.get("identity", identity) != identity:
        raise _Invalid(f"header identity {header['identity']!r} differs from directory {identity!r}", 1)
    if header.get("reference", video_id) != video_id:
        raise _Invalid(f"header reference {header['reference']!r} differs from directory {video_id!r}", 2)
    frames, values = _parse_vox_rows(lines, rows_start)
    units = _vox_units(values, version)
    reference_height = VOX1_REFERENCE_HEIGHT if units == "pixels" else None
    boxes = tuple(
        MetaBox(frame / VOX_FPS, x, y, w, h, units=units, reference_height=reference_height)
        for frame, (x, y, w, h) in zip(frames, values)
    )
    return ClipRequest(
        clip_id=clip_id_for(identity, video_id, utterance),
        video_id=video_id,
        url=resolve_url(video_id, url_template),
        identity=identity,
        split=splits.split_for(identity),
        start_s=frames[0] / VOX_FPS,
        end_s=(frames[-1] + 1) / VOX_FPS,
        boxes=boxes,
        source="voxceleb1" if units == "pixels" else "voxceleb2",
        origin=str(path),
    )


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _Invalid(f"cannot read file: {error}") from error
    if not text.strip():
        raise _Invalid("empty file")
    return text.splitlines()


def _parse_vox_header(lines: list[str]) -> tuple[dict[str, str], int]:
    """Return the ``key : value`` header (keys lower-cased) and the index of the first frame row."""
    header: dict[str, str] = {}
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        if line.split()[0].upper() == "FRAME":
            if [cell.upper() for cell in line.split()] != ["FRAME", "X", "Y", "W", "H"]:
                raise _Invalid(f"column header {line.strip()!r} is not 'FRAME X Y W H'", index + 1)
            if "identity" not in header or "reference" not in header:
                raise _Invalid("header lacks 'Identity :' or 'Reference :'", index + 1)
            return header, index + 1
        key, colon, value = line.partition(":")
        if not colon:
            raise _Invalid(f"header line {line.strip()!r} is not 'Key : value'", index + 1)
        header[" ".join(key.split()).lower()] = value.strip()
    raise _Invalid("no 'FRAME X Y W H' column header")


def _parse_vox_rows(lines: list[str], start: int) -> tuple[list[int], list[tuple[float, float, float, float]]]:
    frames: list[int] = []
    values: list[tuple[float, float, float, float]] = []
    for index in range(start, len(lines)):
        cells = lines[index].split()
        if not cells:
            continue
        if len(cells) != 5:
            raise _Invalid(f"expected 5 columns (FRAME X Y W H), found {len(cells)}", index + 1)
        try:
            frame = int(cells[0])
            x, y, w, h = (float(cell) for cell in cells[1:])
        except ValueError:
            raise _Invalid(f"non-numeric row {lines[index].strip()!r}", index + 1) from None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise _Invalid("box values must be finite", index + 1)
        if w <= 0 or h <= 0:
            raise _Invalid(f"box width and height must be positive, got {w} x {h}", index + 1)
        if frame < 0 or (frames and frame <= frames[-1]):
            raise _Invalid(f"frame {frame} is negative or not after frame {frames[-1] if frames else '-'}", index + 1)
        frames.append(frame)
        values.append((x, y, w, h))
    if not frames:
        raise _Invalid("no frame rows after the column header")
    return frames, values


def _vox_units(values: list[tuple[float, float, float, float]], version: int | None) -> str:
    """Pixels (VoxCeleb1) or normalised (VoxCeleb2), detected or checked against `version`."""
    largest = max(max(row) for row in values)
    smallest = min(min(row) for row in values)
    units = "normalized" if version == 2 or (version is None and largest <= 1.0) else "pixels"
    if units == "normalized" and (largest > 1.0 or smallest < 0.0):
        raise _Invalid(f"normalised (VoxCeleb2) box values must lie in [0, 1], found {smallest}..{largest}")
    if units == "pixels" and any(x + w <= 0 or y + h <= 0 or y >= VOX1_REFERENCE_HEIGHT for x, y, w, h in values):
        raise _Invalid(f"a pixel box lies outside the {VOX1_REFERENCE_HEIGHT:.0f}p frame")
    return units


# ---------------------------------------------------------------------------------------------
# 2. Clip tables (CSV, TSV, Parquet)

_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "video": ("videoid", "video", "youtubeid", "ytid", "reference", "url", "videourl", "link", "path", "file"),
    "start_frame": ("start", "startframe", "begin", "firstframe", "from"),
    "end_frame": ("end", "endframe", "stop", "lastframe", "to"),
    "start_s": ("starts", "startsec", "startseconds", "starttime"),
    "end_s": ("ends", "endsec", "endseconds", "endtime"),
    "fps": ("fps", "framerate"),
    "identity": ("identity", "personid", "person", "speaker", "speakerid", "identityid"),
    "split": ("split", "partition", "subset", "set"),
    "clip_id": ("clipid", "clip", "utterance", "uttid"),
    "bbox": ("bbox", "box"),
    "x0": ("x0", "left", "xmin", "bboxx0"),
    "y0": ("y0", "top", "ymin", "bboxy0"),
    "x1": ("x1", "right", "xmax", "bboxx1"),
    "y1": ("y1", "bottom", "ymax", "bboxy1"),
    "width": ("width", "framewidth", "videowidth"),
    "height": ("height", "frameheight", "videoheight"),
}
"""Accepted column names, compared lower-case with everything but letters and digits removed
(so ``Video ID``, ``video_id`` and ``videoId`` all match). A span needs start/end frames (with
``fps``, default 25; the end frame is exclusive) or start/end seconds. A box is either ``bbox``
as ``x0-y0-x1-y1`` or four columns ``x0 y0 x1 y1``; values all <= 1 are normalised, otherwise
pixels of a frame of ``height`` (if given). ``identity`` defaults to the video id, ``split`` to
the `SplitPolicy`, ``clip_id`` to identity/video/span."""


def _normalise_column(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _map_columns(columns: Sequence[str]) -> dict[str, str]:
    """Map canonical names to the table's own column names; raise naming what is missing."""
    by_normalised = {_normalise_column(c): c for c in columns}
    mapping = {}
    for canonical, aliases in _COLUMN_ALIASES.items():
        found = next((by_normalised[a] for a in aliases if a in by_normalised), None)
        if found is not None:
            mapping[canonical] = found
    if "video" not in mapping:
        raise _Invalid(f"no video column; accepted names: {', '.join(_COLUMN_ALIASES['video'])}", 1)
    has_frames = "start_frame" in mapping and "end_frame" in mapping
    has_seconds = "start_s" in mapping and "end_s" in mapping
    if not (has_frames or has_seconds):
        raise _Invalid("no span columns: need start/end frames (start, end) or seconds (start_s, end_s)", 1)
    corners = [c for c in ("x0", "y0", "x1", "y1") if c in mapping]
    if corners and len(corners) != 4:
        raise _Invalid(f"box columns {corners} are incomplete: give all of x0, y0, x1, y1", 1)
    return mapping


def parse_clip_table(
    path: str | Path,
    *,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
) -> ParseResult:
    """Parse a CSV/TSV (by suffix) or Parquet clip table; see `_COLUMN_ALIASES` for accepted columns.

    Origins are ``file:line`` for CSV/TSV (the header is line 1) and ``file:row`` (1-based) for Parquet.
    """
    path = Path(path)
    requests: list[ClipRequest] = []
    failures: list[ParseFailure] = []
    try:
        columns, rows = _read_table(path)
        mapping = _map_columns(columns)
    except _Invalid as error:
        return [], [ParseFailure(f"{path}:{error.line}" if error.line else str(path), str(error))]
    for line, row in rows:
        try:
            requests.append(_table_request(row, mapping, path, f"{path}:{line}", url_template, splits))
        except _Invalid as error:
            failures.append(ParseFailure(f"{path}:{line}", str(error)))
    return _finish(requests, failures)


def _read_table(path: Path) -> tuple[list[str], Iterator[tuple[int, Mapping[str, object]]]]:
    """Return the column names and ``(line or row number, row)`` pairs of a table file."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return table.column_names, ((n + 1, row) for n, row in enumerate(table.to_pylist()))
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _Invalid(f"cannot read table: {error}") from error
    if not text.strip():
        raise _Invalid("empty file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = list(reader.fieldnames or [])
    return columns, _csv_rows(reader, len(columns))


def _csv_rows(reader: csv.DictReader, width: int) -> Iterator[tuple[int, Mapping[str, object]]]:
    for row in reader:
        if None in row or None in row.values():
            row = {"__width_error__": f"row has a different number of fields than the {width} header columns"}
        yield reader.line_num, row


def _cell(row: Mapping[str, object], mapping: dict[str, str], name: str) -> object | None:
    column = mapping.get(name)
    value = row.get(column) if column else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value.strip() if isinstance(value, str) else value


def _number(value: object, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _Invalid(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise _Invalid(f"{what} {value!r} is not finite")
    return number


def _frame_number(value: object, what: str) -> int:
    number = _number(value, what)
    if number != int(number) or number < 0:
        raise _Invalid(f"{what} {value!r} is not a non-negative whole frame number")
    return int(number)


def _table_span(row: Mapping[str, object], mapping: dict[str, str]) -> tuple[float, float]:
    if _cell(row, mapping, "start_frame") is not None or "start_s" not in mapping:
        fps = _cell(row, mapping, "fps")
        rate = VOX_FPS if fps is None else _number(fps, "fps")
        if rate <= 0:
            raise _Invalid(f"fps {fps!r} must be positive")
        start = _frame_number(_cell(row, mapping, "start_frame"), "start frame")
        end = _frame_number(_cell(row, mapping, "end_frame"), "end frame")
        start_s, end_s = start / rate, end / rate
    else:
        start_s = _number(_cell(row, mapping, "start_s"), "start seconds")
        end_s = _number(_cell(row, mapping, "end_s"), "end seconds")
    if start_s < 0 or end_s <= start_s:
        raise _Invalid(f"span {start_s:.3f}..{end_s:.3f} s is empty or negative")
    return start_s, end_s


def _table_box(row: Mapping[str, object], mapping: dict[str, str], t: float) -> tuple[MetaBox, ...]:
    """The table's single box for the clip, given at the clip start; () if the row has none."""
    text = _cell(row, mapping, "bbox")
    if text is not None:
        cells = str(text).split("-")
        if len(cells) != 4:
            raise _Invalid(f"bbox {text!r} is not 'x0-y0-x1-y1'")
        x0, y0, x1, y1 = (_number(cell, "bbox value") for cell in cells)
    elif "x0" in mapping:
        corners = [_cell(row, mapping, c) for c in ("x0", "y0", "x1", "y1")]
        if all(c is None for c in corners):
            return ()
        x0, y0, x1, y1 = (_number(c, "box value") for c in corners)
    else:
        return ()
    if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise _Invalid(f"box ({x0}, {y0}, {x1}, {y1}) needs 0 <= x0 < x1 and 0 <= y0 < y1")
    if max(x1, y1) <= 1.0:
        return (MetaBox(t, x0, y0, x1 - x0, y1 - y0, units="normalized"),)
    height = _cell(row, mapping, "height")
    reference = None if height is None else _number(height, "height")
    if reference is not None and (reference <= 0 or y0 >= reference):
        raise _Invalid(f"box top {y0} lies outside a frame of height {height}")
    return (MetaBox(t, x0, y0, x1 - x0, y1 - y0, units="pixels", reference_height=reference),)


def _table_request(
    row: Mapping[str, object], mapping: dict[str, str], path: Path, origin: str, url_template: str, splits: SplitPolicy
) -> ClipRequest:
    if "__width_error__" in row:
        raise _Invalid(str(row["__width_error__"]))
    video = _cell(row, mapping, "video")
    if video is None:
        raise _Invalid(f"missing video in column {mapping['video']!r}")
    video_id, url = resolve_video(str(video), path.parent, url_template)
    start_s, end_s = _table_span(row, mapping)
    identity = str(_cell(row, mapping, "identity") or video_id)
    if not _ID.fullmatch(identity):
        raise _Invalid(f"identity {identity!r} has characters outside [A-Za-z0-9_-]")
    split_cell = _cell(row, mapping, "split")
    split = splits.split_for(identity) if split_cell is None else _check_split(str(split_cell))
    span = f"{round(start_s * 1000)}-{round(end_s * 1000)}"
    clip_id = str(_cell(row, mapping, "clip_id") or clip_id_for(identity, video_id, span))
    return ClipRequest(
        clip_id=clip_id,
        video_id=video_id,
        url=url,
        identity=identity,
        split=split,
        start_s=start_s,
        end_s=end_s,
        boxes=_table_box(row, mapping, start_s),
        source="table",
        origin=origin,
    )


# ---------------------------------------------------------------------------------------------
# 3. URL / file lists


def parse_url_list(
    path: str | Path,
    *,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
) -> ParseResult:
    """One whole video per line (URL, local file relative to the list, or video id); faces found automatically.

    ``#`` starts a comment line; blank lines are ignored. The identity is the derived video id
    (each video its own identity), since a plain list says nothing about who is in it.
    """
    path = Path(path)
    try:
        lines = _read_lines(path)
    except _Invalid as error:
        return [], [ParseFailure(str(path), str(error))]
    requests: list[ClipRequest] = []
    failures: list[ParseFailure] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            if len(text.split()) != 1:
                raise _Invalid(f"expected one URL or path per line, found {text!r}")
            video_id, url = resolve_video(text, path.parent, url_template)
        except _Invalid as error:
            failures.append(ParseFailure(f"{path}:{number}", str(error)))
            continue
        requests.append(
            ClipRequest(
                clip_id=clip_id_for(video_id, "whole"),
                video_id=video_id,
                url=url,
                identity=video_id,
                split=splits.split_for(video_id),
                source="urls",
                origin=f"{path}:{number}",
            )
        )
    return _finish(requests, failures)


# ---------------------------------------------------------------------------------------------
# Any source


def parse_sources(
    paths: Iterable[str | Path],
    *,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
    voxceleb_version: int | None = None,
) -> ParseResult:
    """Parse several inputs, each by its kind, and drop duplicates across all of them.

    A directory is a VoxCeleb tree; ``.csv``/``.tsv``/``.parquet``/``.pq`` a clip table;
    anything else a URL list.
    """
    requests: list[ClipRequest] = []
    failures: list[ParseFailure] = []
    for path in map(Path, paths):
        if path.is_dir():
            found, bad = parse_voxceleb_tree(path, version=voxceleb_version, url_template=url_template, splits=splits)
        elif path.suffix.lower() in (".csv", ".tsv", ".parquet", ".pq"):
            found, bad = parse_clip_table(path, url_template=url_template, splits=splits)
        else:
            found, bad = parse_url_list(path, url_template=url_template, splits=splits)
        requests.extend(found)
        failures.extend(bad)
    return _finish(requests, failures)
