"""VoxCeleb1/2 metadata trees: ``txt/<identity>/<youtube id>/<utterance>.txt``, one clip per file.

Each file has five header lines, then a FRAME/X/Y/W/H table at 25 fps; VoxCeleb1 boxes are pixels
of the 360p video, VoxCeleb2 boxes are normalised. `write_voxceleb_tree` writes the same format,
so tests and the sample can describe a video the way VoxCeleb would.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from pipelines.prepare.requests import VOX_FPS, ClipRequest, MetaBoxes, clip_id_for, resolve_url
from pipelines.prepare.settings import DEFAULT_URL_TEMPLATE
from pipelines.prepare.sources.common import (
    ID_PATTERN,
    InvalidInput,
    ParseFailure,
    ParseResult,
    SplitPolicy,
    finish,
    read_lines,
)

VOX1_REFERENCE_HEIGHT = 360.0
"""VoxCeleb1 boxes are pixels of the 360p version of each video."""

VOX1_TEST_IDENTITIES = frozenset(f"id{n}" for n in range(10270, 10310))
"""The 40 identities of the official VoxCeleb1 test split (id10270..id10309)."""



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


def voxceleb_txt_root(root: Path) -> Path | None:
    """The folder whose <identity>/<video>/<utterance>.txt files are the tree (`root/txt` or `root`),
    or None when there are no such files."""
    for candidate in (root / "txt", root):
        if candidate.is_dir() and next(candidate.glob("*/*/*.txt"), None) is not None:
            return candidate
    return None


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
    frame (inclusive) at 25 fps, with its rows as `MetaBoxes`.
    """
    if version not in (None, 1, 2):
        raise ValueError(f"VoxCeleb version must be 1, 2 or None (detect), got {version}")
    requests: list[ClipRequest] = []
    failures: list[ParseFailure] = []
    for found, bad in iter_voxceleb_videos(root, version=version, url_template=url_template, splits=splits):
        requests += found
        failures += bad
    return finish(requests, failures)


def iter_voxceleb_videos(
    root: str | Path,
    *,
    version: int | None = None,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
    processes: int | None = None,
) -> Iterator[tuple[list[ClipRequest], list[ParseFailure]]]:
    """The tree one video folder at a time, in sorted order: ``(that video's clips, failures)``.

    The tree is walked, never listed whole, so a plan over VoxCeleb2's 1.1M files starts yielding
    work at once and holds one video's clips at a time. Misplaced files are failures of their own.

    Parsing is CPU-bound, so past its first `IN_LINE_FOLDERS` folders (parsed here: a small tree
    starts no process, a large one yields its first videos at once; the processes start halfway
    through them, so that their start-up does not delay the first window of a plan) a tree is
    parsed by `processes` worker processes (default `plan_processes()`), `CHUNK_FOLDERS` folders per
    task and a bounded number of tasks ahead, and yielded in the same order and content as here.
    """
    if version not in (None, 1, 2):
        raise ValueError(f"VoxCeleb version must be 1, 2 or None (detect), got {version}")
    root = Path(root)
    txt_root = voxceleb_txt_root(root)
    if txt_root is None:
        yield [], [ParseFailure(str(root), "holds no VoxCeleb tree txt/<identity>/<video>/<utterance>.txt")]
        return
    parse = _UtteranceParser(version, url_template, splits)
    folders = _video_folders(txt_root)
    head = list(itertools.islice(folders, IN_LINE_FOLDERS))
    following = next(folders, None)
    processes = plan_processes() if processes is None else processes
    if following is None or processes <= 1:
        yield from _parse_in_threads(itertools.chain(head, [following] if following else [], folders), parse)
        return
    in_line = _parse_in_threads(head, parse)
    yield from itertools.islice(in_line, len(head) // 2)  # before starting processes compete for the cores
    chunks = _chunks(itertools.chain([following], folders))
    with _ParsingProcesses(processes, parse) as pool:
        for chunk in itertools.islice(chunks, CHUNKS_AHEAD_PER_PROCESS * processes):
            pool.submit(chunk)  # the processes start and parse these while the rest of the head is parsed here
        yield from in_line
        while pool.pending:
            parsed = pool.next_result()
            for chunk in itertools.islice(chunks, 1):
                pool.submit(chunk)
            yield from parsed.videos()


READ_AHEAD = 256
"""Video folders whose files threads read ahead of the parser: on a cold disk every small file is a
random read, and reads overlap where parsing (which holds the GIL) cannot."""
READ_THREADS = 8
IN_LINE_FOLDERS = 1024
"""Video folders parsed in the planning process before parsing processes take over: about 7,000
utterances, more than the first window of a plan (64 batches of 8 videos), in under a second."""
CHUNK_FOLDERS = 64
"""Video folders per task of a parsing process: about 450 utterances, some 30 ms of work, so a
task's own cost (pickling, a round trip) is small against it."""
CHUNKS_AHEAD_PER_PROCESS = 4
"""Tasks in flight per parsing process: enough to keep it busy, few enough to bound the memory of
results the plan has not consumed yet (under 1 MB per task)."""
MAX_PLAN_PROCESSES = 4
"""More do not help: the planning process itself then bounds the rate, building the requests,
dropping duplicates and batching (about 20 us per utterance, against 85 us to read and parse it)."""


def plan_processes() -> int:
    """Processes that parse a large tree: two per core this process may use (one waiting for the
    disk, where the tree is not in the page cache, leaves its core to the other), at most
    `MAX_PLAN_PROCESSES` (measured at 1.1M utterances on two cores: 58 s with four, 68 s with two)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_PLAN_PROCESSES, 2 * cores))


_Folder = tuple[tuple[str, str] | None, list[tuple[str, "list[str] | InvalidInput"]], list[str]]
"""A video folder read: its (identity, video), its .txt files' lines (or why they cannot be read),
and the misplaced files below it."""
_Place = tuple[tuple[str, str] | None, str]
"""``((identity, video), folder)``, or ``(None, file)`` for a misplaced file."""
_VideoClips = tuple[list[ClipRequest], list[ParseFailure]]


@dataclass(frozen=True)
class _UtteranceParser:
    """Turns the files of one folder into requests and failures (here or in a parsing process)."""

    version: int | None
    url_template: str
    splits: SplitPolicy

    def __call__(self, files: list[tuple[str, list[str] | InvalidInput]],
                 place: tuple[str, str] | None) -> _VideoClips:
        requests: list[ClipRequest] = []
        failures: list[ParseFailure] = []
        for path, lines in files:
            try:
                requests.append(_parse_utterance(path, lines, place, self.version, self.url_template, self.splits))
            except InvalidInput as error:
                origin = f"{path}:{error.line}" if error.line else path
                failures.append(ParseFailure(origin, str(error)))
        return requests, failures

    def folder(self, folder: _Folder) -> _VideoClips:
        place, files, misplaced = folder
        requests, failures = self(files, place)
        return requests, failures + self([(path, InvalidInput("misplaced")) for path in misplaced], None)[1]


def _parse_in_threads(places: Iterable[_Place], parse: _UtteranceParser) -> Iterator[_VideoClips]:
    """Parse folders here, in order, their files read ahead by `READ_THREADS` threads."""
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="vox-read") as pool:
        ahead: deque[Future[_Folder]] = deque()
        for place, path in places:
            ahead.append(pool.submit(_read_folder, place, path))
            while len(ahead) > READ_AHEAD or (ahead and ahead[0].done()):
                yield parse.folder(ahead.popleft().result())
        while ahead:
            yield parse.folder(ahead.popleft().result())


def _chunks(places: Iterator[_Place]) -> Iterator[list[_Place]]:
    while chunk := list(itertools.islice(places, CHUNK_FOLDERS)):
        yield chunk


class _ParsingProcesses:
    """Worker processes that parse chunks of folders, results read back in the order submitted.

    Plain child interpreters (`python -c`) that speak pickles over their stdin and stdout, not a
    `multiprocessing` pool: those re-run the caller's `__main__` in every child (spawn, forkserver)
    or fork a process that holds Ray's and Prefect's threads (fork). A child ignores SIGINT and
    SIGTERM (the planning process handles them and stops the run gracefully) and ends when its
    stdin closes, so it never outlives the planning process. Chunk `k` goes to process `k mod n`,
    which works in order; a thread per process takes its results off the pipe as they come, so a
    process goes on to its next chunk without waiting for the plan to consume the last one.
    """

    def __init__(self, count: int, parse: _UtteranceParser) -> None:
        package_root = str(Path(__file__).resolve().parents[3])
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-c", f"from {__name__} import _serve_parsing; _serve_parsing()"]
        self.processes = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           env={**os.environ, "PYTHONPATH": path}) for _ in range(count)]
        self.results: list[queue.SimpleQueue[_ParsedChunk | BaseException | None]] = [
            queue.SimpleQueue() for _ in self.processes]
        self.receivers = [threading.Thread(target=_receive, args=(process, results), daemon=True,
                                           name="vox-parsed") for process, results in zip(self.processes, self.results)]
        for receiver in self.receivers:
            receiver.start()
        self.parse = parse
        self.submitted = 0
        self.order: deque[int] = deque()

    @property
    def pending(self) -> int:
        return len(self.order)

    def submit(self, chunk: list[_Place]) -> None:
        index = self.submitted % len(self.processes)
        stdin = self.processes[index].stdin
        assert stdin is not None
        try:
            pickle.dump((chunk, self.parse), stdin, protocol=pickle.HIGHEST_PROTOCOL)
            stdin.flush()
        except BrokenPipeError:
            raise self._ended(index) from None
        self.order.append(index)
        self.submitted += 1

    def next_result(self) -> _ParsedChunk:
        index = self.order.popleft()
        result = self.results[index].get()
        if result is None:
            raise self._ended(index)
        if isinstance(result, BaseException):
            raise result
        return result

    def _ended(self, index: int) -> RuntimeError:
        return RuntimeError(f"a metadata parsing process ended (exit code {self.processes[index].wait()}); "
                            "its error, if it had time to write one, is above")

    def __enter__(self) -> _ParsingProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:  # a parser holds no state worth a graceful end
            process.kill()
            process.wait()
        for process, receiver in zip(self.processes, self.receivers):
            receiver.join()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(BrokenPipeError):  # a chunk still buffered for a process that died
                        pipe.close()


def _receive(process: subprocess.Popen, results: queue.SimpleQueue) -> None:
    """Put each result `process` writes on `results`, then None when it ends."""
    assert process.stdout is not None
    while True:
        try:
            results.put(pickle.load(process.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            results.put(None)
            return


def _serve_parsing() -> None:
    """The loop of a parsing process: parse each chunk read from stdin, write the result to stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests, results = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the results
    while True:
        try:
            places, parse = pickle.load(requests)
        except EOFError:
            return
        try:
            result: _ParsedChunk | Exception = _parse_chunk(places, parse)
        except Exception as error:  # raised again in the planning process
            result = error
        pickle.dump(result, results, protocol=pickle.HIGHEST_PROTOCOL)
        results.flush()


_REQUEST_COLUMNS = tuple(f.name for f in fields(ClipRequest) if f.name != "boxes")


@dataclass(frozen=True)
class _ParsedChunk:
    """Parsed folders as columns, what a parsing process sends back: the box rows of all its clips
    as one array and a tuple of fields per clip, not objects (a `ClipRequest` pickled whole costs
    the driver about 15 us to rebuild, from these columns about 3.5 us)."""

    clips_per_folder: list[int]
    failures_per_folder: list[list[ParseFailure]]
    columns: list[tuple]
    units: list[tuple[str, float | None]]
    rows: np.ndarray
    row_ends: list[int]

    @classmethod
    def of(cls, parsed: list[_VideoClips]) -> _ParsedChunk:
        requests = [request for found, _ in parsed for request in found]
        return cls(clips_per_folder=[len(found) for found, _ in parsed],
                   failures_per_folder=[failures for _, failures in parsed],
                   columns=[tuple(getattr(r, name) for name in _REQUEST_COLUMNS) for r in requests],
                   units=[(r.boxes.units, r.boxes.reference_height) for r in requests],
                   rows=np.concatenate([r.boxes.rows for r in requests]) if requests else np.empty((0, 5)),
                   row_ends=list(itertools.accumulate(len(r.boxes) for r in requests)))

    def videos(self) -> Iterator[_VideoClips]:
        """The folders' requests and failures, equal to what `_UtteranceParser.folder` gave."""
        clips = zip(self.columns, self.units, [0, *self.row_ends], self.row_ends)
        for count, failures in zip(self.clips_per_folder, self.failures_per_folder):
            yield [ClipRequest(**dict(zip(_REQUEST_COLUMNS, values)),
                               boxes=MetaBoxes(self.rows[start:end], units, reference_height))
                   for values, (units, reference_height), start, end in itertools.islice(clips, count)], failures


def _parse_chunk(places: list[_Place], parse: _UtteranceParser) -> _ParsedChunk:
    """Read and parse a chunk of folders (the task of a parsing process)."""
    return _ParsedChunk.of([parse.folder(_read_folder(place, path)) for place, path in places])


def _video_folders(txt_root: Path) -> Iterator[tuple[tuple[str, str] | None, str]]:
    """``((identity, video), folder)`` in sorted order; ``(None, file)`` for a misplaced file."""
    for level_one in _sorted_entries(str(txt_root)):
        if not level_one.is_dir():
            if level_one.name.endswith(".txt"):
                yield None, level_one.path
            continue
        for level_two in _sorted_entries(level_one.path):
            if level_two.is_dir():
                yield (level_one.name, level_two.name), level_two.path
            elif level_two.name.endswith(".txt"):
                yield None, level_two.path


def _read_folder(place: tuple[str, str] | None, path: str) -> _Folder:
    """Read one video folder's utterance files (in a reader thread)."""
    if place is None:
        return None, [(path, InvalidInput("misplaced"))], []
    entries = _sorted_entries(path)
    files: list[tuple[str, list[str] | InvalidInput]] = []
    for entry in entries:
        if entry.name.endswith(".txt"):  # a folder of that name fails to read
            try:
                files.append((entry.path, read_lines(entry.path)))
            except InvalidInput as error:
                files.append((entry.path, error))
    misplaced = [str(p) for entry in entries if entry.is_dir() for p in sorted(Path(entry.path).rglob("*.txt"))]
    return place, files, misplaced


def _sorted_entries(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _parse_utterance(path: str, lines: list[str] | InvalidInput, place: tuple[str, str] | None,
                     version: int | None, url_template: str, splits: SplitPolicy) -> ClipRequest:
    """One utterance file read as `lines` (or why it could not be read); `place` is its (identity,
    video) folders, None for a misplaced file."""
    if place is None:
        raise InvalidInput("misplaced utterance file: expected txt/<identity>/<video>/<utterance>.txt")
    (identity, video_id), utterance = place, os.path.basename(path)[:-4]
    for label, value in (("identity", identity), ("video id", video_id), ("utterance", utterance)):
        if not ID_PATTERN.fullmatch(value):
            raise InvalidInput(f"{label} {value!r} has characters outside [A-Za-z0-9_-]")
    if isinstance(lines, InvalidInput):
        raise lines
    header, rows_start = _parse_vox_header(lines)
    if header.get("identity", identity) != identity:
        raise InvalidInput(f"header identity {header['identity']!r} differs from directory {identity!r}", 1)
    if header.get("reference", video_id) != video_id:
        raise InvalidInput(f"header reference {header['reference']!r} differs from directory {video_id!r}", 2)
    frames, values = _parse_vox_rows(lines, rows_start)
    units = _vox_units(values, version)
    rows = np.empty((len(frames), 5))
    rows[:, 0], rows[:, 1:] = frames / VOX_FPS, values
    boxes = MetaBoxes(rows, units=units, reference_height=VOX1_REFERENCE_HEIGHT if units == "pixels" else None)
    return ClipRequest(
        clip_id=clip_id_for(identity, video_id, utterance),
        video_id=video_id,
        url=resolve_url(video_id, url_template),
        identity=identity,
        split=splits.split_for(identity),
        start_s=int(frames[0]) / VOX_FPS,
        end_s=int(frames[-1] + 1) / VOX_FPS,
        boxes=boxes,
        source="voxceleb1" if units == "pixels" else "voxceleb2",
        origin=path,
    )


def _parse_vox_header(lines: list[str]) -> tuple[dict[str, str], int]:
    """Return the ``key : value`` header (keys lower-cased) and the index of the first frame row."""
    header: dict[str, str] = {}
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        if line.split()[0].upper() == "FRAME":
            if [cell.upper() for cell in line.split()] != ["FRAME", "X", "Y", "W", "H"]:
                raise InvalidInput(f"column header {line.strip()!r} is not 'FRAME X Y W H'", index + 1)
            if "identity" not in header or "reference" not in header:
                raise InvalidInput("header lacks 'Identity :' or 'Reference :'", index + 1)
            return header, index + 1
        key, colon, value = line.partition(":")
        if not colon:
            raise InvalidInput(f"header line {line.strip()!r} is not 'Key : value'", index + 1)
        header[" ".join(key.split()).lower()] = value.strip()
    raise InvalidInput("no 'FRAME X Y W H' column header")


def _parse_vox_rows(lines: list[str], start: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame numbers (n,) and boxes (n, 4) of the rows from line `start` on.

    A well-formed table (every line five cells, integer frames) is converted in one step; anything
    else goes through `_checked_vox_rows`, which names the first bad line.
    """
    body = lines[start:]
    if body and all(len(line.split()) == 5 for line in body):
        cells = "\n".join(body).split()
        frame_cells = cells[0::5]
        if "".join(frame_cells).isdecimal():
            try:
                table = np.array(cells, dtype=np.float64).reshape(-1, 5)
            except ValueError:  # a spelling numpy does not read: the checked path decides
                pass
            else:  # decimal frame numbers read exactly as floats (below 2**53)
                frames, values = table[:, 0].astype(np.int64), table[:, 1:]
                # a sum is finite only when every value is; frames must rise
                if math.isfinite(values.sum()) and values[:, 2:].min() > 0 and (frames[1:] > frames[:-1]).all():
                    return frames, values
    return _checked_vox_rows(lines, start)


def _checked_vox_rows(lines: list[str], start: int) -> tuple[np.ndarray, np.ndarray]:
    """`_parse_vox_rows` one line at a time: raises `InvalidInput` at the first bad line."""
    frames: list[int] = []
    values: list[tuple[float, float, float, float]] = []
    for index in range(start, len(lines)):
        cells = lines[index].split()
        if not cells:
            continue
        if len(cells) != 5:
            raise InvalidInput(f"expected 5 columns (FRAME X Y W H), found {len(cells)}", index + 1)
        try:
            frame = int(cells[0])
            x, y, w, h = (float(cell) for cell in cells[1:])
        except ValueError:
            raise InvalidInput(f"non-numeric row {lines[index].strip()!r}", index + 1) from None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise InvalidInput("box values must be finite", index + 1)
        if w <= 0 or h <= 0:
            raise InvalidInput(f"box width and height must be positive, got {w} x {h}", index + 1)
        if frame < 0 or (frames and frame <= frames[-1]):
            raise InvalidInput(f"frame {frame} is negative or not after frame {frames[-1] if frames else '-'}", index + 1)
        frames.append(frame)
        values.append((x, y, w, h))
    if not frames:
        raise InvalidInput("no frame rows after the column header")
    return np.array(frames, dtype=np.int64), np.array(values, dtype=np.float64).reshape(-1, 4)


def _vox_units(values: np.ndarray, version: int | None) -> str:
    """Pixels (VoxCeleb1) or normalised (VoxCeleb2), detected or checked against `version`."""
    largest, smallest = float(values.max()), float(values.min())
    units = "normalized" if version == 2 or (version is None and largest <= 1.0) else "pixels"
    if units == "normalized" and (largest > 1.0 or smallest < 0.0):
        raise InvalidInput(f"normalised (VoxCeleb2) box values must lie in [0, 1], found {smallest}..{largest}")
    x, y, w, h = values.T
    if units == "pixels" and ((x + w <= 0) | (y + h <= 0) | (y >= VOX1_REFERENCE_HEIGHT)).any():
        raise InvalidInput(f"a pixel box lies outside the {VOX1_REFERENCE_HEIGHT:.0f}p frame")
    return units
