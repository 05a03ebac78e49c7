"""The sample media are what they claim to be, and the loopback server speaks HTTP correctly."""

from __future__ import annotations

import http.client
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.sample.media import SAMPLE_SIZE, describe_media, make_sample_media
from pipelines.sample.server import _parse_range, serve_directory


def _top_level_boxes(path: Path) -> list[str]:
    """Names of the top-level ISO-BMFF boxes of an mp4, in file order."""
    names, data, offset = [], path.read_bytes(), 0
    while offset + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[offset:offset + 8])
        if size == 1:
            size = struct.unpack(">Q", data[offset + 8:offset + 16])[0]
        names.append(name.decode("latin-1"))
        if size < 8:
            break
        offset += size
    return names


def _get(server, route: str, method: str = "GET", headers: dict | None = None, timeout: float = 5):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, "/" + route, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_talk_is_a_looped_faststart_clip_with_audio(sample_media):
    info = describe_media(sample_media["talk.mp4"])
    assert (info["width"], info["height"]) == SAMPLE_SIZE
    assert info["has_audio"]
    assert 11.5 < info["duration_s"] < 12.5
    assert info["frames"] == 360  # 3 loops of the 120-frame clip
    boxes = _top_level_boxes(sample_media["talk.mp4"])
    assert boxes.index("moov") < boxes.index("mdat"), boxes


def test_other_samples(sample_media):
    noface, twofaces = describe_media(sample_media["noface.mp4"]), describe_media(sample_media["twofaces.mp4"])
    assert 3.5 < noface["duration_s"] < 4.5 and noface["has_audio"]
    assert (twofaces["width"], twofaces["height"]) == (2 * SAMPLE_SIZE[0], SAMPLE_SIZE[1])
    talk_bytes = sample_media["talk.mp4"].read_bytes()
    corrupt_bytes = sample_media["corrupt.mp4"].read_bytes()
    assert talk_bytes.startswith(corrupt_bytes) and len(corrupt_bytes) < len(talk_bytes) // 2
    assert describe_media(sample_media["corrupt.mp4"])["frames"] < 360  # header fine, frames missing


def test_make_sample_media_is_idempotent_and_leaves_no_temp_files(sample_media):
    directory = sample_media["talk.mp4"].parent
    before = {path: path.stat().st_mtime_ns for path in sample_media.values()}
    again = make_sample_media(directory)
    assert again == sample_media
    assert {path: path.stat().st_mtime_ns for path in again.values()} == before
    assert sorted(p.name for p in directory.iterdir()) == sorted([*sample_media, "recipes.sha256"])


def test_media_made_by_another_recipe_are_made_again(sample_media, tmp_path):
    """A cache folder that outlives an upgrade must not hand back media made by the old recipe."""
    for name, path in sample_media.items():
        (tmp_path / name).write_bytes(b"made by an older recipe" if name == "talk.mp4" else path.read_bytes())
    (tmp_path / "recipes.sha256").write_text("an older recipe\n")
    again = make_sample_media(tmp_path)
    assert describe_media(again["talk.mp4"]) == describe_media(sample_media["talk.mp4"])
    assert (tmp_path / "recipes.sha256").read_text() == (sample_media["talk.mp4"].parent / "recipes.sha256").read_text()


def test_serves_whole_files_ranges_and_head(sample_server, sample_media):
    data = sample_media["talk.mp4"].read_bytes()
    status, headers, body = _get(sample_server, "talk.mp4")
    assert (status, headers["Content-Type"], int(headers["Content-Length"]), body) == (200, "video/mp4", len(data), data)

    status, headers, body = _get(sample_server, "talk.mp4", headers={"Range": "bytes=100-199"})
    assert (status, body, headers["Content-Range"]) == (206, data[100:200], f"bytes 100-199/{len(data)}")
    status, _, body = _get(sample_server, "talk.mp4", headers={"Range": "bytes=-50"})
    assert (status, body) == (206, data[-50:])
    status, _, body = _get(sample_server, "talk.mp4", headers={"Range": f"bytes={len(data) + 10}-"})
    assert status == 416

    status, headers, body = _get(sample_server, "talk.mp4", method="HEAD")
    assert (status, int(headers["Content-Length"]), body) == (200, len(data), b"")


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 10_000), first=st.integers(0, 12_000), length=st.integers(0, 12_000))
def test_parse_range_stays_inside_the_file(size, first, length):
    span = _parse_range(f"bytes={first}-{first + length}", size)
    if first >= size:
        assert span is None
    else:
        assert span == (first, min(first + length, size - 1))


@pytest.mark.parametrize("header", ["bytes=-", "bytes=5-2", "items=0-1", "bytes=0-1,4-5"])
def test_parse_range_rejects_malformed_or_empty(header):
    assert _parse_range(header, 100) is None


def test_fault_routes(sample_server):
    assert _get(sample_server, "missing.mp4")[0] == 404
    assert _get(sample_server, "../pyproject.toml")[0] == 404
    assert _get(sample_server, "gone/talk.mp4")[0] == 410
    statuses = [_get(sample_server, "flaky/2/noface.mp4")[0] for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    logged = [r.status for r in sample_server.requests if r.path == "/flaky/2/noface.mp4"]
    assert logged == statuses


def test_stall_holds_the_connection_until_shutdown(sample_media):
    with serve_directory(sample_media["talk.mp4"].parent) as server:
        outcome = {}

        def stalled_request():
            try:
                outcome["status"] = _get(server, "stall/talk.mp4", timeout=10)[0]
            except (http.client.HTTPException, OSError) as error:
                outcome["error"] = error

        client = threading.Thread(target=stalled_request)
        client.start()
        while not any(r.path == "/stall/talk.mp4" for r in server.requests):  # logged on arrival
            assert client.is_alive(), f"the stall route answered instead of stalling: {outcome}"
            time.sleep(0.01)
        assert client.is_alive(), "the stall route answered instead of stalling"
        started = time.monotonic()
    shutdown_s = time.monotonic() - started
    client.join(5)
    assert shutdown_s < 3, "shutting down must release stalled connections"
    assert "status" not in outcome and "error" in outcome
