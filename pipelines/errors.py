"""Errors that reject one clip with a machine-readable failure class.

Dataset preparation never stops for one bad clip: every stage raises a subclass of
`PreparationError`, the worker records its `failure_class` in the manifest and moves on. The class
names are stable strings (they are counted and filtered in reports); the message is for people.
"""

from __future__ import annotations

CORRUPT_VIDEO = "corrupt_video"
SPAN_OUTSIDE_VIDEO = "span_outside_video"
NO_FACE = "no_face"
MULTIPLE_FACES = "multiple_faces"
TRACK_TOO_SHORT = "track_too_short"
FACE_TOO_SMALL = "face_too_small"
FACE_LEAVES_FRAME = "face_leaves_frame"


class PreparationError(Exception):
    """A failure of one input, with a stable `failure_class` and a message naming input and cause."""

    def __init__(self, failure_class: str, message: str) -> None:
        super().__init__(f"{failure_class}: {message}")
        self.failure_class = failure_class
        self.message = message


class VideoError(PreparationError):
    """A video that cannot be read as asked (corrupt, truncated, span outside it)."""


class ClipRejected(PreparationError):
    """A clip that cannot become a training sample (no usable face track, unreadable video)."""
