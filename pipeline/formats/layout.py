"""The decoder interface every sparse disk format implements, and the reader it reads through.

A decoder turns an image file into a guest-ordered list of `Piece`s: runs of the guest disk that are
zeros, or bytes stored at a file offset (plain, or compressed with a codec the decoder undoes). It
reads its headers and tables through an `ImageReader`, lazily, as it walks the guest disk in order:

- with a range-capable source (file, HTTP with ranges, S3) every read is a ranged read;
- with a sequential source (stdin, HTTP without ranges, later: inside gzip or tar) the reader is a
  forward-only stream that keeps a bounded window of the bytes it skipped over, so tables and data
  that come slightly out of order still work; a layout that needs more fails with a message that
  names the remedy.

The decode stage (pipeline/formats/decode.py) reads the pieces' bytes through the same reader,
coalesces neighbouring ranges, and assembles guest windows for the zero-skip and encode stages.

Decoders raise CorruptImage for broken structures, UnsafeImage / UnsupportedImage for what they
refuse; "not this format" is the probe's business (formats/probes.py), never the decoder's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.errors import CorruptImage
from pipeline.settings import Settings

ZERO = -1  # Piece.file for a run that reads as zeros (unallocated, or a zero flag)


@dataclass(frozen=True, slots=True)
class Piece:
    """`length` guest bytes at guest offset `guest`.

    file == ZERO: zeros. codec == "": the bytes are stored as is at [file, file + length).
    Otherwise `stored` bytes at `file` hold the run encoded with `codec`; the decoder's decode()
    turns them back into exactly `length` bytes (a compressed cluster, a VMDK grain).
    """

    guest: int
    length: int
    file: int = ZERO
    stored: int = 0
    codec: str = ""

    @property
    def zero(self) -> bool:
        return self.file == ZERO

    @property
    def file_length(self) -> int:
        """Bytes of the file this piece needs."""
        if self.file == ZERO:
            return 0
        return self.stored if self.codec else self.length


@dataclass(slots=True)
class ImageInfo:
    """What `imgpipe info` shows and the summary reports; filled by Decoder.open()."""

    format: str
    subformat: str = ""
    virtual_size: int = 0
    cluster_size: int = 0  # cluster, grain or block size: the allocation unit
    allocated: int | None = None  # bytes of guest data the image stores, when its tables say
    details: dict[str, Any] = field(default_factory=dict)


class ImageReader(ABC):
    """Reads the image file. Offsets are file offsets."""

    size: int | None  # None: not known until EOF (a sequential source of unknown length)
    ranged: bool  # True: any offset, any order; False: forward only (see module docstring)

    @abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (metadata: headers, tables). A read past the end of
        the file raises CorruptImage (a truncated image)."""

    @abstractmethod
    async def read_into(self, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes at `offset` (data). Same rules as read()."""

    async def sibling(self, name: str) -> ImageReader:
        """A reader for another object beside this one (a VMDK descriptor's extent file). Only
        remote sources (S3, HTTP) have siblings; `name` must already be checked to be a bare name."""
        from pipeline.errors import UnsafeImage

        raise UnsafeImage(
            f"the image refers to a separate file {name!r}; extents are only read as sibling objects "
            "of an S3 or HTTP(S) source, never from the local filesystem"
        )


class Decoder(ABC):
    """One image format. Construct with the reader and settings, await open(), then iterate pieces()."""

    format: ClassVar[str]

    def __init__(self, reader: ImageReader, settings: Settings) -> None:
        self.reader = reader
        self.settings = settings
        self.info = ImageInfo(self.format)

    @classmethod
    def trailing_footer(cls, tail: bytes, file_size: int) -> int | None:
        """For a format that is raw guest data plus a footer at the very end (a fixed VHD): given
        the file's last bytes, the guest size, or None if `tail` is not such a footer. Lets a
        sequential source, which learns its end only at EOF, be read as raw and trimmed there.
        Raise CorruptImage / UnsupportedImage for a footer of this format that is refused. Asked
        only when the format's probe declares a `tail` and matches it (stages._trailing_footer)."""
        return None

    @abstractmethod
    async def open(self) -> ImageInfo:
        """Read and validate the header (and whatever must come first); fill and return self.info.
        Must check the virtual size against settings.max_virtual_size."""

    @abstractmethod
    def pieces(self) -> AsyncIterator[Piece]:
        """Pieces in strictly ascending guest order, not overlapping, within [0, virtual_size).
        Gaps read as zeros. May read tables lazily through self.reader as it goes."""

    def check_end(self, file_size: int) -> None:
        """Called once the whole file has passed (sequential sources, whose size may be unknown
        until EOF): refuse what depends on the size (tables that would lie past the end)."""
        return None

    def decode(self, piece: Piece, stored: bytes | memoryview) -> bytes | memoryview:
        """Undo `piece.codec` on its stored bytes; return exactly piece.length bytes, or raise
        CorruptImage. May run in a worker thread: must not touch the reader or mutable state."""
        raise CorruptImage(f"{self.format}: no codec {piece.codec!r}")
