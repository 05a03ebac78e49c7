"""`portrait demo` in a reduced form (a few training steps, one edit), and its report in a real browser.

The browser is Debian's chromium (installed by .ci/run when missing), driven by Playwright: every
section, picture and video of the report must be there and load, and the videos must play.
"""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import av
import pytest

from flows.cli import main

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("dataset", "training", "editing")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_cluster, prefect_harness) -> Path:
    output = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--output", str(output), "--steps", "4", "--workers", "1", "--batch", "2",
                 "--jobs", "1"]) == 0
    return output


class _Media(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(values["id"])
        if tag in ("img", "video") and values.get("src"):
            self.sources.append(values["src"])


def test_the_report_links_only_files_it_holds_and_its_videos_play_in_browsers(demo):
    index = demo / "report" / "index.html"
    parser = _Media()
    parser.feed(index.read_text())
    assert set(SECTIONS) <= set(parser.ids)
    assert parser.sources, "the report shows nothing"
    for source in parser.sources:
        assert not source.startswith(("/", "http:", "https:", "file:")), f"{source} is not inside the report"
        assert (index.parent / source).is_file(), f"{source} is missing"
    videos = [index.parent / source for source in parser.sources if source.endswith(".mp4")]
    assert videos, "no edited video in the report"
    for path in videos:
        data = path.read_bytes()
        assert data.find(b"moov") < data.find(b"mdat"), f"{path.name}: not faststart"
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
            assert [stream.codec_context.name for stream in container.streams.audio] == ["aac"]
    assert "trained for minutes" in index.read_text()


def test_the_demo_trains_on_reconstruction_alone(demo):
    # The demo's recipe (README, training recipe): at 64 px without the VGG term the GAN term is held back.
    import csv

    with open(demo / "runs" / "demo" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["l1_self_pose"] for row in rows), rows
    assert not any(row.get("g_gan") or row.get("d_gan") for row in rows), rows


def test_a_rerun_of_the_demo_reuses_what_is_done(demo, capsys):
    parts = sorted(p.name for p in (demo / "dataset" / "manifest" / "parts").iterdir())
    results = (demo / "edited" / "results.parquet").read_bytes()
    assert main(["demo", "--output", str(demo), "--steps", "4", "--workers", "1", "--batch", "2", "--jobs", "1"]) == 0
    assert sorted(p.name for p in (demo / "dataset" / "manifest" / "parts").iterdir()) == parts
    assert (demo / "edited" / "results.parquet").read_bytes() == results, "a finished edit was done again"
    assert "open the report" in capsys.readouterr().out
    assert main(["inspect", str(demo / "edited")]) == 0
    assert "jobs" in capsys.readouterr().out


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_the_report_renders_in_a_real_browser_with_every_picture_and_video_loaded(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    index = demo / "report" / "index.html"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(index.as_uri())
            for section in SECTIONS:
                assert page.locator(f"section#{section} h2").is_visible()
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
            broken = page.evaluate("Array.from(document.images).filter(i => !i.naturalWidth).map(i => i.src)")
            assert broken == []
            page.wait_for_function("Array.from(document.querySelectorAll('video'))"
                                   ".every(v => v.readyState >= 2 || v.error)", timeout=60_000)
            videos = page.evaluate("Array.from(document.querySelectorAll('video')).map(v => "
                                   "({src: v.currentSrc, error: v.error && v.error.code, duration: v.duration, "
                                   "width: v.videoWidth}))")
            assert videos and all(v["error"] is None and v["duration"] > 1 and v["width"] > 0 for v in videos), videos
            page.evaluate("(async () => { const v = document.querySelector('video'); v.muted = true; "
                          "await v.play(); })()")
            page.wait_for_function("document.querySelector('video').currentTime > 0", timeout=60_000)
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
