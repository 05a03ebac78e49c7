"""What to edit: jobs from one source, a job table (CSV or Parquet), or a glob / prefix of sources.

A job is one output video: a source, a driver (video or image), per-job options and an output
path inside the output folder. All three inputs produce the same `EditJob`s (a single video is a
job table of one), so everything downstream has one code path.

Job table columns (names matched loosely: case, spaces and dashes do not matter):
`source` (required), `driving` (required unless --driving gives one for all rows), `output`
(a path inside the output folder; default: the source's file name, in its own container when the
job can write it, else .mp4), and optionally
`mode`, `strength`, `motion`, `driving_policy`, `face`. Relative local paths are relative to the
table's folder. An unknown column refuses the whole table (a misspelt `strenght` must not be
silently ignored); a bad value fails only its row, as `bad_job`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from pipelines import errors
from pipelines.edit.settings import DRIVING_POLICIES, MODES, MOTIONS, OUTPUT_EXTENSIONS, JobDefaults, parse_face
from pipelines.storage import clean_relpath

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
TABLE_COLUMNS = ("source", "driving", "output", "mode", "strength", "motion", "driving_policy", "face")
OPTION_COLUMNS = ("mode", "strength", "motion", "driving_policy", "face")


class InputError(ValueError):
    """Inputs that cannot be read at all (a missing table, an unknown column): the run does not start."""


@dataclass(frozen=True)
class EditJob:
    """One output video to make. `output` is a clean relative path inside the output folder."""

    source: str
    driving: str
    output: str
    mode: str
    strength: float
    motion: str
    driving_policy: str
    face: str
    origin: str = ""
    """Where the job came from (table file and row, --source, a glob), for messages."""

    @property
    def job_id(self) -> str:
        """Jobs are identified by their output path: one output file, one job."""
        return self.output

    @property
    def key(self) -> str:
        """A short file-name-safe name for the job's scratch and preview files (readable part + hash)."""
        stem = re.sub(r"[^A-Za-z0-9-]+", "-", self.output).strip("-")[:60] or "job"
        return f"{stem}-{hashlib.sha1(self.output.encode()).hexdigest()[:10]}"

    @property
    def driving_is_image(self) -> bool:
        return is_image(self.driving)

    def resolved_motion(self) -> str:
        """'auto' means relative for a driving video and absolute for a driving image."""
        if self.motion != "auto":
            return self.motion
        return "absolute" if self.driving_is_image else "relative"

    def digest(self, context: dict[str, Any]) -> str:
        """A digest of everything that decides this job's output (inputs, options, model and settings)."""
        text = json.dumps({"job": {k: v for k, v in asdict(self).items() if k != "origin"}, "context": context},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RejectedJob:
    """A job that cannot run (bad_job, duplicate_output): it still gets a row in the results table."""

    job: EditJob
    failure_class: str
    message: str

    @property
    def job_id(self) -> str:
        """Output path and origin: a rejected row never takes the id of the job it collides with."""
        return f"{self.job.output}@{self.job.origin}"


def is_image(path: str) -> bool:
    return PurePosixPath(str(path).split("?")[0]).suffix.lower() in IMAGE_EXTENSIONS


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def output_relpath(relative: str) -> str:
    """An output path for a source: the same path, in the source's own container when the job can write
    it (.mov stays .mov, .mkv .mkv, .ts .ts), else .mp4."""
    path = PurePosixPath(relative)
    return str(path if path.suffix.lower() in OUTPUT_EXTENSIONS else path.with_suffix(".mp4"))


def default_output_name(source: str) -> str:
    """The source's file name (`output_relpath`)."""
    return output_relpath(PurePosixPath(str(source).rstrip("/")).name)


def check_job(job: EditJob) -> EditJob:
    """Validate a job's values; raises ValueError naming the column."""
    if not job.source:
        raise ValueError("source: empty; give the video to edit")
    if not job.driving:
        raise ValueError("driving: empty; give a driving video or image (column 'driving' or --driving)")
    if job.mode not in MODES:
        raise ValueError(f"mode: {job.mode!r} must be one of {', '.join(MODES)}")
    if job.motion not in MOTIONS:
        raise ValueError(f"motion: {job.motion!r} must be one of {', '.join(MOTIONS)}")
    if job.driving_policy not in DRIVING_POLICIES:
        raise ValueError(f"driving_policy: {job.driving_policy!r} must be one of {', '.join(DRIVING_POLICIES)}")
    if not (job.strength >= 0 and job.strength < float("inf")):
        raise ValueError(f"strength: {job.strength!r} must be a number >= 0 (1 = the driver's full motion)")
    try:
        parse_face(job.face)
    except ValueError as error:
        raise ValueError(f"face: {job.face!r}: {error}") from None
    output = clean_relpath(job.output)
    if PurePosixPath(output).suffix.lower() not in OUTPUT_EXTENSIONS:
        raise ValueError(f"output: {job.output!r} must end in one of {', '.join(OUTPUT_EXTENSIONS)}")
    return replace(job, output=output)


def _job(source: str, driving: str, output: str, defaults: JobDefaults, origin: str, **options: Any) -> EditJob:
    values = {name: getattr(defaults, name) for name in OPTION_COLUMNS}
    values.update({k: v for k, v in options.items() if v is not None and v != ""})
    try:
        strength = float(values["strength"])
    except (TypeError, ValueError):
        raise ValueError(f"strength: {values['strength']!r} is not a number") from None
    return EditJob(source=str(source), driving=str(driving or ""), output=str(output), mode=str(values["mode"]),
                   strength=strength, motion=str(values["motion"]), driving_policy=str(values["driving_policy"]),
                   face=str(values["face"]), origin=origin)


def single_job(source: str, driving: str, output_name: str | None, defaults: JobDefaults) -> EditJob:
    """The job of `portrait edit --source S --driving D [-o NAME]`."""
    return check_job(_job(_absolute(source), _absolute(driving), output_name or default_output_name(source),
                          defaults, "--source"))


def _absolute(path: str, base: Path | None = None) -> str:
    """Local paths become absolute (workers may run elsewhere in the tree); URIs stay as they are."""
    if not path or is_uri(path):
        return path
    path = path[len("file://"):] if path.startswith("file://") else path
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and base is not None:
        candidate = base / candidate
    return str(candidate.resolve())


def _normalise_column(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


TABLE_WINDOW_ROWS = 4096
"""Rows of a job table read at a time: the table is streamed, never held whole."""


def _table_reader(path: str):
    """A stream of record batches of the table (every column as text for CSV/TSV) and its close()."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        if is_uri(path):
            filesystem, location = pafs.FileSystem.from_uri(path)
        else:
            filesystem, location = pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
        handle = filesystem.open_input_file(location)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as error:
        raise InputError(f"job table {path}: cannot be read: {error}") from None
    try:
        if path.lower().endswith((".parquet", ".pq")):
            parquet = pq.ParquetFile(handle)
            return parquet.schema_arrow.names, parquet.iter_batches(batch_size=TABLE_WINDOW_ROWS), handle.close
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        # every column as text: values are checked per row below, with a message naming the row
        header = handle.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", "replace").strip().split(delimiter)
        handle.seek(0)
        columns = {name.strip(): pa.string() for name in header}
        reader = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=1 << 20),
                                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                convert_options=pacsv.ConvertOptions(column_types=columns, strings_can_be_null=True))
        return reader.schema.names, reader, handle.close
    except (pa.ArrowInvalid, OSError) as error:
        handle.close()
        raise InputError(f"job table {path}: not a readable CSV or Parquet file: {error}") from None


def table_windows(path: str) -> Iterator[list[dict[str, Any]]]:
    """The rows of a CSV/TSV or Parquet file (local or object store), a window at a time, as dicts with
    normalised column names. The header is checked before the first window (`InputError`)."""
    import pyarrow as pa

    column_names, batches, close = _table_reader(path)
    names = [_normalise_column(name) for name in column_names]
    if "source" not in names:
        close()
        raise InputError(f"job table {path}: no 'source' column (columns: {', '.join(column_names)})")
    unknown = sorted(set(names) - set(TABLE_COLUMNS))
    if unknown:
        close()
        raise InputError(f"job table {path}: unknown column(s) {', '.join(unknown)}; "
                         f"known columns: {', '.join(TABLE_COLUMNS)}")

    def windows() -> Iterator[list[dict[str, Any]]]:
        try:
            for batch in batches:
                columns = [column.to_pylist() for column in batch.columns]
                yield [dict(zip(names, values)) for values in zip(*columns)]
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"job table {path}: not a readable CSV or Parquet file: {error}") from None
        finally:
            close()

    return windows()


def read_table_rows(path: str) -> list[dict[str, Any]]:
    """Every row of a job table (small tables and tests; runs stream `table_windows`)."""
    return [row for window in table_windows(path) for row in window]


def table_jobs(path: str, defaults: JobDefaults,
               driving: str | None = None) -> Iterator[tuple[list[EditJob], list[RejectedJob]]]:
    """The jobs of a job table a window at a time; rows with bad values become `bad_job` rejections."""
    base = None if is_uri(path) else Path(path).expanduser().resolve().parent
    number = 2  # row 1 is the header
    for window in table_windows(path):
        jobs, rejected = [], []
        for row in window:
            _table_row(path, base, row, number, defaults, driving, jobs, rejected)
            number += 1
        yield jobs, rejected


def _table_row(path: str, base: Path | None, row: dict[str, Any], number: int, defaults: JobDefaults,
               driving: str | None, jobs: list[EditJob], rejected: list[RejectedJob]) -> None:
    origin = f"{path}:{number}"
    source = str(row.get("source") or "")
    output = row.get("output") or (default_output_name(source) if source else f"row-{number}.mp4")
    options = {name: row.get(name) for name in OPTION_COLUMNS}
    try:
        job = _job(_absolute(source, base), _absolute(str(row.get("driving") or driving or ""), base),
                   str(output), defaults, origin, **options)
        jobs.append(check_job(job))
    except ValueError as error:
        placeholder = EditJob(source=source, driving=str(row.get("driving") or driving or ""),
                              output=_placeholder_output(str(output), number), mode=str(options["mode"] or ""),
                              strength=_float_or_nan(options["strength"]), motion=str(options["motion"] or ""),
                              driving_policy=str(options["driving_policy"] or ""), face=str(options["face"] or ""),
                              origin=origin)
        rejected.append(RejectedJob(placeholder, errors.BAD_JOB, f"{origin}: {error}"))


def jobs_from_table(path: str, defaults: JobDefaults,
                    driving: str | None = None) -> tuple[list[EditJob], list[RejectedJob]]:
    """Every job of a job table (small tables and tests; runs stream `table_jobs`)."""
    jobs, rejected = [], []
    for window_jobs, window_rejected in table_jobs(path, defaults, driving):
        jobs += window_jobs
        rejected += window_rejected
    return jobs, rejected


def _placeholder_output(output: str, number: int) -> str:
    try:
        return clean_relpath(output)
    except (ValueError, TypeError):
        return f"invalid-row-{number}"


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def split_pattern(pattern: str) -> tuple[str, str]:
    """'s3://b/archive/*.mp4' -> ('s3://b/archive', '*.mp4'); a plain folder or prefix -> (it, '')."""
    parts = pattern.rstrip("/").split("/")
    for index, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return "/".join(parts[:index]), "/".join(parts[index:])
    return pattern.rstrip("/"), ""


def list_sources(pattern: str) -> list[tuple[str, str]]:
    """(source, path relative to the pattern's fixed part) of every video matching a glob or under a prefix.

    `*` may match across folders ('/' included), the same for local folders and object stores.
    Without wildcards, every video file (by extension) under the folder or prefix is taken.
    """
    root, remainder = split_pattern(pattern)
    if is_uri(root):
        import pyarrow.fs as pafs

        filesystem, base = pafs.FileSystem.from_uri(root)
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        scheme = root.split("://", 1)[0]
        found = [(f"{scheme}://{info.path.lstrip('/')}", posixpath.relpath(info.path, base))
                 for info in infos if info.type == pafs.FileType.File]
    else:
        directory = Path(root or ".").expanduser().resolve()
        if directory.is_file() and not remainder:
            return [(str(directory), directory.name)]
        found = [(str(Path(folder) / name), (Path(folder) / name).relative_to(directory).as_posix())
                 for folder, _, names in os.walk(directory) for name in names]
    matches = [(source, relative) for source, relative in found
               if (fnmatch.fnmatchcase(relative, remainder) if remainder
                   else PurePosixPath(relative).suffix.lower() in VIDEO_EXTENSIONS)
               and not PurePosixPath(relative).name.startswith(".")]
    return sorted(matches, key=lambda item: item[1])


def source_jobs(pattern: str, driving: str,
                defaults: JobDefaults) -> Iterator[tuple[list[EditJob], list[RejectedJob]]]:
    """One job per video matching `pattern`, a window at a time; outputs keep the sources' relative paths
    (`output_relpath`). Raises `InputError` (before the first window) when nothing matches."""
    found = list_sources(pattern)
    if not found:
        raise InputError(f"--sources {pattern!r}: no video matches (a glob such as 'dir/*.mp4' or "
                         f"'s3://bucket/prefix/**.mp4', or a folder / prefix of videos)")
    driver = _absolute(driving)

    def windows() -> Iterator[tuple[list[EditJob], list[RejectedJob]]]:
        for first in range(0, len(found), TABLE_WINDOW_ROWS):
            jobs, rejected = [], []
            for source, relative in found[first:first + TABLE_WINDOW_ROWS]:
                job = _job(source, driver, output_relpath(relative), defaults, pattern)
                try:
                    jobs.append(check_job(job))
                except ValueError as error:
                    rejected.append(RejectedJob(job, errors.BAD_JOB, f"{source}: {error}"))
            yield jobs, rejected

    return windows()


def jobs_from_sources(pattern: str, driving: str, defaults: JobDefaults) -> tuple[list[EditJob], list[RejectedJob]]:
    """Every job of `source_jobs` at once (tests; runs stream the windows)."""
    jobs, rejected = [], []
    for window_jobs, window_rejected in source_jobs(pattern, driving, defaults):
        jobs += window_jobs
        rejected += window_rejected
    return jobs, rejected


def drop_duplicate_outputs(jobs: Iterable[EditJob]) -> tuple[list[EditJob], list[RejectedJob]]:
    """The first job per output is kept; later ones are `duplicate_output` (they would overwrite it)."""
    kept: dict[str, EditJob] = {}
    rejected = []
    for job in jobs:
        if job.output in kept:
            rejected.append(RejectedJob(job, errors.DUPLICATE_OUTPUT,
                                        f"{job.origin}: output {job.output} is also written by "
                                        f"{kept[job.output].origin}; "
                                        "give each job its own output"))
        else:
            kept[job.output] = job
    return list(kept.values()), rejected
