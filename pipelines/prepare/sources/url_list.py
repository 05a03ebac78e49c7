"""Plain lists of whole videos: one URL, local file or video id per line; faces found automatically."""

from __future__ import annotations

from pathlib import Path

from pipelines.prepare.requests import ClipRequest, clip_id_for
from pipelines.prepare.settings import DEFAULT_URL_TEMPLATE
from pipelines.prepare.sources.common import (
    InvalidInput,
    ParseFailure,
    ParseResult,
    SplitPolicy,
    finish,
    read_lines,
    resolve_video,
)


def parse_url_list(
    path: str | Path,
    *,
    url_template: str = DEFAULT_URL_TEMPLATE,
    splits: SplitPolicy = SplitPolicy(),
) -> ParseResult:
    """One whole video per line (URL, local file relative to the list, or video id); faces found automatically.

    ``#`` starts a comment line; blank lines are ignored. The identity is the derived video id
    (each video its own identity), since a plain list says nothing about who is in it.
    """
    path = Path(path)
    try:
        lines = read_lines(path)
    except InvalidInput as error:
        return [], [ParseFailure(str(path), str(error))]
    requests: list[ClipRequest] = []
    failures: list[ParseFailure] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            if len(text.split()) != 1:
                raise InvalidInput(f"expected one URL or path per line, found {text!r}")
            video_id, url = resolve_video(text, path.parent, url_template)
        except InvalidInput as error:
            failures.append(ParseFailure(f"{path}:{number}", str(error)))
            continue
        requests.append(
            ClipRequest(
                clip_id=clip_id_for(video_id, "whole"),
                video_id=video_id,
                url=url,
                identity=video_id,
                split=splits.split_for(video_id),
                source="urls",
                origin=f"{path}:{number}",
            )
        )
    return finish(requests, failures)

