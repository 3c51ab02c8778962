"""What travels between stages after the source: guest extents, then output writes."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.buffers import Chunk


@dataclass(slots=True)
class Extent:
    """`length` bytes of the guest disk at `offset`: bytes of `chunk` from `start`, or zeros if no chunk."""

    offset: int
    length: int
    chunk: Chunk | None = None
    start: int = 0

    def view(self) -> memoryview:
        assert self.chunk is not None
        return memoryview(self.chunk.buf)[self.start : self.start + self.length]


@dataclass(slots=True)
class Batch:
    """Extents in ascending guest order, and the chunks whose release falls to the consumer."""

    extents: list[Extent]
    owned: list[Chunk] = field(default_factory=list)

    def release(self) -> None:
        for c in self.owned:
            c.release()
        self.owned.clear()


@dataclass(slots=True)
class Writes:
    """Output bytes in stream order; an int is that many zero bytes (a hole where the sink can)."""

    items: list[bytes | memoryview | int]
    owned: list[Chunk] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(i if isinstance(i, int) else len(i) for i in self.items)

    def release(self) -> None:
        for c in self.owned:
            c.release()
        self.owned.clear()


@dataclass(slots=True)
class Finish:
    """End of output: `head` goes at offset 0 (the qcow2 header); sizes for the summary."""

    head: bytes
    virtual_size: int
    output_size: int
