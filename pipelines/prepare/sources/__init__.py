"""Parse the kinds of metadata input into `ClipRequest`s, never stopping on bad input.

1. VoxCeleb1/2 metadata trees (`voxceleb`), 2. clip tables, CSV/TSV or Parquet, in the style of
``vox-metadata.csv`` (`clip_table`), 3. plain lists of video URLs, local files or ids (`url_list`).
What they share (failures, splits, video references, duplicates) is in `common`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines.prepare.settings import DEFAULT_URL_TEMPLATE, SourceInputs
from pipelines.prepare.sources.clip_table import parse_clip_table
from pipelines.prepare.sources.common import ClipFilter, ParseFailure, ParseResult, SplitPolicy, finish

__all__ = ["InputError", "ParseFailure", "ParseResult", "SourceInputs", "SplitPolicy", "check_inputs",
           "parse_clip_table", "parse_sources", "stream_videos", "parse_url_list", "parse_voxceleb_tree"]
from pipelines.prepare.requests import ClipRequest
from pipelines.prepare.sources.url_list import parse_url_list
from pipelines.prepare.sources.voxceleb import iter_voxceleb_videos, parse_voxceleb_tree, voxceleb_txt_root

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


class InputError(ValueError):
    """An input named on the command line (or in the flow's parameters) that cannot be read as
    the kind it was given as; found before any service starts."""


def check_inputs(inputs: SourceInputs) -> None:
    """Raise `InputError` naming the first input that is missing or not of its kind."""
    for flag, paths in (("--vox1-txt", inputs.vox1_txt), ("--vox2-txt", inputs.vox2_txt)):
        for text in paths:
            path = Path(text)
            if not path.is_dir():
                kind = "a file" if path.exists() else "missing"
                raise InputError(f"{flag} {text}: {kind}; expected the folder of a VoxCeleb metadata tree "
                                 f"(txt/<identity>/<video>/<utterance>.txt)")
            if voxceleb_txt_root(path) is None:
                raise InputError(f"{flag} {text}: holds no VoxCeleb utterance files "
                                 f"(<identity>/<video>/<utterance>.txt, under a txt/ folder or directly)")
    for flag, paths, check in (("--clips", inputs.clips, _is_table), ("--urls", inputs.urls, _is_list)):
        for text in paths:
            problem = check(Path(text))
            if problem:
                raise InputError(f"{flag} {text}: {problem}")


def _is_table(path: Path) -> str | None:
    if not path.is_file():
        return "missing" if not path.exists() else "a folder; expected a CSV, TSV or Parquet clip table"
    if path.suffix.lower() not in TABLE_SUFFIXES:
        return f"expected a clip table ending in {', '.join(TABLE_SUFFIXES)}"
    return None


def _is_list(path: Path) -> str | None:
    if not path.is_file():
        return "missing" if not path.exists() else "a folder; expected a text file with one URL per line"
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "a clip table; give it with --clips"
    return None


def parse_sources(
    inputs: SourceInputs,
    *,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
) -> ParseResult:
    """Parse every input as the kind it was given as, and drop duplicates across all of them."""
    results = [
        *(parse_voxceleb_tree(path, version=1, url_template=url_template, splits=splits) for path in inputs.vox1_txt),
        *(parse_voxceleb_tree(path, version=2, url_template=url_template, splits=splits) for path in inputs.vox2_txt),
        *(parse_clip_table(path, url_template=url_template, splits=splits) for path in inputs.clips),
        *(parse_url_list(path, url_template=url_template, splits=splits) for path in inputs.urls),
    ]
    requests: list[ClipRequest] = [request for found, _ in results for request in found]
    failures: list[ParseFailure] = [failure for _, bad in results for failure in bad]
    return finish(requests, failures)


VideoClips = tuple[list[ClipRequest], list[ParseFailure]]
"""The clips of one video that passed the filter, and the input failures met on the way there."""


def stream_videos(
    inputs: SourceInputs,
    *,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
) -> Iterator[VideoClips]:
    """Every input as a stream of videos, each with all of its clips in that input, duplicates
    across inputs dropped as `parse_sources` drops them.

    VoxCeleb trees (the inputs that reach a million files) are walked one video folder at a time,
    large ones parsed by worker processes (`iter_voxceleb_videos`); clip tables and URL lists are
    read whole and then grouped per video, in input order.
    """
    admit = ClipFilter()
    sources: list[Iterable[VideoClips]] = [
        *(iter_voxceleb_videos(path, version=1, url_template=url_template, splits=splits) for path in inputs.vox1_txt),
        *(iter_voxceleb_videos(path, version=2, url_template=url_template, splits=splits) for path in inputs.vox2_txt),
        *(_per_video(parse_clip_table(path, url_template=url_template, splits=splits)) for path in inputs.clips),
        *(_per_video(parse_url_list(path, url_template=url_template, splits=splits)) for path in inputs.urls),
    ]
    for source in sources:
        for requests, failures in source:
            kept, refused = admit.split(requests)
            yield kept, failures + refused


def _per_video(parsed: ParseResult) -> Iterator[VideoClips]:
    """A parsed input's clips grouped per video (first appearance order), its failures with the first group."""
    requests, failures = parsed
    groups: dict[tuple[str, str], list[ClipRequest]] = {}
    for request in requests:
        groups.setdefault((request.video_id, request.url), []).append(request)
    yield [], list(failures)
    for group in groups.values():
        yield group, []
