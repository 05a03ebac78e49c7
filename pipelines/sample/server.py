"""A loopback HTTP server over the sample media, with HTTP Range and injected faults.

ffmpeg seeks inside a remote mp4 when yt-dlp downloads a section, which Python's `http.server`
cannot serve; this server speaks Range and injects faults on request, so download code is tested
against real sockets: `/stall/<name>`, `/flaky/<n>/<name>`, `/gone/<name>`, and 404 for missing
files. It binds 127.0.0.1 only and serves only the files directly inside its directory.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

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

    def _record(self, status: int) -> None:
        self.server.record(RequestRecord(self.command, self.path.split("?", 1)[0], status,
                                         self.headers.get("Range"), self.headers.get("User-Agent", "")))

    def _respond(self, status: int) -> None:
        """Log the request, then send the status line: a client that got an answer finds it logged."""
        self._record(status)
        self.send_response(status)

    def _route(self, path: str, send_body: bool) -> None:
        if _STALL.match(path):
            self._record(0)  # logged on arrival with status 0: it never gets an answer
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
                self._respond(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = span
        self._respond(HTTPStatus.PARTIAL_CONTENT if header else HTTPStatus.OK)
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
        body = f"{status.value} {status.phrase}\n".encode()
        self._respond(status)
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


__all__ = ["RequestRecord", "SampleServer", "serve_directory"]
