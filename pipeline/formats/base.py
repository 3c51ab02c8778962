"""The probe interface every format implements, and what a probe answers.

A probe looks only at the regions it declares (`head` bytes from offset 0, `tail` bytes at the end),
so the sniffer can collect exactly those regions as the stream passes and hold little memory. A probe
raises NotThisFormat when the bytes are not its format; a broken image of its format is a different
error, raised by its decoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Match:
    format: str
    detail: str = ""
    # A marker that may coexist with another format without making the input ambiguous (a GPT in a
    # hybrid ISO). Markers never decide the format on their own when a real format also matches.
    marker: bool = False

    def describe(self) -> str:
        return f"{self.format} ({self.detail})" if self.detail else self.format


class Probe(ABC):
    name: str
    head: int = 0
    tail: int = 0
    decodable: bool = False

    @abstractmethod
    def probe(self, head: bytes, tail: bytes | None, size: int | None) -> Match:
        """Return a Match or raise NotThisFormat. `tail` is None when the end is not known yet."""
