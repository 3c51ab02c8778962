"""Error classes, each mapped to one exit status.

The split matters to callers: a refused image (exit 3) is permanent and must not be retried; anything
else (exit 1) may succeed on a retry; bad usage (exit 2) needs a different command line.
"""

from __future__ import annotations

import asyncio

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class ImgpipeError(Exception):
    """Base of every error the tool reports as one line."""

    exit_status = EXIT_FAILURE
    stage: str | None = None

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return f"{self.stage}: {text}" if self.stage else text


class UsageError(ImgpipeError):
    """The command line or settings are wrong; the message says what to change."""

    exit_status = EXIT_USAGE


class InputRefused(ImgpipeError):
    """The image is corrupt, unsupported or unsafe: permanent, never retried."""

    exit_status = EXIT_REFUSED


class NotThisFormat(Exception):
    """Raised by a format probe: the bytes are not this format (distinct from a broken image)."""


class CorruptImage(InputRefused):
    """The image claims a format but its structures are broken."""


class UnsupportedImage(InputRefused):
    """A recognised format (or feature) that this version does not convert."""


class UnsafeImage(InputRefused):
    """The image asks for something we refuse on principle (backing file, ambiguity, ...)."""


class SourceError(ImgpipeError):
    """Reading the source failed (network, permissions, missing object)."""


class SourceChanged(SourceError):
    """The source changed while we read it; a retry reads one consistent version."""


class SinkError(ImgpipeError):
    """Writing the destination failed."""


def is_missing(exc: Exception) -> bool:
    """A source error that says the object is not there (HTTP 404/410, S3 NoSuchKey, no such file)."""
    text = str(exc)
    return any(k in text for k in ("HTTP 404", "HTTP 410", "no such object", "no such file"))


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a task group's failure is about: its first leaf that is not a cancellation."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
