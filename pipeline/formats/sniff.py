"""Run every probe over the same bytes and decide, refusing ambiguity; raw is the fallback, last."""

from __future__ import annotations

from pipeline.errors import NotThisFormat, UnsafeImage, UnsupportedImage
from pipeline.formats.base import Match
from pipeline.formats.probes import COPIED, DECODABLE, PACKAGES, PROBES, TAIL_BYTES, WRAPPERS
from pipeline.formats.registry import DECODERS

# Pairs that really do occur together in good images and are decoded as the first element.
BENIGN = {frozenset({"iso", "raw"})}


def decide(head: bytes, tail: bytes | None, size: int | None, allow_wrappers: bool = False) -> Match:
    """The one format the bytes are. A compressed wrapper (gzip, xz, bzip2, zstd) is returned only
    with allow_wrappers (the runner and the unwrap stage peel it); otherwise it is refused by name."""
    matches: list[Match] = []
    for probe in PROBES:
        if tail is None and probe.tail and not probe.head:
            continue  # tail-only probes run at EOF, see check_tail()
        try:
            matches.append(probe.probe(head, tail, size))
        except NotThisFormat:
            continue
    real = [m for m in matches if not m.marker]
    # Markers (a GPT) only describe what a raw disk holds: they never make an image ambiguous.
    formats = {m.format for m in real}
    if formats == {"iso", "vhd"} and any(m.format == "vhd" and m.detail == "fixed" for m in real):
        # A fixed VHD is raw data plus a footer: an ISO 9660 filesystem inside it is that data.
        real = [m for m in real if m.format == "vhd"]
        formats = {"vhd"}
    if len(formats) > 1 and formats not in BENIGN:
        found = " and ".join(sorted({m.describe() for m in matches}))
        raise UnsafeImage(
            f"input matches more than one format: {found}; refusing an ambiguous image "
            "(a file crafted to be read differently by different tools)"
        )
    if not matches:
        return Match("raw")
    chosen = real[0] if real else matches[0]
    if chosen.format in WRAPPERS:
        if allow_wrappers:
            return chosen
        raise UnsupportedImage(
            f"input is a {chosen.describe()} stream; imgpipe info does not look inside compressed "
            "images yet (convert decompresses them)"
        )
    if chosen.format in PACKAGES or chosen.format in COPIED:
        return chosen
    if chosen.format not in DECODABLE and chosen.format not in DECODERS:
        raise UnsupportedImage(
            f"input is a {chosen.describe()} image; this version of imgpipe does not convert "
            f"{chosen.format} yet (it is refused rather than copied as a raw disk)"
        )
    return chosen


def check_tail(tail: bytes, size: int) -> None:
    """Sequential sources learn their tail only at EOF: refuse then what the tail reveals (a format
    with a decoder is the raw decode stage's business: it trims the footer, see stages.py)."""
    head = b""
    for probe in PROBES:
        if not probe.tail or probe.name in DECODERS:
            continue
        try:
            m = probe.probe(head, tail, size)
        except NotThisFormat:
            continue
        raise UnsupportedImage(
            f"input is a {m.describe()} image (found at its end); this version of imgpipe does not "
            f"convert {m.format} yet (it is refused rather than copied as a raw disk)"
        )


__all__ = ["TAIL_BYTES", "check_tail", "decide"]
