"""Clip tables (CSV, TSV or Parquet) in the style of ``vox-metadata.csv``: one clip per row."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pipelines.prepare.requests import VOX_FPS, ClipRequest, MetaBoxes, clip_id_for
from pipelines.prepare.settings import DEFAULT_URL_TEMPLATE
from pipelines.prepare.sources.common import (
    ID_PATTERN,
    InvalidInput,
    ParseFailure,
    ParseResult,
    SplitPolicy,
    check_split,
    finish,
    resolve_video,
)

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
        raise InvalidInput(f"no video column; accepted names: {', '.join(_COLUMN_ALIASES['video'])}", 1)
    has_frames = "start_frame" in mapping and "end_frame" in mapping
    has_seconds = "start_s" in mapping and "end_s" in mapping
    if not (has_frames or has_seconds):
        raise InvalidInput("no span columns: need start/end frames (start, end) or seconds (start_s, end_s)", 1)
    corners = [c for c in ("x0", "y0", "x1", "y1") if c in mapping]
    if corners and len(corners) != 4:
        raise InvalidInput(f"box columns {corners} are incomplete: give all of x0, y0, x1, y1", 1)
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
    except InvalidInput as error:
        return [], [ParseFailure(f"{path}:{error.line}" if error.line else str(path), str(error))]
    for line, row in rows:
        try:
            requests.append(_table_request(row, mapping, path, f"{path}:{line}", url_template, splits))
        except InvalidInput as error:
            failures.append(ParseFailure(f"{path}:{line}", str(error)))
    return finish(requests, failures)


def _read_table(path: Path) -> tuple[list[str], Iterator[tuple[int, Mapping[str, object]]]]:
    """Return the column names and ``(line or row number, row)`` pairs of a table file."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return table.column_names, ((n + 1, row) for n, row in enumerate(table.to_pylist()))
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InvalidInput(f"cannot read table: {error}") from error
    if not text.strip():
        raise InvalidInput("empty file")
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
        raise InvalidInput(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise InvalidInput(f"{what} {value!r} is not finite")
    return number


def _frame_number(value: object, what: str) -> int:
    number = _number(value, what)
    if number != int(number) or number < 0:
        raise InvalidInput(f"{what} {value!r} is not a non-negative whole frame number")
    return int(number)


def _table_span(row: Mapping[str, object], mapping: dict[str, str]) -> tuple[float, float]:
    if _cell(row, mapping, "start_frame") is not None or "start_s" not in mapping:
        fps = _cell(row, mapping, "fps")
        rate = VOX_FPS if fps is None else _number(fps, "fps")
        if rate <= 0:
            raise InvalidInput(f"fps {fps!r} must be positive")
        start = _frame_number(_cell(row, mapping, "start_frame"), "start frame")
        end = _frame_number(_cell(row, mapping, "end_frame"), "end frame")
        start_s, end_s = start / rate, end / rate
    else:
        start_s = _number(_cell(row, mapping, "start_s"), "start seconds")
        end_s = _number(_cell(row, mapping, "end_s"), "end seconds")
    if start_s < 0 or end_s <= start_s:
        raise InvalidInput(f"span {start_s:.3f}..{end_s:.3f} s is empty or negative")
    return start_s, end_s


def _table_box(row: Mapping[str, object], mapping: dict[str, str], t: float) -> MetaBoxes:
    """The table's single box for the clip, given at the clip start; () if the row has none."""
    text = _cell(row, mapping, "bbox")
    if text is not None:
        cells = str(text).split("-")
        if len(cells) != 4:
            raise InvalidInput(f"bbox {text!r} is not 'x0-y0-x1-y1'")
        x0, y0, x1, y1 = (_number(cell, "bbox value") for cell in cells)
    elif "x0" in mapping:
        corners = [_cell(row, mapping, c) for c in ("x0", "y0", "x1", "y1")]
        if all(c is None for c in corners):
            return MetaBoxes()
        x0, y0, x1, y1 = (_number(c, "box value") for c in corners)
    else:
        return MetaBoxes()
    if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise InvalidInput(f"box ({x0}, {y0}, {x1}, {y1}) needs 0 <= x0 < x1 and 0 <= y0 < y1")
    if max(x1, y1) <= 1.0:
        return MetaBoxes([(t, x0, y0, x1 - x0, y1 - y0)], units="normalized")
    height = _cell(row, mapping, "height")
    reference = None if height is None else _number(height, "height")
    if reference is not None and (reference <= 0 or y0 >= reference):
        raise InvalidInput(f"box top {y0} lies outside a frame of height {height}")
    return MetaBoxes([(t, x0, y0, x1 - x0, y1 - y0)], units="pixels", reference_height=reference)


def _table_request(
    row: Mapping[str, object], mapping: dict[str, str], path: Path, origin: str, url_template: str, splits: SplitPolicy
) -> ClipRequest:
    if "__width_error__" in row:
        raise InvalidInput(str(row["__width_error__"]))
    video = _cell(row, mapping, "video")
    if video is None:
        raise InvalidInput(f"missing video in column {mapping['video']!r}")
    video_id, url = resolve_video(str(video), path.parent, url_template)
    start_s, end_s = _table_span(row, mapping)
    identity = str(_cell(row, mapping, "identity") or video_id)
    if not ID_PATTERN.fullmatch(identity):
        raise InvalidInput(f"identity {identity!r} has characters outside [A-Za-z0-9_-]")
    split_cell = _cell(row, mapping, "split")
    split = splits.split_for(identity) if split_cell is None else check_split(str(split_cell))
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

