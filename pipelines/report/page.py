"""One self-contained HTML report of the whole system: dataset, training and editing, side by side.

`write_report` copies every picture and video it shows into the report folder (`assets/`), so the
folder can be zipped, mailed or served as it is, and writes `index.html` with plain HTML and CSS
(no scripts, no network). Sections have stable ids (`dataset`, `training`, `editing`) so tests and
people can find them; videos are the editing job's browser-playable previews (H.264 yuv420p,
faststart, AAC), each showing source | driving | result.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines import runs
from pipelines.dataset import manifest
from pipelines.dataset.layout import SUMMARY_PATH
from pipelines.edit.results import OK, read_results
from pipelines.storage import OutputStore, atomic_local_path

ASSETS = "assets"


@dataclass(frozen=True)
class ReportInputs:
    """Where the three jobs wrote: a prepared dataset, a training run folder (None when the demo edits
    with given weights), and an editing output folder; plus a note shown at the top."""

    dataset: str
    run: str | None
    edits: str
    note: str = ""


def write_report(inputs: ReportInputs, folder: str | Path) -> Path:
    """Write `folder/index.html` and its assets; returns the path of index.html."""
    folder = Path(folder)
    (folder / ASSETS).mkdir(parents=True, exist_ok=True)
    body = ["<h1>DPE portrait editing: demo report</h1>",
            f"<p class='note'>{html.escape(inputs.note)}</p>" if inputs.note else "",
            _dataset_section(inputs.dataset, folder),
            _training_section(inputs.run, folder),
            _editing_section(inputs.edits, folder)]
    page = (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>DPE demo report</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(part for part in body if part) + "\n</body></html>\n")
    index = folder / "index.html"
    with atomic_local_path(index) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return index


def _asset(store: OutputStore, relpath: str, folder: Path, name: str) -> str | None:
    """Copy one file of a job's output into the report's assets; its relative link, or None when absent."""
    if not store.exists(relpath):
        return None
    target = folder / ASSETS / name
    with atomic_local_path(target) as temporary:
        temporary.write_bytes(store.read_bytes(relpath))
    return f"{ASSETS}/{name}"


def _table(header: list[str], rows: list[list[object]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table class='{css}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dataset_section(dataset: str, folder: Path) -> str:
    store = OutputStore(dataset)
    summary = json.loads(store.read_bytes(SUMMARY_PATH))
    counts = [["clips requested", summary["requested"]], ["prepared", summary["ok"]], ["failed", summary["failed"]],
              ["seconds of prepared video", summary["ok_seconds"]],
              *[[f"shards ({split})", n] for split, n in summary["shards"].items()]]
    failures = sorted((row.failure_class or "", row.clip_id, row.message)
                      for row in manifest.load_state(store).values() if row.status == manifest.FAILED)
    sheet = _asset(store, "contact_sheet.png", folder, "contact_sheet.png")
    return ("<section id='dataset'><h2>1. Dataset preparation</h2>"
            f"<p>Dataset <code>{html.escape(store.uri)}</code>: every requested clip ends prepared or failed with "
            "a class that says why; bad inputs never stop the good ones.</p>"
            + _table(["", "count"], counts, "narrow")
            + "<h3>Failures</h3>" + _table(["failure class", "clip", "message"], [list(f) for f in failures])
            + (f"<h3>Contact sheet</h3><img src='{sheet}' alt='prepared clips with their landmarks'>" if sheet else "")
            + "</section>")


def _training_section(run: str | None, folder: Path) -> str:
    if run is None:
        return ("<section id='training'><h2>2. Training</h2><p>Skipped: the edits use the given checkpoint."
                "</p></section>")
    store = OutputStore(run)
    final = runs.read_json(store, runs.FINAL_METRICS, {})
    evaluations = runs.read_json(store, runs.EVALUATIONS, [])
    curve = _asset(store, runs.LOSS_CURVE, folder, "loss_curve.png")
    grids = sorted(path for path in store.list(runs.GRIDS) if path.endswith(".png"))
    shown = [grids[0], grids[-1]] if len(grids) > 1 else grids
    grid_html = "".join(f"<figure><img src='{_asset(store, path, folder, Path(path).name)}' alt='training grid'>"
                        f"<figcaption>{html.escape(Path(path).stem)}</figcaption></figure>" for path in shown)
    metrics = [[name, value] for name, value in sorted((evaluations[-1] if evaluations else {}).items())]
    facts = [[name, final[name]] for name in ("step", "pairs_per_s") if name in final]
    return ("<section id='training'><h2>2. Training</h2>"
            f"<p>Run <code>{html.escape(store.uri)}</code>. Grids: source, driving, expression transfer, pose "
            "transfer, both, on fixed held-out pairs.</p>" + _table(["", "value"], facts, "narrow")
            + (f"<h3>Loss curves</h3><img src='{curve}' alt='loss curves'>" if curve else "")
            + f"<h3>Training grids</h3><div class='grids'>{grid_html}</div>"
            + "<h3>Evaluation on the test split</h3>" + _table(["metric", "value"], metrics, "narrow")
            + "</section>")


def _editing_section(edits: str, folder: Path) -> str:
    store = OutputStore(edits)
    rows = sorted(read_results(store).values(), key=lambda row: row.job_id)
    table = _table(["job", "mode", "status", "frames", "edited", "passed through", "fps in / out", "seconds",
                    "failure", "message"],
                   [[Path(r.output).name, r.mode, r.status, r.frames, r.frames_edited, r.frames_passed_through,
                     f"{r.input_fps} / {r.output_fps}", r.output_duration_s, r.failure_class, r.message]
                    for r in rows])
    videos = []
    for row in rows:
        if row.status != OK or not row.preview_video:
            continue
        name = Path(row.output).stem
        video = _asset(store, _relative(store, row.preview_video), folder, f"{name}.mp4")
        sheet = _asset(store, _relative(store, row.preview_sheet), folder, f"{name}.png") if row.preview_sheet else None
        videos.append(f"<figure class='edit'><figcaption><b>{html.escape(name)}</b>: {html.escape(row.mode)} "
                      f"transfer, source | driving | result</figcaption>"
                      f"<video src='{video}' controls preload='auto' playsinline></video>"
                      + (f"<img src='{sheet}' alt='{html.escape(name)} contact sheet'>" if sheet else "")
                      + "</figure>")
    return ("<section id='editing'><h2>3. Editing</h2>"
            f"<p>Output <code>{html.escape(store.uri)}</code>: each edited video keeps its source's resolution, "
            "frame count, exact frame timing and audio.</p>" + table + "".join(videos) + "</section>")


def _relative(store: OutputStore, uri: str) -> str:
    """A path inside the edit output as the store names it (results record full paths or URIs)."""
    base = store.uri.rstrip("/") + "/"
    if uri.startswith(base):
        return uri[len(base):]
    local = Path(uri)
    if store.is_local and local.is_absolute():
        return str(local.relative_to(store.local_path()))
    return uri


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .3rem; margin-top: 2.5rem; }
.note { background: #fff6d6; border: 1px solid #e6c200; padding: .6rem .8rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
td, th { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
table.narrow td:last-child { text-align: right; }
img, video { max-width: 100%; display: block; margin: .4rem 0; }
.grids figure, figure.edit { margin: 1rem 0; }
code { background: #f4f4f4; padding: 0 .2rem; }
"""
