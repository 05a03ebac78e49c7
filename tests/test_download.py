"""Real yt-dlp against the loopback sample server: sections, retries, failure classes, cache, safety."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yt_dlp
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.prepare.download import (
    DownloadCache,
    DownloadedSection,
    DownloadError,
    DownloadOptions,
    check_url,
    classify_failure,
    download_for_clips,
    download_video,
    ensure_ffmpeg_on_path,
    find_section,
    merge_spans,
    resolve_url,
)
from pipelines.prepare.requests import ClipRequest
from pipelines.sample.media import describe_media
from pipelines.sample.server import serve_directory

FPS = 30000 / 1001
FAST = DownloadOptions(retries=2, backoff_base_s=0.01, socket_timeout_s=5)


@pytest.fixture
def server(sample_media):
    """A server of our own per test, so request counts and flaky counters start at zero."""
    with serve_directory(sample_media["talk.mp4"].parent, stall_limit_s=10) as served:
        yield served


def _requests_to(server, path: str) -> list:
    return [r for r in server.requests if r.path == path]


def _leftovers(directory: Path) -> list[Path]:
    """Partial or temporary files anywhere under a cache directory."""
    return [p for p in directory.rglob("*") if p.is_file() and (
        ".staging" in p.parts or p.name.endswith((".part", ".tmp", ".ytdl")) or ".part-" in p.name)]


def test_two_clips_of_one_video_come_in_one_call_as_two_exact_sections(server, sample_media, tmp_path):
    cache = DownloadCache(tmp_path)
    options = DownloadOptions(margin_s=0.5, join_gap_s=1.0)
    sections = download_video("talk", server.url("talk.mp4"), [(1.0, 3.0), (7.0, 9.0)], cache, options).sections

    assert [(s.start_s, s.end_s) for s in sections] == [(0.5, 3.5), (6.5, 9.5)]
    whole_size = sample_media["talk.mp4"].stat().st_size
    for section in sections:
        info = describe_media(section.path)
        assert abs(info["duration_s"] - 3.0) < 0.1
        assert abs(info["frames"] - 3.0 * FPS) <= 2
        assert info["has_audio"]
        assert section.path.stat().st_size < whole_size / 2
    extractions = [r for r in _requests_to(server, "/talk.mp4") if r.range is None]
    assert len(extractions) == 1, "both sections must come from a single yt-dlp call"

    section, offset = find_section(sections, 7.0, 9.0)
    assert (section, offset) == (sections[1], 0.5)
    assert _leftovers(tmp_path) == []


def test_rerun_with_the_same_spans_is_served_from_the_cache(server, tmp_path):
    cache = DownloadCache(tmp_path)
    first = download_video("talk", server.url("talk.mp4"), [(2.0, 4.0)], cache, FAST).sections
    requests_after_first = len(server.requests)
    again = download_video("talk", server.url("talk.mp4"), [(2.0, 4.0)], DownloadCache(tmp_path), FAST).sections
    assert again == first and len(server.requests) == requests_after_first

    download_video("talk", server.url("talk.mp4"), [(5.0, 6.0)], cache, FAST)  # other spans: a new download
    assert len(server.requests) > requests_after_first


def test_near_spans_merge_into_one_section(server, tmp_path):
    sections = download_video("talk", server.url("talk.mp4"), [(1.0, 2.0), (2.5, 3.5)], DownloadCache(tmp_path), FAST).sections
    assert [(s.start_s, s.end_s) for s in sections] == [(0.5, 4.0)]
    assert find_section(sections, 2.5, 3.5) == (sections[0], 2.0)


def test_whole_video_when_a_span_is_open(server, sample_media, tmp_path):
    sections = download_video("talk", server.url("talk.mp4"), [(1.0, 2.0), None], DownloadCache(tmp_path), FAST).sections
    assert len(sections) == 1 and (sections[0].start_s, sections[0].end_s) == (0.0, None)
    assert sections[0].path.read_bytes() == sample_media["talk.mp4"].read_bytes()
    assert find_section(sections, 4.0, 5.0) == (sections[0], 4.0)


def test_clip_requests_of_one_video_make_one_download(server, tmp_path):
    template = server.base_url + "/{id}.mp4"
    clips = [ClipRequest(f"talk/{n}", "talk", "talk", "id0", start_s=start, end_s=start + 1.5)
             for n, start in enumerate((0.5, 8.0))]
    sections = download_for_clips(clips, DownloadCache(tmp_path), DownloadOptions(url_template=template)).sections
    assert len(sections) == 2
    assert len([r for r in _requests_to(server, "/talk.mp4") if r.range is None]) == 1
    with pytest.raises(ValueError, match="one video"):
        download_for_clips([clips[0], ClipRequest("x/0", "other", "other", "id1")], DownloadCache(tmp_path))


def test_rate_limit_and_sleep_slow_a_whole_download_down(server, sample_media, tmp_path):
    download_video("noface", server.url("noface.mp4"), [None], DownloadCache(tmp_path / "warm"), FAST)  # ~0.1 s warm
    size = sample_media["noface.mp4"].stat().st_size
    polite = DownloadOptions(rate_limit_bytes_per_s=size, sleep_between_s=0.3)  # about 1 s + 0.3 s
    started = time.monotonic()
    download_video("noface", server.url("noface.mp4"), [None], DownloadCache(tmp_path / "polite"), polite)
    assert time.monotonic() - started > 1.1


def test_downloads_go_through_the_configured_proxy(server, tmp_path):
    options = DownloadOptions(proxy=server.base_url, retries=0)
    with pytest.raises(DownloadError) as caught:  # .invalid never resolves: only the proxy can answer
        download_video("talk", "http://video.invalid/talk.mp4", [None], DownloadCache(tmp_path), options)
    assert caught.value.failure_class == "not_found"
    assert [r.path for r in server.requests] == ["http://video.invalid/talk.mp4"]


@pytest.mark.parametrize(("route", "failure_class"), [("missing.mp4", "not_found"), ("gone/talk.mp4", "gone")])
def test_permanent_http_failures_are_not_retried_and_are_recorded(server, tmp_path, route, failure_class):
    cache = DownloadCache(tmp_path)
    with pytest.raises(DownloadError) as caught:
        download_video("vid-1", server.url(route), [(1.0, 2.0)], cache, FAST)
    error = caught.value
    assert (error.failure_class, error.permanent) == (failure_class, True)
    assert "vid-1" in error.message and server.url(route) in error.message
    assert len(_requests_to(server, "/" + route)) == 1, "a permanent failure must not be retried"

    with pytest.raises(DownloadError) as again:  # a rerun does not ask the host again
        download_video("vid-1", server.url(route), [(3.0, 4.0)], cache, FAST)
    assert again.value.failure_class == failure_class
    assert len(_requests_to(server, "/" + route)) == 1
    assert _leftovers(tmp_path) == []


def test_transient_503_is_retried_until_it_succeeds(server, tmp_path):
    route = "flaky/2/talk.mp4"
    sections = download_video("talk", server.url(route), [(1.0, 2.0)], DownloadCache(tmp_path), FAST).sections
    assert len(sections) == 1 and describe_media(sections[0].path)["frames"] > 50
    statuses = [r.status for r in _requests_to(server, "/" + route)]
    assert statuses[:2] == [503, 503] and set(statuses[2:]) <= {200, 206}


def test_transient_failures_give_up_after_the_retry_count(server, tmp_path):
    route = "flaky/9/talk.mp4"
    with pytest.raises(DownloadError) as caught:
        download_video("talk", server.url(route), [None], DownloadCache(tmp_path), FAST)
    assert (caught.value.failure_class, caught.value.permanent) == ("server_error", False)
    assert len(_requests_to(server, "/" + route)) == FAST.retries + 1
    assert _leftovers(tmp_path) == []


def test_a_stalled_connection_times_out_within_seconds(server, tmp_path):
    options = DownloadOptions(retries=1, backoff_base_s=0.01, socket_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        download_video("talk", server.url("stall/talk.mp4"), [(1.0, 2.0)], DownloadCache(tmp_path), options)
    assert time.monotonic() - started < 20  # the stalled server would hold it 30 s per try
    assert (caught.value.failure_class, caught.value.permanent) == ("timeout", False)
    assert len(_requests_to(server, "/stall/talk.mp4")) == 2  # first try and one retry
    assert _leftovers(tmp_path) == []


def test_a_span_past_the_end_gives_no_section_but_the_videos_length(server, sample_media, tmp_path):
    cache = DownloadCache(tmp_path)
    past = download_video("talk", server.url("talk.mp4"), [(30.0, 31.0)], cache, FAST)
    assert past.sections == () and past.duration_s == pytest.approx(describe_media(sample_media["talk.mp4"])
                                                                        ["duration_s"], abs=0.1)
    both = download_video("talk", server.url("talk.mp4"), [(1.0, 2.0), (30.0, 31.0)], cache, FAST)
    assert [s.start_s for s in both.sections] == [0.5] and both.duration_s == past.duration_s
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name, content, failure_class", [
    ("empty.mp4", b"", "not_a_video"),
    ("notes.mp4", b"this is a text file, not a video\n" * 20, "not_a_video"),
])
def test_a_whole_download_that_is_no_video_fails_with_what_it_is(server, sample_media, tmp_path, name, content,
                                                                 failure_class):
    served = sample_media["talk.mp4"].parent / name
    served.write_bytes(content)
    try:
        with pytest.raises(DownloadError) as caught:
            download_video(name, server.url(name), [None], DownloadCache(tmp_path), FAST)
    finally:
        served.unlink()
    assert (caught.value.failure_class, caught.value.permanent) == (failure_class, True)
    assert server.url(name) in caught.value.message and str(tmp_path) not in caught.value.message


def test_local_files_are_refused_unless_allowed(sample_media, tmp_path):
    path = sample_media["talk.mp4"]
    cache = DownloadCache(tmp_path)
    for url in (path.as_uri(), str(path)):
        with pytest.raises(DownloadError) as caught:
            download_video("talk", url, [None], cache)
        assert (caught.value.failure_class, caught.value.permanent) == ("refused_scheme", True)
        assert "allow_file_urls" in caught.value.message
    assert not (tmp_path / "failures").exists(), "refusals are decisions about URLs, not about videos"

    sections = download_video("talk", str(path), [(1.0, 2.0)], cache, DownloadOptions(allow_file_urls=True)).sections
    assert sections[0].end_s is None and sections[0].path.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("url", ["ftp://example.org/a.mp4", "data:video/mp4;base64,AAAA", "javascript:alert(1)",
                                 "rtmp://127.0.0.1/live", "gopher://x/"])
def test_other_schemes_are_refused_even_with_file_urls_allowed(url):
    with pytest.raises(DownloadError) as caught:
        check_url(url, allow_file_urls=True)
    assert (caught.value.failure_class, caught.value.permanent) == ("refused_scheme", True)


def test_ids_starting_with_dash_or_underscore_are_ids_not_options(server, sample_media, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    for name in ("-dash", "_under"):
        shutil.copy(sample_media["noface.mp4"], served / f"{name}.mp4")
    with serve_directory(served) as own:
        template = own.base_url + "/{id}.mp4"
        for video_id in ("-dash", "_under"):
            url = resolve_url(video_id, template)
            assert url == f"{own.base_url}/{video_id}.mp4"
            sections = download_video(video_id, url, [None], DownloadCache(tmp_path / "cache"), FAST).sections
            assert sections[0].path.stat().st_size == (served / f"{video_id}.mp4").stat().st_size


def test_resolve_url_keeps_urls_and_paths_and_checks_the_template():
    assert resolve_url("-abc_DEF12") == "https://www.youtube.com/watch?v=-abc_DEF12"
    assert resolve_url("https://host/v.mp4", "http://mirror/{id}") == "https://host/v.mp4"
    assert resolve_url("/data/v.mp4") == "/data/v.mp4"
    with pytest.raises(ValueError, match="placeholder"):
        resolve_url("abc", "https://host/watch")
    with pytest.raises(ValueError):
        resolve_url("  ")


@settings(max_examples=200, deadline=None)
@given(video_id=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20)
       .filter(lambda s: s.strip() == s and "://" not in s and not s.startswith(("/", ".", "~"))))
def test_resolve_url_round_trips_any_id_through_the_query(video_id):
    url = resolve_url(video_id)
    assert url.startswith("https://www.youtube.com/watch?v=")
    assert parse_qs(urlsplit(url).query, keep_blank_values=True)["v"] == [video_id]
    assert unquote(url.rsplit("=", 1)[1]) == video_id


span_lists = st.lists(st.tuples(st.floats(0, 500, allow_nan=False), st.floats(0.01, 60, allow_nan=False))
                      .map(lambda t: (t[0], t[0] + t[1])), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(spans=span_lists, margin=st.floats(0, 2), gap=st.floats(0, 5))
def test_merged_spans_cover_every_span_and_are_disjoint(spans, margin, gap):
    merged = merge_spans(spans, margin, gap)
    assert len(merged) <= len(spans)
    for start, end in spans:
        assert any(m_start <= max(0.0, start - margin) and end + margin <= m_end for m_start, m_end in merged)
    for (_, end), (start, _) in zip(merged, merged[1:]):
        assert start - end > gap
    assert all(start >= 0 for start, _ in merged)


def test_merge_spans_whole_video_and_bad_spans():
    assert merge_spans([(1.0, 2.0), None]) is None
    for bad in [(2.0, 1.0), (-1.0, 2.0), (0.0, float("inf")), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="bad time span"):
            merge_spans([bad])


def test_find_section_rejects_spans_no_section_holds(tmp_path):
    sections = [DownloadedSection(tmp_path / "a.mp4", 1.0, 4.0)]
    assert find_section(sections, 1.0, 4.0)[1] == 0.0
    for start, end in [(0.5, 2.0), (3.0, 4.5), (None, None), (2.0, None)]:
        with pytest.raises(LookupError):
            find_section(sections, start, end)


@pytest.mark.parametrize(("message", "failure_class", "permanent"), [
    ("ERROR: [youtube] abc: Private video. Sign in if you've been granted access to this video", "private", True),
    ("ERROR: [youtube] abc: Video unavailable. This video has been removed by the uploader", "unavailable", True),
    ("ERROR: [youtube] abc: Video unavailable. This video contains content from X, who has blocked it on "
     "copyright grounds", "copyright", True),
    ("ERROR: [youtube] abc: The uploader has not made this video available in your country", "geo_blocked", True),
    ("ERROR: [youtube] abc: Sign in to confirm your age", "age_restricted", True),
    ("ERROR: Unsupported URL: https://example.org/page", "unsupported_url", True),
    ("ERROR: [youtube] abc: Sign in to confirm you're not a bot", "rate_limited", False),
    ("ERROR: unable to download video data: HTTP Error 429: Too Many Requests", "rate_limited", False),
    ("ERROR: unable to download video data: HTTP Error 403: Forbidden", "forbidden", True),
    ("ERROR: [generic] x: Unable to download webpage: [Errno 104] Connection reset by peer", "network", False),
    ("ERROR: something nobody has seen before", "download_failed", False),
])
def test_classify_failure_from_yt_dlp_messages(message, failure_class, permanent):
    from pipelines.errors import is_transient

    assert classify_failure(yt_dlp.utils.DownloadError(message)) == failure_class
    assert is_transient(failure_class) is not permanent


def test_classify_failure_prefers_structured_causes():
    geo = yt_dlp.utils.GeoRestrictedError("blocked")
    wrapped = yt_dlp.utils.DownloadError("ERROR: blocked", exc_info=(type(geo), geo, None))
    assert classify_failure(wrapped) == "geo_blocked"
    timeout = yt_dlp.utils.DownloadError("ERROR: something failed")
    timeout.__cause__ = TimeoutError()
    assert classify_failure(timeout) == "timeout"


def test_ffmpeg_goes_on_path_once_even_from_many_threads():
    folders: list[Path] = []
    threads = [threading.Thread(target=lambda: folders.append(ensure_ffmpeg_on_path())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(folders)) == 1
    assert os.environ["PATH"].split(os.pathsep).count(str(folders[0])) == 1
    assert shutil.which("ffmpeg") == str(folders[0] / "ffmpeg")


def test_download_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(DownloadError("gone", "video x (http://h/x): gone")))
    assert (error.failure_class, error.message, error.permanent) == ("gone", "video x (http://h/x): gone", True)


def test_a_damaged_entry_can_be_evicted_so_the_next_run_downloads_again(server, tmp_path):
    cache = DownloadCache(tmp_path)
    sections = download_video("talk", server.url("talk.mp4"), [(2.0, 4.0)], cache, FAST).sections
    cache.evict(sections[0])
    assert cache.lookup("talk", merge_spans([(2.0, 4.0)], FAST.margin_s, FAST.join_gap_s)) is None
    with pytest.raises(ValueError, match="not inside the download cache"):
        cache.evict(DownloadedSection(tmp_path.parent / "elsewhere.mp4", 0.0, None))


def test_videos_that_never_come_load_no_detector_and_share_one_ytdlp(server, tmp_path, monkeypatch):
    """A 404 costs milliseconds: no detector load and no yt-dlp warm-up per video (bench_prepare_scale measures it)."""
    from pipelines.prepare import download, worker

    built = []
    real = yt_dlp.YoutubeDL
    monkeypatch.setattr(download, "_DOWNLOADERS", threading.local())
    monkeypatch.setattr(download.yt_dlp, "YoutubeDL", lambda params: built.append(params) or real(params))
    monkeypatch.setattr(worker, "_detector", lambda name: pytest.fail("a detector was loaded for a missing video"))
    settings = worker.WorkerSettings(download_dir=str(tmp_path), download=FAST)
    for n in range(3):
        requests = [ClipRequest(clip_id=f"gone{n}/{k}", video_id=f"gone{n}", url=server.url(f"gone{n}.mp4"),
                                identity="i", start_s=1.0 + 5 * k, end_s=3.0 + 5 * k) for k in range(2)]
        assert [o.failure_class for o in worker.prepare_video(requests, settings)] == ["not_found"] * 2
    assert len(built) == 1, "one yt-dlp instance serves every video of a worker"
